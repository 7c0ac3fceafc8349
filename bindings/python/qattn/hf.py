"""Build qattn layers and RoPE tables from Hugging Face `transformers` modules.

`from_hf_attention` turns the attention half of one decoder layer into a
`qattn.Layer`. "Attention half" means, per family (as in transformers 5):

  sequential pre-norm (llama, mistral, qwen2, qwen3, gemma, phi3; gpt_neox with
  use_parallel_residual=False):
      x  ->  x + o_proj(attention(input_layernorm(x)))
  with a post-attention norm (gemma2, gemma3_text):
      x  ->  x + post_attention_layernorm(o_proj(attention(input_layernorm(x))))
      (Gemma's pre_/post_feedforward_layernorm belong to the MLP half.)
  parallel attention + MLP (phi, cohere; gpt_neox with use_parallel_residual=True):
      HF computes x + attn(norm(x)) + mlp(norm'(x)); qattn computes x + attn(norm(x)).
      The MLP reads the layer's *input* x (norm' = input_layernorm for phi and
      cohere, post_attention_layernorm for gpt_neox), which forward2 overwrites in
      place, so keep a copy of x (or compute norm'(x)) before forward2 and add the
      MLP output afterwards. `AttentionInfo.parallel_mlp_norm` names norm'.

The attention itself runs between forward1 and forward2 in the caller's code;
`AttentionInfo` carries what it needs (softmax scale, sliding window, logit
softcap, causality), none of which the library applies.

    layer, info = from_hf_attention(model.model.layers[i], model.config, max_rows=4096, max_seq_len=8192)
    sin, cos = rope_tables_from_hf(model.model, 8192, layer_type=info.layer_type)
    q, k, v = layer.forward1(x, sin=sin, cos=cos, past_len=past)
    ... write k, v into the KV cache; attn = attention(q, cache, scale=info.softmax_scale, ...)
    layer.forward2(x, attn)   # x now holds x + attention half

tests/test_hf_parity.py checks every family above against transformers.
"""
import dataclasses
from typing import Optional

import torch

from .layer import Layer, Norm
from .qmatrix import QMatrix
from .rope import rope_tables


@dataclasses.dataclass(frozen=True)
class _Family:
    attn: str = "self_attn"
    qkv: str = "separate"        # "separate" q/k/v_proj, "neox" per-head fused, "concat" fused [q; k; v]
    o_proj: str = "o_proj"
    head_norms: Optional[tuple] = None   # attribute names of (q, k) head norms, when the model has them
    post_norm: Optional[str] = None      # decoder-layer norm applied to the O projection output
    rope: str = "neox"
    parallel_mlp_norm: Optional[str] = None


_FAMILIES = {
    "llama": _Family(),
    "mistral": _Family(),
    "qwen2": _Family(),
    "qwen3": _Family(head_norms=("q_norm", "k_norm")),
    "gemma": _Family(),
    "gemma2": _Family(post_norm="post_attention_layernorm"),
    "gemma3_text": _Family(head_norms=("q_norm", "k_norm"), post_norm="post_attention_layernorm"),
    "phi": _Family(o_proj="dense", head_norms=("q_layernorm", "k_layernorm"), parallel_mlp_norm="input_layernorm"),
    "phi3": _Family(qkv="concat"),
    "gpt_neox": _Family(attn="attention", qkv="neox", o_proj="dense"),
    "cohere": _Family(rope="gptj", head_norms=("q_norm", "k_norm"), parallel_mlp_norm="input_layernorm"),
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILIES))


@dataclasses.dataclass(frozen=True)
class AttentionInfo:
    """What the attention between forward1 and forward2 must do to match the HF model."""

    model_type: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: Optional[str]            # "neox" or "gptj"
    rotary_dim: int
    softmax_scale: float           # multiply q.k by this (HF `scaling`; Gemma: query_pre_attn_scalar**-0.5)
    causal: bool
    sliding_window: Optional[int]  # attend only to keys with position > query position - sliding_window
    logit_softcap: Optional[float]  # scores = softcap * tanh(scores / softcap) before the mask (Gemma-2)
    parallel_mlp_norm: Optional[str]  # see the module docstring; None for sequential layers
    layer_type: Optional[str]      # HF attention layer type; pass it to rope_tables_from_hf


