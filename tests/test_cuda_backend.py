"""The CUDA backend against the CPU backend of the same library: identical random
weights and inputs go to a CPU layer and a CUDA layer, and the outputs must agree
within fp16 tolerance. Covers both weight formats at decode (tensor-core GEMV) and
prefill (dequantize + cuBLAS) row counts, every layer feature, graphs, capture in
torch.cuda.graph, concurrent streams and device-side position checks."""
import dataclasses
import os
import pathlib
import subprocess
import sys
from typing import Optional

import pytest
import torch

import qattn
import quant

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or qattn.cuda_device_count() == 0,
    reason="needs a CUDA device and a qattn build with the CUDA backend",
)

# The CPU backend multiplies fp32 activations by fp32 weights; the CUDA backend
# rounds the normed activations and the dequantized weights to fp16 and
# accumulates in fp32. Outputs are fp16. Two or three fp16 roundings: ~1e-3.
TOL = 3e-3
CUDA = torch.device("cuda", 0)


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm()).item()


@dataclasses.dataclass
class Spec:
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    # "dense", "gptq4", "gptq4_act", "gptq4_act_shared", "gptq4_noidx", "gptq4_z0", "gptq4_g32", "gptq8",
    # "gptq4_g128", "gptq4_g128_act_shared"
    weights: str = "gptq4"
    input_norm: Optional[str] = "rms"  # None, "rms", "layer", "layer_bias"
    head_norm: Optional[str] = None  # None, "rms", "layer_bias_per_head"
    rope: Optional[str] = "neox"
    rotary_dim: Optional[int] = None
    post_norm: Optional[str] = None
    has_residual: bool = True
    residual_fp32: bool = False
    biases: bool = False
    max_rows: int = 32
    max_seq_len: int = 2048
    use_graphs: bool = False


def _gptq_options(kind):
    return {
        "gptq4": dict(bits=4, group_size=64),
        "gptq4_act": dict(bits=4, group_size=64, act_order=True),
        "gptq4_act_shared": dict(bits=4, group_size=64, act_order=True),
        "gptq4_noidx": dict(bits=4, group_size=64),
        "gptq4_z0": dict(bits=4, group_size=128, act_order=True, zero_offset_one=False),
        "gptq4_g32": dict(bits=4, group_size=32, act_order=True),
        "gptq8": dict(bits=8, group_size=64, act_order=True),
        "gptq4_g128": dict(bits=4, group_size=128),
        "gptq4_g128_act_shared": dict(bits=4, group_size=128, act_order=True),
    }[kind]


