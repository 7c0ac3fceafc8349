"""Bad input: every case must raise QattnError (or return a status through raw
ctypes) with the expected status and a message naming the problem; never crash."""
import ctypes

import pytest
import torch

import qattn
from qattn import _lib
from layer_case import Spec, build, inputs, tables

L = _lib.lib
INVALID = "QATTN_ERROR_INVALID_ARGUMENT"
RANGE = "QATTN_ERROR_OUT_OF_RANGE"


def expect_raise(status, words, fn, *args, **kwargs):
    with pytest.raises(qattn.QattnError) as e:
        fn(*args, **kwargs)
    assert e.value.status == status, e.value
    for w in words if isinstance(words, (list, tuple)) else [words]:
        assert w in e.value.message, e.value
    return e.value


def expect_status(status, words, code):
    """For raw C calls: the status code and the thread's last message."""
    assert L.qattn_status_string(code).decode() == status, L.qattn_last_error()
    message = L.qattn_last_error().decode()
    for w in words if isinstance(words, (list, tuple)) else [words]:
        assert w in message, message


@pytest.fixture
def small(device, gen):
    """A small RoPE layer, its inputs and tables on `device`."""
    spec = Spec(hidden=64, heads=4, kv_heads=2, head_dim=32, max_rows=6, max_seq_len=32)
    layer, _ = build(spec, device, gen)
    x, attn = inputs(spec, 2, 3, gen, device)
    sin, cos = tables(spec, device)
    yield spec, layer, x, attn, sin, cos
    layer.close()


# ---- raw C ABI: NULL pointers and handles, struct_size -----------------------

def test_null_handles_and_pointers(small):
    spec, layer, x, attn, sin, cos = small
    h = ctypes.c_void_p()
    handle = layer._handle
    expect_status(INVALID, "qattn_qmatrix_desc is NULL", L.qattn_qmatrix_create(None, ctypes.byref(h)))
    desc = L.qattn_qmatrix_desc_default()
    expect_status(INVALID, "out is NULL", L.qattn_qmatrix_create(ctypes.byref(desc), None))
    expect_status(INVALID, "qattn_layer_config is NULL", L.qattn_create(None, ctypes.byref(h)))
    config = L.qattn_layer_config_default()
    expect_status(INVALID, "out is NULL", L.qattn_create(ctypes.byref(config), None))
    f1 = L.qattn_forward1_args_default()
    f2 = L.qattn_forward2_args_default()
    expect_status(INVALID, "layer is NULL", L.qattn_forward1(None, ctypes.byref(f1), None))
    expect_status(INVALID, "qattn_forward1_args is NULL", L.qattn_forward1(handle, None, None))
    expect_status(INVALID, "layer is NULL", L.qattn_forward2(None, ctypes.byref(f2), None))
    expect_status(INVALID, "qattn_forward2_args is NULL", L.qattn_forward2(handle, None, None))
    expect_status(INVALID, "layer is NULL", L.qattn_set_loras(None, None, 0, None))
    expect_status(INVALID, "loras is NULL", L.qattn_set_loras(handle, None, 2, None))
    expect_status(INVALID, "layer is NULL", L.qattn_check_device_errors(None, None))
    block = L.qattn_block_args_default()
    expect_status(INVALID, "layer is NULL", L.qattn_forward(None, ctypes.byref(block), None))
    expect_status(INVALID, "NULL", L.qattn_forward(handle, None, None))
    # Destroying NULL is a no-op by contract.
    assert L.qattn_destroy(None) == 0 and L.qattn_qmatrix_destroy(None) == 0


