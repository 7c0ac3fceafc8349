"""forward1 writing keys and values straight into a KV cache (kv_cache, kv_slots):
the rows must land at their slots, bit for bit what forward1 returns as k and v,
nothing else in the cache may change, and bad slots give errors, not writes."""
import dataclasses

import pytest
import torch

import qattn
from layer_case import Spec, build, inputs, tables

SPEC = Spec(hidden=128, heads=4, kv_heads=2, head_dim=64, head_norm="rms", biases=True, max_rows=16,
            gptq=dict(bits=4, group_size=32, act_order=True))
GUARD = 123.0  # what the cache holds before: any slot written by mistake shows


def _caches(num_slots, device):
    shape = (num_slots, SPEC.kv_heads, SPEC.head_dim)
    return (torch.full(shape, GUARD, dtype=torch.float16, device=device),
            torch.full(shape, -GUARD, dtype=torch.float16, device=device))


# Up to 300 rows: on CUDA the head epilogue in the GEMM, its kernel per (row,
# head) and, from 128 rows, its kernel per row.
@pytest.mark.parametrize("batch,q_len", [(1, 1), (3, 1), (8, 1), (16, 1), (2, 5), (2, 150)])
def test_rows_land_in_their_slots(device, gen, batch, q_len):
    spec = dataclasses.replace(SPEC, max_rows=max(SPEC.max_rows, batch * q_len),
                               max_seq_len=max(SPEC.max_seq_len, 20 + q_len))
    layer, _ = build(spec, device, gen)
    x, _ = inputs(spec, batch, q_len, gen, device)
    sin, cos = tables(spec, device)
    past_lens = torch.randint(0, 20, (batch,), generator=gen, dtype=torch.int32).to(device)
    q_ref, k_ref, v_ref = layer.forward1(x, sin=sin, cos=cos, past_lens=past_lens)

    num_slots = 4 * batch * q_len + 7
    slots = torch.randperm(num_slots, generator=gen)[: batch * q_len].to(torch.int32).view(batch, q_len)
    k_cache, v_cache = _caches(num_slots, device)
    q, k, v = layer.forward1(x, sin=sin, cos=cos, past_lens=past_lens, kv_cache=(k_cache, v_cache),
                             kv_slots=slots.to(device))
    assert k is None and v is None
    assert torch.equal(q.cpu(), q_ref.cpu())
    flat = slots.view(-1).long()
    assert torch.equal(k_cache.cpu()[flat], k_ref.cpu().reshape(-1, SPEC.kv_heads, SPEC.head_dim))
    assert torch.equal(v_cache.cpu()[flat], v_ref.cpu().reshape(-1, SPEC.kv_heads, SPEC.head_dim))
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[flat] = False
    assert (k_cache.cpu()[untouched] == GUARD).all() and (v_cache.cpu()[untouched] == -GUARD).all()

    # With out= as well, both destinations are written.
    out = [torch.empty_like(t) for t in (q_ref, k_ref, v_ref)]
    k_cache, v_cache = _caches(num_slots, device)
    layer.forward1(x, sin=sin, cos=cos, past_lens=past_lens, kv_cache=(k_cache, v_cache), kv_slots=slots.to(device),
                   out=out)
    for o, r in zip(out, (q_ref, k_ref, v_ref)):
        assert torch.equal(o.cpu(), r.cpu())
    assert torch.equal(k_cache.cpu()[flat], k_ref.cpu().reshape(-1, SPEC.kv_heads, SPEC.head_dim))


