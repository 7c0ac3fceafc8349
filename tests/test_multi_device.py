"""Several layers on two CUDA devices in one process. The same weights are built on
the CPU, cuda:0 and cuda:1 (layer_case.build with one seed); the CUDA layers run
interleaved on their own streams, with the other device current, and as CUDA
graphs replayed in turn, and every output must match the CPU backend's. Matrices
and tensors of the wrong device must be refused with a QattnError that names the
device, by the Python binding and by the C ABI behind it (raw ctypes calls).
Skipped unless torch and qattn both see two CUDA devices."""
import ctypes

import pytest
import torch

import qattn
import reference as R
from layer_case import TOL, Spec, build, inputs, tables
from qattn import _lib


def _two_devices_missing():
    if torch.cuda.device_count() < 2:
        return "needs 2 CUDA devices; torch sees %d" % torch.cuda.device_count()
    if qattn.cuda_device_count() < 2:
        return "needs 2 CUDA devices usable by qattn; it sees %d (%s)" % (qattn.cuda_device_count(),
                                                                         qattn.build_info())
    return None


_MISSING = _two_devices_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))

L = _lib.lib
INVALID = "QATTN_ERROR_INVALID_ARGUMENT"
CPU = torch.device("cpu")
DEVICES = [torch.device("cuda", 0), torch.device("cuda", 1)]

# The two devices run the same kernels on the same data; only the order of the
# fp32 split-K atomic additions may differ, and each output is rounded to fp16
# once, from fp32, so an element moves by at most one ulp (2^-10 relative). Even
# if every element moved, the outputs would agree within 1e-3; a layer reading
# another device's buffers or racing on its scratch is off by O(1).
TOL_BETWEEN_DEVICES = 1e-3

# Two layers of different make-up: GPTQ 4-bit act-order with q/k head norms (the
# tensor-core GEMV with split-K atomics up to 32 rows, dequantize + cuBLAS above)
# and dense fp16 with biases, LayerNorm and a post-norm.
SPECS = {
    "gptq": Spec(gptq=dict(bits=4, group_size=32, act_order=True), head_norm="rms", max_rows=48, max_seq_len=128),
    "dense": Spec(input_norm="layer_bias", post_norm="rms", biases=True, max_rows=48, max_seq_len=128),
}
# (batch, q_len, past_len): decode rows and prefill rows above the 32-row small
# path, at positions that move from step to step.
STEPS = [(4, 1, 9), (2, 24, 0), (4, 1, 37), (3, 16, 60)]


def _graphed(spec, layer, ref):
    """A use_graphs Layer over `layer`'s matrices and norm weights (the latter taken
    from its RefLayer): layer_case.build has no graph option. Closes `layer`."""
    dev = layer.device

    def norm(r):
        if r is None:
            return None
        return qattn.Norm(r.kind, r.weight.to(dev), None if r.bias is None else r.bias.to(dev), eps=r.eps,
                          per_head=r.weight.dim() == 2)

    q, k, v, o = layer._projections
    graphed = qattn.Layer(hidden_size=spec.hidden, num_heads=spec.heads, num_kv_heads=spec.kv_heads,
                          head_dim=spec.head_dim, q_proj=q, k_proj=k, v_proj=v, o_proj=o,
                          input_norm=norm(ref.input_norm), q_norm=norm(ref.q_norm), k_norm=norm(ref.k_norm),
                          post_norm=norm(ref.post_norm), rope=spec.rope, rotary_dim=spec.rotary_dim,
                          has_residual=spec.has_residual, residual_fp32=spec.residual_fp32,
                          max_rows=spec.max_rows, max_seq_len=spec.max_seq_len, use_graphs=True)
    layer.close()
    return graphed


def build_on(spec, devices, seed, use_graphs=False):
    """{device: (Layer, (sin, cos))}: the same weights (one seed) on each device;
    the CUDA layers capture graphs when use_graphs is set."""
    out = {}
    for dev in devices:
        layer, ref = build(spec, dev, torch.Generator().manual_seed(seed))
        if use_graphs and dev.type == "cuda":
            layer = _graphed(spec, layer, ref)
        out[dev] = (layer, tables(spec, dev))
    return out


def forward(layer, tabs, x, attn, past_len):
    """forward1 then forward2 (x updated in place) on the caller's current stream."""
    sin, cos = tabs
    q, k, v = layer.forward1(x, sin=sin, cos=cos, past_len=past_len)
    return {"q": q, "k": k, "v": v, "x": layer.forward2(x, attn)}


