"""Attention over a KV cache, run between forward1 and forward2.

Two backends, with the same contract: the step's new keys and values are written
into the cache at each sequence's current length, then the new queries attend
causally over everything the cache holds for their sequence (query t of a sequence
with p cached tokens sees keys 0 .. p + t). Grouped-query heads share KV heads:
query head h reads KV head h // (NH / NKV).

- "flash_attn": `flash_attn.flash_attn_with_kvcache`, which appends k/v into the
  cache in place and attends in one kernel (CUDA, fp16/bf16; its paged cache needs
  a block size that is a multiple of 256).
- "torch": writes k/v with indexing, then `scaled_dot_product_attention` over the
  cache (pages gathered for the paged cache). CPU and CUDA, any cache here.

With no backend named, flash_attn is used when it is importable and supports the
cache; otherwise torch.
"""
import importlib
import math
import sys

import torch
import torch.nn.functional as F

from .cache import PagedKVCache, check_cache_type
from .errors import QattnError, invalid

BACKENDS = ("flash_attn", "torch")

_FLASH_PAGE_MULTIPLE = 256
_FLASH_MAX_HEAD_DIM = 256

_flash_import_failed = False


def _torch_version():
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


# scaled_dot_product_attention gained enable_gqa (KV heads shared without copies) in 2.5.
_SDPA_GQA = _torch_version() >= (2, 5)


def _flash_module():
    """The flash_attn module, or None. Looked up in sys.modules each time so that a
    module installed there (a test double) is seen; a failed import is remembered
    so the hot path does not search sys.path on every step."""
    global _flash_import_failed
    module = sys.modules.get("flash_attn")
    if module is None:
        if _flash_import_failed:
            return None
        try:
            module = importlib.import_module("flash_attn")
        except Exception:
            _flash_import_failed = True
            return None
    return module if hasattr(module, "flash_attn_with_kvcache") else None


def available_backends():
    """Names of the backends usable in this process, preferred first."""
    return [name for name in BACKENDS if name != "flash_attn" or _flash_module() is not None]


def default_backend():
    """The backend chosen when none is named and the cache suits flash-attn."""
    return available_backends()[0]


def _flash_unsupported(cache):
    """Why flash-attn cannot serve this cache, or None."""
    if cache.dtype not in (torch.float16, torch.bfloat16):
        return "flash-attn takes float16 or bfloat16 caches, this cache is %s" % cache.dtype
    if cache.head_dim > _FLASH_MAX_HEAD_DIM:
        return "flash-attn takes head_dim up to %d, this cache has %d" % (_FLASH_MAX_HEAD_DIM, cache.head_dim)
    if isinstance(cache, PagedKVCache) and cache.block_size % _FLASH_PAGE_MULTIPLE != 0:
        return (
            "flash-attn's paged KV cache needs a block_size that is a multiple of %d, this cache has %d "
            "(use backend='torch', or a block size such as %d)"
            % (_FLASH_PAGE_MULTIPLE, cache.block_size, _FLASH_PAGE_MULTIPLE)
        )
    return None


def resolve_backend(backend, cache):
    """The backend name a step on `cache` runs with: `backend` if given (checked),
    else flash_attn where it is importable and supports the cache (CUDA), else torch."""
    if backend is None:
        if (
            cache.device.type == "cuda"
            and _flash_module() is not None
            and _flash_unsupported(cache) is None
        ):
            return "flash_attn"
        return "torch"
    if backend == "torch":
        return backend
    if backend == "flash_attn":
        if _flash_module() is None:
            raise QattnError(
                "QATTN_ERROR_NOT_SUPPORTED",
                "attention backend 'flash_attn' was asked for, but the flash_attn package is not importable",
            )
        reason = _flash_unsupported(cache)
        if reason is not None:
            raise QattnError("QATTN_ERROR_NOT_SUPPORTED", reason)
        return backend
    raise invalid("unknown attention backend %r; choose one of %s or None" % (backend, list(BACKENDS)))


