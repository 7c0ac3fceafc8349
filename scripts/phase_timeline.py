"""Kernel timeline of the bench's graphed phases: which kernels one layer's
forward1, forward2 or block runs, how long each takes and how long the GPU sits
between them (or how far they overlap, with programmatic launch). The bench's
own model and case data (`qattn.bench`), a CUDA graph of every layer's call in
turn, replayed under the torch profiler; times from the kernels' trace events.

    python scripts/phase_timeline.py [--cases D1,D16,P2k] [--parts f1,f2,block,torch] [--layers 8] [--ncu]

(torch: the bench's plain PyTorch fp16 layer, the same SDPA call after its own kernels.)

Prints per case and part: the kernels of one layer in the middle of the loop,
each with its start relative to the layer's first kernel, its duration, the
gap since the previous kernel ended (negative: overlap), its shared memory a
block and its grid over the SMs (the profiler's "blocks per SM"), then the layer's span
and its kernels' summed time. The per-layer time of a replay divided by the
layers (median of 20 replays) is printed too, the number the bench reports
(there: medians of 100)."""
import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

from qattn import bench


def kernel_events(trace_path):
    with open(trace_path) as f:
        trace = json.load(f)
    kernels = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    return sorted(kernels, key=lambda e: e["ts"])


def short(name, width=60):
    name = name.replace("qattn::cuda::", "").replace("(anonymous namespace)::", "")
    return name if len(name) <= width else name[: width - 3] + "..."


def layer_groups(kernels, layers):
    """The trace's kernels cut into `layers` equal runs (every layer launches the
    same kernels), or None where they do not divide evenly."""
    if not kernels or len(kernels) % layers:
        return None
    per = len(kernels) // layers
    return [kernels[i * per:(i + 1) * per] for i in range(layers)]


def report(label, kernels, layers, replays):
    total = len(kernels) // replays
    kernels = kernels[-total:]  # the last replay
    groups = layer_groups(kernels, layers)
    if groups is None:
        print("%s: %d kernels in a replay of %d layers: not one set a layer; all of them:" % (label, total, layers))
        groups = [kernels]
    one = groups[len(groups) // 2]
    t0 = one[0]["ts"]
    print("%s: layer %d of %d, %d kernels" % (label, len(groups) // 2, len(groups), len(one)))
    end = None
    busy = 0.0
    for e in one:
        gap = "" if end is None else "%+7.1f" % (e["ts"] - end)
        a = e.get("args", {})
        # Shared memory a block decides the SMs' L1 / shared split, which an SM
        # changes only when idle; "blocks per SM" is the grid over the SMs.
        occupancy = "%6s B %5s/SM" % (a.get("shared memory", "?"), a.get("blocks per SM", "?"))
        print("  %8.1f  %7.1f  %7s  %s  %s" % (e["ts"] - t0, e["dur"], gap, occupancy, short(e["name"])))
        end = max(end or 0.0, e["ts"] + e["dur"])
        busy += e["dur"]
    nxt = groups[len(groups) // 2 + 1][0]["ts"] if len(groups) > len(groups) // 2 + 1 else end
    print("  span %.1f us (to the next layer's first kernel %.1f), kernels %.1f us" % (end - t0, nxt - t0, busy))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="D1,D16,P2k")
    ap.add_argument("--parts", default="f1,f2,block")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--ncu", action="store_true",
                    help="no trace (under Nsight Compute, which cannot share the GPU's profiler): the calls only")
    args = ap.parse_args()
    device = torch.device("cuda", 0)
    clock = bench.Clock(device)
    cases, _ = bench.make_cases(tiny=False)
    by_name = {c.name: c for c in cases.values()}
    wanted = [by_name[n] for n in args.cases.split(",")]
    if any(c.paged for c in wanted):
        sys.exit("phase_timeline.py: the contiguous cases only (D1, D16, P2k, 70B-D1)")
    shapes = {c.shape for c in wanted}
    for shape_name in sorted(shapes):
        shape = bench.FULL_SHAPES[shape_name]
        these = [c for c in wanted if c.shape == shape_name]
        max_rows = max(c.rows for c in these)
        max_seq = max(c.kv_len for c in these) + 16
        model = bench.Model(shape, args.layers, max_rows, max_seq, device, seed=1)
        for case in these:
            gen = torch.Generator(device=device)
            gen.manual_seed(1)
            data = bench.CaseData(model, case, args.layers, gen)
            attention = bench.Attention(case, shape, bench.sdpa_supports_gqa(device))
            pairs = list(zip(model.layers, data.sets))
            fns = {
                "f1": lambda: [bench.qattn_forward1(l, d, model, case) for l, d in pairs],
                "f2": lambda: [l.forward2(d["x"], d["attn"]) for l, d in pairs],
                "block": lambda: [bench.qattn_block(l, d, model, case, attention) for l, d in pairs],
                "torch": lambda: [bench.torch_block(w, d, shape, case, data.rope16, attention)
                                  for w, d in zip(model.torch_weights, data.sets)],
            }
            for part in args.parts.split(","):
                data.reset()
                graph, _ = bench.capture_graph(fns[part], device)
                per_layer = statistics.median(clock.measure(graph.replay, 20, 5)) * 1e6 / args.layers
                if args.ncu:
                    print("== %s %s: %.1f us a layer (under ncu)" % (case.name, part, per_layer))
                    del graph
                    continue
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.replays):
                        graph.replay()
                    torch.cuda.synchronize(device)
                path = os.path.join(tempfile.mkdtemp(), "trace.json")
                prof.export_chrome_trace(path)
                print("== %s %s: %.1f us a layer (median of 20 replays of %d layers)"
                      % (case.name, part, per_layer, args.layers))
                report("%s %s" % (case.name, part), kernel_events(path), args.layers, args.replays)
                del graph
            del data
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
