"""Times torch SDPA at decode over a contiguous KV cache, per formulation and
backend, to choose how the torch attention step of qattn (and the bench's block)
calls it. Decode (one new token a sequence, every cached key visible) allows two
formulations of grouped-query attention:

  gqa:    q [B, NH, 1, D] against k, v [B, NKV, L, D] with enable_gqa=True
          (strided views of the cache [B, L, NKV, D])
  folded: the NH / NKV query heads of a KV head folded into the query length,
          q [B, NKV, NH / NKV, D] against the same k, v; no mask (decode sees
          every key), and the output [B, NKV, NH / NKV, D] is already the
          [B, 1, NH, D] layout, so no transpose copy follows.
  headmajor, folded-headmajor: the same two over a head-major cache
          [B, NKV, L, D] (contiguous k, v), a layout qattn's KV writes do not
          offer yet: whether it would be worth offering.

--prefill N times a causal prefill of N tokens from an empty cache instead
(one sequence), where three formulations differ:

  gqa:      q [1, NH, N, D] against the cache's k, v viewed as [1, NKV, N, D]
            (strided: the cache is [1, N, NKV, D]), enable_gqa=True
  headmajor: the same with k, v in a head-major cache [1, NKV, N, D] (contiguous)
  expanded: k, v repeated to NH heads (the copies counted), no enable_gqa

Each (formulation, backend) is replayed from a CUDA graph over enough caches to
keep the L2 cold, timed with CUDA events, median of the replays, per call; the
KV bytes over the measured copy bandwidth (decode) or the FLOPs of the causal
product over the measured fp16 matmul rate (prefill) is printed beside it.

    python scripts/sdpa_probe.py [--batch 1,16] [--past 2048] [--prefill 2048]
"""
import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def median_seconds(fn, runs=12):
    """Median time of fn() alone, by CUDA events, the first two runs left out."""
    times = []
    for _ in range(runs):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times[2:])


def copy_bandwidth(nbytes=1 << 30):
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * nbytes / median_seconds(lambda: b.copy_(a))