def test_null_tensors_in_forward1_and_forward2(small):
    spec, layer, x, attn, sin, cos = small
    q = torch.empty(6, spec.heads * spec.head_dim, dtype=torch.float16, device=x.device)
    kv = torch.empty(6, spec.kv_heads * spec.head_dim, dtype=torch.float16, device=x.device)
    full = dict(x=x.data_ptr(), sin=sin.data_ptr(), cos=cos.data_ptr(), q=q.data_ptr(), k=kv.data_ptr(),
                v=kv.data_ptr())
    stream = qattn._tensors.stream_of(x.device)
    for missing in full:
        a = L.qattn_forward1_args_default()
        a.batch, a.q_len, a.max_positions = 2, 3, sin.shape[0]
        for name, value in full.items():
            setattr(a, name, None if name == missing else value)
        expect_status(INVALID, "%s is NULL" % missing, L.qattn_forward1(layer._handle, ctypes.byref(a), stream))
    for missing in ("x", "attn_out"):
        a = L.qattn_forward2_args_default()
        a.batch, a.q_len = 2, 3
        a.x = None if missing == "x" else x.data_ptr()
        a.attn_out = None if missing == "attn_out" else attn.data_ptr()
        expect_status(INVALID, "%s is NULL" % missing, L.qattn_forward2(layer._handle, ctypes.byref(a), stream))
    a = L.qattn_forward2_args_default()
    a.batch, a.q_len, a.x, a.attn_out, a.num_lora_ids = 2, 3, x.data_ptr(), attn.data_ptr(), 2
    expect_status(INVALID, "lora_ids is NULL", L.qattn_forward2(layer._handle, ctypes.byref(a), stream))
    for batch, q_len in ((0, 3), (2, -1)):
        a.batch, a.q_len, a.num_lora_ids = batch, q_len, 0
        expect_status(INVALID, "batch and q_len must be > 0", L.qattn_forward2(layer._handle, ctypes.byref(a), stream))


@pytest.mark.parametrize("size", [0, 8, "larger"])
def test_struct_size_wrong(size):
    h = ctypes.c_void_p()
    for default, create in ((L.qattn_qmatrix_desc_default, L.qattn_qmatrix_create),
                            (L.qattn_layer_config_default, L.qattn_create)):
        s = default()
        s.struct_size = ctypes.sizeof(s) + 8 if size == "larger" else size
        expect_status(INVALID, "struct_size is %d" % s.struct_size, create(ctypes.byref(s), ctypes.byref(h)))
        assert not h.value


def test_struct_size_wrong_in_forward_and_lora(small):
    spec, layer, x, attn, sin, cos = small
    for default, call in ((L.qattn_forward1_args_default, L.qattn_forward1),
                          (L.qattn_forward2_args_default, L.qattn_forward2)):
        a = default()
        a.struct_size = 4
        expect_status(INVALID, "struct_size is 4", call(layer._handle, ctypes.byref(a), None))
    d = (L.qattn_lora_desc_default(),)[0]
    d.struct_size = 1000
    expect_status(INVALID, "qattn_lora_desc.struct_size is 1000", L.qattn_set_loras(layer._handle, ctypes.byref(d), 1, None))


def test_raw_qmatrix_sizes():
    h = ctypes.c_void_p()
    w = torch.randn(8, 8).half()
    d = L.qattn_qmatrix_desc_default()
    d.weight = w.data_ptr()
    for k, n in ((0, 8), (8, -1)):
        d.in_features, d.out_features = k, n
        expect_status(INVALID, "must be > 0", L.qattn_qmatrix_create(ctypes.byref(d), ctypes.byref(h)))
    d.in_features = d.out_features = 8
    d.weight = None
    expect_status(INVALID, "weight is NULL", L.qattn_qmatrix_create(ctypes.byref(d), ctypes.byref(h)))
    d.format = 7
    expect_status(INVALID, "unknown QMatrix format 7", L.qattn_qmatrix_create(ctypes.byref(d), ctypes.byref(h)))
    g = [torch.zeros(4, 8, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8).half()]
    d = L.qattn_qmatrix_desc_default()
    d.format, d.in_features, d.out_features = _lib.QMATRIX_GPTQ, 32, 8
    d.qweight, d.qzeros, d.scales = (t.data_ptr() for t in g)
    d.bits = 3
    expect_status(INVALID, "bits must be 4 or 8, got 3", L.qattn_qmatrix_create(ctypes.byref(d), ctypes.byref(h)))
    d.bits, d.in_features = 4, 12
    expect_status(INVALID, "in_features (12) must be a multiple of 8", L.qattn_qmatrix_create(ctypes.byref(d), ctypes.byref(h)))
    d.in_features, d.num_groups = 32, 33
    expect_status(INVALID, "num_groups must be in [1, in_features=32]", L.qattn_qmatrix_create(ctypes.byref(d), ctypes.byref(h)))
    d.num_groups, d.qzeros = 1, None
    expect_status(INVALID, "GPTQ needs qweight, qzeros and scales", L.qattn_qmatrix_create(ctypes.byref(d), ctypes.byref(h)))
    assert not h.value


