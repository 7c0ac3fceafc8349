"""Layer: one attention block (forward1 / forward2) and its LoRA adapters."""
import ctypes
import dataclasses
import operator
import weakref
from typing import Optional

import torch

from . import _lib
from ._tensors import (INT32_MAX, INT32_MIN, as_c_int, check_tensor, current_stream, device_index, is_ready, ptr,
                       same_device, stream_of, sync_for_host_read)
from .errors import check, invalid
from .qmatrix import QMatrix
from .scratch import Scratch

_NORM_KINDS = {"rms": _lib.NORM_RMS, "layer": _lib.NORM_LAYER}
_ROPE_KINDS = {None: _lib.ROPE_NONE, "neox": _lib.ROPE_NEOX, "gptj": _lib.ROPE_GPTJ}
_PROJS = {"q": _lib.PROJ_Q, "k": _lib.PROJ_K, "v": _lib.PROJ_V, "o": _lib.PROJ_O}


@dataclasses.dataclass
class Norm:
    """RMSNorm ("rms") or LayerNorm ("layer"); weight (and bias) fp16 [width], or
    [heads, head_dim] for a per-head head norm."""

    kind: str
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    eps: float = 1e-6
    per_head: bool = False


@dataclasses.dataclass
class LoRA:
    """Adapter `id` on projection `proj` ("q", "k", "v" or "o"): adds (n . a) . b,
    a fp16 [in, r], b fp16 [r, out]. Fold alpha / r into b."""

    id: int
    proj: str
    a: torch.Tensor
    b: torch.Tensor


def _destroy(handle, projections):
    # `projections` is held here so the matrices outlive the layer even when both
    # become garbage at once.
    _lib.lib.qattn_destroy(handle)


# Looked up once: attribute access on the CDLL costs on every call.
_forward1 = _lib.lib.qattn_forward1
_forward2 = _lib.lib.qattn_forward2


