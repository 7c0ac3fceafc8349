"""The whole attention block over a KV cache: forward1, attention, forward2.

`forward(layer, x, cache, ...)` is what `Layer.forward` runs. Everything that can
be checked is checked before anything is written, so bad input leaves the cache
as it was: sequence ids, room in the cache (or free pages), positions against the
RoPE tables and the layer's max_seq_len, heads, dtype and device of the cache,
and the backend's own limits. Only then are the step's pages taken and forward1
run (with the torch backend it writes k/v straight into the cache; flash-attn
appends them itself), then attention and forward2, and the lengths advance; an
error on the way gives the pages back and leaves the lengths as they were.
"""
import weakref

import torch

from . import attention
from ._tensors import same_device
from .cache import check_cache_type
from .errors import QattnError, invalid


def _check_cache(layer, cache):
    """Heads, dtype and device of the cache against the layer's. None of these can
    change on either side, so a pass is remembered (weakly: the cache does not keep
    a closed layer alive) and the next steps of the same pair skip it."""
    checked = getattr(cache, "checked_layer", None)
    if checked is not None and checked() is layer:
        return
    check_cache_type(cache)
    if cache.num_kv_heads != layer.num_kv_heads or cache.head_dim != layer.head_dim:
        raise invalid(
            "the KV cache has %d KV heads of dim %d, the layer %d of dim %d"
            % (cache.num_kv_heads, cache.head_dim, layer.num_kv_heads, layer.head_dim)
        )
    if cache.dtype != torch.float16:
        raise invalid("the KV cache holds %s; the layer's keys and values are float16" % cache.dtype)
    if not same_device(cache.device, layer.device):
        raise invalid("the KV cache is on %s, the layer on %s" % (cache.device, layer.device))
    cache.checked_layer = weakref.ref(layer)


def _check_positions(layer, step, sin):
    end = step.max_total
    limit = layer.max_seq_len
    if end > limit:
        raise QattnError(
            "QATTN_ERROR_OUT_OF_RANGE",
            "sequences %s would reach position %d, past the layer's max_seq_len %d"
            % (step.seq_ids, end - 1, limit),
        )
    if isinstance(sin, torch.Tensor) and sin.dim() >= 1 and end > sin.shape[0]:
        raise QattnError(
            "QATTN_ERROR_OUT_OF_RANGE",
            "sequences %s would reach position %d, past the %d positions of the RoPE tables"
            % (step.seq_ids, end - 1, sin.shape[0]),
        )


def forward(layer, x, cache, seq_ids=None, *, sin=None, cos=None, backend=None, loras=(), softmax_scale=None):
    """Runs the attention block for x [batch, q_len, H] over `cache` and updates x
    in place (returned). Token t of batch entry b sits at position
    cache length(seq_ids[b]) + t; its key and value are appended to the cache and
    the lengths advance by q_len. seq_ids picks cache rows (contiguous) or
    block-table rows (paged); default 0..batch-1. The backend used is left in
    `cache.last_backend`."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise invalid("x must be a 3-D tensor [batch, q_len, hidden_size]")
    _check_cache(layer, cache)
    batch, q_len = x.shape[0], x.shape[1]
    step = cache.plan(seq_ids, batch, q_len)
    _check_positions(layer, step, sin)
    name = attention.resolve_backend(backend, cache)

    cache.reserve(step)
    try:
        if name == "torch":
            # forward1 writes the keys and values into the cache: no copy before attention.
            direct = {"kv_cache": (cache.k, cache.v), "kv_slots": attention.kv_slots(step)}
        else:
            direct = {}  # flash-attn appends k and v itself, in its attention kernel
        q, k, v = layer.forward1(x, sin=sin, cos=cos, past_lens=step.past_lens, loras=loras, **direct)
        attn_out = attention.run_checked(q, k, v, step, name, softmax_scale)
        layer.forward2(x, attn_out, loras=loras)
    except BaseException:
        cache.release(step)
        raise
    cache.advance(step)
    return x