class Pair:
    """The same layer on the CPU and on the GPU."""

    def __init__(self, spec, gen):
        self.spec = spec
        H, NH, NKV, D = spec.hidden, spec.heads, spec.kv_heads, spec.head_dim
        mats = {"cpu": {}, "cuda": {}}
        # *act_shared: q, k and v share one act-order g_idx, as in GPTQ
        # checkpoints (one input, quantized together): one packed row order.
        shared_g_idx = None
        for name, (k, n) in {"q": (H, NH * D), "k": (H, NKV * D), "v": (H, NKV * D), "o": (NH * D, H)}.items():
            bias = (0.5 * torch.randn(n, generator=gen)).half() if spec.biases else None
            if spec.weights == "dense":
                w = (torch.randn(n, k, generator=gen) / k**0.5).half()
                for dev in ("cpu", "cuda"):
                    mats[dev][name] = qattn.QMatrix.dense(w.to(dev), None if bias is None else bias.to(dev))
            else:
                g = quant.random_gptq(k, n, generator=gen, **_gptq_options(spec.weights),
                                      g_idx=shared_g_idx if name in ("k", "v") else None)
                if spec.weights.endswith("act_shared") and name == "q":
                    shared_g_idx = g["g_idx"]
                g_idx = None if spec.weights == "gptq4_noidx" else g["g_idx"]
                for dev in ("cpu", "cuda"):
                    mats[dev][name] = qattn.QMatrix.gptq(
                        g["qweight"].to(dev), g["qzeros"].to(dev), g["scales"].to(dev),
                        None if g_idx is None else g_idx.to(dev), None if bias is None else bias.to(dev),
                        bits=g["bits"], group_size=g["group_size"], zero_offset_one=g["zero_offset_one"])
        norms = {
            "input_norm": self._norm(spec.input_norm, (H,), gen),
            "q_norm": self._norm(spec.head_norm, (NH, D) if _per_head(spec.head_norm) else (D,), gen),
            "k_norm": self._norm(spec.head_norm, (NKV, D) if _per_head(spec.head_norm) else (D,), gen),
            "post_norm": self._norm(spec.post_norm, (H,), gen),
        }
        self.rotary_dim = spec.rotary_dim or D
        self.layers = {}
        for dev in ("cpu", "cuda"):
            kwargs = {name: None if n is None else dataclasses.replace(n, weight=n.weight.to(dev),
                                                                      bias=None if n.bias is None else n.bias.to(dev))
                      for name, n in norms.items()}
            self.layers[dev] = qattn.Layer(
                hidden_size=H, num_heads=NH, num_kv_heads=NKV, head_dim=D,
                q_proj=mats[dev]["q"], k_proj=mats[dev]["k"], v_proj=mats[dev]["v"], o_proj=mats[dev]["o"],
                rope=spec.rope, rotary_dim=spec.rotary_dim, has_residual=spec.has_residual,
                residual_fp32=spec.residual_fp32, max_rows=spec.max_rows, max_seq_len=spec.max_seq_len,
                use_graphs=spec.use_graphs and dev == "cuda", **kwargs)
        inv = qattn.default_inv_freq(self.rotary_dim)
        self.tables = {dev: qattn.rope_tables(inv, spec.max_seq_len, device=dev) for dev in ("cpu", "cuda")}

    @staticmethod
    def _norm(kind, shape, gen):
        if kind is None:
            return None
        weight = (1.0 + 0.5 * torch.randn(shape, generator=gen)).half()
        bias = (0.3 * torch.randn(shape, generator=gen)).half() if "bias" in kind else None
        return qattn.Norm(kind.split("_")[0], weight, bias, eps=1e-5, per_head=_per_head(kind))

    def inputs(self, batch, q_len, gen):
        dtype = torch.float32 if self.spec.residual_fp32 else torch.float16
        x = (2.0 * torch.randn(batch, q_len, self.spec.hidden, generator=gen)).to(dtype)
        attn = torch.randn(batch, q_len, self.spec.heads, self.spec.head_dim, generator=gen).half()
        return x, attn

    def forward1(self, dev, x, **kwargs):
        sin, cos = self.tables[dev]
        if self.spec.rope is None:
            sin = cos = None
        if kwargs.get("past_lens") is not None:
            kwargs["past_lens"] = kwargs["past_lens"].to(dev)
        return self.layers[dev].forward1(x.to(dev), sin=sin, cos=cos, **kwargs)

    def forward2(self, dev, x, attn, **kwargs):
        return self.layers[dev].forward2(x.to(dev).clone(), attn.to(dev), **kwargs)

    def check(self, batch, q_len, gen, *, past_len=0, past_lens=None, loras=()):
        x, attn = self.inputs(batch, q_len, gen)
        ref = self.forward1("cpu", x, past_len=past_len, past_lens=past_lens, loras=loras)
        out = self.forward1("cuda", x, past_len=past_len, past_lens=past_lens, loras=loras)
        torch.cuda.synchronize()
        for name, o, r in zip("qkv", out, ref):
            assert rel_err(o, r) < TOL, "%s: relative error %.2e" % (name, rel_err(o, r))
        y_ref = self.forward2("cpu", x, attn, loras=loras)
        y = self.forward2("cuda", x, attn, loras=loras)
        torch.cuda.synchronize()
        # With a residual, compare the block's contribution, not the (large) residual.
        base = x.double() if self.spec.has_residual else torch.zeros_like(x, dtype=torch.float64)
        err = rel_err(y.cpu().double() - base, y_ref.double() - base)
        assert err < TOL, "forward2: relative error %.2e" % err


def _per_head(kind):
    return kind is not None and "per_head" in kind


WEIGHTS = ["dense", "gptq4", "gptq4_act", "gptq4_act_shared", "gptq4_noidx", "gptq4_z0", "gptq4_g32", "gptq8"]
ROWS = [(1, 1), (3, 1), (8, 1), (12, 1), (16, 1), (4, 8), (2, 50), (1, 600)]  # 1, 3, 8, 12, 16, 32, 100, 600 rows


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("batch,q_len", ROWS)
def test_projections_match_cpu(weights, batch, q_len, gen):
    pair = Pair(Spec(weights=weights, max_rows=batch * q_len, biases=True), gen)
    pair.check(batch, q_len, gen, past_len=3)


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(128, 4, 1), (32, 8, 2), (64, 6, 3), (96, 4, 2)])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("residual_fp32", [False, True])
def test_decode_epilogue_in_gemm_over_repeated_calls(head_dim, heads, kv_heads, rows, residual_fp32, gen):
    # Up to 16 rows the GEMM finishes the phase: its split-K blocks as a thread
    # block cluster (sm_90), or up to 8 rows the last block per column range,
    # which resets its arrival counter (beyond: the separate kernels). Every call
    # of a sequence must be right, not only the first. Head dims that divide the
    # 128-column range (one head, four, two, with a range holding only half its
    # columns for 3 KV heads of 64) and one that does not (96: separate kernel).
    spec = Spec(hidden=256, heads=heads, kv_heads=kv_heads, head_dim=head_dim, weights="gptq4_act",
                head_norm="rms", biases=True, residual_fp32=residual_fp32, max_rows=16)
    pair = Pair(spec, gen)
    for step in range(4):
        pair.check(rows, 1, gen, past_len=100 * step + rows)


