"""LoRA adapters: each projection, several adapters at once with different ranks,
one id over several projections, the LoRA-before-post-norm order, replacement."""
import dataclasses

import pytest
import torch

import qattn
import reference as R
from layer_case import Spec, assert_close, assert_distinct, build, reference, run

# (id, proj, rank); id 1 covers three projections, id 2 two, id 7 one.
ADAPTERS = [(1, "q", 4), (1, "v", 4), (1, "o", 4), (2, "k", 8), (2, "q", 2), (7, "o", 16)]


def make_adapters(spec, gen, device, adapters=ADAPTERS):
    H, q_width, kv_width = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    widths = {"q": (H, q_width), "k": (H, kv_width), "v": (H, kv_width), "o": (q_width, H)}
    loras, ref_loras = [], {}
    for ident, proj, rank in adapters:
        fan_in, fan_out = widths[proj]
        a = (torch.randn(fan_in, rank, generator=gen) / fan_in**0.5).half()
        b = (torch.randn(rank, fan_out, generator=gen) * (0.5 / rank**0.5)).half()
        loras.append(qattn.LoRA(ident, proj, a.to(device), b.to(device)))
        ref_loras[(ident, proj)] = (a, b)
    return loras, ref_loras


@pytest.mark.parametrize("active", [(), (1,), (2, 7), (7, 2, 1)], ids=lambda a: "ids" + "-".join(map(str, a)))
def test_lora_sets(device, gen, active):
    spec = Spec(head_norm="rms", biases=True)
    layer, ref = build(spec, device, gen)
    loras, ref_loras = make_adapters(spec, gen, device)
    with layer:
        assert layer.set_loras(loras) == 16
        ref = dataclasses.replace(ref, loras=ref_loras)
        out, ctx = run(spec, layer, device, gen, lora_ids=active)
        expected = reference(ref, ctx)
        assert_close(out, expected)
        touched = {proj for (ident, proj) in ref_loras if ident in active}
        names = [n for n in ("q", "k", "v") if n in touched] + (["x"] if "o" in touched else [])
        if names:
            plain = dict(ctx, lora_ids=())
            assert_distinct(expected, reference(ref, plain), names, what="dropping the adapters")


@pytest.mark.parametrize("proj", ["q", "k", "v", "o"])
def test_lora_each_projection(device, gen, proj):
    spec = Spec()
    layer, ref = build(spec, device, gen)
    loras, ref_loras = make_adapters(spec, gen, device, [(5, proj, 8)])
    with layer:
        layer.set_loras(loras)
        ref = dataclasses.replace(ref, loras=ref_loras)
        out, ctx = run(spec, layer, device, gen, lora_ids=[5])
        expected = reference(ref, ctx)
        assert_close(out, expected)
        name = "x" if proj == "o" else proj
        assert_distinct(expected, reference(ref, dict(ctx, lora_ids=())), [name], what="dropping the adapter")


def test_lora_before_post_norm(device, gen):
    spec = Spec(post_norm="rms", has_residual=True)
    layer, ref = build(spec, device, gen)
    loras, ref_loras = make_adapters(spec, gen, device, [(3, "o", 8)])
    with layer:
        layer.set_loras(loras)
        ref = dataclasses.replace(ref, loras=ref_loras)
        out, ctx = run(spec, layer, device, gen, lora_ids=[3])
        expected = reference(ref, ctx)
        assert_close(out, expected)
        # Adding the delta after the post-norm instead must be caught.
        attn = R.d64(ctx["attn"]).reshape(-1, spec.heads * spec.head_dim)
        a, b = ref_loras[(3, "o")]
        y = R.norm(attn @ R.d64(ref.wo), ref.post_norm) + (attn @ R.d64(a)) @ R.d64(b)
        late = R.d64(ctx["x"]) + y.reshape(ctx["x"].shape)
        assert_distinct(expected, {"x": late}, ["x"], what="LoRA after the post-norm")


def test_set_loras_replaces_the_set(device, gen):
    spec = Spec()
    layer, ref = build(spec, device, gen)
    first, _ = make_adapters(spec, gen, device)
    second, ref_second = make_adapters(spec, gen, device, [(9, "v", 3)])
    with layer:
        assert layer.set_loras(first) == 16
        assert layer.set_loras(second) == 3
        with pytest.raises(qattn.QattnError) as e:
            run(spec, layer, device, gen, lora_ids=[1])
        assert e.value.status == "QATTN_ERROR_OUT_OF_RANGE" and "unknown LoRA adapter id 1" in e.value.message
        out, ctx = run(spec, layer, device, gen, lora_ids=[9])
        assert_close(out, reference(dataclasses.replace(ref, loras=ref_second), ctx))
        assert layer.set_loras([]) == 0
        with pytest.raises(qattn.QattnError, match="unknown LoRA adapter id 9"):
            run(spec, layer, device, gen, lora_ids=[9])


def test_lora_weights_from_host_memory(device, gen):
    """Adapter weights may be given in host memory; the library copies them."""
    spec = Spec()
    layer, ref = build(spec, device, gen)
    loras, ref_loras = make_adapters(spec, gen, torch.device("cpu"), [(4, "q", 6), (4, "o", 6)])
    with layer:
        layer.set_loras(loras)
        del loras
        out, ctx = run(spec, layer, device, gen, lora_ids=[4])
        assert_close(out, reference(dataclasses.replace(ref, loras=ref_loras), ctx))