def test_raw_layer_config_sizes(gen):
    m = qattn.QMatrix.dense(torch.randn(64, 64, generator=gen).half())
    h = ctypes.c_void_p()
    base = L.qattn_layer_config_default()
    base.hidden_size, base.num_heads, base.num_kv_heads, base.head_dim = 64, 2, 2, 32
    base.q_proj = base.k_proj = base.v_proj = base.o_proj = m.handle
    for field, value, words in (("hidden_size", 0, "must be > 0"), ("num_heads", -2, "must be > 0"),
                                ("head_dim", 0, "must be > 0"), ("max_rows", 0, "max_rows must be > 0"),
                                ("max_seq_len", -1, "max_seq_len must be > 0"), ("device", -5, "device must be"),
                                ("rope", 9, "rope 9 is not")):
        c = _lib.LayerConfig.from_buffer_copy(base)
        setattr(c, field, value)
        expect_status(INVALID if field != "device" else INVALID, words, L.qattn_create(ctypes.byref(c), ctypes.byref(h)))
    # Widths past a QMatrix's largest dimension are refused before anything is sized
    # from them (num_heads * head_dim would overflow an int here).
    c = _lib.LayerConfig.from_buffer_copy(base)
    c.num_heads, c.num_kv_heads, c.head_dim = 2**22 + 1, 1, 512
    w = torch.ones(512, dtype=torch.float16)
    c.q_norm.type, c.q_norm.weight, c.q_norm.per_head = _lib.NORM_RMS, w.data_ptr(), 1
    expect_status(INVALID, "num_heads * head_dim = 2147484160", L.qattn_create(ctypes.byref(c), ctypes.byref(h)))
    c = _lib.LayerConfig.from_buffer_copy(base)
    c.hidden_size = 2**20 + 2
    expect_status(INVALID, "hidden_size 1048578", L.qattn_create(ctypes.byref(c), ctypes.byref(h)))
    c = _lib.LayerConfig.from_buffer_copy(base)
    c.k_proj = None
    expect_status(INVALID, "config.k_proj is NULL", L.qattn_create(ctypes.byref(c), ctypes.byref(h)))
    c = _lib.LayerConfig.from_buffer_copy(base)
    c.input_norm.type = _lib.NORM_RMS
    expect_status(INVALID, "input_norm.weight is NULL", L.qattn_create(ctypes.byref(c), ctypes.byref(h)))
    assert not h.value
    m.close()


# ---- Python level: layer configuration -----------------------------------------

def _projections(device, gen, hidden, q_width, kv_width):
    def dense(n, k):
        return qattn.QMatrix.dense((torch.randn(n, k, generator=gen) / k**0.5).half().to(device))
    return dict(q_proj=dense(q_width, hidden), k_proj=dense(kv_width, hidden), v_proj=dense(kv_width, hidden),
                o_proj=dense(hidden, q_width))


