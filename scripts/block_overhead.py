"""Per-step host time and torch op count of the whole block, `Layer.forward`, on
the CPU backend with the torch attention backend (the path an eager decode step
takes on a GPU without flash-attn).

The layer is tiny (H 64, 4/2 heads of dim 16, dense fp16 weights) and the caches
short, so the arithmetic is a few microseconds and what is timed is the Python
bookkeeping (cache plan / reserve / advance, checks), the torch ops' dispatch and
the forward1/forward2 wrappers. Each case decodes one token per sequence per
step (q_len 1), for batch 1 and 16, on a contiguous and a paged (16-token pages)
cache. The cache is emptied every `--window` steps (outside the timing), so every
run covers the same lengths.

Columns: "block" is one Layer.forward call; "f1+f2" is forward1 + forward2 alone
on the same shapes (a baseline no cache path can avoid); "overhead" is the
difference: cache bookkeeping plus attention (its torch ops, SDPA included);
"books" is the cache's plan + reserve + advance alone (host bookkeeping and the
device length update). "ops" counts the aten ops one step
dispatches (TorchDispatchMode), each a few microseconds of host time on CUDA too;
"f1+f2 ops" the ones forward1 + forward2 dispatch themselves (allocating q/k/v).
Each time is the fastest of --repeats runs (per step).

Usage: QATTN_LIBRARY=build-blk/libqattn.so PYTHONPATH=bindings/python \
       python scripts/block_overhead.py [--window N] [--repeats R]
"""
import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qattn
from qattn.cache import ContiguousKVCache, PagedKVCache

H, NH, NKV, D, POSITIONS, BLOCK = 64, 4, 2, 16, 256, 16


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def make_layer(gen):
    def dense(n, k):
        return qattn.QMatrix.dense((torch.randn(n, k, generator=gen) / k ** 0.5).half())

    norm = qattn.Norm("rms", (1 + 0.1 * torch.randn(H, generator=gen)).half())
    return qattn.Layer(hidden_size=H, num_heads=NH, num_kv_heads=NKV, head_dim=D,
                       q_proj=dense(NH * D, H), k_proj=dense(NKV * D, H), v_proj=dense(NKV * D, H),
                       o_proj=dense(H, NH * D), input_norm=norm, rope="neox", max_rows=16,
                       max_seq_len=POSITIONS)


def make_cache(kind, batch):
    if kind == "contiguous":
        return ContiguousKVCache(batch, POSITIONS, NKV, D)
    per_seq = POSITIONS // BLOCK
    return PagedKVCache(batch * per_seq, BLOCK, NKV, D, batch, per_seq)


def time_steps(step, reset, window, repeats):
    """Fastest of `repeats` runs of `window` steps, us per step; reset() between runs."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        reset()
        t0 = time.perf_counter_ns()
        for _ in range(window):
            step()
        best = min(best, (time.perf_counter_ns() - t0) / window / 1e3)
    return best


def count_ops(step):
    with OpCounter() as counter:
        step()
    return sum(counter.ops.values()), counter.ops


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=200, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--ops", action="store_true", help="also list the ops of each step")
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    layer = make_layer(gen)
    sin, cos = qattn.rope_tables(qattn.default_inv_freq(D), POSITIONS)

    print("%-11s %5s %9s %9s %9s %9s %5s %9s" % ("cache", "batch", "block us", "f1+f2 us", "overhead",
                                                   "books us", "ops", "f1+f2 ops"))
    for kind in ("contiguous", "paged"):
        for batch, reverse in ((1, False), (16, False), (16, True)):
            cache = make_cache(kind, batch)
            x = (torch.randn(batch, 1, H, generator=gen) * 0.1).half()
            seq_ids = list(range(batch))[::-1] if reverse else list(range(batch))
            attn = (torch.randn(batch, 1, NH, D, generator=gen) * 0.1).half()
            past = torch.full((batch,), 5, dtype=torch.int32)

            def block():
                layer.forward(x, cache, seq_ids, sin=sin, cos=cos, backend="torch")

            def phases():
                layer.forward1(x, sin=sin, cos=cos, past_lens=past)
                layer.forward2(x, attn)

            def books():
                step = cache.plan(seq_ids, batch, 1)
                cache.reserve(step)
                cache.advance(step)

            t_block = time_steps(block, cache.reset, args.window, args.repeats)
            t_phases = time_steps(phases, lambda: None, args.window, args.repeats)
            t_books = time_steps(books, cache.reset, args.window, args.repeats)
            cache.reset()
            for _ in range(20):  # mid-page, lengths 20 -> 21
                block()
            n_block, ops = count_ops(block)
            n_phases, _ = count_ops(phases)
            label = "%d%s" % (batch, "r" if reverse else "")
            print("%-11s %5s %9.1f %9.1f %9.1f %9.1f %5d %9d" % (kind, label, t_block, t_phases, t_block - t_phases,
                                                                 t_books, n_block, n_phases))
            if args.ops:
                print("    " + ", ".join("%s x%d" % kv for kv in sorted(ops.items())))


if __name__ == "__main__":
    main()
