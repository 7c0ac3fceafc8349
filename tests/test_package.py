"""The Python package itself: metadata, RoPE tables, handle lifetimes, the CLI."""
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