def test_layer_config_errors(device, gen):
    p = _projections(device, gen, 64, 96, 32)
    expect_raise(INVALID, ["num_heads (3) must be a multiple of num_kv_heads (2)"], qattn.Layer, hidden_size=64,
                 num_heads=3, num_kv_heads=2, head_dim=32, **p)
    ok = dict(hidden_size=64, num_heads=3, num_kv_heads=1, head_dim=32, **p)
    expect_raise(INVALID, "rotary_dim must be even", qattn.Layer, rotary_dim=15, **ok)
    expect_raise(INVALID, "rotary_dim must be even and in (0, head_dim=32]", qattn.Layer, rotary_dim=34, **ok)
    expect_raise(INVALID, "rope must be 'neox', 'gptj' or None", qattn.Layer, rope="yarn", **ok)
    expect_raise(INVALID, "config.q_proj maps 64 -> 96 features; the layer needs 64 -> 128", qattn.Layer,
                 **dict(ok, num_heads=4))
    w = torch.ones(64, dtype=torch.float16, device=device)
    expect_raise(INVALID, "input_norm.kind must be 'rms' or 'layer'", qattn.Layer, input_norm=qattn.Norm("l2", w), **ok)
    expect_raise(INVALID, "input_norm.weight must have shape [64]", qattn.Layer,
                 input_norm=qattn.Norm("rms", w[:32]), **ok)
    expect_raise(INVALID, "input_norm.weight must have dtype torch.float16", qattn.Layer,
                 input_norm=qattn.Norm("rms", w.float()), **ok)
    expect_raise(INVALID, "input_norm.bias is only allowed for LayerNorm", qattn.Layer,
                 input_norm=qattn.Norm("rms", w, w), **ok)
    expect_raise(INVALID, "input_norm.eps must be > 0", qattn.Layer, input_norm=qattn.Norm("rms", w, eps=0.0), **ok)
    expect_raise(INVALID, "input_norm.eps must be a number, got '1e-6'", qattn.Layer,
                 input_norm=qattn.Norm("rms", w, eps="1e-6"), **ok)
    expect_raise(INVALID, "input_norm.per_head is only meaningful", qattn.Layer,
                 input_norm=qattn.Norm("rms", w, per_head=True), **ok)
    head = torch.ones(2, 32, dtype=torch.float16, device=device)
    expect_raise(INVALID, "q_norm.weight must have shape [3, 32]", qattn.Layer,
                 q_norm=qattn.Norm("rms", head, per_head=True), **ok)
    expect_raise(INVALID, "q_proj must be a qattn.QMatrix", qattn.Layer, **dict(ok, q_proj=torch.zeros(2)))
    # Sizes cross the ABI as C ints: one past int32 must not wrap onto a valid size.
    expect_raise(INVALID, "hidden_size must be an int32, got 4294967360", qattn.Layer,
                 **dict(ok, hidden_size=2**32 + 64))
    expect_raise(INVALID, "max_rows must be an int32, got 8.0", qattn.Layer, max_rows=8.0, **ok)
    expect_raise(INVALID, "rotary_dim must be an int32", qattn.Layer, rotary_dim=2**32 + 16, **ok)
    for m in p.values():
        m.close()
    expect_raise(INVALID, "closed QMatrix", qattn.Layer, **ok)