class Layer:
    """The attention block of one transformer layer; see include/qattn.h."""

    def __init__(self, *, hidden_size, num_heads, num_kv_heads, head_dim, q_proj, k_proj, v_proj, o_proj,
                 input_norm=None, q_norm=None, k_norm=None, post_norm=None, rope="neox", rotary_dim=None,
                 has_residual=True, residual_fp32=False, max_rows=2048, max_seq_len=4096, use_graphs=False,
                 scratch=None):
        projections = (q_proj, k_proj, v_proj, o_proj)
        for name, m in zip(("q_proj", "k_proj", "v_proj", "o_proj"), projections):
            if not isinstance(m, QMatrix):
                raise invalid("%s must be a qattn.QMatrix, got %s" % (name, type(m).__name__))
            if m.closed:
                raise invalid("%s is a closed QMatrix" % name)
            if not same_device(m.device, q_proj.device):
                raise invalid("%s is on %s but q_proj on %s" % (name, m.device, q_proj.device))
        if rope not in _ROPE_KINDS:
            raise invalid("rope must be 'neox', 'gptj' or None, got %r" % (rope,))
        if scratch is not None and not isinstance(scratch, Scratch):
            raise invalid("scratch must be a qattn.Scratch, got %s" % type(scratch).__name__)
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("max_rows", max_rows), ("max_seq_len", max_seq_len)):
            as_c_int(name, value)
        if rotary_dim is not None:
            as_c_int("rotary_dim", rotary_dim)
        self.device = q_proj.device
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope = rope
        self.rotary_dim = (rotary_dim or head_dim) if rope else 0
        self.residual_fp32 = bool(residual_fp32)
        self.max_rows = max_rows
        self.max_seq_len = max_seq_len

        c = _lib.lib.qattn_layer_config_default()
        c.device = device_index(self.device)
        c.hidden_size = hidden_size
        c.num_heads = num_heads
        c.num_kv_heads = num_kv_heads
        c.head_dim = head_dim
        c.max_rows = max_rows
        c.max_seq_len = max_seq_len
        weights = []
        for name, norm, width, heads in (
            ("input_norm", input_norm, hidden_size, None),
            ("q_norm", q_norm, head_dim, num_heads),
            ("k_norm", k_norm, head_dim, num_kv_heads),
            ("post_norm", post_norm, hidden_size, None),
        ):
            if norm is not None:
                weights += self._fill_norm(getattr(c, name), name, norm, width, heads)
        c.rope = _ROPE_KINDS[rope]
        c.rotary_dim = rotary_dim or 0
        c.has_residual = 1 if has_residual else 0
        c.residual_fp32 = 1 if residual_fp32 else 0
        c.use_graphs = 1 if use_graphs else 0
        c.q_proj, c.k_proj, c.v_proj, c.o_proj = (m.handle for m in projections)
        c.scratch = scratch.handle if scratch is not None else None

        sync_for_host_read(*weights)
        handle = ctypes.c_void_p()
        check(_lib.lib.qattn_create(ctypes.byref(c), ctypes.byref(handle)))
        self._handle = handle
        self._projections = projections
        self._finalizer = weakref.finalize(self, _destroy, handle, projections)
        for m in projections:
            m._users.add(self)
        self._device_index = c.device
        self._x_dtype = torch.float32 if residual_fp32 else torch.float16
        self._half_rotary = self.rotary_dim // 2
        self._f1 = _lib.lib.qattn_forward1_args_default()
        self._f2 = _lib.lib.qattn_forward2_args_default()
        self._f1_ref = ctypes.byref(self._f1)
        self._f2_ref = ctypes.byref(self._f2)
        self._lora_key = self._lora_array = None

    def _fill_norm(self, desc, name, norm, width, heads):
        if not isinstance(norm, Norm):
            raise invalid("%s must be a qattn.Norm, got %s" % (name, type(norm).__name__))
        if norm.kind not in _NORM_KINDS:
            raise invalid("%s.kind must be 'rms' or 'layer', got %r" % (name, norm.kind))
        if norm.per_head and heads is None:
            raise invalid("%s.per_head is only meaningful for q_norm and k_norm" % name)
        shape = (heads, width) if norm.per_head else (width,)
        check_tensor(norm.weight, name + ".weight", torch.float16, shape, self.device, allow_cpu=True)
        if norm.bias is not None:
            check_tensor(norm.bias, name + ".bias", torch.float16, shape, self.device, allow_cpu=True)
        desc.type = _NORM_KINDS[norm.kind]
        try:
            desc.eps = norm.eps
        except TypeError:
            raise invalid("%s.eps must be a number, got %r" % (name, norm.eps)) from None
        desc.weight = ptr(norm.weight)
        desc.bias = ptr(norm.bias)
        desc.per_head = 1 if norm.per_head else 0
        return [norm.weight, norm.bias]

    @property
    def closed(self):
        return not self._finalizer.alive

    def _live_handle(self):
        if self.closed:
            raise invalid("Layer is closed")
        return self._handle

    def close(self):
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # The forward calls run once per layer per decode step, so their host time is
    # kept small (docs/HOST_OVERHEAD.md): each tensor passes one cheap combined
    # test (is_ready) and only a failure goes through check_tensor for the message;
    # the argument structs and their byref are built once and every field is set
    # on every call; the no-LoRA case builds nothing. Handles are single-threaded
    # (include/qattn.h), so one struct per layer is enough.

    def _check_rows(self, x, name):
        """x [batch, q_len, H] (fp16, or fp32 with residual_fp32) -> (batch, q_len)."""
        if (isinstance(x, torch.Tensor) and x.dtype is self._x_dtype and x.layout is torch.strided
                and x.device == self.device and x.is_contiguous()):
            s = x.shape
            if len(s) == 3 and s[2] == self.hidden_size and s[0] > 0 and s[1] > 0:
                return s[0], s[1]
        check_tensor(x, name, self._x_dtype, (None, None, self.hidden_size), self.device)
        return x.shape[0], x.shape[1]

    def _check_heads(self, t, name, batch, q_len, heads):
        """fp16 [batch, q_len, heads, D] or [batch, q_len, heads * D]."""
        if isinstance(t, torch.Tensor) and t.dim() == 3:
            shape = (batch, q_len, heads * self.head_dim)
        else:
            shape = (batch, q_len, heads, self.head_dim)
        if not is_ready(t, torch.float16, shape, self.device):
            check_tensor(t, name, torch.float16, shape, self.device)

    def _fill_lora_ids(self, a, loras):
        """Fills a.lora_ids / a.num_lora_ids from an iterable of adapter ids."""
        if loras.__class__ in (tuple, list) and not loras:
            a.lora_ids, a.num_lora_ids = None, 0
            return
        try:
            raw = loras if loras.__class__ is tuple else tuple(loras)
            ids = tuple(map(operator.index, raw))
        except TypeError:  # not iterable, or a float id that int() would truncate onto another id
            raise invalid("LoRA ids must be int32, got %r" % (loras,)) from None
        if any(i.__class__ is bool for i in raw):  # as set_loras: True is not adapter 1
            raise invalid("LoRA ids must be int32, got %r" % (loras,))
        if not ids:
            a.lora_ids, a.num_lora_ids = None, 0
        else:
            if ids != self._lora_key:
                if not all(INT32_MIN <= i <= INT32_MAX for i in ids):
                    raise invalid("LoRA ids must be int32, got %s" % (ids,))
                # The array is kept with its key: a decode loop passes the same ids every step.
                self._lora_key, self._lora_array = ids, (ctypes.c_int32 * len(ids))(*ids)
            a.lora_ids, a.num_lora_ids = self._lora_array, len(ids)

    def forward1(self, x, *, sin=None, cos=None, past_len=0, past_lens=None, loras=(), out=None, kv_cache=None,
                 kv_slots=None):
        """x [batch, q_len, H] -> (q [batch, q_len, NH, D], k, v [batch, q_len, NKV, D]).
        Positions are past_len + t, or past_lens[b] + t (int32 [batch] on the layer's
        device); `loras` lists the active adapter ids; `out` = (q, k, v) buffers
        ([..., heads, D] or [..., heads * D]) are written instead of new tensors.
        `kv_cache` = (k_cache, v_cache), fp16 [..., NKV, D], with `kv_slots`, int32
        [batch, q_len] on the layer's device: token (b, t)'s key and value are
        written straight to slot kv_slots[b, t] of the caches viewed as
        [slots, NKV, D], and k and v are returned as None unless `out` asks for
        them too (out=(q, None, None) gives q a buffer alone). On CUDA a slot outside the cache is not written and is reported
        by check_device_errors()."""
        if not self._finalizer.alive:
            raise invalid("Layer is closed")
        batch, q_len = self._check_rows(x, "x")
        device = self.device
        a = self._f1
        if self.rope is not None:
            if sin is None or cos is None:
                raise invalid("sin and cos tables are required when rope is %r" % self.rope)
            table = sin.shape if isinstance(sin, torch.Tensor) else None
            if not (table is not None and len(table) == 2 and table[0] > 0
                    and is_ready(sin, torch.float32, (table[0], self._half_rotary), device)
                    and is_ready(cos, torch.float32, table, device)):
                check_tensor(sin, "sin", torch.float32, (None, self._half_rotary), device)
                check_tensor(cos, "cos", torch.float32, (sin.shape[0], self._half_rotary), device)
            a.sin, a.cos, a.max_positions = sin.data_ptr(), cos.data_ptr(), table[0]
        if past_lens is None:
            a.past_lens = None
        else:
            if not is_ready(past_lens, torch.int32, (batch,), device):
                check_tensor(past_lens, "past_lens", torch.int32, (batch,), device)
            a.past_lens = past_lens.data_ptr()
        self._fill_kv_destination(a, kv_cache, kv_slots, batch, q_len)
        if out is None:
            q = torch.empty(batch, q_len, self.num_heads, self.head_dim, dtype=torch.float16, device=device)
            k = v = None
            if kv_cache is None:
                k = torch.empty(batch, q_len, self.num_kv_heads, self.head_dim, dtype=torch.float16, device=device)
                v = torch.empty(batch, q_len, self.num_kv_heads, self.head_dim, dtype=torch.float16, device=device)
        else:
            if len(out) != 3:
                raise invalid("out must be a (q, k, v) tuple")
            q, k, v = out
            self._check_heads(q, "out[0] (q)", batch, q_len, self.num_heads)
            if kv_cache is None or k is not None or v is not None:
                self._check_heads(k, "out[1] (k)", batch, q_len, self.num_kv_heads)
                self._check_heads(v, "out[2] (v)", batch, q_len, self.num_kv_heads)
        self._fill_lora_ids(a, loras)
        a.batch, a.q_len, a.x, a.past_len = batch, q_len, x.data_ptr(), int(past_len)
        if a.past_len != past_len:
            raise invalid("past_len must be an int32, got %r" % (past_len,))
        a.q = q.data_ptr()
        a.k, a.v = (None, None) if k is None else (k.data_ptr(), v.data_ptr())
        status = _forward1(self._handle, self._f1_ref, current_stream(self._device_index))
        if status:
            check(status)
        return q, k, v

    def _fill_kv_destination(self, a, kv_cache, kv_slots, batch, q_len):
        if kv_cache is None and kv_slots is None:
            a.k_cache = a.v_cache = a.kv_slots = None
            a.num_kv_slots = 0
            return
        if kv_cache is None or kv_slots is None:
            raise invalid("kv_cache and kv_slots go together: the slots say where each token's key and value go")
        if not isinstance(kv_cache, (tuple, list)) or len(kv_cache) != 2:
            raise invalid("kv_cache must be a (k_cache, v_cache) pair of tensors")
        k_cache, v_cache = kv_cache
        row = (self.num_kv_heads, self.head_dim)
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(t, torch.Tensor) or t.dim() < 3 or tuple(t.shape[-2:]) != row:
                raise invalid("%s must be a tensor [..., %d, %d] (KV heads, head_dim), got %s"
                              % (name, row[0], row[1], tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)))
            check_tensor(t, name, torch.float16, tuple(t.shape), self.device)
        if k_cache.shape != v_cache.shape:
            raise invalid("k_cache %s and v_cache %s differ in shape" % (tuple(k_cache.shape), tuple(v_cache.shape)))
        if not is_ready(kv_slots, torch.int32, (batch, q_len), self.device):
            check_tensor(kv_slots, "kv_slots", torch.int32, (batch, q_len), self.device)
        a.k_cache, a.v_cache, a.kv_slots = k_cache.data_ptr(), v_cache.data_ptr(), kv_slots.data_ptr()
        a.num_kv_slots = k_cache.numel() // (row[0] * row[1])

    def forward2(self, x, attn_out, *, loras=()):
        """x += O(attn_out) (post-norm, LoRA as configured); x is updated in place and returned."""
        if not self._finalizer.alive:
            raise invalid("Layer is closed")
        batch, q_len = self._check_rows(x, "x")
        self._check_heads(attn_out, "attn_out", batch, q_len, self.num_heads)
        a = self._f2
        self._fill_lora_ids(a, loras)
        a.batch, a.q_len, a.x, a.attn_out = batch, q_len, x.data_ptr(), attn_out.data_ptr()
        status = _forward2(self._handle, self._f2_ref, current_stream(self._device_index))
        if status:
            check(status)
        return x

    def forward(self, x, cache, seq_ids=None, **kwargs):
        """The whole block over a KV cache (forward1, attention, forward2); see qattn.block.forward."""
        from . import block

        self._live_handle()
        return block.forward(self, x, cache, seq_ids, **kwargs)

    def set_loras(self, adapters):
        """Replaces the adapter set; returns the largest rank (0 when empty). It may
        grow the layer's device scratch: capture a torch.cuda.graph of the layer's
        calls again after it."""
        handle = self._live_handle()
        adapters = list(adapters)
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        widths = {"q": (self.hidden_size, q_width), "k": (self.hidden_size, kv_width),
                  "v": (self.hidden_size, kv_width), "o": (q_width, self.hidden_size)}
        descs = (_lib.LoraDesc * max(1, len(adapters)))()
        for i, lora in enumerate(adapters):
            if not isinstance(lora, LoRA):
                raise invalid("adapters[%d] must be a qattn.LoRA, got %s" % (i, type(lora).__name__))
            if lora.proj not in _PROJS:
                raise invalid("adapters[%d].proj must be 'q', 'k', 'v' or 'o', got %r" % (i, lora.proj))
            lora_id = as_c_int("adapters[%d].id" % i, lora.id)
            fan_in, fan_out = widths[lora.proj]
            check_tensor(lora.a, "adapters[%d].a" % i, torch.float16, (fan_in, None), self.device, allow_cpu=True)
            rank = lora.a.shape[1]
            check_tensor(lora.b, "adapters[%d].b" % i, torch.float16, (rank, fan_out), self.device, allow_cpu=True)
            d = _lib.lib.qattn_lora_desc_default()
            d.id, d.proj, d.rank = lora_id, _PROJS[lora.proj], rank
            d.a, d.b = lora.a.data_ptr(), lora.b.data_ptr()
            descs[i] = d
        sync_for_host_read(*(t for lora in adapters for t in (lora.a, lora.b)))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        max_rank = ctypes.c_int(0)
        check(_lib.lib.qattn_set_loras(handle, descs, len(adapters), ctypes.byref(max_rank)))
        return max_rank.value

    def check_device_errors(self):
        """Raises QattnError (QATTN_ERROR_OUT_OF_RANGE) if a device kernel met a position
        past the tables or max_seq_len since the last check; waits for the stream."""
        check(_lib.lib.qattn_check_device_errors(self._live_handle(), stream_of(self.device)))

    def __repr__(self):
        return "Layer(H=%d, NH=%d, NKV=%d, D=%d, device=%s%s)" % (
            self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.device,
            ", closed" if self.closed else "")
