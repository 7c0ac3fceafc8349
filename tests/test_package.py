"""The Python package itself: metadata, RoPE tables, handle lifetimes, the CLI."""
import ctypes
import gc
import math
import os
import subprocess
import sys

import pytest
import torch

import qattn


def test_version_and_build_info():
    assert qattn.version() == "0.1.0"
    assert qattn.build_info().startswith("qattn 0.1.0") and "cpu" in qattn.build_info()
    assert qattn.cuda_device_count() >= 0
    assert os.path.exists(qattn.library_path())


def test_default_inv_freq_matches_the_formula():
    inv = qattn.default_inv_freq(64, base=500000.0)
    assert inv.shape == (32,) and inv.dtype == torch.float64
    for i in (0, 5, 31):
        assert inv[i].item() == pytest.approx(500000.0 ** (-2 * i / 64), rel=1e-15)
    with pytest.raises(qattn.QattnError, match="rotary_dim must be a positive even int"):
        qattn.default_inv_freq(7)


def test_rope_tables(device):
    inv = torch.tensor([1.0, 0.1, 1e-3], dtype=torch.float32)
    sin, cos = qattn.rope_tables(inv, 5000, attention_scaling=0.75, device=device)
    assert sin.shape == cos.shape == (5000, 3) and sin.dtype == torch.float32 and sin.device == device
    for p, i in ((0, 0), (4999, 0), (1234, 1), (4321, 2)):
        angle = p * float(inv[i])  # exact float64 product, as documented
        assert sin[p, i].item() == pytest.approx(0.75 * math.sin(angle), abs=1e-7)
        assert cos[p, i].item() == pytest.approx(0.75 * math.cos(angle), abs=1e-7)
    with pytest.raises(qattn.QattnError, match="max_positions must be a positive int"):
        qattn.rope_tables(inv, 0)
    with pytest.raises(qattn.QattnError, match="inv_freq must be a non-empty 1-D tensor"):
        qattn.rope_tables(torch.ones(2, 2), 4)


def _dense(n, k, device):
    return qattn.QMatrix.dense(torch.randn(n, k).half().to(device))


def test_qmatrix_properties_and_context_manager(device):
    with _dense(48, 32, device) as m:
        assert (m.in_features, m.out_features, m.device.type) == (32, 48, device.type)
        assert not m.closed and "32 -> 48" in repr(m)
    assert m.closed


def test_finalizers_destroy_handles():
    m = _dense(16, 16, torch.device("cpu"))
    finalizer = m._finalizer
    del m
    gc.collect()
    assert not finalizer.alive


def test_layer_keeps_its_matrices_alive(device):
    mats = [_dense(64, 64, device) for _ in range(4)]
    finalizers = [m._finalizer for m in mats]
    layer = qattn.Layer(hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=32, q_proj=mats[0], k_proj=mats[1],
                        v_proj=mats[2], o_proj=mats[3], rope=None, max_rows=2)
    del mats
    gc.collect()
    assert all(f.alive for f in finalizers)
    x = torch.randn(1, 2, 64).half().to(device)
    q, k, v = layer.forward1(x)
    assert q.shape == (1, 2, 2, 32) and k.shape == v.shape == (1, 2, 2, 32)
    layer_finalizer = layer._finalizer
    del layer, q, k, v
    gc.collect()
    assert not layer_finalizer.alive and not any(f.alive for f in finalizers)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qattn", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))


def test_cli_info_and_check():
    info = _cli("info")
    assert info.returncode == 0 and "qattn 0.1.0" in info.stdout and "torch" in info.stdout
    check = _cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "check passed" in check.stdout and "relative error" in check.stdout
    bad = _cli("frobnicate")
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_ctypes_structs_match_the_header():
    """The library reports each struct's C size in struct_size; the ctypes mirror in
    _lib.py must have the same size, or a field was added, dropped or retyped."""
    from qattn import _lib
    L = _lib.lib
    for default, mirror in ((L.qattn_qmatrix_desc_default, _lib.QMatrixDesc),
                            (L.qattn_layer_config_default, _lib.LayerConfig),
                            (L.qattn_forward1_args_default, _lib.Forward1Args),
                            (L.qattn_forward2_args_default, _lib.Forward2Args),
                            (L.qattn_lora_desc_default, _lib.LoraDesc),
                            (L.qattn_kv_cache_default, _lib.KVCache),
                            (L.qattn_block_args_default, _lib.BlockArgs)):
        assert default().struct_size == ctypes.sizeof(mirror), mirror.__name__


def test_raw_qattn_forward_through_ctypes(gen):
    """qattn_forward called through the ctypes mirror with a Python attention callback:
    the callback sees the layer's shapes and the cache, and what it writes to `out`
    reaches forward2 (here attention returns q itself, so the block must equal
    forward1 then forward2(x, q))."""
    from qattn import _lib
    from layer_case import Spec, build, inputs, tables
    L = _lib.lib
    spec = Spec()
    cpu = torch.device("cpu")
    layer, _ = build(spec, cpu, gen)
    x, _ = inputs(spec, 2, 3, gen, cpu)
    sin, cos = tables(spec, cpu)
    with layer:
        q, _, _ = layer.forward1(x, sin=sin, cos=cos, past_len=4)
        expected = layer.forward2(x.clone(), q)

        k_cache = torch.zeros(2, spec.max_seq_len, spec.kv_heads, spec.head_dim, dtype=torch.float16)
        v_cache = torch.zeros_like(k_cache)
        cache = L.qattn_kv_cache_default()
        cache.k, cache.v, cache.max_seq_len = k_cache.data_ptr(), v_cache.data_ptr(), spec.max_seq_len
        seen = []

        def attention(params):
            p = params.contents
            seen.append((p.struct_size, p.batch, p.q_len, p.num_heads, p.num_kv_heads, p.head_dim, p.past_len,
                         p.cache.contents.max_seq_len, p.causal))
            ctypes.memmove(p.out, p.q, 2 * p.batch * p.q_len * p.num_heads * p.head_dim)
            return 0

        callback = _lib.ATTENTION_FN(attention)
        workspace = torch.empty(L.qattn_block_workspace_size(layer._handle, 6), dtype=torch.uint8)
        a = L.qattn_block_args_default()
        a.batch, a.q_len, a.x, a.past_len = 2, 3, x.data_ptr(), 4
        a.sin, a.cos, a.max_positions = sin.data_ptr(), cos.data_ptr(), sin.shape[0]
        a.cache = ctypes.pointer(cache)
        a.attention = callback
        a.workspace, a.workspace_size = workspace.data_ptr(), workspace.numel()
        qattn.errors.check(L.qattn_forward(layer._handle, ctypes.byref(a), None))
    assert seen == [(ctypes.sizeof(_lib.AttentionParams), 2, 3, spec.heads, spec.kv_heads, spec.head_dim, 4,
                     spec.max_seq_len, 1)]
    assert torch.equal(x, expected)
