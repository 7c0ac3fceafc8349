"""Times the CUDA backend on Llama-3-8B attention shapes (H 4096, 32/8 heads, D 128,
GPTQ 4-bit, group 128): forward1 and forward2 at decode batch 1 and 16 and prefill
2048, with CUDA events, medians, and eight layers cycled so the weights come from
HBM, not L2 (8 x 22 MB > 50 MB). Prints each time beside its floor: the packed
bytes over the measured copy bandwidth (decode), or the same GEMMs in fp16 through
torch/cuBLAS (prefill). "gpu" times replays of a torch.cuda.graph holding 16 calls
(device time alone); "eager" and "graphs" time plain Python loops of calls to
layers without and with use_graphs (host overhead included: at decode sizes the
Python + ctypes path, not the GPU, sets these). --profile adds a per-kernel table;
run it with QATTN_CUDA_PDL=0 for each kernel's own time (with programmatic launch a
kernel starts early and the profiler counts its wait for the kernel before).
--cases D1,D16,P2048 picks cases (all by default), e.g. for one case under ncu.
Usage: python scripts/cuda_timing.py [--profile] [--cases D1,...]"""
import statistics
import sys

import torch

import qattn

H, NH, NKV, D, GROUP = 4096, 32, 8, 128, 128
LAYERS = 8
DEV = torch.device("cuda", 0)


def median_ms(fn, reps=15, inner=LAYERS * 2):
    for i in range(3):
        fn(i)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(inner):
            fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def copy_bandwidth():
    src = torch.randn(256 << 20, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), reps=10, inner=4)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def random_gptq(k, n, gen, g_idx):
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=DEV, generator=gen)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // GROUP, n // 8), dtype=torch.int32, device=DEV, generator=gen)
    scales = ((torch.rand(k // GROUP, n, device=DEV, generator=gen) + 0.5) / (8 * k**0.5)).half()
    return qattn.QMatrix.gptq(qweight, qzeros, scales, g_idx, bits=4, group_size=GROUP)


def graph_ms(fn, reps=15, inner=LAYERS * 2):
    """Median device time per call of `fn`, from replays of a captured graph of `inner` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(inner):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fn(i)
    return median_ms(lambda i: graph.replay(), reps=reps, inner=1) / inner


def profile(name, fn):
    """Device time per kernel over 8 eager calls, to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(LAYERS):
            fn(i)
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        print("  %-6s %-70.70s %6d calls %9.1f us/call" % (name, e.key, e.count, e.device_time_total / e.count))


def main():
    gen = torch.Generator(device=DEV).manual_seed(0)
    bandwidth = copy_bandwidth()
    print("card: %s, copy bandwidth %.2f TB/s (read + write)" % (torch.cuda.get_device_name(), bandwidth / 1e12))
    norm = qattn.Norm("rms", torch.rand(H, device=DEV).half() + 0.5)
    sin, cos = qattn.rope_tables(qattn.default_inv_freq(D, 500000.0), 8192, device=DEV)
    layers = {"eager": [], "graphs": []}
    for _ in range(LAYERS):
        # Act-order; q, k and v share one permutation, as GPTQ gives them (same input Hessian).
        g_qkv, g_o = [(torch.arange(H, device=DEV) // GROUP)[torch.randperm(H, device=DEV, generator=gen)].int()
                      for _ in range(2)]
        mats = [random_gptq(H, NH * D, gen, g_qkv), random_gptq(H, NKV * D, gen, g_qkv),
                random_gptq(H, NKV * D, gen, g_qkv), random_gptq(NH * D, H, gen, g_o)]
        for kind in layers:
            layers[kind].append(qattn.Layer(
                hidden_size=H, num_heads=NH, num_kv_heads=NKV, head_dim=D, q_proj=mats[0], k_proj=mats[1],
                v_proj=mats[2], o_proj=mats[3], input_norm=norm, rope="neox", max_rows=2048, max_seq_len=8192,
                use_graphs=kind == "graphs"))
    packed_qkv = H * (NH + 2 * NKV) * D / 2 + (H // GROUP) * (NH + 2 * NKV) * D * 4
    packed_o = NH * D * H / 2 + (NH * D // GROUP) * H * 4
    print("floors: decode = packed bytes / copy bandwidth, prefill = torch fp16 matmul; times in us")
    print("%-8s %9s %8s %8s %8s %8s %8s" % ("case", "phase", "gpu", "floor", "ratio", "eager", "graphs"))
    wanted = sys.argv[sys.argv.index("--cases") + 1].split(",") if "--cases" in sys.argv else None
    for batch, q_len in ((1, 1), (16, 1), (1, 2048)):
        rows = batch * q_len
        name = "D%d" % batch if q_len == 1 else "P%d" % q_len
        if wanted and name not in wanted:
            continue
        xs = [torch.randn(batch, q_len, H, device=DEV).half() for _ in range(LAYERS)]
        attn = [torch.randn(batch, q_len, NH, D, device=DEV).half() for _ in range(LAYERS)]
        lens = torch.randint(0, 4096, (batch,), dtype=torch.int32, device=DEV)
        outs = [layers["eager"][0].forward1(xs[i], sin=sin, cos=cos, past_lens=lens) for i in range(LAYERS)]

        def calls(kind):
            def f1(i):
                layers[kind][i % LAYERS].forward1(xs[i % LAYERS], sin=sin, cos=cos, past_lens=lens,
                                                  out=outs[i % LAYERS])

            def f2(i):
                layers[kind][i % LAYERS].forward2(xs[i % LAYERS], attn[i % LAYERS])

            def both(i):
                f1(i)
                f2(i)
            return f1, f2, both

        gpu = [graph_ms(f) * 1e3 for f in calls("eager")]
        eager = [median_ms(f) * 1e3 for f in calls("eager")]
        graphed = [median_ms(f) * 1e3 for f in calls("graphs")]
        if rows <= 32:
            floor1, floor2 = packed_qkv / bandwidth * 1e6, packed_o / bandwidth * 1e6
        else:
            a = torch.randn(rows, H, device=DEV).half()
            wqkv = torch.randn((NH + 2 * NKV) * D, H, device=DEV).half()
            wo = torch.randn(H, NH * D, device=DEV).half()
            floor1 = median_ms(lambda i: a @ wqkv.t(), reps=10, inner=4) * 1e3
            floor2 = median_ms(lambda i: a @ wo.t(), reps=10, inner=4) * 1e3
        if "--profile" in sys.argv:
            profile(name, calls("eager")[2])
        floors = (floor1, floor2, floor1 + floor2)
        for j, phase in enumerate(("forward1", "forward2", "both")):
            print("%-8s %9s %8.1f %8.1f %8.2f %8.1f %8.1f" % (name, phase, gpu[j], floors[j], gpu[j] / floors[j],
                                                              eager[j], graphed[j]))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