@pytest.mark.parametrize("rows", [1, 8, 16, 40])
@pytest.mark.parametrize("input_norm", [None, "rms"])
def test_inputs_read_in_place_or_gathered(rows, input_norm, gen):
    # Without act-order the packed row order is the input order, so the
    # projections read x and attn_out where they lie, but only when they are
    # aligned for 16-byte loads; one element off, they must be gathered instead.
    pair = Pair(Spec(weights="gptq4", input_norm=input_norm, max_rows=40, biases=True), gen)
    x, attn = pair.inputs(rows, 1, gen)
    ref_q = pair.forward1("cpu", x, past_len=3)
    ref_y = pair.forward2("cpu", x, attn)
    for offset in (0, 1):
        xs = torch.empty(x.numel() + 8, dtype=x.dtype, device=CUDA)
        xo = xs[offset:offset + x.numel()].view(x.shape)
        xo.copy_(x)
        attns = torch.empty(attn.numel() + 8, dtype=attn.dtype, device=CUDA)
        ao = attns[offset:offset + attn.numel()].view(attn.shape)
        ao.copy_(attn)
        sin, cos = pair.tables["cuda"]
        out = pair.layers["cuda"].forward1(xo, sin=sin, cos=cos, past_len=3)
        y = pair.layers["cuda"].forward2(xo.clone(), ao)
        torch.cuda.synchronize()
        for name, o, r in zip("qkv", out, ref_q):
            assert rel_err(o, r) < TOL, "%s, offset %d" % (name, offset)
        assert rel_err(y.cpu().double() - x.double(), ref_y.double() - x.double()) < TOL, "offset %d" % offset


