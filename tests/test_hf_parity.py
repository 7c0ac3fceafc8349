"""Parity of qattn layers built by qattn.hf with the Hugging Face modelling code.

For each family a tiny random model (2 layers, hidden 256, 4 heads, 2 KV heads
where the family allows GQA, head_dim 64) is built from its config. qattn runs
forward1 -> attention (torch, over a contiguous fp16 KV cache) -> forward2 on
layer 0; the reference is the model itself in float64 with layer 0's MLP
removed, read at hidden_states[1]: exactly HF's attention half (the residual
wiring, post-norms, masks and RoPE are HF's own code, not re-implemented here).

Schedule, with per-sequence lengths 12 and 15: a batched prefill of 9 tokens,
a 3-token chunk for sequence 1 alone at past_len 9, then 3 batched decode steps
with past_lens = [9 + i, 12 + i]. Every produced row is compared with the HF
row at the same position.

Tolerance. fp16 rounding (unit roundoff 2^-11 = 4.9e-4) enters through the
weights (rounded once), q/k/v, the attention output and the stored residual;
the measured error of the attention contribution (out - x against ref - x) is
6e-4 to 1.3e-3 (CPU backend; 7e-4 to 1.2e-3 with the CUDA backend on an H100),
so it must stay below 5e-3, and the whole output (x plus that contribution, x
itself exact) below 2.5e-3 (measured 3.5e-4 to 1.2e-3).
Each parity check is shown to be able to fail: the same pipeline with RoPE
turned off (identity tables), or with the decode positions of the two
sequences swapped (judged on the decode rows), must miss by more than 10x the
tolerance; measured 0.11 to 0.68, i.e. 22x to 130x.
"""
import copy

import pytest
import torch

import qattn
from hf_model import attention_half, randomize
from qattn.hf import from_hf_attention, rope_tables_from_hf

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 256, 4, 2, 64
PREFIX, CHUNK, STEPS = 9, 3, 3
LENGTHS = (PREFIX + STEPS, PREFIX + CHUNK + STEPS)  # 12 and 15 tokens
TOTAL = max(LENGTHS)
MAX_SEQ = 16
DELTA_TOL = 5e-3
OUTPUT_TOL = 2.5e-3
CONTROL_FACTOR = 10