def test_qmatrix_python_errors(device, gen):
    import quant
    g = quant.random_gptq(64, 32, bits=4, group_size=32, act_order=True, generator=gen)
    t = {name: g[name].to(device) for name in ("qweight", "qzeros", "scales", "g_idx")}
    expect_raise(INVALID, "weight must have dtype torch.float16", qattn.QMatrix.dense,
                 torch.randn(4, 4, device=device))
    expect_raise(INVALID, "weight must be contiguous", qattn.QMatrix.dense,
                 torch.randn(8, 4, device=device).half().t())
    expect_raise(INVALID, "bias must have shape [4]", qattn.QMatrix.dense,
                 torch.randn(4, 8, device=device).half(), torch.zeros(5, device=device).half())
    expect_raise(INVALID, "bits must be 4 or 8", qattn.QMatrix.gptq, **t, bits=2)
    expect_raise(INVALID, "bits must be 4 or 8, got 4.0", qattn.QMatrix.gptq, **t, bits=4.0)
    expect_raise(INVALID, "scales must have shape [*, 32]", qattn.QMatrix.gptq,
                 **dict(t, scales=t["scales"][:, :16].contiguous()))
    expect_raise(INVALID, "qzeros must have shape [2, 4]", qattn.QMatrix.gptq,
                 **dict(t, qzeros=t["qzeros"][:1].contiguous()))
    expect_raise(INVALID, "g_idx must have shape [64]", qattn.QMatrix.gptq, **dict(t, g_idx=t["g_idx"][:32].clone()))
    expect_raise(INVALID, "qweight must have dtype torch.int32", qattn.QMatrix.gptq,
                 **dict(t, qweight=t["qweight"].long()))
    expect_raise(INVALID, "qzeros must have shape [2, 8]", qattn.QMatrix.gptq, **t, bits=8)
    bad = t["g_idx"].clone()
    bad[17] = 2
    expect_raise(RANGE, "g_idx[17] = 2 is outside [0, num_groups=2)", qattn.QMatrix.gptq, **dict(t, g_idx=bad))
    bad[17] = -1
    expect_raise(RANGE, "g_idx[17] = -1", qattn.QMatrix.gptq, **dict(t, g_idx=bad))
    expect_raise(INVALID, "does not cover in_features 64", qattn.QMatrix.gptq, **dict(t, g_idx=None), group_size=16)
    expect_raise(INVALID, "is on meta, expected", qattn.QMatrix.gptq, **dict(t, scales=t["scales"].to("meta")))
    expect_raise(INVALID, "group_size must be an int32", qattn.QMatrix.gptq, **dict(t, g_idx=None),
                 group_size=2**32 + 32)


# ---- Python level: forward calls -------------------------------------------------

def test_forward_tensor_checks(small):
    spec, layer, x, attn, sin, cos = small
    dev = x.device
    f1 = dict(sin=sin, cos=cos)
    expect_raise(INVALID, "x must have dtype torch.float16", layer.forward1, x.float(), **f1)
    expect_raise(INVALID, "x must have shape [*, *, 64]", layer.forward1, x[..., :32].contiguous(), **f1)
    expect_raise(INVALID, "x must have shape", layer.forward1, x.reshape(6, 64), **f1)
    expect_raise(INVALID, "x must be contiguous", layer.forward1, x.transpose(0, 1), **f1)
    expect_raise(INVALID, "x is on meta, expected", layer.forward1, x.to("meta"), **f1)
    expect_raise(INVALID, "x is empty", layer.forward1, x[:0], **f1)
    expect_raise(INVALID, "x must be a torch.Tensor", layer.forward1, x.tolist(), **f1)
    expect_raise(INVALID, "sin and cos tables are required", layer.forward1, x)
    expect_raise(INVALID, "sin must have dtype torch.float32", layer.forward1, x, sin=sin.double(), cos=cos)
    expect_raise(INVALID, "sin must have shape [*, 16]", layer.forward1, x, sin=sin[:, :8].contiguous(), cos=cos)
    expect_raise(INVALID, "cos must have shape [32, 16]", layer.forward1, x, sin=sin, cos=cos[:8])
    expect_raise(INVALID, "past_lens must have dtype torch.int32", layer.forward1, x, **f1,
                 past_lens=torch.zeros(2, dtype=torch.int64, device=dev))
    expect_raise(INVALID, "past_lens must have shape [2]", layer.forward1, x, **f1,
                 past_lens=torch.zeros(3, dtype=torch.int32, device=dev))
    q = torch.empty(2, 3, 4, 32, dtype=torch.float16, device=dev)
    kv = torch.empty(2, 3, 2, 32, dtype=torch.float16, device=dev)
    expect_raise(INVALID, "out[1] (k) must have shape [2, 3, 2, 32]", layer.forward1, x, **f1, out=(q, q, kv))
    expect_raise(INVALID, "out must be a (q, k, v) tuple", layer.forward1, x, **f1, out=(q, kv))
    expect_raise(INVALID, "attn_out must have shape [2, 3, 4, 32]", layer.forward2, x, attn[:, :, :2].contiguous())
    expect_raise(INVALID, "attn_out must have shape [2, 3, 128]", layer.forward2, x, attn.reshape(2, 3, 64, 2)
                 .reshape(2, 3, 128)[:, :, :64].contiguous())
    expect_raise(INVALID, "attn_out must have dtype torch.float16", layer.forward2, x, attn.float())
    # out given as [batch, q_len, heads * D] is accepted.
    q3, k3, v3 = layer.forward1(x, **f1, out=(q.view(2, 3, 128), kv.view(2, 3, 64), kv.clone().view(2, 3, 64)))
    assert q3.data_ptr() == q.data_ptr()