def _config_value(config, name, default):
    """config.name, or default where it is missing or None (head_dim is None in some configs)."""
    value = getattr(config, name, None)
    return default if value is None else value


def _rope_parameters(config, layer_type):
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    return params


def _fp16(t, name, device):
    """A detached fp16 copy on `device`; fails if a value overflows fp16 (bf16 checkpoints can)."""
    out = t.detach().to(device=device, dtype=torch.float16).contiguous()
    if not torch.isfinite(out).all():
        raise ValueError("%s has values outside the fp16 range (max |value| %.3g); qattn stores weights in fp16"
                         % (name, t.detach().abs().max().item()))
    return out


def _child(module, attr, name):
    child = getattr(module, attr, None)
    if child is None:
        raise ValueError("%s (%s) has no .%s; is the model_type in the config the one of this layer?"
                         % (name, type(module).__name__, attr))
    return child


def _linear(module, name):
    if not isinstance(module, torch.nn.Linear):
        raise TypeError("%s is a %s; from_hf_attention reads dense torch.nn.Linear projections only (build "
                        "quantized ones with qattn.QMatrix.gptq from the checkpoint tensors)"
                        % (name, type(module).__name__))
    return module.weight, module.bias


def _dense(weight, bias, name, device):
    return QMatrix.dense(_fp16(weight, name + ".weight", device),
                         None if bias is None else _fp16(bias, name + ".bias", device))


def _projections(attn, family, num_heads, num_kv_heads, head_dim, device):
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    prefix = family.attn + "."
    if family.qkv == "separate":
        names = [prefix + n for n in ("q_proj", "k_proj", "v_proj")]
        parts = [(_linear(_child(attn, n.split(".")[-1], family.attn), n), n) for n in names]
    else:
        attr = "query_key_value" if family.qkv == "neox" else "qkv_proj"
        name = prefix + attr
        weight, bias = _linear(_child(attn, attr, family.attn), name)
        if weight.shape[0] != q_width + 2 * kv_width:
            raise ValueError("%s has %d output rows; %d query and 2 x %d key/value heads of %d need %d"
                             % (name, weight.shape[0], num_heads, num_kv_heads, head_dim, q_width + 2 * kv_width))
        if family.qkv == "neox":
            # GPT-NeoX interleaves per head: output rows are [head, (q|k|v), D].
            if num_heads != num_kv_heads:
                raise ValueError("%s: GPT-NeoX fused QKV needs num_kv_heads == num_heads" % name)
            w = weight.detach().view(num_heads, 3, head_dim, -1)
            b = None if bias is None else bias.detach().view(num_heads, 3, head_dim)
            split = [(w[:, i].reshape(q_width, -1), None if b is None else b[:, i].reshape(q_width)) for i in range(3)]
        else:
            bounds = (0, q_width, q_width + kv_width, q_width + 2 * kv_width)
            split = [(weight.detach()[lo:hi], None if bias is None else bias.detach()[lo:hi])
                     for lo, hi in zip(bounds, bounds[1:])]
        parts = [(s, "%s[%s]" % (name, p)) for s, p in zip(split, "qkv")]
    mats = [_dense(w, b, n, device) for (w, b), n in parts]
    o_name = prefix + family.o_proj
    mats.append(_dense(*_linear(_child(attn, family.o_proj, family.attn), o_name), o_name, device))
    return mats


def _norm_eps(module, name):
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise ValueError("%s (%s) has no eps / variance_epsilon attribute" % (name, type(module).__name__))