_COMMON = dict(hidden_size=HIDDEN, intermediate_size=384, num_hidden_layers=2, num_attention_heads=HEADS,
               vocab_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_GQA = dict(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)

# What each case exercises is in its comment; all run the same schedule.
CASES = {
    # Attention biases, and llama3 rope scaling (frequency-dependent inv_freq).
    "llama": ("LlamaConfig", dict(_GQA, attention_bias=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    # Sliding window read from the config (the attention module has no attribute).
    "mistral": ("MistralConfig", dict(_GQA, sliding_window=7)),
    # Q/K/V biases without an O bias, YaRN (attention_scaling != 1 in the tables).
    "qwen2": ("Qwen2Config", dict(_GQA, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    # RMS head norms over head_dim, one weight shared by all heads.
    "qwen3": ("Qwen3Config", dict(_GQA)),
    # Gemma RMSNorm multiplies by (1 + weight).
    "gemma": ("GemmaConfig", dict(_GQA)),
    # Post-attention norm, query_pre_attn_scalar != head_dim, logit softcapping,
    # and a sliding window shorter than the sequences on layer 0.
    "gemma2": ("Gemma2Config", dict(_GQA, query_pre_attn_scalar=48, attn_logit_softcapping=5.0,
                                    sliding_window=5, layer_types=["sliding_attention", "full_attention"])),
    # LayerNorm with bias, LayerNorm head norms, half rotary, parallel MLP; no GQA.
    "phi": ("PhiConfig", dict(num_key_value_heads=HEADS, qk_layernorm=True,
                              rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                   partial_rotary_factor=0.5))),
    # Q/K head norms with (1 + weight), post-norm, per-layer-type rope bases.
    "gemma3_text": ("Gemma3TextConfig", dict(_GQA, query_pre_attn_scalar=32, sliding_window=6,
                                             layer_types=["sliding_attention", "full_attention"])),
    # Fused [q; k; v] projection.
    "phi3": ("Phi3Config", dict(num_key_value_heads=KV_HEADS)),
    # Per-head interleaved fused QKV, quarter rotary, parallel residual; no GQA.
    "gpt_neox": ("GPTNeoXConfig", dict(attention_bias=True, use_parallel_residual=True,
                                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            partial_rotary_factor=0.25))),
    # GPT-J interleaved rope, bias-free LayerNorm, per-head [heads, D] head norms.
    "cohere": ("CohereConfig", dict(num_key_value_heads=KV_HEADS, use_qk_norm=True)),
}


def _build(case, gen):
    config_name, extra = CASES[case]
    config = getattr(transformers, config_name)(**_COMMON, **extra)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    randomize(model, gen)
    return model, config


def _attend(q, cache_k, cache_v, b, past, info):
    """Attention of q [q_len, NH, D] (positions past..) over sequence b of the cache, as
    the HF eager path does it: scale, softcap, causal and sliding-window mask, GQA."""
    q_len, total = q.shape[0], past + q.shape[0]
    rep = info.num_heads // info.num_kv_heads
    k = cache_k[b, :total].float().repeat_interleave(rep, dim=1).transpose(0, 1)
    v = cache_v[b, :total].float().repeat_interleave(rep, dim=1).transpose(0, 1)
    qf = q.float().transpose(0, 1)
    q_pos = torch.arange(past, total, device=q.device)[:, None]
    k_pos = torch.arange(total, device=q.device)[None, :]
    allowed = k_pos <= q_pos
    if info.sliding_window is not None:
        allowed &= k_pos > q_pos - info.sliding_window
    if info.logit_softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(qf, k, v, attn_mask=allowed, scale=info.softmax_scale)
    else:
        scores = qf @ k.transpose(-1, -2) * info.softmax_scale
        scores = info.logit_softcap * torch.tanh(scores / info.logit_softcap)
        out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    return out.transpose(0, 1).to(torch.float16)


def _run_qattn(layer, info, x, sin, cos, device, control=None):
    """The schedule of the module docstring; returns the outputs [batch, TOTAL, H]
    (NaN where a row is not produced). `control` injects a deliberate bug."""
    if control == "rope_off":
        sin, cos = torch.zeros_like(sin), torch.ones_like(cos)
    x = x.to(device)  # fp16, or fp32 for a residual_fp32 layer
    cache_k = torch.full((2, MAX_SEQ, info.num_kv_heads, info.head_dim), float("nan"), dtype=torch.float16,
                         device=device)
    cache_v = torch.full_like(cache_k, float("nan"))
    got = torch.full(x.shape, float("nan"), dtype=torch.float64)

    def step(rows, batch_index, past_lens):
        """rows: [batch, q_len, H] fp16; sequence batch_index[i] at past_lens[i]."""
        chunk = rows.clone()
        positions = torch.tensor(past_lens, dtype=torch.int32, device=device)
        if control == "swap_past_lens" and len(past_lens) == 2 and chunk.shape[1] == 1:
            positions = positions.flip(0)
        q, k, v = layer.forward1(chunk, sin=sin, cos=cos, past_lens=positions)
        attn = torch.empty_like(q)
        for i, (b, past) in enumerate(zip(batch_index, past_lens)):
            cache_k[b, past:past + chunk.shape[1]] = k[i]
            cache_v[b, past:past + chunk.shape[1]] = v[i]
            attn[i] = _attend(q[i], cache_k, cache_v, b, past, info)
        layer.forward2(chunk, attn)
        for i, (b, past) in enumerate(zip(batch_index, past_lens)):
            got[b, past:past + chunk.shape[1]] = chunk[i].double().cpu()

    step(x[:, :PREFIX], [0, 1], [0, 0])
    step(x[1:2, PREFIX:PREFIX + CHUNK], [1], [PREFIX])
    for i in range(STEPS):
        ends = [PREFIX + i, PREFIX + CHUNK + i]
        step(torch.stack([x[0, ends[0]], x[1, ends[1]]])[:, None], [0, 1], ends)
    return got


def _errors(got, ref, x, last=None):
    """(relative error of the whole output, of the attention contribution) over the
    produced rows, or over the `last` rows of each sequence."""
    valid = torch.zeros(got.shape[:2], dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        valid[b, n - (last or n):n] = True
    assert not torch.isnan(got[valid]).any(), "some produced row is NaN"
    g, r, x = got[valid], ref[valid], x.double()[valid]

    def rel(a, b):
        return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()

    return rel(g, r), rel(g - x, r - x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_half_matches_hf(case, device):
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    model, config = _build(case, gen)
    x = torch.randn(2, TOTAL, HIDDEN, generator=gen).to(torch.float16)
    ref = attention_half(model, x)

    layer, info = from_hf_attention(model.layers[0], config, device=device, max_rows=32, max_seq_len=MAX_SEQ)
    with layer:
        assert (info.num_heads, info.head_dim) == (HEADS, HEAD_DIM) and info.causal
        sin, cos = rope_tables_from_hf(model, MAX_SEQ, device, layer_type=info.layer_type)
        assert sin.shape == (MAX_SEQ, info.rotary_dim // 2)

        out_err, delta_err = _errors(_run_qattn(layer, info, x, sin, cos, device), ref, x)
        print("%s on %s: output rel err %.2e, attention-contribution rel err %.2e" % (case, device, out_err,
                                                                                    delta_err))
        assert delta_err < DELTA_TOL, "attention contribution differs from HF by %.2e" % delta_err
        assert out_err < OUTPUT_TOL, "layer output differs from HF by %.2e" % out_err

        # Swapped past_lens only touch the decode rows; RoPE off touches every row.
        for control, rows in (("rope_off", None), ("swap_past_lens", STEPS)):
            _, wrong = _errors(_run_qattn(layer, info, x, sin, cos, device, control=control), ref, x, rows)
            assert wrong > CONTROL_FACTOR * DELTA_TOL, (
                "with the deliberate bug %r the check still passes (error %.2e): it could not catch it"
                % (control, wrong))


def test_layers_of_a_model_share_a_scratch(device):
    """Two decoder layers built with one qattn.Scratch (as a whole model's would be)
    run in turn, the first again after the second, each matching its own HF layer."""
    built = [_build("qwen3", torch.Generator().manual_seed(seed)) for seed in (11, 12)]
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, TOTAL, HIDDEN, generator=gen).to(torch.float16)
    scratch = qattn.Scratch(device)
    layers = [from_hf_attention(model.layers[0], config, device=device, max_rows=32, max_seq_len=MAX_SEQ,
                                scratch=scratch) for model, config in built]
    scratch.close()  # the layers keep what they share
    try:
        for i in (0, 1, 0):
            model, _ = built[i]
            layer, info = layers[i]
            sin, cos = rope_tables_from_hf(model, MAX_SEQ, device, layer_type=info.layer_type)
            out_err, delta_err = _errors(_run_qattn(layer, info, x, sin, cos, device), attention_half(model, x), x)
            assert delta_err < DELTA_TOL and out_err < OUTPUT_TOL, (i, out_err, delta_err)
    finally:
        for layer, _ in layers:
            layer.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(device, dtype):
    """A model already in fp16 or bf16 converts (its norms are identified on half-precision
    modules, bf16 weights are exact in fp16), and the per-family facts come out right.
    The reference is that model's own weights in float64."""
    gen = torch.Generator().manual_seed(7)
    model, config = _build("gpt_neox", gen)
    model = model.to(dtype)
    x = torch.randn(2, TOTAL, HIDDEN, generator=gen).to(torch.float16)
    ref = attention_half(model, x)
    layer, info = from_hf_attention(model.layers[0], config, device=device, max_rows=32, max_seq_len=MAX_SEQ)
    with layer:
        assert info.parallel_mlp_norm == "post_attention_layernorm"
        assert info.num_kv_heads == HEADS and info.rotary_dim == HEAD_DIM // 4 and info.rope == "neox"
        sin, cos = rope_tables_from_hf(model.rotary_emb, MAX_SEQ, device)
        out_err, delta_err = _errors(_run_qattn(layer, info, x, sin, cos, device), ref, x)
        assert delta_err < DELTA_TOL and out_err < OUTPUT_TOL, (out_err, delta_err)


@pytest.mark.parametrize("case", ["phi", "cohere", "gpt_neox"])
def test_parallel_mlp_norm_names_the_mlp_input(case):
    """For parallel attention + MLP layers, HF's whole layer is qattn's attention half
    plus mlp(norm'(x)) with norm' = info.parallel_mlp_norm, applied to the layer input."""
    gen = torch.Generator().manual_seed(5)
    model, config = _build(case, gen)
    x = torch.randn(2, TOTAL, HIDDEN, generator=gen, dtype=torch.float64)
    half = attention_half(model, x)
    full_model = copy.deepcopy(model).double()
    with torch.no_grad():
        full = full_model(inputs_embeds=x, output_hidden_states=True, use_cache=False).hidden_states[1]
    layer, info = from_hf_attention(model.layers[0], config, max_rows=8, max_seq_len=8)
    layer.close()
    block = full_model.layers[0]
    with torch.no_grad():
        expected = half + block.mlp(getattr(block, info.parallel_mlp_norm)(x))
    assert (torch.linalg.vector_norm(full - expected) / torch.linalg.vector_norm(full)).item() < 1e-12


def test_fp32_residual(device):
    """residual_fp32 carries through: x and the output stay fp32."""
    gen = torch.Generator().manual_seed(11)
    model, config = _build("qwen3", gen)
    x = torch.randn(2, TOTAL, HIDDEN, generator=gen)
    ref = attention_half(model, x)
    layer, info = from_hf_attention(model.layers[0], config, device=device, max_rows=32, max_seq_len=MAX_SEQ,
                                    residual_fp32=True)
    with layer:
        sin, cos = rope_tables_from_hf(model, MAX_SEQ, device)
        out_err, delta_err = _errors(_run_qattn(layer, info, x, sin, cos, device), ref, x)
        # The fp32 output is not rounded to fp16, so the whole output is closer than
        # with an fp16 residual (measured 3.2e-4 against 3.5e-4 to 1.2e-3 at fp16).
        assert delta_err < DELTA_TOL and out_err < OUTPUT_TOL, (out_err, delta_err)


def test_unsupported_inputs_are_named():
    gen = torch.Generator().manual_seed(3)
    model, config = _build("llama", gen)
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        from_hf_attention(model.layers[0], transformers.BertConfig(), max_rows=8, max_seq_len=8)
    with pytest.raises(ValueError, match=r"decoder_layer \(GPTNeoXLayer\) has no .self_attn"):
        from_hf_attention(_build("gpt_neox", gen)[0].layers[0], config, max_rows=8, max_seq_len=8)
    model.layers[0].self_attn.k_proj = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"self_attn\.k_proj is a Identity"):
        from_hf_attention(model.layers[0], config, max_rows=8, max_seq_len=8)
    with pytest.raises(ValueError, match="changes its frequencies past"):
        dyn = transformers.LlamaConfig(**_COMMON, **_GQA, rope_parameters=dict(
            rope_type="dynamic", rope_theta=10000.0, factor=2.0))
        rope_tables_from_hf(transformers.AutoModel.from_config(dyn), 128)
