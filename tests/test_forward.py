"""forward1 / forward2 against the float64 reference, one feature at a time.
Tolerances: layer_case.TOL (3e-3) for fp16 outputs, TOL_FP32_RESIDUAL (3e-5) for
the fp32 residual stream; see layer_case.py for why."""
import dataclasses

import pytest
import torch

import quant
import reference as R
from layer_case import TOL, TOL_FP32_RESIDUAL, Spec, assert_close, assert_distinct, build, reference, run


def check(spec, device, gen, variant=None, variant_names=("q", "k", "v", "x"), tol=TOL, **kw):
    """Builds and runs `spec`, compares with the reference, and (given `variant`, a
    function of the RefLayer) checks that the variant's reference is far off."""
    layer, ref = build(spec, device, gen)
    with layer:
        out, ctx = run(spec, layer, device, gen, **kw)
        expected = reference(ref, ctx)
        assert_close(out, expected, tol)
        if variant is not None:
            assert_distinct(expected, reference(variant(ref), ctx), variant_names, tol)
    return out, expected


@pytest.mark.parametrize("kind", [None, "rms", "layer", "layer_bias"])
def test_input_norm(device, gen, kind):
    other = {None: "rms", "rms": None, "layer": "rms", "layer_bias": "layer"}[kind]

    def variant(ref):
        n = ref.input_norm
        if other is None:
            return dataclasses.replace(ref, input_norm=None)
        if n is None:
            return dataclasses.replace(ref, input_norm=R.RefNorm("rms", torch.ones(ref.wq.shape[0])))
        return dataclasses.replace(ref, input_norm=R.RefNorm(other, n.weight, None, n.eps))

    check(Spec(input_norm=kind), device, gen, variant, ("q", "k", "v"))


@pytest.mark.parametrize("kind", ["rms", "layer_bias", "rms_per_head", "layer_per_head_bias"])
def test_head_norms(device, gen, kind):
    def variant(ref):
        return dataclasses.replace(ref, q_norm=None, k_norm=None)

    check(Spec(head_norm=kind), device, gen, variant, ("q", "k"))


def test_per_head_norm_weights_differ_per_head(device, gen):
    """A [heads, D] weight must be applied per head, not as head 0's weight for all."""
    def variant(ref):
        return dataclasses.replace(ref, q_norm=dataclasses.replace(ref.q_norm, weight=ref.q_norm.weight[0]),
                                   k_norm=dataclasses.replace(ref.k_norm, weight=ref.k_norm.weight[0]))

    check(Spec(head_norm="rms_per_head"), device, gen, variant, ("q", "k"))


@pytest.mark.parametrize("rope", ["neox", "gptj", None])
@pytest.mark.parametrize("partial", [False, True])
def test_rope(device, gen, rope, partial):
    if rope is None and partial:
        pytest.skip("rotary_dim is ignored without RoPE")
    spec = Spec(rope=rope, rotary_dim=32 if partial else None, max_seq_len=40)
    other = {"neox": "gptj", "gptj": "neox", None: "neox"}[rope]

    def variant(ref):
        return dataclasses.replace(ref, rope=other)

    if rope is None:
        check(spec, device, gen, past_len=9)
    else:
        check(spec, device, gen, variant, ("q", "k"), past_len=9)


@pytest.mark.parametrize("kind", ["rms", "layer", "layer_bias"])
def test_post_norm(device, gen, kind):
    check(Spec(post_norm=kind), device, gen, lambda ref: dataclasses.replace(ref, post_norm=None), ("x",))


@pytest.mark.parametrize("has_residual", [True, False])
@pytest.mark.parametrize("residual_fp32", [False, True])
def test_residual(device, gen, has_residual, residual_fp32):
    spec = Spec(has_residual=has_residual, residual_fp32=residual_fp32, post_norm="rms")
    tol = TOL_FP32_RESIDUAL if residual_fp32 and has_residual else TOL
    layer, ref = build(spec, device, gen)
    with layer:
        out, ctx = run(spec, layer, device, gen)
        assert out["x"].dtype == (torch.float32 if residual_fp32 else torch.float16)
        expected = reference(ref, ctx)
        # q, k, v are fp16 whatever the residual's dtype.
        assert_close({n: out[n] for n in "qkv"}, expected)
        assert_close({"x": out["x"]}, expected, tol)
        assert_distinct(expected, reference(dataclasses.replace(ref, has_residual=not has_residual), ctx), ("x",))
        if residual_fp32 and has_residual:
            # An fp16 round trip of the residual would be caught by the fp32 tolerance.
            assert R.rel_err(out["x"].half(), expected["x"]) > 2 * tol
            # The update itself (small next to x) to fp16-output accuracy.
            update = R.d64(out["x"]) - R.d64(ctx["x"])
            assert R.rel_err(update, expected["x"] - R.d64(ctx["x"])) < TOL


