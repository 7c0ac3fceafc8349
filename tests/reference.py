"""A float64 reference of forward1 / forward2, written from the semantics in
DESIGN.md and include/qattn.h (it never calls the library)."""
import dataclasses
from typing import Dict, Optional, Tuple

import torch


@dataclasses.dataclass
class RefNorm:
    kind: str                      # "rms" or "layer"
    weight: torch.Tensor           # [width] or [heads, D]
    bias: Optional[torch.Tensor] = None
    eps: float = 1e-6


@dataclasses.dataclass
class RefLayer:
    """Weights as float64, projections in x @ W layout ([in, out])."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: Optional[torch.Tensor] = None
    bk: Optional[torch.Tensor] = None
    bv: Optional[torch.Tensor] = None
    bo: Optional[torch.Tensor] = None
    input_norm: Optional[RefNorm] = None
    q_norm: Optional[RefNorm] = None
    k_norm: Optional[RefNorm] = None
    post_norm: Optional[RefNorm] = None
    rope: Optional[str] = None     # "neox", "gptj" or None
    rotary_dim: int = 0            # 0 means head_dim
    has_residual: bool = True
    # (adapter id, proj) -> (A [in, r], B [r, out])
    loras: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


def d64(t):
    return None if t is None else t.detach().cpu().double()


def norm(x, n):
    """RMSNorm or LayerNorm over the last dim; n.weight broadcasts over leading dims
    (a [heads, D] weight applies per head to x [..., heads, D])."""
    if n is None:
        return x
    w = d64(n.weight)
    if n.kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + n.eps) * w
    return y + d64(n.bias) if n.bias is not None else y


def rope(t, positions, sin, cos, kind, rotary_dim):
    """t [rows, heads, D]; positions [rows]; sin/cos tables [P, rotary_dim/2]."""
    if kind is None:
        return t
    half = rotary_dim // 2
    s = d64(sin)[positions][:, None, :]
    c = d64(cos)[positions][:, None, :]
    t = t.clone()
    if kind == "neox":
        i1, i2 = torch.arange(half), torch.arange(half) + half
    else:
        i1, i2 = torch.arange(half) * 2, torch.arange(half) * 2 + 1
    a, b = t[..., i1], t[..., i2]
    t[..., i1] = a * c - b * s
    t[..., i2] = b * c + a * s
    return t


def project(ref, proj, n, lora_ids):
    w, bias = {"q": (ref.wq, ref.bq), "k": (ref.wk, ref.bk), "v": (ref.wv, ref.bv), "o": (ref.wo, ref.bo)}[proj]
    y = n @ d64(w)
    if bias is not None:
        y = y + d64(bias)
    for i in lora_ids:
        if (i, proj) in ref.loras:
            a, b = ref.loras[(i, proj)]
            y = y + (n @ d64(a)) @ d64(b)
    return y


def positions_of(batch, q_len, past_len=0, past_lens=None):
    base = d64(past_lens).long() if past_lens is not None else torch.full((batch,), int(past_len))
    return (base[:, None] + torch.arange(q_len)[None, :]).reshape(-1)


def forward1(ref, x, *, sin=None, cos=None, past_len=0, past_lens=None, lora_ids=()):
    """x [batch, q_len, H] -> float64 q [batch, q_len, NH, D], k, v [batch, q_len, NKV, D]."""
    batch, q_len, hidden = x.shape
    D = ref.head_dim
    n = norm(d64(x).reshape(-1, hidden), ref.input_norm)
    pos = positions_of(batch, q_len, past_len, past_lens)
    rotary = ref.rotary_dim or D
    q = project(ref, "q", n, lora_ids).reshape(-1, ref.num_heads, D)
    k = project(ref, "k", n, lora_ids).reshape(-1, ref.num_kv_heads, D)
    v = project(ref, "v", n, lora_ids).reshape(-1, ref.num_kv_heads, D)
    q = rope(norm(q, ref.q_norm), pos, sin, cos, ref.rope, rotary)
    k = rope(norm(k, ref.k_norm), pos, sin, cos, ref.rope, rotary)
    return (q.reshape(batch, q_len, ref.num_heads, D), k.reshape(batch, q_len, ref.num_kv_heads, D),
            v.reshape(batch, q_len, ref.num_kv_heads, D))


def forward2(ref, x, attn_out, *, lora_ids=()):
    """float64 new x: x + post_norm(attn_out @ Wo + bo + LoRA) (or without x)."""
    batch, q_len, hidden = x.shape
    y = project(ref, "o", d64(attn_out).reshape(batch * q_len, -1), lora_ids)
    y = norm(y, ref.post_norm).reshape(batch, q_len, hidden)
    return d64(x) + y if ref.has_residual else y


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out, ref = d64(out), d64(ref)
    return float((out.reshape(ref.shape) - ref).norm() / ref.norm())