def assert_same(out, expected, x, tol, what):
    """q, k, v and what forward2 added to x (the unchanged residual would hide an
    error in the O projection) within `tol` relative error."""
    errs = {name: R.rel_err(out[name], expected[name]) for name in "qkv"}
    errs["x"] = R.rel_err(out["x"].cpu().double() - x.double(), expected["x"].cpu().double() - x.double())
    bad = {name: e for name, e in errs.items() if not e < tol}
    assert not bad, "%s: relative errors above %g: %s (all: %s)" % (what, tol, bad, errs)


def cpu_outputs(layers, x, attn, past_len):
    """The CPU layer of `layers` on a step's CPU inputs."""
    layer, tabs = layers[CPU]
    return forward(layer, tabs, x.clone(), attn, past_len)


def check_step(layers, x, attn, past_len, outs):
    """outs {cuda device: outputs of forward()} against the CPU layer in `layers` and
    against each other; x and attn are the step's CPU inputs."""
    expected = cpu_outputs(layers, x, attn, past_len)
    for dev, out in outs.items():
        assert_same(out, expected, x, TOL, "%s vs the CPU backend" % dev)
    # The outputs themselves, the new x included: the one-ulp bound is on them.
    errs = {name: R.rel_err(outs[DEVICES[1]][name], outs[DEVICES[0]][name]) for name in "qkvx"}
    assert all(e < TOL_BETWEEN_DEVICES for e in errs.values()), "cuda:1 vs cuda:0: %s" % errs


def test_same_weights_on_two_devices_interleaved_on_side_streams(gen):
    models = {name: build_on(spec, [CPU] + DEVICES, seed=11 + i) for i, (name, spec) in enumerate(SPECS.items())}
    streams = {(name, dev): torch.cuda.Stream(dev) for name in SPECS for dev in DEVICES}
    runs = []
    for batch, q_len, past_len in STEPS:
        for name, spec in SPECS.items():
            x, attn = inputs(spec, batch, q_len, gen, CPU)
            runs.append(dict(name=name, x=x, attn=attn, past_len=past_len, out={},
                             dev={dev: (x.to(dev), attn.to(dev)) for dev in DEVICES}))
    # Tables and inputs were written on each device's default stream, which the
    # side streams do not wait for.
    for dev in DEVICES:
        torch.cuda.synchronize(dev)
    # Everything is queued before any result is read: forward1 and forward2 of each
    # layer alternate between the devices, and four streams on two devices have
    # work in flight together.
    for r in runs:
        layers = models[r["name"]]
        for dev in DEVICES:
            layer, (sin, cos) = layers[dev]
            with torch.cuda.stream(streams[r["name"], dev]):
                r["out"][dev] = dict(zip("qkv", layer.forward1(r["dev"][dev][0], sin=sin, cos=cos,
                                                               past_len=r["past_len"])))
        for dev in DEVICES:
            with torch.cuda.stream(streams[r["name"], dev]):
                r["out"][dev]["x"] = layers[dev][0].forward2(*r["dev"][dev])
    for dev in DEVICES:
        torch.cuda.synchronize(dev)
    for r in runs:
        check_step(models[r["name"]], r["x"], r["attn"], r["past_len"], r["out"])


@pytest.mark.parametrize("current,target", [(0, 1), (1, 0)])
def test_layer_of_the_other_device_restores_the_current_device(current, target, gen):
    spec = SPECS["gptq"]
    dev = DEVICES[target]
    layers = build_on(spec, [CPU, dev], seed=5)
    layer, tabs = layers[dev]
    x, attn = inputs(spec, 4, 1, gen, CPU)
    side = torch.cuda.Stream(dev)
    torch.cuda.synchronize(dev)  # the tables were written on the default stream
    # A side stream of the layer's device is current there while the other device
    # is torch's current device, as when one thread drives several cards: the
    # library must switch to the layer's device for each call and back after it.
    with torch.cuda.stream(side), torch.cuda.device(current):
        xd, ad = x.to(dev), attn.to(dev)
        sin, cos = tabs
        q, k, v = layer.forward1(xd, sin=sin, cos=cos, past_len=7)
        assert torch.cuda.current_device() == current
        y = layer.forward2(xd, ad)
        assert torch.cuda.current_device() == current
    side.synchronize()
    assert_same({"q": q, "k": k, "v": v, "x": y}, cpu_outputs(layers, x, attn, 7), x, TOL,
                "%s called with cuda:%d current" % (dev, current))