def check_inputs(q, k, v, step):
    """Checks q [B, T, NH, D] and k, v [B, T, NKV, D] against the cache and the step."""
    cache = step.cache
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise invalid("%s must be a torch.Tensor, got %s" % (name, type(t).__name__))
        if t.dim() != 4:
            raise invalid("%s must be 4-D [batch, q_len, heads, head_dim], got shape %s" % (name, tuple(t.shape)))
        if t.dtype != cache.dtype:
            raise invalid("%s is %s but the KV cache holds %s" % (name, t.dtype, cache.dtype))
        if t.device != cache.device:
            raise invalid("%s is on %s but the KV cache is on %s" % (name, t.device, cache.device))
        if t.stride(-1) != 1:
            raise invalid("%s must have a contiguous last dimension" % name)
    batch, q_len = step.batch, step.q_len
    if q.shape[:2] != (batch, q_len):
        raise invalid("q has shape %s; this step is %d sequences of %d tokens" % (tuple(q.shape), batch, q_len))
    kv_shape = (batch, q_len, cache.num_kv_heads, cache.head_dim)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != kv_shape:
            raise invalid("%s has shape %s, the cache needs %s" % (name, tuple(t.shape), kv_shape))
    if q.shape[3] != cache.head_dim:
        raise invalid("q has head_dim %d, the cache %d" % (q.shape[3], cache.head_dim))
    if q.shape[2] % cache.num_kv_heads != 0:
        raise invalid("q has %d heads, not a multiple of the cache's %d KV heads" % (q.shape[2], cache.num_kv_heads))


def _slots(step, int32=False):
    """Where the step's new tokens go, [batch, q_len] indices into the cache's k/v
    flattened over their first two axes (int64 for torch's indexing, or int32 for
    Layer.forward1's kv_slots), and their positions [batch, q_len]. Worked out on
    the device from the lengths and block table there: a handful of small ops, no
    transfer from the host and no dtype conversion."""
    cache, rows = step.cache, step.rows
    positions = step.past_lens.view(-1, 1)
    if step.q_len > 1:
        positions = positions + (cache.offsets32 if int32 else cache.offsets)[: step.q_len]
    if isinstance(cache, PagedKVCache):
        size = cache.block_size
        nth = torch.div(positions, size, rounding_mode="floor")
        table = cache.block_table if int32 else cache.pages64
        pages = table.view(-1).take(rows.base + nth)
        # page * size + position % size, as position + (page - nth) * size
        return torch.add(positions, pages - nth, alpha=size), positions
    return (rows.base32 if int32 else rows.base) + positions, positions


def kv_slots(step):
    """Where the step's keys and values go, int32 [batch, q_len]: the kv_slots of
    Layer.forward1(kv_cache=(cache.k, cache.v), ...), which writes them there."""
    return _slots(step, int32=True)[0]


def _heads_first(t, batch, length):
    """Tokens 0..length-1 of the first `batch` rows of t as [batch, NKV, length, D],
    SDPA's layout, in one strided view (no slice, reshape or transpose ops). t is
    [rows, tokens, NKV, D] or gathered pages [rows, pages, page, NKV, D]: either way
    token i of a row sits i token strides after the row's start."""
    return t.as_strided((batch, t.shape[-2], length, t.shape[-1]), (t.stride(0), t.stride(-2), t.stride(-3), 1))