def test_block_over_a_contiguous_cache_matches_copying(device, gen):
    # Layer.forward with the torch backend now has forward1 write the cache; the
    # result must be what attend() gives after a plain forward1.
    layer, _ = build(SPEC, device, gen)
    sin, cos = tables(SPEC, device)
    caches = [qattn.ContiguousKVCache(2, 32, SPEC.kv_heads, SPEC.head_dim, device=device) for _ in range(2)]
    for step, q_len in enumerate((5, 1, 1)):
        x, _ = inputs(SPEC, 2, q_len, gen, device)
        x_direct = layer.forward(x.clone(), caches[0], sin=sin, cos=cos, backend="torch")
        lens = torch.tensor(caches[1].lengths(), dtype=torch.int32, device=device)
        q, k, v = layer.forward1(x, sin=sin, cos=cos, past_lens=lens)
        out = qattn.attention.attend(q, k, v, caches[1], backend="torch")
        x_copy = layer.forward2(x.clone(), out)
        assert torch.equal(x_direct.cpu(), x_copy.cpu()), "step %d" % step
        assert torch.equal(caches[0].k.cpu(), caches[1].k.cpu()) and torch.equal(caches[0].v.cpu(), caches[1].v.cpu())


def test_bad_arguments_are_refused(device, gen):
    layer, _ = build(SPEC, device, gen)
    x, _ = inputs(SPEC, 2, 1, gen, device)
    sin, cos = tables(SPEC, device)
    k_cache, v_cache = _caches(10, device)
    slots = torch.tensor([[1], [2]], dtype=torch.int32, device=device)
    cases = {
        "kv_cache without kv_slots": dict(kv_cache=(k_cache, v_cache)),
        "kv_slots without kv_cache": dict(kv_slots=slots),
        "slots of the wrong dtype": dict(kv_cache=(k_cache, v_cache), kv_slots=slots.long()),
        "slots of the wrong shape": dict(kv_cache=(k_cache, v_cache), kv_slots=slots.view(-1)[:1]),
        "cache of the wrong heads": dict(kv_cache=(k_cache.view(10, 1, -1), v_cache.view(10, 1, -1)), kv_slots=slots),
        "caches of different shapes": dict(kv_cache=(k_cache, v_cache[:5]), kv_slots=slots),
        "a single cache": dict(kv_cache=k_cache, kv_slots=slots),
    }
    for what, kwargs in cases.items():
        with pytest.raises(qattn.QattnError) as info:
            layer.forward1(x, sin=sin, cos=cos, past_len=0, **kwargs)
        assert info.value.status == "QATTN_ERROR_INVALID_ARGUMENT", what
    assert (k_cache == GUARD).all() and (v_cache == -GUARD).all()


@pytest.mark.parametrize("rows", [3, 200])  # on CUDA: the kernel per (row, head), and per row
def test_slots_outside_the_cache(device, gen, rows):
    spec = dataclasses.replace(SPEC, max_rows=max(SPEC.max_rows, rows))
    layer, _ = build(spec, device, gen)
    x, _ = inputs(spec, rows, 1, gen, device)
    sin, cos = tables(spec, device)
    k_cache, v_cache = _caches(8, device)
    bad = torch.full((rows, 1), -1, dtype=torch.int32)
    bad[0], bad[1] = 0, 8
    bad = bad.to(device)
    if device.type == "cpu":
        # Host slots are checked before anything is computed.
        with pytest.raises(qattn.QattnError) as info:
            layer.forward1(x, sin=sin, cos=cos, past_len=0, kv_cache=(k_cache, v_cache), kv_slots=bad)
        assert info.value.status == "QATTN_ERROR_OUT_OF_RANGE" and "kv_slots[1] = 8" in str(info.value)
        assert (k_cache == GUARD).all()
        return
    # Device slots are checked by the kernel: good rows are written, bad ones are
    # not (nothing outside the cache), and the layer reports it afterwards.
    _, k_ref, _ = layer.forward1(x, sin=sin, cos=cos, past_len=0)
    layer.forward1(x, sin=sin, cos=cos, past_len=0, kv_cache=(k_cache, v_cache), kv_slots=bad)
    with pytest.raises(qattn.QattnError) as info:
        layer.check_device_errors()
    assert info.value.status == "QATTN_ERROR_OUT_OF_RANGE" and "kv_slots" in str(info.value)
    layer.check_device_errors()  # cleared
    assert torch.equal(k_cache[0].cpu(), k_ref[0, 0].cpu())
    assert (k_cache[1:] == GUARD).all() and (v_cache[1:] == -GUARD).all()