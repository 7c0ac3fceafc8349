"""Per-call host time of Layer.forward1 / forward2 on the CPU backend.

The layer is tiny (H 64, 4/2 heads of dim 16, dense fp16 weights, decode batch 1),
so the CPU arithmetic is well under a microsecond and what is timed is the Python
wrapper, ctypes and the C validation: the same path an eager call takes on CUDA,
except the per-pointer cudaPointerGetAttributes. "C call" times qattn_forward1/2
through ctypes with a prebuilt argument struct, i.e. the library side plus the bare
ctypes call; "wrapper" is the rest (Python checks, struct filling, stream lookup).
Each figure is the fastest of --repeats runs of --calls calls (per call): the other
runs lost time to whatever else the machine was doing.

Usage: QATTN_LIBRARY=build-host/libqattn.so PYTHONPATH=bindings/python \
       python scripts/host_overhead.py [--calls N] [--repeats R]
"""
import argparse
import ctypes
import time

import torch

import qattn
from qattn import _lib

H, NH, NKV, D, POSITIONS = 64, 4, 2, 16, 64


def make_layer(gen):
    def dense(n, k):
        return qattn.QMatrix.dense((torch.randn(n, k, generator=gen) / k ** 0.5).half())

    norm = qattn.Norm("rms", (1 + 0.1 * torch.randn(H, generator=gen)).half())
    layer = qattn.Layer(hidden_size=H, num_heads=NH, num_kv_heads=NKV, head_dim=D,
                        q_proj=dense(NH * D, H), k_proj=dense(NKV * D, H), v_proj=dense(NKV * D, H),
                        o_proj=dense(H, NH * D), input_norm=norm, rope="neox", max_rows=16,
                        max_seq_len=POSITIONS)
    a = (torch.randn(H, 4, generator=gen) * 0.1).half()
    b = (torch.randn(4, NH * D, generator=gen) * 0.1).half()
    layer.set_loras([qattn.LoRA(7, "q", a, b)])
    return layer


def per_call_us(fn, calls, repeats):
    for _ in range(min(calls, 1000)):
        fn()
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return min(means)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    layer = make_layer(gen)
    sin, cos = qattn.rope_tables(qattn.default_inv_freq(D), POSITIONS)
    x = (torch.randn(1, 1, H, generator=gen) * 0.1).half()
    attn = (torch.randn(1, 1, NH, D, generator=gen) * 0.1).half()
    q = torch.empty(1, 1, NH, D, dtype=torch.float16)
    k = torch.empty(1, 1, NKV, D, dtype=torch.float16)
    v = torch.empty(1, 1, NKV, D, dtype=torch.float16)
    out = (q, k, v)

    # The library side alone: one struct built once, reused for every call.
    f1 = _lib.lib.qattn_forward1_args_default()
    f1.x, f1.q, f1.k, f1.v = x.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr()
    f1.sin, f1.cos, f1.max_positions, f1.past_len = sin.data_ptr(), cos.data_ptr(), POSITIONS, 5
    f2 = _lib.lib.qattn_forward2_args_default()
    f2.x, f2.attn_out = x.data_ptr(), attn.data_ptr()
    handle, f1_ref, f2_ref = layer._handle, ctypes.byref(f1), ctypes.byref(f2)
    c_f1, c_f2 = _lib.lib.qattn_forward1, _lib.lib.qattn_forward2

    cases = [
        ("forward1 (out given, rope, past_len)", lambda: layer.forward1(x, sin=sin, cos=cos, past_len=5, out=out)),
        ("forward1 (allocates q, k, v)", lambda: layer.forward1(x, sin=sin, cos=cos, past_len=5)),
        ("forward1 (out given, 1 LoRA)", lambda: layer.forward1(x, sin=sin, cos=cos, past_len=5, out=out, loras=(7,))),
        ("forward1 C call", lambda: c_f1(handle, f1_ref, None)),
        ("forward2", lambda: layer.forward2(x, attn)),
        ("forward2 (1 LoRA)", lambda: layer.forward2(x, attn, loras=(7,))),
        ("forward2 C call", lambda: c_f2(handle, f2_ref, None)),
    ]
    print("qattn %s, %s; H %d, %d/%d heads of %d, batch 1, q_len 1; %d calls x %d"
          % (qattn.version(), qattn.build_info(), H, NH, NKV, D, args.calls, args.repeats))
    results = {}
    for name, fn in cases:
        results[name] = per_call_us(fn, args.calls, args.repeats)
        print("  %-40s %7.2f us/call" % (name, results[name]))
    print("  %-40s %7.2f us/call" % ("forward1 wrapper (out given) - C call",
                                      results[cases[0][0]] - results["forward1 C call"]))
    print("  %-40s %7.2f us/call" % ("forward2 wrapper - C call", results["forward2"] - results["forward2 C call"]))


if __name__ == "__main__":
    main()