def test_biases(device, gen):
    def variant(ref):
        return dataclasses.replace(ref, bq=None, bk=None, bv=None, bo=None)

    check(Spec(biases=True), device, gen, variant)


def test_all_features_together(device, gen):
    spec = Spec(input_norm="layer_bias", head_norm="layer_per_head_bias", rope="gptj", rotary_dim=32,
                post_norm="layer_bias", biases=True, gptq=dict(bits=4, group_size=32, act_order=True))
    check(spec, device, gen, batch=2, q_len=4, past_lens=[3, 17])


SHAPES = [
    # hidden, heads, kv_heads, head_dim
    (128, 4, 2, 64),
    (256, 4, 1, 128),
    (128, 4, 2, 256),
    (96, 6, 3, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H%d-NH%d-NKV%d-D%d" % s)
@pytest.mark.parametrize("rows", ["decode", "batched", "max_rows"])
def test_shapes(device, gen, shape, rows):
    H, NH, NKV, D = shape
    spec = Spec(hidden=H, heads=NH, kv_heads=NKV, head_dim=D, rotary_dim=D // 2, head_norm="rms", max_rows=8,
                max_seq_len=48)
    if rows == "decode":
        check(spec, device, gen, batch=1, q_len=1, past_len=30)
    elif rows == "batched":
        # Different past lengths per sequence: a backend using one position for all fails.
        layer, ref = build(spec, device, gen)
        with layer:
            out, ctx = run(spec, layer, device, gen, batch=3, q_len=2, past_lens=[0, 13, 40])
            expected = reference(ref, ctx)
            assert_close(out, expected)
            same = dict(ctx, past_lens=None, past_len=13)
            assert_distinct(expected, reference(ref, same), ("q", "k"), what="one past_len for all")
    else:
        check(spec, device, gen, batch=2, q_len=4, past_len=44)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("zero_offset_one", [True, False])
def test_gptq(device, gen, bits, group_size, act_order, zero_offset_one):
    spec = Spec(hidden=256, heads=4, kv_heads=2, head_dim=64, biases=True,
                gptq=dict(bits=bits, group_size=group_size, act_order=act_order, zero_offset_one=zero_offset_one))
    packed = []
    layer, ref = build(spec, device, gen, packed)
    with layer:
        out, ctx = run(spec, layer, device, gen)
        expected = reference(ref, ctx)
        assert_close(out, expected)

    def other_zero(w, g):
        # The other zero convention moves every weight by one quantization step.
        step = g["scales"].double()[g["g_idx"].long()]
        return w + step if zero_offset_one else w - step

    wrong_zero = dataclasses.replace(ref, **{"w" + p: other_zero(getattr(ref, "w" + p), g)
                                             for p, g in zip("qkvo", packed)})
    # One step is 1/15 of the 4-bit range but 1/255 of the 8-bit one, so the 8-bit
    # shift is smaller; it stays several times the tolerance.
    assert_distinct(expected, reference(wrong_zero, ctx), ("q", "k", "v"), tol=TOL if bits == 4 else TOL / 4,
                    what="the other zero convention")
    if act_order:
        def sequential(w, g):
            return quant.dequantize_gptq(g["qweight"], g["qzeros"], g["scales"], None, bits, zero_offset_one,
                                         group_size)

        ignored_g_idx = dataclasses.replace(ref, **{"w" + p: sequential(getattr(ref, "w" + p), g)
                                                    for p, g in zip("qkvo", packed)})
        assert_distinct(expected, reference(ignored_g_idx, ctx), ("q", "x"), what="ignoring g_idx")


def test_gptq_dequantize_matches_packing(gen):
    """The unpacking helper the HF-parity tests use inverts the packing."""
    for bits in (4, 8):
        for zero_offset_one in (True, False):
            g = quant.random_gptq(64, 32, bits=bits, group_size=32, act_order=True, zero_offset_one=zero_offset_one,
                                  generator=gen)
            w = quant.dequantize_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits, zero_offset_one)
            assert torch.equal(w, g["w"])


def test_gptq_without_g_idx(device, gen):
    """Without g_idx, input row k uses group k // group_size."""
    check(Spec(hidden=128, gptq=dict(bits=4, group_size=32), gptq_g_idx=False), device, gen)