def test_rows_and_positions(small, device):
    spec, layer, x, attn, sin, cos = small
    f1 = dict(sin=sin, cos=cos)
    big = torch.randn(2, 4, 64, device=device).half()
    expect_raise(RANGE, "batch * q_len = 8 rows exceeds the layer's max_rows = 6", layer.forward1, big, **f1)
    expect_raise(RANGE, "batch * q_len = 8 rows exceeds the layer's max_rows = 6", layer.forward2, big,
                 torch.randn(2, 4, 4, 32, device=device).half())
    expect_raise(RANGE, "positions 30 .. 32 are outside [0, 32)", layer.forward1, x, **f1, past_len=30)
    expect_raise(RANGE, "positions -1 .. 1 are outside", layer.forward1, x, **f1, past_len=-1)
    # A table shorter than max_seq_len bounds the positions too.
    expect_raise(RANGE, ["positions 10 .. 12 are outside [0, 12)", "max_positions 12"], layer.forward1, x,
                 sin=sin[:12], cos=cos[:12], past_len=10)
    lens = torch.tensor([4, 30], dtype=torch.int32, device=device)
    if device.type == "cpu":
        expect_raise(RANGE, "past_lens[1] = 30 puts positions outside [0, 32)", layer.forward1, x, **f1,
                     past_lens=lens)
        expect_raise(RANGE, "past_lens[0] = -2", layer.forward1, x, **f1,
                     past_lens=torch.tensor([-2, 0], dtype=torch.int32))
    else:
        # Device-side positions are checked by the kernels and reported on demand.
        layer.forward1(x, **f1, past_lens=lens)
        expect_raise(RANGE, "", layer.check_device_errors)
        layer.check_device_errors()
    expect_raise(INVALID, "past_len must be an int32, got 4294967300", layer.forward1, x, **f1, past_len=2**32 + 4)
    expect_raise(INVALID, "past_len must be an int32, got 4.5", layer.forward1, x, **f1, past_len=4.5)
    layer.forward1(x, **f1, past_len=29)  # the last valid start