def _gather_torch(step, length):
    """Keys and values 0..length-1 of the step's sequences, [B, NKV, length, D]."""
    cache, batch = step.cache, step.batch
    if isinstance(cache, PagedKVCache):
        pages = step.pages()[:, : -(-length // cache.block_size)]
        keys, values = cache.k[pages], cache.v[pages]
    elif step.identity:
        keys, values = cache.k, cache.v
    else:
        keys = cache.k[:, :length].index_select(0, step.index)
        values = cache.v[:, :length].index_select(0, step.index)
    return _heads_first(keys, batch, length), _heads_first(values, batch, length)


def _attend_torch(q, k, v, step, scale):
    cache = step.cache
    slots, positions = _slots(step)
    if k is not None:  # else forward1 wrote k and v into the cache itself
        cache.k_slots.index_put_((slots,), k)
        cache.v_slots.index_put_((slots,), v)
    length = step.max_total
    keys, values = _gather_torch(step, length)
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = keys.shape[1]
    group = num_heads // num_kv

    if q_len > 1 and length == q_len and (group == 1 or _SDPA_GQA):
        # Prefill of fresh sequences: every query row is the top-left causal mask,
        # which SDPA's fused kernels handle without a mask tensor.
        gqa = {"enable_gqa": True} if group > 1 else {}
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=True, scale=scale, **gqa)
        return out.transpose(1, 2).contiguous()

    # Fold the query heads of each KV head into the query length, so every kernel
    # (fused or not) shares K/V across the group without repeating it:
    # [B, T, NKV*G, D] -> [B, NKV, G*T, D], row g*T + t.
    if q_len == 1:
        folded = q.reshape(batch, num_kv, group, head_dim)
    else:
        folded = q.reshape(batch, q_len, num_kv, group, head_dim).permute(0, 2, 3, 1, 4)
        folded = folded.reshape(batch, num_kv, group * q_len, head_dim)
    if q_len == 1 and min(step.past) + 1 == length:
        # One new token per sequence, all of one length: every query sees every key.
        mask = None
    else:
        # Query row g*T + t of sequence b sees keys 0..positions[b, t].
        last_key = positions.view(batch, 1, 1, 1) if q_len == 1 else positions.repeat(1, group)[:, None, :, None]
        mask = cache.offsets[:length] <= last_key
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scale)
    if q_len == 1:
        return out.reshape(batch, 1, num_heads, head_dim).contiguous()
    out = out.reshape(batch, num_kv, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.contiguous().reshape(batch, q_len, num_heads, head_dim)


def _attend_flash(q, k, v, step, scale):
    cache = step.cache
    kwargs = dict(k=k, v=v, cache_seqlens=step.past_lens, softmax_scale=scale, causal=True)
    if isinstance(cache, PagedKVCache):
        kwargs["block_table"] = step.block_table()
    elif not step.identity:
        kwargs["cache_batch_idx"] = step.index32
    try:
        out = _flash_module().flash_attn_with_kvcache(q, cache.k, cache.v, **kwargs)
    except RuntimeError as e:
        raise QattnError(
            "QATTN_ERROR_NOT_SUPPORTED", "flash_attn.flash_attn_with_kvcache rejected the step: %s" % e
        ) from e
    # For one query token per sequence flash-attn may return a view of a transposed result.
    return out.contiguous()


_IMPLEMENTATIONS = {"torch": _attend_torch, "flash_attn": _attend_flash}


def run_step(q, k, v, step, backend, softmax_scale=None):
    """Attention for a planned and reserved cache step with a resolved backend name.
    Writes k/v into the cache (not yet counted in its lengths) and returns
    [B, T, NH, D] in the cache's dtype."""
    check_inputs(q, k, v, step)
    return run_checked(q, k, v, step, backend, softmax_scale)


def run_checked(q, k, v, step, backend, softmax_scale=None):
    """run_step for q, k, v already known to fit the cache and the step (the
    block's forward1 outputs, whose shapes, dtype and device follow from a layer
    checked against the cache). With the torch backend k and v may be None: they
    are in the cache already, at kv_slots(step)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = _IMPLEMENTATIONS[backend](q, k, v, step, scale)
    step.cache.last_backend = backend
    return out


def attend(q, k, v, cache, seq_ids=None, *, backend=None, softmax_scale=None):
    """Appends k, v [B, T, NKV, D] to the sequences `seq_ids` (default 0..B-1) of
    `cache` and returns their causal attention for q [B, T, NH, D] over the cache,
    [B, T, NH, D]. The lengths advance by T. On error the cache is unchanged.
    The backend used is in `cache.last_backend`."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise invalid("q must be a 4-D tensor [batch, q_len, heads, head_dim]")
    check_cache_type(cache)
    step = cache.plan(seq_ids, q.shape[0], q.shape[1])
    name = resolve_backend(backend, cache)
    check_inputs(q, k, v, step)
    cache.reserve(step)
    try:
        out = run_checked(q, k, v, step, name, softmax_scale)
    except BaseException:
        cache.release(step)
        raise
    cache.advance(step)
    return out
