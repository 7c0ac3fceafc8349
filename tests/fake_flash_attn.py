"""A plain-torch stand-in for the `flash_attn` package, for machines without it.

It implements `flash_attn_with_kvcache` as flash-attn 2 documents it
(flash_attn/flash_attn_interface.py), with the checks flash-attn makes on its
arguments, so that qattn's adapter is tested for argument order, layouts and the
in-place append:
  q [B, Tq, NH, D]; k_cache/v_cache [B_cache, S, NKV, D], or with block_table
  [num_blocks, page_block_size, NKV, D] and page_block_size % 256 == 0;
  k/v [B, Tk, NKV, D] are written into the cache at cache_seqlens[b] (row
  cache_batch_idx[b] of a contiguous cache, or the pages block_table[b]), then
  q attends over cache_seqlens[b] + Tk keys; causal masks align to the bottom
  right; query head h reads KV head h // (NH / NKV). Arithmetic is fp32, one
  sequence at a time (deliberately unlike qattn's torch backend).
Install with `monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn)`.
"""
import torch

calls = []


def _check(condition, message):
    if not condition:
        raise RuntimeError(message)


def _slots(k_cache, b, cache_batch_idx, block_table, positions):
    """Index (for k_cache[...]) of tokens `positions` of batch entry b."""
    if block_table is not None:
        page_size = k_cache.shape[1]
        return block_table[b].long()[positions // page_size], positions % page_size
    row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
    return torch.full_like(positions, row), positions


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    # Features qattn never asks for; refusing them makes a wrong call visible.
    _check(rotary_cos is None and rotary_sin is None, "fake flash_attn: rotary not implemented")
    _check(cache_leftpad is None and alibi_slopes is None, "fake flash_attn: leftpad/alibi not implemented")
    _check(tuple(window_size) == (-1, -1) and softcap == 0.0, "fake flash_attn: window/softcap not implemented")
    _check(not return_softmax_lse, "fake flash_attn: softmax_lse not implemented")

    _check(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type")
    _check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "query and key must have the same dtype")
    for t in (q, k_cache, v_cache):
        _check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
        _check(t.device == q.device, "All tensors must be on the same device")
    _check(q.dim() == 4 and k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "bad q / cache ranks")
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    _check(k_cache.shape[3] == head_dim, "q and cache head dims differ")
    _check(head_dim <= 256, "FlashAttention forward only supports head dimension at most 256")
    _check(num_heads % num_kv == 0, "Number of heads in key/value must divide number of heads in query")

    paged = block_table is not None
    if paged:
        _check(cache_batch_idx is None, "Paged KVcache does not support cache_batch_idx")
        _check(block_table.dtype == torch.int32, "block_table must have dtype torch.int32")
        _check(block_table.stride(-1) == 1, "block_table must have contiguous last dimension")
        _check(block_table.device == q.device, "block_table must be on the device of q")
        _check(block_table.shape[0] == batch, "block_table must have batch_size rows")
        _check(k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            _check(cache_batch_idx.dtype == torch.int32, "cache_batch_idx must have dtype int32")
            _check(cache_batch_idx.is_contiguous(), "cache_batch_idx must be contiguous")
            _check(cache_batch_idx.device == q.device, "cache_batch_idx must be on the device of q")
        else:
            _check(k_cache.shape[0] >= batch, "cache has fewer rows than the batch")

    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    new = 0
    if k is not None:
        _check(v is not None, "If key is supplied, value must also be passed in")
        _check(cache_seqlens is not None, "If key is supplied, seqlens_k must also be passed in")
        _check(k.dtype == q.dtype and v.dtype == q.dtype, "Key must have the same dtype as query")
        new = k.shape[1]
        _check(tuple(k.shape) == (batch, new, num_kv, head_dim), "k has the wrong shape")
        _check(tuple(v.shape) == (batch, new, num_kv, head_dim), "v has the wrong shape")
    if cache_seqlens is not None:
        _check(cache_seqlens.dtype == torch.int32, "seqlens_k must have dtype int32")
        _check(cache_seqlens.is_contiguous(), "seqlens_k must be contiguous")
        _check(tuple(cache_seqlens.shape) == (batch,), "seqlens_k must have shape [batch_size]")
        lengths = [int(n) for n in cache_seqlens]
    else:
        lengths = [capacity] * batch

    calls.append(dict(paged=paged, batch=batch, q_len=q_len, appended=new,
                      cache_batch_idx=cache_batch_idx is not None, causal=causal))

    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    group = num_heads // num_kv
    out = torch.empty_like(q)
    for b in range(batch):
        past = lengths[b]
        total = past + new
        _check(total <= capacity, "appending past the end of the KV cache")
        if new:
            index = _slots(k_cache, b, cache_batch_idx, block_table, torch.arange(past, total, device=q.device))
            k_cache[index] = k[b]
            v_cache[index] = v[b]
        index = _slots(k_cache, b, cache_batch_idx, block_table, torch.arange(total, device=q.device))
        keys = k_cache[index].float()                                 # [S, NKV, D]
        values = v_cache[index].float()
        keys = keys.repeat_interleave(group, dim=1)                   # [S, NH, D]
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", q[b].float(), keys) * scale
        if causal:
            # Bottom-right alignment: query i sees keys j <= i + total - q_len.
            i = torch.arange(q_len, device=q.device)[:, None]
            j = torch.arange(total, device=q.device)[None, :]
            scores = scores.masked_fill(j > i + total - q_len, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hts,shd->thd", probs, values).to(q.dtype)
    return out
