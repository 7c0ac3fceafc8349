"""A Layer reuses its argument structs and its LoRA id array from call to call:
nothing of one call (per-sequence lengths, adapter ids, out buffers, a failed
call's half-filled arguments) may leak into the next."""
import dataclasses

import pytest
import torch

import qattn
from layer_case import Spec, assert_close, assert_distinct, build, inputs, reference, run, tables
from test_lora import make_adapters


def test_calls_do_not_inherit_arguments(device, gen):
    spec = Spec(head_norm="rms")
    layer, ref = build(spec, device, gen)
    loras, ref_loras = make_adapters(spec, gen, device, [(1, "q", 4), (1, "o", 4), (2, "k", 8)])
    ref = dataclasses.replace(ref, loras=ref_loras)
    with layer:
        layer.set_loras(loras)
        steps = [
            dict(past_lens=[5, 20], lora_ids=[1, 2]),
            dict(past_len=9),  # no past_lens, no adapters: both must be cleared
            dict(past_len=3, lora_ids=[2]),
            dict(past_len=3, lora_ids=(1,)),  # same ids as a tuple, then other ids
            dict(past_lens=[0, 7], lora_ids=[2, 1]),
            dict(past_len=11, lora_ids=[]),
        ]
        for step in steps:
            out, ctx = run(spec, layer, device, gen, **step)
            assert_close(out, reference(ref, ctx))


def test_failed_call_leaves_next_call_clean(device, gen):
    spec = Spec()
    layer, ref = build(spec, device, gen)
    with layer:
        x, attn = inputs(spec, 2, 3, gen, device)
        sin, cos = tables(spec, device)
        lens = torch.tensor([1, 2], dtype=torch.int32, device=device)
        bad_out = (torch.empty(2, 3, spec.heads, spec.head_dim, dtype=torch.float16, device=device),) * 2
        with pytest.raises(qattn.QattnError, match="out must be a"):
            layer.forward1(x, sin=sin, cos=cos, past_lens=lens, out=bad_out)
        with pytest.raises(qattn.QattnError, match="unknown LoRA adapter id 4"):
            layer.forward1(x, sin=sin, cos=cos, past_lens=lens, loras=[4])
        out, ctx = run(spec, layer, device, gen, past_len=6)
        assert_close(out, reference(ref, ctx))


def test_out_buffers_are_written(device, gen):
    """out given as [batch, q_len, heads, D] or [batch, q_len, heads * D] receives
    what the allocating call returns."""
    spec = Spec(head_norm="rms")
    layer, ref = build(spec, device, gen)
    with layer:
        x, _ = inputs(spec, 2, 3, gen, device)
        sin, cos = tables(spec, device)
        fresh = layer.forward1(x, sin=sin, cos=cos, past_len=2)
        for flat in (False, True):
            out = tuple(torch.full_like(t, float("nan")) for t in fresh)
            given = tuple(t.flatten(2) for t in out) if flat else out
            got = layer.forward1(x, sin=sin, cos=cos, past_len=2, out=given)
            assert all(g is o for g, o in zip(got, given))
            # Same inputs, same kernels: only the order of atomic adds may differ.
            assert_close(dict(zip("qkv", out)), dict(zip("qkv", fresh)), tol=1e-3)


def test_lora_ids_from_any_iterable(device, gen):
    """Ids may come as any iterable of ints; an empty one means no adapters, even
    right after a call that had some."""
    spec = Spec()
    layer, ref = build(spec, device, gen)
    loras, _ = make_adapters(spec, gen, device, [(1, "q", 4), (2, "k", 8)])
    with layer:
        layer.set_loras(loras)
        x, _ = inputs(spec, 2, 3, gen, device)
        sin, cos = tables(spec, device)
        with_ids = dict(zip("qkv", layer.forward1(x, sin=sin, cos=cos, loras=[1, 2])))
        without = dict(zip("qkv", layer.forward1(x, sin=sin, cos=cos)))
        assert_distinct(with_ids, without, ["q", "k"], tol=1e-3, what="dropping the adapters")
        for ids in (iter([1, 2]), torch.tensor([1, 2]), (i for i in (2, 1))):
            got = dict(zip("qkv", layer.forward1(x, sin=sin, cos=cos, loras=ids)))
            assert_close(got, with_ids, tol=1e-3)
            got = dict(zip("qkv", layer.forward1(x, sin=sin, cos=cos, loras=iter(()))))
            assert_close(got, without, tol=1e-3)