def test_graphs_on_both_devices_replayed_in_turn(gen):
    spec = SPECS["gptq"]
    layers = build_on(spec, [CPU] + DEVICES, seed=23, use_graphs=True)
    streams = {dev: torch.cuda.Stream(dev) for dev in DEVICES}
    for dev in DEVICES:
        torch.cuda.synchronize(dev)
    # Two shapes, so each device captures two graphs and then replays them with
    # fresh tensors (new pointers) and a new past_len. The devices take turns; which
    # goes first changes every two steps, so each shape sees both orders.
    for step in range(6):
        batch, q_len = (4, 1) if step % 2 == 0 else (2, 24)
        past_len = 3 + 11 * step
        x, attn = inputs(spec, batch, q_len, gen, CPU)
        outs = {}
        for dev in DEVICES if step % 4 < 2 else DEVICES[::-1]:
            layer, tabs = layers[dev]
            with torch.cuda.stream(streams[dev]):
                outs[dev] = forward(layer, tabs, x.to(dev), attn.to(dev), past_len)
        for dev in DEVICES:
            streams[dev].synchronize()
        check_step(layers, x, attn, past_len, outs)


# ---- the wrong device ----------------------------------------------------------

def expect_raise(words, fn, *args, **kwargs):
    """fn raises QattnError INVALID_ARGUMENT whose message holds every one of `words`."""
    with pytest.raises(qattn.QattnError) as e:
        fn(*args, **kwargs)
    assert e.value.status == INVALID, e.value
    for w in words:
        assert w in e.value.message, e.value


def expect_status(words, code):
    """For raw C calls: INVALID_ARGUMENT, and the thread's last message holds `words`."""
    assert L.qattn_status_string(code).decode() == INVALID, L.qattn_last_error()
    message = L.qattn_last_error().decode()
    for w in words:
        assert w in message, message


# (the layer's device, the other one): each direction once.
DIRECTIONS = [(1, 0), (0, 1)]


@pytest.mark.parametrize("mine,other", DIRECTIONS)
def test_matrix_of_the_other_device_is_refused(mine, other):
    spec = Spec(max_rows=8, max_seq_len=32)
    models = build_on(spec, DEVICES, seed=3)
    own = models[DEVICES[mine]][0]._projections
    foreign = models[DEVICES[other]][0]._projections
    sizes = dict(hidden_size=spec.hidden, num_heads=spec.heads, num_kv_heads=spec.kv_heads, head_dim=spec.head_dim,
                 max_rows=spec.max_rows, max_seq_len=spec.max_seq_len)
    # The binding: a layer's device is its q_proj's, and the others must agree.
    for i, name in enumerate(("k_proj", "v_proj", "o_proj")):
        mats = dict(zip(("q_proj", "k_proj", "v_proj", "o_proj"), own))
        mats[name] = foreign[i + 1]
        expect_raise(["%s is on cuda:%d but q_proj on cuda:%d" % (name, other, mine)], qattn.Layer, **sizes, **mats)
    norm = qattn.Norm("rms", torch.ones(spec.hidden, dtype=torch.float16, device=DEVICES[other]))
    expect_raise(["input_norm.weight is on cuda:%d, expected cuda:%d" % (other, mine)], qattn.Layer, **sizes,
                 input_norm=norm, **dict(zip(("q_proj", "k_proj", "v_proj", "o_proj"), own)))
    # The C ABI, which a C caller reaches without the binding: config.device names
    # the layer's device and each projection must live there.
    base = L.qattn_layer_config_default()
    base.device = mine
    base.hidden_size, base.num_heads, base.num_kv_heads, base.head_dim = (spec.hidden, spec.heads, spec.kv_heads,
                                                                          spec.head_dim)
    base.max_rows, base.max_seq_len = spec.max_rows, spec.max_seq_len
    base.q_proj, base.k_proj, base.v_proj, base.o_proj = (m.handle for m in own)
    h = ctypes.c_void_p()
    for i, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
        c = _lib.LayerConfig.from_buffer_copy(base)
        setattr(c, name, foreign[i].handle)
        expect_status(["config.%s lives on device %d, the layer on device %d" % (name, other, mine)],
                      L.qattn_create(ctypes.byref(c), ctypes.byref(h)))
        assert not h.value
    # The same config with its own matrices is accepted: the refusals came from the device.
    assert L.qattn_create(ctypes.byref(base), ctypes.byref(h)) == 0, L.qattn_last_error()
    L.qattn_destroy(h)