def test_lora_errors(small, device, gen):
    spec, layer, x, attn, sin, cos = small
    a = torch.randn(64, 4, generator=gen).half().to(device)
    b = torch.randn(4, 128, generator=gen).half().to(device)
    expect_raise(INVALID, "adapter id 1 has two entries for q_proj", layer.set_loras,
                 [qattn.LoRA(1, "q", a, b), qattn.LoRA(1, "q", a, b)])
    expect_raise(INVALID, "adapters[0].proj must be 'q', 'k', 'v' or 'o'", layer.set_loras, [qattn.LoRA(1, "x", a, b)])
    expect_raise(INVALID, "adapters[0].b must have shape [4, 64]", layer.set_loras, [qattn.LoRA(1, "k", a, b)])
    expect_raise(INVALID, "adapters[0].a must have shape [128, *]", layer.set_loras, [qattn.LoRA(1, "o", a, b)])
    expect_raise(INVALID, "adapters[0].a must have dtype torch.float16", layer.set_loras,
                 [qattn.LoRA(1, "q", a.float(), b)])
    expect_raise(INVALID, "adapters[0] must be a qattn.LoRA", layer.set_loras, [(1, "q", a, b)])
    # Ids cross the ABI as int32: one past its range must not wrap onto another id.
    expect_raise(INVALID, "adapters[0].id must be an int32", layer.set_loras, [qattn.LoRA(2**32 + 1, "q", a, b)])
    expect_raise(INVALID, "adapters[0].id must be an int32", layer.set_loras, [qattn.LoRA(1.5, "q", a, b)])
    assert layer.set_loras([qattn.LoRA(1, "q", a, b), qattn.LoRA(1, "v", a, b[:, :64].contiguous())]) == 4
    expect_raise(RANGE, "unknown LoRA adapter id 3", layer.forward1, x, sin=sin, cos=cos, loras=[1, 3])
    expect_raise(RANGE, "unknown LoRA adapter id 3", layer.forward2, x, attn, loras=[3])
    expect_raise(INVALID, "LoRA adapter id 1 is listed twice", layer.forward1, x, sin=sin, cos=cos, loras=[1, 1])
    expect_raise(INVALID, "LoRA ids must be int32", layer.forward1, x, sin=sin, cos=cos, loras=[2**32 + 1])
    expect_raise(INVALID, "LoRA ids must be int32", layer.forward2, x, attn, loras=[-2**31 - 1])
    expect_raise(INVALID, "LoRA ids must be int32", layer.forward1, x, sin=sin, cos=cos, loras=[1.5])
    expect_raise(INVALID, "LoRA ids must be int32", layer.forward2, x, attn, loras=5)
    layer.forward1(x, sin=sin, cos=cos, loras=[1])
    # As in set_loras, True is not adapter 1, also right after [1] was accepted.
    expect_raise(INVALID, "LoRA ids must be int32", layer.forward1, x, sin=sin, cos=cos, loras=[True])
    expect_raise(INVALID, "LoRA ids must be int32", layer.forward2, x, attn, loras=(True,))
    # A failed set_loras leaves the previous set in place.
    expect_raise(INVALID, "two entries", layer.set_loras, [qattn.LoRA(2, "q", a, b), qattn.LoRA(2, "q", a, b)])
    layer.forward2(x, attn, loras=[1])
    expect_raise(RANGE, "unknown LoRA adapter id 2", layer.forward2, x, attn, loras=[2])


def test_use_after_close(small, device, gen):
    spec, layer, x, attn, sin, cos = small
    m = layer._projections[0]
    expect_raise(INVALID, "still used by 1 open layer", m.close)
    layer.close()
    layer.close()  # idempotent
    for call in (lambda: layer.forward1(x, sin=sin, cos=cos), lambda: layer.forward2(x, attn),
                 lambda: layer.set_loras([]), layer.check_device_errors):
        expect_raise(INVALID, "Layer is closed", call)
    for p in layer._projections:
        p.close()
    expect_raise(INVALID, "QMatrix is closed", lambda: m.handle)
    assert "closed" in repr(layer) and "closed" in repr(m)


def test_error_object():
    e = expect_raise(INVALID, "qattn_qmatrix_desc.struct_size is 0", qattn.errors.check,
                     L.qattn_qmatrix_create(ctypes.byref(_lib.QMatrixDesc()), ctypes.byref(ctypes.c_void_p())))
    assert isinstance(e, RuntimeError) and str(e).startswith(INVALID + ": ")