# Up to 4 rows with K <= 4096 (here 4096 for Q|K|V, 512 for O: warps left
# without chunks) and no head norms a block of the decode GEMM owns
# 16 columns over the whole K and finishes them, NeoX partners paired into it:
# full and partial rotary parts (pass-through tiles after them in twos), GPT-J,
# none; rotary_dim 40 leaves the NeoX halves off a tile pair (the split-K
# kernels then); 5 rows go back to those too. Every row count up to 4 has a
# kernel of its own. Biases, and the O projection's residual in fp16 and fp32.
@pytest.mark.parametrize("rope,rotary_dim", [("neox", None), ("neox", 96), ("neox", 48), ("neox", 40),
                                             ("gptj", 64), (None, None)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("residual_fp32", [False, True])
def test_decode_columns_over_the_whole_k(rope, rotary_dim, rows, residual_fp32, gen):
    spec = Spec(hidden=4096, heads=4, kv_heads=2, head_dim=128, rope=rope, rotary_dim=rotary_dim, biases=True,
                residual_fp32=residual_fp32, max_rows=8)
    pair = Pair(spec, gen)
    for step in range(2):
        pair.check(rows, 1, gen, past_len=4 + step)


@pytest.mark.parametrize("batch,q_len", [(1, 1), (8, 4), (3, 40)])
def test_uneven_shapes_pad_groups(batch, q_len, gen):
    # K = 200 is not a multiple of 128 and group 6 holds only 8 rows: the packed
    # layout pads groups and chunks, which must contribute nothing.
    spec = Spec(hidden=200, heads=5, kv_heads=1, head_dim=40, weights="gptq4_g32", max_rows=120,
                head_norm="rms")
    Pair(spec, gen).check(batch, q_len, gen, past_len=5)


@pytest.mark.parametrize("weights", ["gptq4", "gptq4_act"])
def test_large_matrices_dequantized_in_slices(weights, gen):
    # The large-row path dequantizes a packed matrix a bounded slice of columns
    # at a time into its scratch (16 Mi elements): Q (4096 x 8192) and O (8192 x
    # 4096) take several slices each, K and V one. Two calls in a row: the
    # second one's first slice must not overwrite what the first one's last GEMM
    # still reads.
    spec = Spec(hidden=4096, heads=64, kv_heads=8, head_dim=128, weights=weights, max_rows=40)
    pair = Pair(spec, gen)
    for step in range(2):
        pair.check(1, 40, gen, past_len=11 * step)


def test_decode_at_llama3_8b_widths(gen):
    # The production shape of the bench: which way the GEMM finishes the phase
    # depends on how many clusters of its split-K blocks the card holds at once
    # (the H200 holds 45 of the 48 that one row needs, so there the last block
    # of each column range finishes it; small test layers always fit). 1 and 8
    # rows finish in the GEMM, 16 in clusters or by the separate kernels.
    spec = Spec(hidden=4096, heads=32, kv_heads=8, head_dim=128, weights="gptq4_act_shared", max_rows=16,
                head_norm="rms", biases=True)
    pair = Pair(spec, gen)
    for rows in (1, 8, 16):
        for step in range(2):
            pair.check(rows, 1, gen, past_len=3 + step)


def test_sixteen_rows_with_a_short_last_k_slice(gen):
    # 9-16 rows of Llama-3-8B's Q|K|V widths take blocks of up to 3 chunks (at 3
    # the weights roll through two register slots, each reloaded when its chunk
    # is done); K = 3200 is 25 chunks, so the last K slice of each column range
    # is shorter than the rest and the rolled loop ends on an odd chunk.
    spec = Spec(hidden=3200, heads=32, kv_heads=8, head_dim=128, max_rows=16, biases=True)
    pair = Pair(spec, gen)
    for rows in (9, 16):
        for step in range(2):
            pair.check(rows, 1, gen, past_len=3 + step)


def test_decode_with_weights_streamed_through_shared_memory(gen):
    # Llama-3-70B-like widths (K = 8192: 64 chunks a column): the register
    # variant of the swapped kernel would take more than two waves, so the
    # weights stream through a cp.async pipeline in shared memory instead, with
    # one x tile (1 row) and two (16 rows). Two calls each: the accumulators and
    # counters must be clean again after each.
    spec = Spec(hidden=8192, heads=64, kv_heads=8, head_dim=128, weights="gptq4_act", max_rows=16)
    pair = Pair(spec, gen)
    for rows in (1, 16):
        for step in range(2):
            pair.check(rows, 1, gen, past_len=5 + step)


FEATURES = {
    "layer_norm_bias": dict(input_norm="layer_bias"),
    "no_input_norm": dict(input_norm=None),
    "head_norm_rms": dict(head_norm="rms"),
    "head_norm_layer_per_head": dict(head_norm="layer_bias_per_head"),
    "gptj": dict(rope="gptj"),
    "partial_neox": dict(rope="neox", rotary_dim=32),
    "partial_gptj": dict(rope="gptj", rotary_dim=16),
    "no_rope": dict(rope=None),
    "post_norm_rms": dict(post_norm="rms"),
    "post_norm_layer_bias": dict(post_norm="layer_bias"),
    "no_residual": dict(has_residual=False),
    "fp32_residual": dict(residual_fp32=True),
    "fp32_residual_no_norm": dict(residual_fp32=True, input_norm=None),
    "everything": dict(input_norm="layer_bias", head_norm="layer_bias_per_head", post_norm="layer_bias",
                       biases=True, rope="gptj", rotary_dim=48, residual_fp32=True),
}


# 2, 100 and 300 rows: the small-row path, then the large-row path with the head
# epilogue's kernel per (row, head) and, from 128 rows, its kernel per row.
@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("weights", ["dense", "gptq4_act"])
@pytest.mark.parametrize("batch,q_len", [(2, 1), (2, 50), (3, 100)])
def test_features_match_cpu(feature, weights, batch, q_len, gen):
    spec = Spec(weights=weights, max_rows=batch * q_len, **FEATURES[feature])
    Pair(spec, gen).check(batch, q_len, gen, past_len=7)


def _adapters(pair, gen, layout):
    """layout: {id: {proj: rank}} -> qattn.LoRA list for the CPU and the CUDA layer."""
    H, NH, NKV, D = pair.spec.hidden, pair.spec.heads, pair.spec.kv_heads, pair.spec.head_dim
    widths = {"q": (H, NH * D), "k": (H, NKV * D), "v": (H, NKV * D), "o": (NH * D, H)}
    out = {"cpu": [], "cuda": []}
    for lora_id, projs in layout.items():
        for proj, rank in projs.items():
            fan_in, fan_out = widths[proj]
            a = (torch.randn(fan_in, rank, generator=gen) / fan_in**0.5).half()
            b = (0.5 * torch.randn(rank, fan_out, generator=gen) / rank**0.5).half()
            for dev in out:
                out[dev].append(qattn.LoRA(lora_id, proj, a.to(dev), b.to(dev)))
    return out


# The head epilogue's kernel per row takes heads of 8 times a power of two
# elements and NeoX pairs of 8 times one; other shapes fall back to the kernel
# per (row, head). 300 rows, both kinds, with head norms and biases.
@pytest.mark.parametrize("head_dim,rope,rotary_dim,head_norm", [
    (256, "neox", None, "rms"),                   # 32 threads a head
    (128, "neox", 96, "layer_bias_per_head"),     # 48 pairs: fallback
    (96, "neox", None, "rms"),                    # 12 threads a head: fallback
    (128, "gptj", 40, "rms"),                     # 40 % 8 == 0: per row
    (128, "gptj", 36, None),                      # GPT-J pairs split a piece: fallback
])
def test_prefill_head_shapes_match_cpu(head_dim, rope, rotary_dim, head_norm, gen):
    spec = Spec(hidden=256, heads=4, kv_heads=2, head_dim=head_dim, rope=rope, rotary_dim=rotary_dim,
                head_norm=head_norm, biases=True, max_rows=300)
    Pair(spec, gen).check(3, 100, gen, past_len=7)


# Wide rows give the per-row kernel's threads 4 pieces (64 + 2 x 8 heads of 128:
# 1280 a row, as Llama-3-70B) or 8 (128 + 2 x 8: 2304).
@pytest.mark.parametrize("heads", [64, 128])
def test_prefill_head_epilogue_of_wide_rows(heads, gen):
    spec = Spec(hidden=256, heads=heads, kv_heads=8, head_dim=128, head_norm="rms", max_rows=130)
    Pair(spec, gen).check(1, 130, gen, past_len=3)


@pytest.mark.parametrize("weights", ["dense", "gptq4_act", "gptq4_act_shared"])
@pytest.mark.parametrize("batch,q_len", [(1, 1), (16, 1), (2, 50), (2, 80)])  # 160: the head epilogue per row
def test_lora_matches_cpu(weights, batch, q_len, gen):
    pair = Pair(Spec(weights=weights, max_rows=160, post_norm="rms", head_norm="rms"), gen)
    adapters = _adapters(pair, gen, {3: {"q": 8, "v": 4, "o": 16}, 9: {"k": 2, "q": 5}, 11: {"o": 3}})
    ranks = {dev: pair.layers[dev].set_loras(adapters[dev]) for dev in adapters}
    assert ranks == {"cpu": 16, "cuda": 16}
    pair.check(batch, q_len, gen, past_len=1, loras=(3, 9, 11))
    pair.check(batch, q_len, gen, past_len=1, loras=(11,))
    pair.check(batch, q_len, gen, past_len=1)
    # Replacing the set re-uploads; clearing it leaves the base layer.
    adapters = _adapters(pair, gen, {5: {"o": 7, "k": 3}})
    for dev in adapters:
        pair.layers[dev].set_loras(adapters[dev])
    pair.check(batch, q_len, gen, past_len=1, loras=(5,))
    for dev in adapters:
        pair.layers[dev].set_loras([])
    pair.check(batch, q_len, gen, past_len=1)
    pair.check(1, 1, gen, past_len=1)  # the accumulator rows the small-row GEMM adds into were zeroed


# On Hopper, beyond the small-row path, packed matrices with one group a
# 128-row chunk and columns a multiple of 256 go through the fused dequantize +
# wgmma GEMM (Q, K and V in one launch where their x needs no gathering of its
# own); elsewhere, or with QATTN_CUDA_WGMMA=0, through dequantize + cuBLAS. Both
# must match the CPU. 130 and 300 rows: the GEMM's 128-row tiles with a short
# last one; 40: one short tile. Input order (x read where it lies), one shared
# act-order (the staging's gathered x for all three), and act-order per matrix
# (z0: K and V gathered each before a launch of their own).
FUSED_FEATURES = {
    "plain": {},
    "fp32_residual": dict(residual_fp32=True),
    "no_residual_no_input_norm": dict(has_residual=False, input_norm=None),
    "biases_post_norm": dict(biases=True, post_norm="rms"),  # O into fp32 sums, then the residual epilogue
    "graphs": dict(use_graphs=True),
}


def _fused_gemm_pair(weights, gen, **features):
    spec = Spec(hidden=512, heads=8, kv_heads=4, head_dim=64, weights=weights, max_rows=300, **features)
    return Pair(spec, gen)


@pytest.mark.parametrize("feature", sorted(FUSED_FEATURES))
@pytest.mark.parametrize("weights", ["gptq4_g128", "gptq4_g128_act_shared", "gptq4_z0"])
def test_prefill_through_the_fused_dequantize_gemm(feature, weights, gen):
    pair = _fused_gemm_pair(weights, gen, **FUSED_FEATURES[feature])
    for batch, q_len in ((1, 130), (3, 100), (1, 40), (1, 130)):
        pair.check(batch, q_len, gen, past_len=3)


@pytest.mark.parametrize("residual_fp32", [False, True])
def test_fused_gemm_blocks_walk_several_tiles(residual_fp32, gen):
    # The fused GEMM runs one block an SM, each walking tiles of 256 columns x
    # 128 rows, its copier running on into the next tile's chunks. 4608 rows at
    # hidden 1024: Q|K|V make 8 x 36 = 288 tiles and O 4 x 36 = 144, more than
    # the 132 SMs of an H100 or H200, so blocks take two or three tiles each.
    spec = Spec(hidden=1024, heads=16, kv_heads=8, head_dim=64, weights="gptq4_g128", max_rows=4608,
                residual_fp32=residual_fp32)
    Pair(spec, gen).check(36, 128, gen, past_len=3)


def test_prefill_fused_dequantize_gemm_with_lora(gen):
    # LoRA on q, k, v: Q|K|V leave the fused GEMM in fp32 for the adapters to add to.
    pair = _fused_gemm_pair("gptq4_g128_act_shared", gen, head_norm="rms")
    adapters = _adapters(pair, gen, {4: {"q": 8, "v": 4, "o": 16}})
    for dev in adapters:
        pair.layers[dev].set_loras(adapters[dev])
    pair.check(2, 75, gen, past_len=1, loras=(4,))
    pair.check(2, 75, gen, past_len=1)


def test_prefill_without_the_fused_gemm_when_asked(tmp_path):
    # QATTN_CUDA_WGMMA=0 keeps dequantize + cuBLAS for every large-row call (a
    # process of its own: the library reads the variable once).
    script = tmp_path / "no_wgmma.py"
    script.write_text(
        "import sys, torch\n"
        "sys.path.insert(0, %r)\n"
        "import test_cuda_backend as t\n"
        "gen = torch.Generator().manual_seed(2)\n"
        "for weights in ('gptq4_g128', 'gptq4_g128_act_shared'):\n"
        "    pair = t._fused_gemm_pair(weights, gen)\n"
        "    for batch, q_len in ((1, 130), (1, 40)):\n"
        "        pair.check(batch, q_len, gen, past_len=2)\n"
        "print('ok')\n" % str(pathlib.Path(__file__).parent))
    env = dict(os.environ, QATTN_CUDA_WGMMA="0")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_layers_of_a_device_share_cublas_handles(gen):
    # A cuBLAS handle holds tens of MiB of device memory (64.5 on an H200): the
    # layers of a device lease one per call from a shared pool instead of owning
    # one each, so six small layers take well under six handles' worth.
    H, NH, NKV, D = 256, 4, 2, 64
    mats = {}
    for name, (k, n) in {"q": (H, NH * D), "k": (H, NKV * D), "v": (H, NKV * D), "o": (NH * D, H)}.items():
        g = quant.random_gptq(k, n, generator=gen, bits=4, group_size=64)
        mats[name + "_proj"] = qattn.QMatrix.gptq(g["qweight"].to(CUDA), g["qzeros"].to(CUDA), g["scales"].to(CUDA),
                                                  None, None, bits=4, group_size=64,
                                                  zero_offset_one=g["zero_offset_one"])
    x = torch.randn(1, 40, H, generator=gen).half().to(CUDA)
    attn = torch.randn(1, 40, NH, D, generator=gen).half().to(CUDA)
    sin, cos = qattn.rope_tables(qattn.default_inv_freq(D), 64, device=CUDA)
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    layers = [qattn.Layer(hidden_size=H, num_heads=NH, num_kv_heads=NKV, head_dim=D, rope="neox", max_rows=64,
                          max_seq_len=64, **mats) for _ in range(6)]
    for layer in layers:  # 40 rows: the large-row path, through cuBLAS
        layer.forward1(x, sin=sin, cos=cos, past_len=0)
        layer.forward2(x.clone(), attn)
    torch.cuda.synchronize()
    used = free_before - torch.cuda.mem_get_info()[0]
    assert used < 6 * (40 << 20), "six layers took %.1f MiB" % (used / 2**20)


def test_input_order_matrices_need_no_gather_scratch(gen):
    # Without act-order the projections read x where it lies; only the small-row
    # path gathers an unaligned input, so the gather scratch holds 32 rows, not
    # max_rows (8 MiB here); the rest of the two layers' scratch is the same.
    H, NH, NKV, D, rows = 1024, 8, 2, 128, 4096

    def device_bytes_of_a_layer(act_order):
        mats = {}
        for name, (k, n) in {"q": (H, NH * D), "k": (H, NKV * D), "v": (H, NKV * D), "o": (NH * D, H)}.items():
            g = quant.random_gptq(k, n, generator=gen, bits=4, group_size=128, act_order=act_order)
            mats[name + "_proj"] = qattn.QMatrix.gptq(g["qweight"].to(CUDA), g["qzeros"].to(CUDA),
                                                      g["scales"].to(CUDA),
                                                      g["g_idx"].to(CUDA) if act_order else None, None, bits=4,
                                                      group_size=128, zero_offset_one=g["zero_offset_one"])
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        layer = qattn.Layer(hidden_size=H, num_heads=NH, num_kv_heads=NKV, head_dim=D, rope="neox",
                            max_rows=rows, max_seq_len=64, **mats)
        torch.cuda.synchronize()
        used = free_before - torch.cuda.mem_get_info()[0]
        del layer
        return used

    device_bytes_of_a_layer(False)  # the device's cuBLAS handle, made with its first layer
    plain, gathered = device_bytes_of_a_layer(False), device_bytes_of_a_layer(True)
    assert gathered - plain >= 6 << 20, "act-order %.1f MiB, input order %.1f MiB" % (gathered / 2**20, plain / 2**20)


def test_kernels_launched_plainly_when_asked(tmp_path):
    # QATTN_CUDA_PDL=0 (for profiling) launches without programmatic dependent
    # launch; the results must not change. A process of its own: the library
    # reads the variable once.
    script = tmp_path / "plain.py"
    script.write_text(
        "import sys, torch\n"
        "sys.path.insert(0, %r)\n"
        "import test_cuda_backend as t\n"
        "gen = torch.Generator().manual_seed(1)\n"
        "for weights in ('gptq4_act', 'dense'):\n"
        "    pair = t.Pair(t.Spec(weights=weights, max_rows=64, head_norm='rms'), gen)\n"
        "    for rows in (1, 12, 40):\n"
        "        pair.check(rows, 1, gen, past_len=2)\n"
        "print('ok')\n" % str(pathlib.Path(__file__).parent))
    env = dict(os.environ, QATTN_CUDA_PDL="0")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


@pytest.mark.parametrize("weights", ["dense", "gptq4_act"])
def test_lora_after_calls_grows_the_accumulators(weights, gen):
    # Without an O bias or post-norm, beyond the small-row path the layer keeps
    # no fp32 O sums (cuBLAS adds O into the residual) and its Q|K|V sums in
    # fp16; LoRA adds into fp32 sums of every row, so set_loras grows those
    # buffers. Calls before and after, at both paths, must be right.
    pair = Pair(Spec(weights=weights, max_rows=100), gen)
    pair.check(2, 50, gen, past_len=1)
    pair.check(1, 1, gen, past_len=1)
    for layout, active in (({4: {"o": 8}}, (4,)), ({6: {"q": 4, "v": 8}, 4: {"o": 8}}, (6, 4))):
        adapters = _adapters(pair, gen, layout)
        for dev in adapters:
            pair.layers[dev].set_loras(adapters[dev])
        pair.check(2, 50, gen, past_len=2, loras=active)
        pair.check(3, 1, gen, past_len=2, loras=active)
        pair.check(2, 50, gen, past_len=3)


@pytest.mark.parametrize("weights", ["dense", "gptq4_act"])
def test_graphs_follow_new_pointers_and_positions(weights, gen):
    pair = Pair(Spec(weights=weights, max_rows=32, head_norm="rms", use_graphs=True), gen)
    adapters = _adapters(pair, gen, {1: {"q": 4, "o": 4}})
    for dev in adapters:
        pair.layers[dev].set_loras(adapters[dev])
    # The same (batch, q_len) again and again: fresh tensors (new pointers), new
    # scalar past_len, device past_lens, with and without adapters.
    for step in range(3):
        pair.check(4, 1, gen, past_len=10 + step)
        lens = torch.randint(0, 1000, (4,), generator=gen, dtype=torch.int32)
        pair.check(4, 1, gen, past_lens=lens)
        pair.check(4, 1, gen, past_lens=lens + 1, loras=(1,))
        pair.check(2, 16, gen, past_len=step)
    # Device past_lens changed in place between two calls with the same pointers.
    x, _ = pair.inputs(4, 1, gen)
    lens_cuda = torch.tensor([5, 6, 7, 8], dtype=torch.int32, device=CUDA)
    xc = x.to(CUDA)
    sin, cos = pair.tables["cuda"]
    outs = [torch.empty(4, 1, h, pair.spec.head_dim, dtype=torch.float16, device=CUDA) for h in (4, 2, 2)]
    for new_lens in ([5, 6, 7, 8], [100, 0, 3, 1500]):
        lens_cuda.copy_(torch.tensor(new_lens, dtype=torch.int32))
        pair.layers["cuda"].forward1(xc, sin=sin, cos=cos, past_lens=lens_cuda, out=outs)
        ref = pair.forward1("cpu", x, past_lens=torch.tensor(new_lens, dtype=torch.int32))
        torch.cuda.synchronize()
        for o, r in zip(outs, ref):
            assert rel_err(o, r) < TOL


@pytest.mark.parametrize("weights", ["gptq4", "gptq4_act", "gptq4_act_shared"])
def test_prefill_rows_in_graphs(weights, gen):
    # Beyond 32 rows the first dequantization runs on a second stream beside the
    # staging of x (forked and joined inside the call), and forward2 without bias, post-norm
    # or LoRA has cuBLAS add O to x: in the layer's own graphs, in a caller's
    # capture and eagerly, call after call.
    pair = Pair(Spec(weights=weights, max_rows=96, head_norm="rms", use_graphs=True), gen)
    for step in range(3):
        pair.check(2, 48, gen, past_len=step)
    layer, sin, cos = pair.layers["cuda"], *pair.tables["cuda"]
    x, attn = pair.inputs(3, 32, gen)
    xc, ac = x.to(CUDA), attn.to(CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer.forward1(xc, sin=sin, cos=cos, past_len=5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, k, v = layer.forward1(xc, sin=sin, cos=cos, past_len=5)
        y = layer.forward2(xc, ac)
    xc.copy_(x.to(CUDA))
    graph.replay()
    torch.cuda.synchronize()
    for o, r in zip((q, k, v), pair.forward1("cpu", x, past_len=5)):
        assert rel_err(o, r) < TOL
    y_ref = pair.forward2("cpu", x, attn)
    assert rel_err(y.cpu().double() - x.double(), y_ref.double() - x.double()) < TOL


@pytest.mark.parametrize("use_graphs", [False, True])
def test_capture_in_torch_cuda_graph(use_graphs, gen):
    pair = Pair(Spec(weights="gptq4_act", max_rows=16, post_norm="rms", use_graphs=use_graphs), gen)
    layer = pair.layers["cuda"]
    sin, cos = pair.tables["cuda"]
    batch = 8
    x_static = torch.empty(batch, 1, pair.spec.hidden, dtype=torch.float16, device=CUDA)
    attn_static = torch.empty(batch, 1, pair.spec.heads, pair.spec.head_dim, dtype=torch.float16, device=CUDA)
    lens_static = torch.zeros(batch, dtype=torch.int32, device=CUDA)
    x0, a0 = pair.inputs(batch, 1, gen)
    x_static.copy_(x0)
    attn_static.copy_(a0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch recommends
        layer.forward1(x_static, sin=sin, cos=cos, past_lens=lens_static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, k, v = layer.forward1(x_static, sin=sin, cos=cos, past_lens=lens_static)
        y = layer.forward2(x_static, attn_static)
    for _ in range(3):
        x, attn = pair.inputs(batch, 1, gen)
        lens = torch.randint(0, 2000, (batch,), generator=gen, dtype=torch.int32)
        x_static.copy_(x)
        attn_static.copy_(attn)
        lens_static.copy_(lens)
        graph.replay()
        torch.cuda.synchronize()
        ref = pair.forward1("cpu", x, past_lens=lens)
        for name, o, r in zip("qkv", (q, k, v), ref):
            assert rel_err(o, r) < TOL, name
        y_ref = pair.forward2("cpu", x, attn)
        assert rel_err(y.cpu().double() - x.double(), y_ref.double() - x.double()) < TOL


def test_two_layers_on_two_streams(gen):
    pairs = [Pair(Spec(weights=w, max_rows=64, head_norm="rms"), gen) for w in ("gptq4_act", "dense")]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    cases = []
    for pair in pairs:
        x, attn = pair.inputs(4, 16 if pair.spec.weights == "dense" else 8, gen)
        cases.append((x, attn, x.to(CUDA), attn.to(CUDA)))
    torch.cuda.synchronize()
    results = []
    for _ in range(5):
        for pair, stream, (x, attn, xc, ac) in zip(pairs, streams, cases):
            with torch.cuda.stream(stream):
                sin, cos = pair.tables["cuda"]
                qkv = pair.layers["cuda"].forward1(xc, sin=sin, cos=cos, past_len=2)
                y = pair.layers["cuda"].forward2(xc.clone(), ac)
                results.append((pair, x, attn, qkv, y))
    torch.cuda.synchronize()
    for pair, x, attn, qkv, y in results:
        ref = pair.forward1("cpu", x, past_len=2)
        for o, r in zip(qkv, ref):
            assert rel_err(o, r) < TOL
        y_ref = pair.forward2("cpu", x, attn)
        assert rel_err(y.cpu().double() - x.double(), y_ref.double() - x.double()) < TOL


@pytest.mark.parametrize("use_graphs", [False, True])
@pytest.mark.parametrize("q_len", [2, 80])  # 8 rows, and 320 (the head epilogue's kernel per row)
def test_out_of_range_past_lens_are_flagged(use_graphs, q_len, gen):
    max_seq_len = 256 if q_len == 2 else 512
    spec = Spec(weights="gptq4_act", max_rows=4 * q_len, max_seq_len=max_seq_len, use_graphs=use_graphs)
    pair = Pair(spec, gen)
    layer = pair.layers["cuda"]
    batch = 4
    x, _ = pair.inputs(batch, q_len, gen)
    good = torch.tensor([0, 10, 100, 254], dtype=torch.int32)
    # Rows of sequences 2 and 3 leave [0, max_seq_len).
    bad = torch.tensor([0, 10, max_seq_len - 1, -3], dtype=torch.int32)
    q_ref, k_ref, v_ref = pair.forward1("cpu", x, past_lens=good)
    guard = 4  # elements past the outputs, to see that nothing is written there
    bufs = [torch.full((batch * q_len * h * spec.head_dim + guard,), 7.0, dtype=torch.float16, device=CUDA)
            for h in (spec.heads, spec.kv_heads, spec.kv_heads)]
    outs = [b[:-guard].view(batch, q_len, -1, spec.head_dim) for b in bufs]
    sin, cos = pair.tables["cuda"]
    layer.forward1(x.to(CUDA), sin=sin, cos=cos, past_lens=bad.to(CUDA), out=outs)
    with pytest.raises(qattn.QattnError) as info:
        layer.check_device_errors()
    assert info.value.status == "QATTN_ERROR_OUT_OF_RANGE"
    layer.check_device_errors()  # the flag was cleared
    for b in bufs:
        assert (b[-guard:] == 7.0).all()
    # Sequences 0 and 1 are untouched by the bad positions; v is never rotated.
    for o, r in zip(outs[:2], (q_ref, k_ref)):
        assert rel_err(o[:2], r[:2]) < TOL
    assert rel_err(outs[2], v_ref) < TOL
    # The layer still works afterwards.
    out = layer.forward1(x.to(CUDA), sin=sin, cos=cos, past_lens=good.to(CUDA))
    layer.check_device_errors()
    for o, r in zip(out, (q_ref, k_ref, v_ref)):
        assert rel_err(o, r) < TOL


def test_caller_device_is_restored(gen):
    pair = Pair(Spec(weights="gptq4", max_rows=4), gen)
    before = torch.cuda.current_device()
    pair.check(2, 2, gen, past_len=0)
    assert torch.cuda.current_device() == before
