"""Builds a random qattn.Layer together with its float64 RefLayer, and runs both."""
import dataclasses
from typing import Optional

import torch

import qattn
import quant
import reference as R

# Outputs are fp16 (rounding alone gives ~3e-4 relative RMS error); inputs are
# exact fp16/fp32 values and the library accumulates in fp32. The CUDA backend may
# round intermediates (normed x, projections) to fp16 too: 3e-3 covers two or three
# such roundings, and a wrong feature moves results by far more (checked where cheap).
TOL = 3e-3
# fp32 residual stream: inputs() makes x ~64x larger than the block's output y, so
# an fp16 rounding of y costs ~5e-6 relative to x, while an fp16 rounding of x
# itself (~2e-4) fails this.
TOL_FP32_RESIDUAL = 3e-5


@dataclasses.dataclass
class Spec:
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    input_norm: Optional[str] = "rms"     # None, "rms", "layer", "layer_bias"
    head_norm: Optional[str] = None       # None, "rms", "layer_bias", "rms_per_head", "layer_per_head_bias"
    rope: Optional[str] = "neox"
    rotary_dim: Optional[int] = None
    post_norm: Optional[str] = None       # None, "rms", "layer", "layer_bias"
    has_residual: bool = True
    residual_fp32: bool = False
    biases: bool = False
    gptq: Optional[dict] = None           # random_gptq options for all four projections
    gptq_g_idx: bool = True               # pass g_idx (False: the library derives k // group_size)
    max_rows: int = 8
    max_seq_len: int = 64
    use_graphs: bool = False


def _norm(kind, shape, gen, device):
    if kind is None:
        return None, None
    base, _, rest = kind.partition("_")
    per_head = "per_head" in rest
    weight = (1.0 + 0.5 * torch.randn(shape, generator=gen)).half()
    bias = (0.3 * torch.randn(shape, generator=gen)).half() if kind.endswith("bias") else None
    eps = 1e-5
    lib_norm = qattn.Norm(base, weight.to(device), None if bias is None else bias.to(device), eps=eps,
                          per_head=per_head)
    return lib_norm, R.RefNorm(base, weight, bias, eps)


def _projection(spec, k, n, gen, device, gptq_out):
    bias = (0.5 * torch.randn(n, generator=gen)).half() if spec.biases else None
    dev_bias = None if bias is None else bias.to(device)
    if spec.gptq is None:
        w = (torch.randn(n, k, generator=gen) / k**0.5).half()
        return qattn.QMatrix.dense(w.to(device), dev_bias), w.t().double(), bias
    g = quant.random_gptq(k, n, generator=gen, **spec.gptq)
    gptq_out.append(g)
    g_idx = g["g_idx"].to(device) if spec.gptq_g_idx else None
    m = qattn.QMatrix.gptq(g["qweight"].to(device), g["qzeros"].to(device), g["scales"].to(device),
                           g_idx, dev_bias, bits=g["bits"], group_size=g["group_size"],
                           zero_offset_one=g["zero_offset_one"])
    return m, g["w"], bias