@pytest.mark.parametrize("mine,other", DIRECTIONS)
def test_tensors_of_the_other_device_are_refused(mine, other, gen):
    spec = Spec(max_rows=8, max_seq_len=32)
    here, there = DEVICES[mine], DEVICES[other]
    layers = build_on(spec, [CPU, here], seed=4)
    layer = layers[here][0]
    batch, q_len = 2, 3
    x, attn = inputs(spec, batch, q_len, gen, CPU)
    # Every tensor of the calls, on both devices.
    t = {}
    for dev in (here, there):
        t[dev] = dict(x=x.to(dev), attn=attn.to(dev), past_lens=torch.tensor([1, 5], dtype=torch.int32, device=dev),
                      q=torch.empty(batch, q_len, spec.heads, spec.head_dim, dtype=torch.float16, device=dev),
                      k=torch.empty(batch, q_len, spec.kv_heads, spec.head_dim, dtype=torch.float16, device=dev),
                      v=torch.empty(batch, q_len, spec.kv_heads, spec.head_dim, dtype=torch.float16, device=dev))
        t[dev]["sin"], t[dev]["cos"] = tables(spec, dev)
    ok, bad = t[here], t[there]
    moved = "is on cuda:%d, expected cuda:%d" % (other, mine)

    # The binding.
    def f1(**wrong):
        a = dict(ok, **wrong)
        return layer.forward1(a["x"], sin=a["sin"], cos=a["cos"], past_lens=a["past_lens"],
                              out=(a["q"], a["k"], a["v"]))

    for name, words in (("x", "x " + moved), ("sin", "sin " + moved), ("cos", "cos " + moved),
                        ("past_lens", "past_lens " + moved), ("q", "out[0] (q) " + moved),
                        ("k", "out[1] (k) " + moved), ("v", "out[2] (v) " + moved)):
        expect_raise([words], f1, **{name: bad[name]})
    before = bad["x"].clone()
    expect_raise(["x " + moved], layer.forward2, bad["x"], ok["attn"])
    expect_raise(["attn_out " + moved], layer.forward2, ok["x"].clone(), bad["attn"])
    assert torch.equal(bad["x"], before), "a refused forward2 wrote to x"

    # The C ABI: every pointer is located before anything is launched.
    stream = qattn._tensors.stream_of(here)
    where = "must be in the memory of CUDA device %d (it is in another device's memory)" % mine
    for name in ("x", "sin", "cos", "past_lens", "q", "k", "v"):
        a = L.qattn_forward1_args_default()
        a.batch, a.q_len, a.max_positions = batch, q_len, ok["sin"].shape[0]
        for field in ("x", "sin", "cos", "past_lens", "q", "k", "v"):
            setattr(a, field, (bad if field == name else ok)[field].data_ptr())
        expect_status([name + " " + where], L.qattn_forward1(layer._handle, ctypes.byref(a), stream))
    for name in ("x", "attn_out"):
        a = L.qattn_forward2_args_default()
        a.batch, a.q_len = batch, q_len
        a.x = (bad if name == "x" else ok)["x"].data_ptr()
        a.attn_out = (bad if name == "attn_out" else ok)["attn"].data_ptr()
        expect_status([name + " " + where], L.qattn_forward2(layer._handle, ctypes.byref(a), stream))
    assert torch.equal(bad["x"], before), "a refused qattn_forward2 wrote to x"

    # Nothing was left half done: the layer computes the right answer afterwards.
    out = forward(layer, (ok["sin"], ok["cos"]), ok["x"], ok["attn"], 4)
    assert_same(out, cpu_outputs(layers, x, attn, 4), x, TOL, "%s after the refusals" % here)


@pytest.mark.parametrize("mine,other", DIRECTIONS)
def test_stream_of_the_other_device_is_refused(mine, other, gen):
    """The binding always passes the current stream of the layer's own device, but a
    C caller may pass a stream of another device: like a tensor there, it should be
    refused up front with a message naming the stream and the layer's device, not
    fail in some kernel launch (or in the middle of a call)."""
    spec = Spec(max_rows=8, max_seq_len=32)
    here, there = DEVICES[mine], DEVICES[other]
    layer, (sin, cos) = build_on(spec, [here], seed=6)[here]
    x, _ = inputs(spec, 2, 3, gen, here)
    q = torch.empty(2, 3, spec.heads, spec.head_dim, dtype=torch.float16, device=here)
    k, v = (torch.empty(2, 3, spec.kv_heads, spec.head_dim, dtype=torch.float16, device=here) for _ in range(2))
    torch.cuda.synchronize(here)
    # Not the default stream: NULL stands for the legacy stream of whichever device
    # is current, which the library makes the layer's.
    foreign = torch.cuda.Stream(there)
    a = L.qattn_forward1_args_default()
    a.batch, a.q_len, a.max_positions = 2, 3, sin.shape[0]
    a.x, a.sin, a.cos, a.q, a.k, a.v = (t.data_ptr() for t in (x, sin, cos, q, k, v))
    expect_status(["stream", "device %d" % mine], L.qattn_forward1(layer._handle, ctypes.byref(a), foreign.cuda_stream))