def _norm(module, name, device, shape):
    """Reads an HF norm module into a qattn.Norm, identifying what it computes by
    running it: RMSNorm with weight w, Gemma-style RMSNorm with (1 + w), or LayerNorm
    (optional bias). Class names vary across families; the arithmetic does not."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError("%s (%s) has no weight; qattn norms need one" % (name, type(module).__name__))
    if tuple(weight.shape) not in shape:
        raise ValueError("%s (%s) has weight shape %s; qattn needs %s"
                         % (name, type(module).__name__, list(weight.shape), " or ".join(map(str, map(list, shape)))))
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    eps = _norm_eps(module, name)

    gen = torch.Generator().manual_seed(0)
    probe = torch.randn((4,) + tuple(weight.shape), generator=gen, dtype=torch.float64) * 2.0 + 0.7
    with torch.no_grad():
        got = module(probe.to(device=weight.device, dtype=weight.dtype)).detach().to("cpu", torch.float64)
    x = probe.to(weight.dtype).double()
    w = weight.detach().to("cpu", torch.float64)
    b = None if bias is None else bias.detach().to("cpu", torch.float64)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    centred = x - x.mean(-1, keepdim=True)
    layer = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * w
    candidates = [("rms", rms * w, weight), ("rms", rms * (1.0 + w), 1.0 + weight.detach().double()),
                  ("layer", layer if b is None else layer + b, weight)]
    # fp16/bf16 modules round their output; the candidates differ by O(1).
    tolerance = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    for kind, expected, effective in candidates:
        if torch.linalg.vector_norm(got - expected) <= tolerance * torch.linalg.vector_norm(expected):
            return Norm(kind, _fp16(effective, name + ".weight", device),
                        None if kind == "rms" or bias is None else _fp16(bias, name + ".bias", device),
                        eps=eps, per_head=weight.dim() == 2)
    raise ValueError("%s (%s) computes neither RMSNorm, RMSNorm with (1 + weight) nor LayerNorm over its last "
                     "dimension; qattn cannot express it" % (name, type(module).__name__))


def from_hf_attention(decoder_layer, config, *, device=None, max_rows, max_seq_len, use_graphs=False,
                      residual_fp32=False, scratch=None):
    """Builds the attention half of `decoder_layer` (a transformers decoder layer of
    `config`, one of SUPPORTED_MODEL_TYPES) as a qattn.Layer with dense fp16 weights.

    Returns (layer, info): `info` is an AttentionInfo telling the attention between
    forward1 and forward2 what to do. `device` defaults to the layer's parameter
    device. Weights are copied; the HF module is not modified. `scratch`: a
    qattn.Scratch shared with the model's other layers (see Layer)."""
    model_type = getattr(config, "model_type", None)
    family = _FAMILIES.get(model_type)
    if family is None:
        raise ValueError("model_type %r is not supported by from_hf_attention (supported: %s)"
                         % (model_type, ", ".join(SUPPORTED_MODEL_TYPES)))
    attn = _child(decoder_layer, family.attn, "decoder_layer")
    if device is None:
        device = next(decoder_layer.parameters()).device
    device = torch.device(device)

    hidden = int(config.hidden_size)
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(_config_value(config, "num_key_value_heads", num_heads))
    head_dim = int(_config_value(config, "head_dim", hidden // num_heads))
    layer_type = getattr(attn, "layer_type", None)
    partial = float(_rope_parameters(config, layer_type).get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)  # int() truncates, as transformers does
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError("rotary_dim = int(head_dim %d * partial_rotary_factor %g) = %d must be even and > 0"
                         % (head_dim, partial, rotary_dim))

    mlp_norm = family.parallel_mlp_norm
    if model_type == "gpt_neox" and config.use_parallel_residual:
        mlp_norm = "post_attention_layernorm"

    prefix = family.attn + "."
    q_proj, k_proj, v_proj, o_proj = _projections(attn, family, num_heads, num_kv_heads, head_dim, device)
    input_norm = _norm(_child(decoder_layer, "input_layernorm", "decoder_layer"), "input_layernorm", device,
                       [(hidden,)])
    q_norm = k_norm = None
    if family.head_norms is not None:
        q_mod, k_mod = (getattr(attn, n, None) for n in family.head_norms)
        if q_mod is not None:
            q_norm = _norm(q_mod, prefix + family.head_norms[0], device, [(head_dim,), (num_heads, head_dim)])
        if k_mod is not None:
            k_norm = _norm(k_mod, prefix + family.head_norms[1], device, [(head_dim,), (num_kv_heads, head_dim)])
    post_norm = None
    if family.post_norm is not None:
        post_norm = _norm(_child(decoder_layer, family.post_norm, "decoder_layer"), family.post_norm, device,
                          [(hidden,)])

    layer = Layer(hidden_size=hidden, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, o_proj=o_proj, input_norm=input_norm,
                  q_norm=q_norm, k_norm=k_norm, post_norm=post_norm, rope=family.rope, rotary_dim=rotary_dim,
                  residual_fp32=residual_fp32, max_rows=max_rows, max_seq_len=max_seq_len, use_graphs=use_graphs,
                  scratch=scratch)
    sliding = getattr(attn, "sliding_window", None) if hasattr(attn, "sliding_window") else \
        getattr(config, "sliding_window", None)
    softcap = getattr(attn, "attn_logit_softcapping", None)
    info = AttentionInfo(model_type=model_type, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         rope=family.rope, rotary_dim=rotary_dim, softmax_scale=float(attn.scaling),
                         causal=bool(getattr(attn, "is_causal", True)),
                         sliding_window=None if sliding is None else int(sliding),
                         logit_softcap=None if softcap is None else float(softcap), parallel_mlp_norm=mlp_norm,
                         layer_type=layer_type)
    return layer, info


def _find_rotary_emb(obj):
    if hasattr(obj, "inv_freq") or hasattr(obj, "rope_type"):
        return obj
    found = [m for m in obj.modules() if hasattr(m, "rope_type") and hasattr(m, "original_max_seq_len")]
    if not found:
        raise ValueError("%s holds no Hugging Face rotary embedding module" % type(obj).__name__)
    if len(found) > 1:
        raise ValueError("%s holds %d rotary embeddings (%s); pass the one this layer uses"
                         % (type(obj).__name__, len(found), ", ".join(type(m).__name__ for m in found)))
    return found[0]


def rope_tables_from_hf(model_or_rotary_emb, max_positions, device=None, *, layer_type=None):
    """(sin, cos) fp32 [max_positions, rotary_dim / 2] for qattn from an HF rotary
    embedding (or a model holding exactly one): its inv_freq and attention_scaling,
    so any static rope scaling (linear, NTK, YaRN, llama3, ...) carries over.
    `layer_type` (AttentionInfo.layer_type) picks the per-type tables of models
    such as Gemma-3 ("sliding_attention" / "full_attention"); embeddings with one
    set of tables ignore it."""
    rotary = _find_rotary_emb(model_or_rotary_emb)
    per_type = isinstance(getattr(rotary, "rope_type", None), dict)
    if per_type and layer_type not in rotary.rope_type:
        raise ValueError("%s has tables per layer type (%s); pass layer_type=one of them, got %r"
                         % (type(rotary).__name__, ", ".join(rotary.rope_type), layer_type))
    if not per_type:
        layer_type = None
    prefix = "" if layer_type is None else layer_type + "_"
    inv_freq = getattr(rotary, prefix + "original_inv_freq", None)
    if inv_freq is None:
        inv_freq = getattr(rotary, prefix + "inv_freq", None)
    if inv_freq is None:
        raise ValueError("%s has no %sinv_freq%s" % (type(rotary).__name__, prefix,
                                                     "" if layer_type else " (pass layer_type=...?)"))
    scaling = getattr(rotary, prefix + "attention_scaling", 1.0)
    rope_type = rotary.rope_type if layer_type is None else rotary.rope_type[layer_type]
    # Dynamic NTK and LongRoPE recompute inv_freq from the whole sequence's length
    # once it passes the original context, which no fixed table can follow; below
    # that length they use original_inv_freq, which is what the table holds.
    if "dynamic" in rope_type or rope_type == "longrope":
        params = _rope_parameters(rotary.config, layer_type)
        limit = params.get("original_max_position_embeddings", rotary.original_max_seq_len) \
            if rope_type == "longrope" else rotary.original_max_seq_len
        if max_positions > limit:
            raise ValueError("rope_type %r changes its frequencies past %d positions, depending on the sequence "
                             "length; a fixed table covers max_positions <= %d only (got %d)"
                             % (rope_type, limit, limit, max_positions))
    if device is None:
        device = inv_freq.device
    return rope_tables(inv_freq, max_positions, attention_scaling=float(scaling), device=device)