def build(spec, device, gen, gptq_out=None, scratch=None):
    """Returns (layer, ref): a qattn.Layer on `device` (with `scratch`, a
    qattn.Scratch to share, if given) and the RefLayer of the same weights. With
    GPTQ, the random_gptq dicts of q, k, v, o are appended to gptq_out."""
    H, NH, NKV, D = spec.hidden, spec.heads, spec.kv_heads, spec.head_dim
    mats, refs = {}, {}
    gptq_out = [] if gptq_out is None else gptq_out
    for name, (k, n) in {"q": (H, NH * D), "k": (H, NKV * D), "v": (H, NKV * D), "o": (NH * D, H)}.items():
        mats[name], refs["w" + name], refs["b" + name] = _projection(spec, k, n, gen, device, gptq_out)
    per_head = spec.head_norm is not None and "per_head" in spec.head_norm
    input_norm, ref_input = _norm(spec.input_norm, (H,), gen, device)
    q_norm, ref_q = _norm(spec.head_norm, (NH, D) if per_head else (D,), gen, device)
    k_norm, ref_k = _norm(spec.head_norm, (NKV, D) if per_head else (D,), gen, device)
    post_norm, ref_post = _norm(spec.post_norm, (H,), gen, device)
    layer = qattn.Layer(hidden_size=H, num_heads=NH, num_kv_heads=NKV, head_dim=D, q_proj=mats["q"],
                        k_proj=mats["k"], v_proj=mats["v"], o_proj=mats["o"], input_norm=input_norm,
                        q_norm=q_norm, k_norm=k_norm, post_norm=post_norm, rope=spec.rope,
                        rotary_dim=spec.rotary_dim, has_residual=spec.has_residual,
                        residual_fp32=spec.residual_fp32, max_rows=spec.max_rows, max_seq_len=spec.max_seq_len,
                        use_graphs=spec.use_graphs, scratch=scratch)
    ref = R.RefLayer(num_heads=NH, num_kv_heads=NKV, head_dim=D, input_norm=ref_input, q_norm=ref_q, k_norm=ref_k,
                     post_norm=ref_post, rope=spec.rope, rotary_dim=spec.rotary_dim or 0,
                     has_residual=spec.has_residual, **refs)
    return layer, ref


def tables(spec, device):
    rotary = spec.rotary_dim or spec.head_dim
    return qattn.rope_tables(qattn.default_inv_freq(rotary), spec.max_seq_len, device=device)


def inputs(spec, batch, q_len, gen, device):
    """x (offset so that LayerNorm and RMSNorm differ) and attn_out, both on `device`."""
    x = 1.5 * torch.randn(batch, q_len, spec.hidden, generator=gen) + 0.3
    x = 64 * x.float() if spec.residual_fp32 else x.half()
    attn = torch.randn(batch, q_len, spec.heads, spec.head_dim, generator=gen).half()
    return x.to(device), attn.to(device)


def run(spec, layer, device, gen, *, batch=2, q_len=3, past_len=4, past_lens=None, lora_ids=()):
    """Runs forward1 then forward2 on random inputs. Returns the library's outputs
    {"q", "k", "v", "x"} and the inputs (for reference())."""
    x, attn = inputs(spec, batch, q_len, gen, device)
    sin, cos = tables(spec, device) if spec.rope else (None, None)
    dev_lens = None if past_lens is None else torch.tensor(past_lens, dtype=torch.int32).to(device)
    ctx = {"x": x.clone(), "attn": attn, "sin": sin, "cos": cos, "past_len": past_len,
           "past_lens": None if past_lens is None else torch.tensor(past_lens), "lora_ids": tuple(lora_ids)}
    q, k, v = layer.forward1(x, sin=sin, cos=cos, past_len=past_len, past_lens=dev_lens, loras=lora_ids)
    new_x = layer.forward2(x, attn, loras=lora_ids)
    assert new_x.data_ptr() == x.data_ptr()
    return {"q": q, "k": k, "v": v, "x": new_x}, ctx


def reference(ref, ctx):
    """float64 {"q", "k", "v", "x"} of `ref` on the inputs of a run()."""
    q, k, v = R.forward1(ref, ctx["x"], sin=ctx["sin"], cos=ctx["cos"], past_len=ctx["past_len"],
                         past_lens=ctx["past_lens"], lora_ids=ctx["lora_ids"])
    x = R.forward2(ref, ctx["x"], ctx["attn"], lora_ids=ctx["lora_ids"])
    return {"q": q, "k": k, "v": v, "x": x}


def errors(out, expected):
    return {name: R.rel_err(out[name], expected[name]) for name in out}


def assert_close(out, expected, tol=TOL):
    errs = errors(out, expected)
    bad = {name: e for name, e in errs.items() if not e < tol}
    assert not bad, "relative errors above %g: %s (all: %s)" % (tol, bad, errs)
    return errs


def assert_distinct(expected, variant, names, tol=TOL, what="variant"):
    """The reference must move by much more than the tolerance when a feature is
    dropped or changed, or the comparison could not catch a backend that ignores it."""
    for name in names:
        e = R.rel_err(variant[name], expected[name])
        assert e > 10 * tol, "%s changes reference %s by only %g" % (what, name, e)