def matmul_rate(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    return 2 * n**3 / median_seconds(lambda: a @ b)


def probe(kinds, attend_fn, sets_for, ref, floor, backends=BACKENDS):
    """A table row per (formulation, backend): us a call (graph replays over the
    sets of inputs), against the floor, and the relative error against ref."""
    width = max(len(k) for k in kinds) + 2
    print(f"{'formulation':<{width}} {'backend':<10} {'us':>8} {'x floor':>8} {'rel err':>9}")
    for kind in kinds:
        sets = sets_for(kind)
        for name, backend in backends.items():
            ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            try:
                with ctx:
                    out = attend_fn(kind, *sets[0])
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    us = time_graph(lambda: [attend_fn(kind, *t) for t in sets], len(sets))
                print(f"{kind:<{width}} {name:<10} {us:8.1f} {us / floor:8.2f} {err:9.1e}")
            except Exception as exc:  # a backend that does not take the shape says why
                print(f"{kind:<{width}} {name:<10} {'-':>8} {'':>8} {'':>9} {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:80]}")


def attend_prefill(kind, q, kc, vc, heads, kv_heads):
    """q [1, N, NH, D]; kc, vc [1, N, NKV, D] (headmajor: [1, NKV, N, D]) -> [1, N, NH, D]."""
    qt = q.transpose(1, 2)
    if kind == "headmajor":
        out = F.scaled_dot_product_attention(qt, kc, vc, is_causal=True, enable_gqa=True)
    elif kind == "gqa":
        out = F.scaled_dot_product_attention(qt, kc.transpose(1, 2), vc.transpose(1, 2), is_causal=True,
                                             enable_gqa=True)
    else:
        group = heads // kv_heads
        keys = kc.transpose(1, 2).repeat_interleave(group, dim=1)
        values = vc.transpose(1, 2).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(qt, keys, values, is_causal=True)
    return out.transpose(1, 2).contiguous()


def prefill(args):
    torch.manual_seed(0)
    rate = matmul_rate()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, fp16 matmul {rate / 1e12:.0f} TFLOP/s")
    nh, nkv, d, n = args.heads, args.kv_heads, args.head_dim, args.prefill
    flops = 4 * n * n * d * nh / 2  # QK^T and PV over the causal half
    floor = flops / rate * 1e6
    kv_bytes = 2 * n * nkv * d * 2 + 2 * n * nh * d * 2
    caches = max(2, -(-3 * l2 // kv_bytes))
    data = [(torch.randn(1, n, nh, d, device="cuda", dtype=torch.float16),
             torch.randn(1, n, nkv, d, device="cuda", dtype=torch.float16),
             torch.randn(1, n, nkv, d, device="cuda", dtype=torch.float16)) for _ in range(caches)]
    heads_major = [(q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()) for q, k, v in data]
    q, kc, vc = data[0]
    keys = kc.double().transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    values = vc.double().transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    scores = q.double().transpose(1, 2) @ keys.transpose(-1, -2) / d ** 0.5
    scores.masked_fill_(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    ref = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2)
    del keys, values, scores
    print(f"\nprefill {n} tokens, causal: {flops / 1e9:.1f} GFLOP, floor {floor:.1f} us, {caches} caches cycled")
    no_math = {name: b for name, b in BACKENDS.items() if name != "math"}  # seconds a call at this size
    probe(("gqa", "headmajor", "expanded"), lambda kind, *t: attend_prefill(kind, *t, nh, nkv),
          lambda kind: heads_major if kind == "headmajor" else data, ref, floor, no_math)


def attend(kind, q, kc, vc, heads, kv_heads):
    """q [B, 1, NH, D]; kc, vc [B, L, NKV, D] (the head-major kinds: [B, NKV, L, D])."""
    b, _, _, d = q.shape
    keys, values = (kc, vc) if kind.endswith("headmajor") else (kc.transpose(1, 2), vc.transpose(1, 2))
    if kind in ("gqa", "headmajor"):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=True)
        return out.transpose(1, 2).contiguous()
    folded = q.view(b, kv_heads, heads // kv_heads, d)
    return F.scaled_dot_product_attention(folded, keys, values).view(b, 1, heads, d)


def time_graph(fn, calls, replays=30):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls)
    return statistics.median(times[3:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--past", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=0, help="time a causal prefill of this many tokens instead")
    args = ap.parse_args()
    if args.prefill:
        return prefill(args)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s")
    nh, nkv, d, length = args.heads, args.kv_heads, args.head_dim, args.past + 1
    for batch in [int(b) for b in args.batch.split(",")]:
        kv_bytes = 2 * batch * length * nkv * d * 2
        caches = max(4, -(-3 * l2 // kv_bytes))
        data = [(torch.randn(batch, 1, nh, d, device="cuda", dtype=torch.float16),
                 torch.randn(batch, length, nkv, d, device="cuda", dtype=torch.float16),
                 torch.randn(batch, length, nkv, d, device="cuda", dtype=torch.float16)) for _ in range(caches)]
        q, kc, vc = data[0]
        keys = kc.double().transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        values = vc.double().transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        p = torch.softmax(q.double().transpose(1, 2) @ keys.transpose(-1, -2) / d ** 0.5, dim=-1)
        ref = (p @ values).transpose(1, 2)
        floor = kv_bytes / bw * 1e6
        print(f"\nbatch {batch}, {length} keys: KV {kv_bytes / 2**20:.1f} MiB a call, floor {floor:.1f} us, "
              f"{caches} caches cycled")
        heads_major = [(q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()) for q, k, v in data]
        probe(("gqa", "folded", "headmajor", "folded-headmajor"), lambda kind, *t: attend(kind, *t, nh, nkv),
              lambda kind: heads_major if kind.endswith("headmajor") else data, ref, floor)


if __name__ == "__main__":
    main()
