"""`python -m qattn bench`: qattn's attention block against its floors and a plain
PyTorch fp16 layer, all measured in the same run. docs/BENCHMARK_METHOD.md says
what is measured and why; this docstring only maps the code.

- `Floors`: measured device-to-device copy bandwidth and fp16 matmul rate.
- `Model`: the weights of N distinct layers of one shape (GPTQ for qattn, the same
  values dequantized to fp16 for PyTorch), cycled so no timing is L2-cache-hot.
- `CaseData`: one input / KV-cache set per layer of a case (a contiguous cache,
  or a `qattn.PagedKVCache` with a fixed planned step for the paged cases).
- `measure_case`: forward1, forward2 and the whole block of qattn, and the PyTorch
  layer, eager and replayed from a CUDA graph, per layer; for the paged cases also
  the public `Layer.forward` (host bookkeeping included), eager.
- `accuracy`: block outputs against a float64 reference of the same math.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import zlib
from typing import Optional

import torch
import torch.nn.functional as F

import qattn

# Llama-3 RMSNorm epsilon and RoPE base.
EPS = 1e-5
ROPE_BASE = 500000.0
ZERO = 8  # symmetric 4-bit GPTQ: every zero point is the middle of 0..15


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    group: int = 128


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: str
    batch: int
    q_len: int
    past: int
    paged: bool = False

    @property
    def rows(self):
        return self.batch * self.q_len

    @property
    def kv_len(self):
        return self.past + self.q_len

    @property
    def causal(self):
        # Decode: the new query sees every cached key and its own. Prefill from an
        # empty cache: the top-left causal mask, which SDPA takes without a mask tensor.
        return self.q_len > 1

    def key(self):
        return (self.shape, self.batch, self.q_len, self.past, self.paged)


FULL_SHAPES = {
    "8B": Shape("8B", 4096, 32, 8, 128),
    "70B": Shape("70B", 8192, 64, 8, 128),
}
# Same code paths on shapes a CPU reference backend runs in seconds; K stays a
# multiple of the group size so that GPTQ groups are whole.
TINY_SHAPES = {
    "8B": Shape("8B", 256, 4, 2, 64),
    "70B": Shape("70B", 512, 8, 4, 64),
}

CASE_NAMES = ("D1", "D16", "D1-paged", "D16-paged", "P2k", "70B", "sweep")
ACCURACY_CASES = ("D1", "D16", "D1-paged", "D16-paged")
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)


def make_cases(tiny):
    past = 32 if tiny else 2048
    prefill = 64 if tiny else 2048
    cases = {
        "D1": Case("D1", "8B", 1, 1, past),
        "D16": Case("D16", "8B", 16, 1, past),
        "D1-paged": Case("D1-paged", "8B", 1, 1, past, paged=True),
        "D16-paged": Case("D16-paged", "8B", 16, 1, past, paged=True),
        "P2k": Case("P2k", "8B", 1, prefill, 0),
        "70B": Case("70B-D1", "70B", 1, 1, past),
    }
    sweep = [Case("sweep-B%d" % b, "8B", b, 1, past) for b in SWEEP_BATCHES]
    return cases, sweep


# ---------------------------------------------------------------------------
# Timing


class Clock:
    """Times a callable per call: CUDA events on the GPU (device time between the
    start and end of each call, queue kept full), wall clock on the CPU.
    `between`, if given, runs after every call (warm-up included) outside the
    timed interval: on the GPU its work is queued after the end event and before
    the next start event."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, fn, iters, warmup, between=None):
        after = between or (lambda: None)
        for _ in range(warmup):
            fn()
            after()
        self.sync()
        if not self.cuda:
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                after()
            return times
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
            after()
        self.sync()
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]


def summary(times, per):
    """Median and 10th/90th percentiles of `times`, divided by `per` (layers per call), in us."""
    ordered = sorted(t / per * 1e6 for t in times)
    pick = lambda f: ordered[min(len(ordered) - 1, int(f * len(ordered)))]
    return {"median_us": statistics.median(ordered), "p10_us": pick(0.1), "p90_us": pick(0.9), "samples": len(ordered)}


def capture_graph(fn, device):
    """A CUDA graph of fn, captured after warm-up on a side stream (lazy cuBLAS and
    allocator set-up must not happen inside the capture). Returns (graph, mode);
    tries the strict capture mode first, then "relaxed" for libraries that call
    capture-unsafe but harmless CUDA APIs."""
    errors = []
    for mode in ("global", "relaxed"):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode=mode):
                fn()
            return graph, mode
        except Exception as e:  # a capture that fails leaves no graph; report why
            errors.append("%s: %s" % (mode, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
            torch.cuda.synchronize(device)
    raise RuntimeError("CUDA graph capture failed (" + "; ".join(errors) + ")")


# ---------------------------------------------------------------------------
# Floors


@dataclasses.dataclass
class Floors:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    copy_size_bytes: int
    matmul_n: int

    @classmethod
    def measure(cls, device, clock, tiny):
        # 2 x 512 MiB: far beyond L2, so the copy streams through HBM both ways.
        n = (1 << 22) if tiny else (1 << 28)
        src = torch.randn(n, device=device).half()
        dst = torch.empty_like(src)
        # A floor is the best the card does: the fastest iteration, not the
        # median, so a run with slow clocks does not lower the bar the layer
        # is judged by (the H200's median matmul rate moved 724-780 TFLOP/s
        # between runs).
        t = min(clock.measure(lambda: dst.copy_(src), iters=5 if tiny else 30, warmup=2 if tiny else 10))
        copy_bw = 2 * src.numel() * src.element_size() / t
        del src, dst
        m = 256 if tiny else 8192
        a = torch.randn(m, m, device=device).half()
        b = (torch.randn(m, m, device=device) / math.sqrt(m)).half()
        c = torch.empty(m, m, device=device, dtype=torch.float16)
        t = min(clock.measure(lambda: torch.mm(a, b, out=c), iters=5 if tiny else 30, warmup=2 if tiny else 10))
        rate = 2.0 * m ** 3 / t
        del a, b, c
        return cls(copy_bw, rate, 2 * n * 2, m)


def gptq_bytes(k, n, group):
    """Bytes of one 4-bit GPTQ matrix K -> N: packed weights, fp16 scales, packed zeros."""
    groups = -(-k // group)
    return k * n // 2 + groups * n * 2 + groups * n // 2


def traffic(shape, case):
    """Bytes that must move and FLOPs that must be done, for forward1, forward2 and the block."""
    s, rows = shape, case.rows
    q_w, kv_w = s.heads * s.head_dim, s.kv_heads * s.head_dim
    w_qkv = gptq_bytes(s.hidden, q_w, s.group) + 2 * gptq_bytes(s.hidden, kv_w, s.group)
    w_o = gptq_bytes(q_w, s.hidden, s.group)
    norm_w = s.hidden * 2
    rope = rows * (s.head_dim // 2) * 4 * 2  # one sin and one cos row (fp32) per token
    x_bytes = rows * s.hidden * 2
    kv_read = case.batch * case.kv_len * kv_w * 2 * 2
    kv_write = rows * kv_w * 2 * 2
    # (query, key) pairs: decode sees all past + 1 keys; prefill is causal.
    pairs = case.batch * (case.q_len * case.past + case.q_len * (case.q_len + 1) // 2)
    f1_flops = 2 * rows * s.hidden * (q_w + 2 * kv_w)
    f2_flops = 2 * rows * q_w * s.hidden
    return {
        "bytes": {
            "f1": w_qkv + norm_w + rope + x_bytes + rows * (q_w + 2 * kv_w) * 2,
            "f2": w_o + rows * q_w * 2 + 2 * x_bytes,
            "block": w_qkv + w_o + norm_w + rope + 2 * x_bytes + kv_read + kv_write,
        },
        "flops": {
            "f1": f1_flops,
            "f2": f2_flops,
            "block": f1_flops + f2_flops + 4 * s.heads * s.head_dim * pairs,
        },
    }


def case_floors(shape, case, floors):
    t = traffic(shape, case)
    bw, rate = floors.copy_bytes_per_s, floors.matmul_flops_per_s
    out = {}
    for part in ("f1", "f2", "block"):
        out[part + "_bytes_us"] = t["bytes"][part] / bw * 1e6
        out[part + "_compute_us"] = t["flops"][part] / rate * 1e6
    out["proj_bytes_us"] = out["f1_bytes_us"] + out["f2_bytes_us"]
    out["proj_compute_us"] = out["f1_compute_us"] + out["f2_compute_us"]
    out["proj_us"] = max(out["proj_bytes_us"], out["proj_compute_us"])
    out["block_us"] = max(out["block_bytes_us"], out["block_compute_us"])
    return out, t


# ---------------------------------------------------------------------------
# Weights and data


def _randn(shape, device, gen, std=1.0):
    return (torch.randn(shape, device=device, generator=gen) * std).half()


def random_gptq(k, n, group, device, gen):
    """Random 4-bit GPTQ tensors, classic checkpoint layout (stored zero = 8 - 1).
    Scales are positive, U[0.5, 1.5] / (4.6 sqrt(K)): (q - 8) has an RMS of ~4.6,
    so a unit-RMS input gives unit-RMS outputs and W has Llama-like magnitude
    (RMS ~0.016 at K = 4096)."""
    groups = -(-k // group)
    words = torch.randint(-(2 ** 31), 2 ** 31, (k // 8, n), device=device, generator=gen, dtype=torch.int64)
    qweight = words.to(torch.int32)
    stored = ZERO - 1
    word = sum(stored << (4 * j) for j in range(8))  # 0x77777777 fits in int32
    qzeros = torch.full((groups, n // 8), word, dtype=torch.int32, device=device)
    scales = ((torch.rand(groups, n, device=device, generator=gen) + 0.5) / (4.6 * math.sqrt(k))).half()
    return qweight, qzeros, scales


def dequantize(qweight, scales, group, dtype):
    """W [K, N] = scales[k // group, n] * (q[k, n] - 8), computed in float64 then cast."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = (qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF
    q = q.reshape(-1, qweight.shape[1]).to(torch.float64)
    s = scales.to(torch.float64).repeat_interleave(group, dim=0)[: q.shape[0]]
    return (s * (q - ZERO)).to(dtype)


@dataclasses.dataclass
class TorchWeights:
    norm: torch.Tensor  # fp16 [H]
    qkv: torch.Tensor  # fp16 [NH*D + 2*NKV*D, H]: one cuBLAS GEMM for Q, K and V
    o: torch.Tensor  # fp16 [H, NH*D]


def _library_bytes(device):
    """Device memory in use outside PyTorch's caching allocator: on a CUDA device
    otherwise idle, what the qattn library allocated itself."""
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


class Model:
    """`count` distinct layers of one shape: qattn layers on GPTQ weights and the
    PyTorch layer's fp16 weights (the same values, dequantized). The qattn layers
    share one qattn.Scratch, as a model's layers run one after another would.
    Layer 0's GPTQ tensors are kept for the float64 reference. On CUDA, `memory`
    is the device memory the qattn layers took (their weights; the rest: the
    shared scratch for max_rows rows, cuBLAS, per-layer state), per layer and for
    the first layer alone (which sizes the scratch and makes the device's cuBLAS
    handle: what one layer without sharing takes), and the PyTorch layer's fp16
    weights, in bytes."""

    def __init__(self, shape, count, max_rows, max_seq_len, device, seed):
        self.shape = shape
        self.device = device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        s = shape
        q_w, kv_w = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.layers, self.torch_weights = [], []
        self.reference = None
        measure = device.type == "cuda"
        weight_bytes = layer_bytes = first_layer_bytes = 0
        self.scratch = qattn.Scratch(device)
        for i in range(count):
            mats = {
                "q": random_gptq(s.hidden, q_w, s.group, device, gen),
                "k": random_gptq(s.hidden, kv_w, s.group, device, gen),
                "v": random_gptq(s.hidden, kv_w, s.group, device, gen),
                "o": random_gptq(q_w, s.hidden, s.group, device, gen),
            }
            norm = (1.0 + 0.1 * torch.randn(s.hidden, device=device, generator=gen)).half()
            before = _library_bytes(device) if measure else 0
            qm = {
                name: qattn.QMatrix.gptq(qw, qz, sc, bits=4, group_size=s.group, zero_offset_one=True)
                for name, (qw, qz, sc) in mats.items()
            }
            between = _library_bytes(device) if measure else 0
            self.layers.append(
                qattn.Layer(
                    hidden_size=s.hidden, num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim,
                    q_proj=qm["q"], k_proj=qm["k"], v_proj=qm["v"], o_proj=qm["o"],
                    input_norm=qattn.Norm("rms", norm, eps=EPS), rope="neox",
                    max_rows=max_rows, max_seq_len=max_seq_len, use_graphs=False, scratch=self.scratch,
                )
            )
            if measure:
                weight_bytes += between - before
                layer_bytes += _library_bytes(device) - between
                if i == 0:
                    first_layer_bytes = layer_bytes
            dense = {name: dequantize(qw, sc, s.group, torch.float16).t().contiguous()
                     for name, (qw, _, sc) in mats.items()}
            self.torch_weights.append(
                TorchWeights(norm, torch.cat([dense["q"], dense["k"], dense["v"]]).contiguous(), dense["o"])
            )
            if i == 0:
                self.reference = {"mats": mats, "norm": norm}
            del mats, dense
        tw = self.torch_weights[0]
        self.memory = None if not measure else {
            "max_rows": max_rows,
            "qattn_weights_bytes": weight_bytes / count,
            "qattn_layer_bytes": layer_bytes / count,
            "qattn_first_layer_bytes": first_layer_bytes,
            "layers_sharing_scratch": count,
            "torch_weights_bytes": (tw.qkv.numel() + tw.o.numel()) * tw.o.element_size(),
        }
        self.inv_freq = qattn.default_inv_freq(s.head_dim, base=ROPE_BASE)
        self.sin, self.cos = qattn.rope_tables(self.inv_freq, max_seq_len, device=device)

    def close(self):
        for layer in self.layers:
            layer.close()
        self.scratch.close()
        self.layers, self.torch_weights, self.reference = [], [], None


def paged_block_size(device):
    """Page size of the paged cases. flash-attn's paged kernel takes only multiples
    of 256 tokens, so where it is importable on CUDA the pages are 256 tokens and
    the auto backend picks it. The torch backend copies whole pages out before
    SDPA, so the smallest page the cache allows over-reads least: 2049 tokens are
    129 pages of 16 (2064 tokens) against 9 pages of 256 (2304 tokens)."""
    if device.type == "cuda" and "flash_attn" in qattn.attention.available_backends():
        return 256
    return 16


def paged_cache(model, case, kc, vc, block_size, gen):
    """A PagedKVCache whose sequences hold kc, vc[:, :past], and the planned decode
    step that writes position `past` of every sequence and attends over past + 1
    keys. Pages are a random permutation of the cache's, as a server's free list
    leaves them after a while. The step is never advanced, so every call writes and
    reads the same places."""
    s, b = model.shape, case.batch
    per_seq = -(-case.kv_len // block_size)
    cache = qattn.PagedKVCache(b * per_seq, block_size, s.kv_heads, s.head_dim, max_seqs=b,
                               max_blocks_per_seq=per_seq, device=model.device)
    order = torch.randperm(b * per_seq, generator=gen, device=model.device).tolist()
    for seq in range(b):
        cache.assign_pages(seq, order[seq * per_seq:(seq + 1) * per_seq])
    # attend() is the public way to append tokens; its output (with the keys as
    # queries) is not needed.
    past_k, past_v = kc[:, :case.past], vc[:, :case.past]
    qattn.attention.attend(past_k, past_k, past_v, cache, backend="torch")
    cache.check_consistency()
    step = cache.plan(None, b, case.q_len)
    # Takes no page: each sequence already holds the page of position `past`.
    cache.reserve(step)
    return cache, step


def rewind(cache, length):
    """Sets every sequence of `cache` back to `length` tokens after Layer.forward
    advanced it. No public call shortens a sequence (reset() empties it and gives
    its pages back), so this sets the host mirror and the device lengths together;
    measure_case checks them with check_consistency() afterwards."""
    cache._host_lens[:] = [length] * cache.num_rows
    cache.seq_lens.fill_(length)


class CaseData:
    """Per-layer buffers of one case: residual x (and its initial value, restored
    before each measurement), KV cache [batch, past + q_len, NKV, D] with random
    past entries, forward1 outputs, and a random attention output for forward2
    timed alone. Also the PyTorch layer's RoPE rows for the case's positions.
    Paged cases add a PagedKVCache holding the same past entries ("cache") and its
    fixed decode step ("step"); `backend` is the attention backend the cache gets
    when none is named."""

    def __init__(self, model, case, count, gen):
        s, dev = model.shape, model.device
        b, l = case.batch, case.q_len
        self.sets = []
        self.block_size = paged_block_size(dev) if case.paged else None
        for _ in range(count):
            x0 = _randn((b, l, s.hidden), dev, gen)
            d = {
                "x0": x0,
                "x": x0.clone(),
                "kc": _randn((b, case.kv_len, s.kv_heads, s.head_dim), dev, gen),
                "vc": _randn((b, case.kv_len, s.kv_heads, s.head_dim), dev, gen),
                "q": torch.empty(b, l, s.heads, s.head_dim, dtype=torch.float16, device=dev),
                "k": torch.empty(b, l, s.kv_heads, s.head_dim, dtype=torch.float16, device=dev),
                "v": torch.empty(b, l, s.kv_heads, s.head_dim, dtype=torch.float16, device=dev),
                "attn": _randn((b, l, s.heads * s.head_dim), dev, gen, std=0.25),
            }
            if case.paged:
                d["cache"], d["step"] = paged_cache(model, case, d["kc"], d["vc"], self.block_size, gen)
            self.sets.append(d)
        self.backend = qattn.attention.resolve_backend(None, self.sets[0]["cache"]) if case.paged else None
        # Where forward1 writes the step's keys and values in the cache, when the
        # attention reads them from there (torch SDPA; flash-attn appends them itself).
        for d in self.sets:
            if not case.paged:
                tokens = torch.arange(case.past, case.kv_len, dtype=torch.int32, device=dev)
                rows = torch.arange(b, dtype=torch.int32, device=dev)[:, None] * case.kv_len
                d["slots"] = rows + tokens
            else:
                d["slots"] = qattn.attention.kv_slots(d["step"]) if self.backend == "torch" else None
        self.rope16 = torch_rope_rows(model, case)

    def reset(self):
        for d in self.sets:
            d["x"].copy_(d["x0"])


def torch_rope_rows(model, case):
    """cos, sin fp16 [1, q_len, 1, D] for the case's positions, halves repeated,
    as Hugging Face's rotary embedding hands them to every layer of a model."""
    pos = torch.arange(case.past, case.kv_len, device=model.device)
    cos = model.cos[pos].half()
    sin = model.sin[pos].half()
    cos = torch.cat([cos, cos], dim=-1)[None, :, None, :].contiguous()
    sin = torch.cat([sin, sin], dim=-1)[None, :, None, :].contiguous()
    return cos, sin


# ---------------------------------------------------------------------------
# The block: qattn and PyTorch


def sdpa_supports_gqa(device):
    try:
        q = torch.ones(1, 2, 1, 8, device=device, dtype=torch.float16)
        kv = torch.ones(1, 1, 1, 8, device=device, dtype=torch.float16)
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except TypeError:
        return False


class Attention:
    """Writes the new k, v into the cache at the case's positions and runs torch
    SDPA over the cache: [B, L, NH, D] -> [B, L, NH, D]. GQA through enable_gqa
    (no copies of K/V) where this torch has it, else K/V expanded per query head."""

    def __init__(self, case, shape, gqa):
        self.case, self.group, self.gqa = case, shape.heads // shape.kv_heads, gqa

    def __call__(self, q, k, v, d):
        c = self.case
        d["kc"][:, c.past:c.kv_len].copy_(k)
        d["vc"][:, c.past:c.kv_len].copy_(v)
        return self.cached(q, d)

    def cached(self, q, d):
        """Attention for q whose keys and values are in the cache already."""
        keys, values = d["kc"].transpose(1, 2), d["vc"].transpose(1, 2)
        extra = {}
        if self.group > 1:
            if self.gqa:
                extra["enable_gqa"] = True
            else:
                keys = keys.repeat_interleave(self.group, dim=1)
                values = values.repeat_interleave(self.group, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=self.case.causal, **extra)
        return out.transpose(1, 2).contiguous()


class PagedAttention:
    """The paged cache's attention step as Layer.forward runs it, on the case's fixed
    planned step: `qattn.attention.run_step` writes the new k, v into the pages and
    attends over the past + 1 keys of each sequence. What Layer.forward adds around
    it (plan, reserve, advance: host bookkeeping and one device increment of the
    lengths) is left out, so that every call does the same work and a CUDA graph
    can replay it."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, q, k, v, d):
        return qattn.attention.run_step(q, k, v, d["step"], self.backend)

    def cached(self, q, d):
        return qattn.attention.run_checked(q, None, None, d["step"], self.backend)


def qattn_forward1(layer, d, model, case, into_cache=False):
    # The paged path takes positions from the cache's device lengths, as Layer.forward does.
    where = {"past_lens": d["step"].past_lens} if case.paged else {"past_len": case.past}
    if into_cache:
        cache = d["cache"] if case.paged else None
        where["kv_cache"] = (cache.k, cache.v) if case.paged else (d["kc"], d["vc"])
        where["kv_slots"] = d["slots"]
        return layer.forward1(d["x"], sin=model.sin, cos=model.cos, out=(d["q"], None, None), **where)
    return layer.forward1(d["x"], sin=model.sin, cos=model.cos, out=(d["q"], d["k"], d["v"]), **where)


def qattn_block(layer, d, model, case, attention):
    """qattn's block as Layer.forward runs it: with torch attention, forward1 writes
    the keys and values straight into the cache (flash-attn appends them itself)."""
    if d["slots"] is not None:
        q, _, _ = qattn_forward1(layer, d, model, case, into_cache=True)
        layer.forward2(d["x"], attention.cached(q, d))
    else:
        q, k, v = qattn_forward1(layer, d, model, case)
        layer.forward2(d["x"], attention(q, k, v, d))


def _rotate_half(t):
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def torch_block(w, d, shape, case, rope16, attention):
    """The plain PyTorch fp16 layer, written as Hugging Face's Llama writes it
    (RMSNorm in fp32 then cast, RoPE in fp16), with Q, K and V in one GEMM."""
    s, x = shape, d["x"]
    b, l = case.batch, case.q_len
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    n = w.norm * h.half()
    q_w, kv_w = s.heads * s.head_dim, s.kv_heads * s.head_dim
    q, k, v = F.linear(n, w.qkv).split([q_w, kv_w, kv_w], dim=-1)
    cos, sin = rope16
    q = q.view(b, l, s.heads, s.head_dim)
    k = k.view(b, l, s.kv_heads, s.head_dim)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    o = attention(q, k, v.view(b, l, s.kv_heads, s.head_dim), d)
    x.add_(F.linear(o.view(b, l, q_w), w.o))


def reference_block(model, case, x16, kc16, vc16):
    """The block in float64 on the device, from the exact dequantized GPTQ weights
    and exact RoPE angles; the cached past keys/values are the fp16 values both
    implementations read."""
    s, ref = model.shape, model.reference
    w = {name: dequantize(qw, sc, s.group, torch.float64) for name, (qw, _, sc) in ref["mats"].items()}
    b, l = case.batch, case.q_len
    x = x16.double()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * ref["norm"].double()
    q = (n @ w["q"]).view(b, l, s.heads, s.head_dim)
    k = (n @ w["k"]).view(b, l, s.kv_heads, s.head_dim)
    v = (n @ w["v"]).view(b, l, s.kv_heads, s.head_dim)
    pos = torch.arange(case.past, case.kv_len, device=x.device, dtype=torch.float64)
    angle = pos[:, None] * model.inv_freq.to(device=x.device, dtype=torch.float64)[None, :]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]

    def rope(t):
        half = s.head_dim // 2
        t1, t2 = t[..., :half], t[..., half:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    q, k = rope(q), rope(k)
    keys = torch.cat([kc16[:, :case.past].double(), k], dim=1)
    values = torch.cat([vc16[:, :case.past].double(), v], dim=1)
    group = s.heads // s.kv_heads
    keys = keys.repeat_interleave(group, dim=2)
    values = values.repeat_interleave(group, dim=2)
    scores = torch.einsum("blhd,bshd->bhls", q, keys) / math.sqrt(s.head_dim)
    if case.causal:
        qpos = torch.arange(l, device=x.device)[:, None] + case.past
        kpos = torch.arange(case.kv_len, device=x.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    o = torch.einsum("bhls,bshd->blhd", scores.softmax(-1), values)
    return x + o.reshape(b, l, s.heads * s.head_dim) @ w["o"]


# ---------------------------------------------------------------------------
# Measurement


@dataclasses.dataclass
class Settings:
    device: torch.device
    tiny: bool
    iters: int
    warmup: int
    layers: Optional[int]  # None: layers_to_cycle
    gqa: bool
    l2_bytes: Optional[int]


def _timed(clock, settings, fn, per, graphs, label, notes):
    """(eager, graph) summaries of fn; graph is None on the CPU or when capture fails."""
    eager = summary(clock.measure(fn, settings.iters, settings.warmup), per)
    graph = None
    if graphs:
        try:
            g, mode = capture_graph(fn, settings.device)
            graph = summary(clock.measure(g.replay, settings.iters, settings.warmup), per)
            if mode != "global":
                notes.append("%s: captured with capture_error_mode=%r" % (label, mode))
            del g
        except Exception as e:
            notes.append("%s graph: %s" % (label, e))
    return eager, graph


def timed_parts(case):
    """The parts of the block a case times alone: forward1, forward2 and the
    block for the plain cases; the block only for paged and sweep cases."""
    return ("f1", "f2", "block") if not case.paged and not case.name.startswith("sweep") else ("block",)


# Each timed loop moves at least this many times the L2, so that a layer's data
# has left L2 when the loop comes back to it; and at least this many layers.
L2_CYCLES = 3
LEAST_LAYERS = 8


def layers_to_cycle(shape, cases, l2_bytes):
    """Distinct layers the cases of one shape cycle: LEAST_LAYERS, or more where
    the smallest part they time would move under L2_CYCLES x the L2 with that few
    (8B shape: forward2 at one row moves 8.7 MB a layer, so an H100's 50 MB takes
    18 layers and an H200's 63 MB 22)."""
    if not l2_bytes:
        return LEAST_LAYERS
    smallest = min(traffic(shape, c)["bytes"][part] for c in cases for part in timed_parts(c))
    return max(LEAST_LAYERS, math.ceil(L2_CYCLES * l2_bytes / smallest))


def l2_notes(shape, case, layers, l2_bytes):
    """Where the bytes cycled through one timed loop are under twice the L2 size,
    part of each layer's data may still be in L2 when the loop comes back to it."""
    if not l2_bytes:
        return []
    notes = []
    for part in timed_parts(case):
        footprint = traffic(shape, case)["bytes"][part] * layers
        if footprint < 2 * l2_bytes:
            notes.append("qattn %s cycles %.0f MB through a %.0f MB L2 (< 2x): some reads may hit L2; "
                         "compare with more --layers" % (part, footprint / 1e6, l2_bytes / 1e6))
    return notes


def make_attention(case, shape, settings, data):
    return PagedAttention(data.backend) if case.paged else Attention(case, shape, settings.gqa)


def measure_case(model, case, settings, clock):
    """Per-layer times of one case (timed_parts: the block, and forward1 and
    forward2 alone where it says so), notes, and (paged cases) the page size and
    attention backend."""
    full = "f1" in timed_parts(case)
    gen = torch.Generator(device=settings.device)
    gen.manual_seed(zlib.crc32(repr(case.key()).encode()))
    n = len(model.layers)
    data = CaseData(model, case, n, gen)
    attention = make_attention(case, model.shape, settings, data)
    pairs = list(zip(model.layers, model.torch_weights, data.sets))
    graphs = settings.device.type == "cuda"
    notes, times = [], {}

    def f1_all():
        for layer, _, d in pairs:
            qattn_forward1(layer, d, model, case)

    def f2_all():
        for layer, _, d in pairs:
            layer.forward2(d["x"], d["attn"])

    def block_all():
        for layer, _, d in pairs:
            qattn_block(layer, d, model, case, attention)

    def torch_all():
        for _, w, d in pairs:
            torch_block(w, d, model.shape, case, data.rope16, attention)

    runs = [("qattn_block", block_all), ("torch", torch_all)]
    if full:
        runs = [("qattn_f1", f1_all), ("qattn_f2", f2_all)] + runs
    for label, fn in runs:
        data.reset()
        eager, graph = _timed(clock, settings, fn, n, graphs, label, notes)
        times[label + "_eager"] = eager
        times[label + "_graph"] = graph
        finite = all(bool(torch.isfinite(d["x"]).all()) for d in data.sets)
        if not finite:
            notes.append("%s: the residual stream became non-finite during timing" % label)
    info = {}
    if case.paged:
        info = measure_public_forward(model, case, settings, clock, data, pairs, times, notes)
    notes += l2_notes(model.shape, case, n, settings.l2_bytes)
    for i, layer in enumerate(model.layers):
        try:
            layer.check_device_errors()
        except qattn.QattnError as e:
            notes.append("layer %d: %s" % (i, e))
    del data
    return times, notes, info


def measure_public_forward(model, case, settings, clock, data, pairs, times, notes):
    """Times Layer.forward on the paged cache, eager only: plan, reserve, forward1,
    attention, forward2 and advance, as a caller runs them. The lengths it advances
    are rewound between iterations, outside the timed interval. A CUDA graph would
    replay the device increment of the lengths without the host bookkeeping, so
    this path has no graph column. Returns the case's paged-cache facts."""
    def forward_all():
        for layer, _, d in pairs:
            layer.forward(d["x"], d["cache"], sin=model.sin, cos=model.cos)

    def rewind_all():
        for d in data.sets:
            rewind(d["cache"], case.past)

    data.reset()
    times["qattn_forward_eager"] = summary(
        clock.measure(forward_all, settings.iters, settings.warmup, between=rewind_all), len(pairs))
    if not all(bool(torch.isfinite(d["x"]).all()) for d in data.sets):
        notes.append("qattn_forward: the residual stream became non-finite during timing")
    ran = sorted({d["cache"].last_backend for d in data.sets})
    if ran != [data.backend]:
        notes.append("attention backends %s ran, %r was expected" % (ran, data.backend))
    expected = [case.past] * case.batch
    for i, d in enumerate(data.sets):
        d["cache"].check_consistency()
        if d["cache"].lengths() != expected:
            notes.append("layer %d: cache lengths %s after timing, expected %s" % (i, d["cache"].lengths(), expected))
    notes.append("paged cache: %d-token pages (%d per sequence, random page order), attention backend %r; "
                 "block timed as forward1 (writing k, v into the pages with the torch backend) -> attention on a "
                 "fixed planned step -> forward2; "
                 "Layer.forward (plan, reserve, advance included) timed eager, lengths rewound between iterations"
                 % (data.block_size, -(-case.kv_len // data.block_size), data.backend))
    return {"block_size": data.block_size, "pages_per_seq": -(-case.kv_len // data.block_size),
            "backend": data.backend, "page_order": "random permutation"}


def accuracy(model, case, settings):
    """Relative errors of the block output x (and of its update x - x_in) against
    the float64 reference, for qattn and for the PyTorch fp16 layer, on layer 0."""
    gen = torch.Generator(device=settings.device)
    gen.manual_seed(1000 + case.batch)
    data = CaseData(model, case, 1, gen)
    d0 = data.sets[0]
    attention = make_attention(case, model.shape, settings, data)
    ref = reference_block(model, case, d0["x0"], d0["kc"], d0["vc"])
    update = (ref - d0["x0"].double()).norm()
    out = {}
    # Paged: every run writes the same position of the same cache and reads the
    # same past, so the runs need no cache copies.
    labels = ("qattn", "torch", "qattn_forward") if case.paged else ("qattn", "torch")
    for label in labels:
        d = {key: t.clone() if isinstance(t, torch.Tensor) else t for key, t in d0.items()}
        if label == "qattn":
            qattn_block(model.layers[0], d, model, case, attention)
        elif label == "torch":
            torch_block(model.torch_weights[0], d, model.shape, case, data.rope16, attention)
        else:
            model.layers[0].forward(d["x"], d["cache"], sin=model.sin, cos=model.cos)
            rewind(d["cache"], case.past)
        diff = (d["x"].double() - ref).norm()
        out[label + "_output_rel_err"] = float(diff / ref.norm())
        out[label + "_update_rel_err"] = float(diff / update)
    out["output_ratio"] = out["qattn_output_rel_err"] / out["torch_output_rel_err"]
    out["update_ratio"] = out["qattn_update_rel_err"] / out["torch_update_rel_err"]
    return out


# ---------------------------------------------------------------------------
# Report


def _us(entry):
    return None if entry is None else entry["median_us"]


def _fmt(v, width=8, digits=1):
    if v is None:
        return "-".rjust(width)
    return ("%.*f" % (digits, v)).rjust(width)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def print_table(results, out):
    header = (
        "%-9s | %-17s | %-17s | %-17s | %-17s | %8s %8s | %-13s | %-13s"
        % ("case", "qattn f1 (us)", "qattn f2 (us)", "qattn block (us)", "torch fp16 (us)",
           "bytes", "compute", "block/floor", "torch/floor")
    )
    sub = (
        "%-9s | %8s %8s | %8s %8s | %8s %8s | %8s %8s | %8s %8s | %6s %6s | %6s %6s"
        % ("", "eager", "graph", "eager", "graph", "eager", "graph", "eager", "graph",
           "floor us", "floor us", "eager", "graph", "eager", "graph")
    )
    print(header, file=out)
    print(sub, file=out)
    print("-" * len(sub), file=out)
    for r in results:
        t, fl = r["time"], r["floor"]
        if t is None:
            print("%-9s | failed: %s" % (r["name"], r["error"]), file=out)
            continue
        cells = []
        for key in ("qattn_f1", "qattn_f2", "qattn_block", "torch"):
            cells += [_fmt(_us(t.get(key + "_eager"))), _fmt(_us(t.get(key + "_graph")))]
        ratios = []
        for key in ("qattn_block", "torch"):
            for mode in ("eager", "graph"):
                ratios.append(_fmt(_ratio(_us(t.get(key + "_" + mode)), fl["block_us"]), 6, 2))
        print(
            "%-9s | %s %s | %s %s | %s %s | %s %s | %s %s | %s %s | %s %s"
            % ((r["name"],) + tuple(cells) + (_fmt(fl["block_bytes_us"]), _fmt(fl["block_compute_us"]))
               + tuple(ratios)),
            file=out,
        )


def print_paged(results, out):
    """One line per paged case: page size, backend, the block against its floor and
    against the contiguous case of the same batch, and the public Layer.forward."""
    by_name = {r["name"]: r for r in results}
    for r in results:
        p = r.get("paged_cache")
        if r["time"] is None or not p:
            continue
        t, floor = r["time"], r["floor"]["block_us"]
        blk, mode = _best(t, "qattn_block")
        contiguous = by_name.get(r["name"][: -len("-paged")])
        versus = ""
        if contiguous is not None and contiguous["time"] is not None:
            other = _us(contiguous["time"].get("qattn_block_" + mode))
            if other:
                versus = ", %.2fx the contiguous %s block" % (blk / other, contiguous["name"])
        fwd = _us(t.get("qattn_forward_eager"))
        print("%-9s paged, %d-token pages, attention backend %s: block (%s) %.1f us, %.2fx floor%s; "
              "Layer.forward (eager) %s us, %sx floor"
              % (r["name"], p["block_size"], p["backend"], mode, blk, blk / floor, versus,
                 _fmt(fwd, 0), _fmt(_ratio(fwd, floor), 0, 2)), file=out)


def _best(t, key):
    """The graphed time where there is one (how decode is deployed), else eager."""
    g = _us(t.get(key + "_graph"))
    return (g, "graph") if g is not None else (_us(t.get(key + "_eager")), "eager")


def evaluate_targets(by_name, sweep, acc):
    """(met: bool or None, line) for each target of the issue; None: not measured."""
    lines = []

    def target(label, value, limit, detail):
        if value is None:
            lines.append((None, "%s: not measured" % label))
        else:
            lines.append((value <= limit, "%s: %.2fx (target <= %.2fx) %s" % (label, value, limit, detail)))

    def timed(name):
        r = by_name.get(name)
        return r if r is not None and r["time"] is not None else None

    r = timed("D1")
    if r:
        f1, mode = _best(r["time"], "qattn_f1")
        f2, _ = _best(r["time"], "qattn_f2")
        proj = None if f1 is None or f2 is None else f1 + f2
        target("D1 projections (forward1 + forward2) vs bytes floor", _ratio(proj, r["floor"]["proj_bytes_us"]), 1.5,
               "[%s: %s us vs %.1f us]" % (mode, _fmt(proj, 0), r["floor"]["proj_bytes_us"]))
        blk, mode = _best(r["time"], "qattn_block")
        target("D1 whole block vs floor", _ratio(blk, r["floor"]["block_us"]), 2.5,
               "[%s: %s us vs %.1f us]" % (mode, _fmt(blk, 0), r["floor"]["block_us"]))
    else:
        target("D1 projections vs bytes floor", None, 1.5, "")
        target("D1 whole block vs floor", None, 2.5, "")
    r = timed("D16")
    blk, mode = _best(r["time"], "qattn_block") if r else (None, "")
    target("D16 whole block vs floor", _ratio(blk, r["floor"]["block_us"]) if r else None, 1.4,
           "[%s: %s us vs %.1f us]" % (mode, _fmt(blk, 0), r["floor"]["block_us"]) if r else "")
    r = timed("P2k")
    blk, mode = _best(r["time"], "qattn_block") if r else (None, "")
    target("P2k whole block vs compute floor", _ratio(blk, r["floor"]["block_compute_us"]) if r else None, 1.25,
           "[%s: %s us vs %.1f us]" % (mode, _fmt(blk, 0), r["floor"]["block_compute_us"]) if r else "")

    slower, compared, seen = [], 0, set()
    for r in list(by_name.values()) + sweep:
        # Sweep points that reuse a case's measurement are compared once.
        if r["time"] is None or id(r["time"]) in seen:
            continue
        seen.add(id(r["time"]))
        for mode in ("eager", "graph"):
            a, b = _us(r["time"].get("qattn_block_" + mode)), _us(r["time"].get("torch_" + mode))
            if a is None or b is None:
                continue
            compared += 1
            if a > b:
                slower.append("%s %s %.1f us > torch %.1f us" % (r["name"], mode, a, b))
    if compared == 0:
        lines.append((None, "qattn never slower than the PyTorch fp16 layer: not measured"))
    else:
        lines.append((not slower, "qattn never slower than the PyTorch fp16 layer (%d comparisons)%s"
                      % (compared, "" if not slower else ": slower in " + "; ".join(slower))))
    for name in ACCURACY_CASES:
        a = acc.get(name)
        if a is None or "error" in a:
            lines.append((None, "%s accuracy: not measured%s" % (name, "" if a is None else " (" + a["error"] + ")")))
        else:
            lines.append((a["output_ratio"] <= 1.5, "%s accuracy, qattn error / torch error: %.2fx (target <= 1.50x)"
                          % (name, a["output_ratio"])))
    return lines


def write_plot(path, sweep, device_name, tiny, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (%s)" % path, file=out)
        return False
    points = [r for r in sweep if r["time"] is not None]
    if not points:
        print("no sweep results: skipping the plot", file=out)
        return False
    batches = [r["batch"] for r in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (
        ("qattn_block_graph", "qattn block, CUDA graph", "o-"),
        ("qattn_block_eager", "qattn block, eager", "o--"),
        ("torch_graph", "PyTorch fp16 layer, CUDA graph", "s-"),
        ("torch_eager", "PyTorch fp16 layer, eager", "s--"),
    ):
        ys = [_us(r["time"].get(key)) for r in points]
        xs = [b for b, y in zip(batches, ys) if y is not None]
        if xs:
            ax.plot(xs, [y for y in ys if y is not None], style, label=label)
    ax.plot(batches, [r["floor"]["block_us"] for r in points], "k-", linewidth=2, label="floor (larger of bytes and compute floors)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("decode batch size (past %d tokens each)" % points[0]["past"])
    ax.set_ylabel("time per layer (us, median)")
    ax.set_title("Attention block, %s, GPTQ 4-bit\n%s" % ("--tiny shape" if tiny else "Llama-3-8B shape", device_name))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print("plot written to %s" % path, file=out)
    return True


def _git_commit():
    # QATTN_COMMIT names the tree where git cannot: a copied tree, or a .git older than it.
    if os.environ.get("QATTN_COMMIT"):
        return os.environ["QATTN_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------
# Driver


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m qattn bench",
        description="Time qattn's attention block (Llama-3 shapes, GPTQ 4-bit) against its bytes and compute "
                    "floors and a plain PyTorch fp16 layer, and check its accuracy against float64.",
    )
    p.add_argument("--cases", default=",".join(CASE_NAMES),
                   help="comma-separated subset of %s (default: all)" % ",".join(CASE_NAMES))
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations per measurement, each over all cycled layers (default 100; --tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 10; --tiny 1)")
    p.add_argument("--json", default="bench.json", help="where to write the results (default bench.json)")
    p.add_argument("--plot", default="bench.png", help="where to save the batch-size plot (default bench.png)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu needs --tiny)")
    p.add_argument("--layers", type=int, default=None,
                   help="distinct layers (weights, inputs, KV caches) cycled in each timed loop (default: "
                        "at least %d, and enough that each loop moves %dx the L2; --tiny 2)"
                        % (LEAST_LAYERS, L2_CYCLES))
    p.add_argument("--tiny", action="store_true",
                   help="small shapes and few layers: runs every code path quickly (timings mean nothing)")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASE_NAMES]
    if unknown or not cases:
        p.error("--cases: unknown %s; choose from %s" % (unknown or "(empty)", ",".join(CASE_NAMES)))
    args.cases = cases
    for name, least in (("iters", 1), ("warmup", 0), ("layers", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            p.error("--%s must be >= %d, got %d" % (name, least, value))
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        p.error("--device: %s" % e)
    if args.device.type not in ("cuda", "cpu"):
        p.error("--device must be cuda, cuda:N or cpu, got %s" % args.device)
    if args.device.type == "cpu" and not args.tiny:
        p.error("--device cpu runs the CPU reference backend, far too slow for full shapes; add --tiny")
    if args.device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("torch sees no CUDA device; use --device cpu --tiny")
        if qattn.cuda_device_count() == 0:
            p.error("this qattn build has no CUDA backend or sees no device: %s" % qattn.build_info())
        if args.device.index is None:
            args.device = torch.device("cuda", torch.cuda.current_device())
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = sys.stdout
    dev = args.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    settings = Settings(
        device=dev, tiny=args.tiny,
        iters=args.iters if args.iters is not None else (3 if args.tiny else 100),
        warmup=args.warmup if args.warmup is not None else (1 if args.tiny else 10),
        layers=args.layers if args.layers is not None else (2 if args.tiny else None),
        gqa=sdpa_supports_gqa(dev),
        l2_bytes=getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", None) if dev.type == "cuda" else None,
    )
    shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
    cases, sweep_cases = make_cases(args.tiny)
    selected = [cases[c] for c in CASE_NAMES[:-1] if c in args.cases]
    sweep_selected = sweep_cases if "sweep" in args.cases else []
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (qattn reference backend)"
    clock = Clock(dev)
    started = time.perf_counter()

    print("qattn %s (%s) from %s" % (qattn.version(), qattn.build_info(), qattn.library_path()), file=out)
    print("device: %s%s; torch %s; SDPA GQA: %s; layers cycled: %s; %d iterations after %d warm-up"
          % (device_name, "" if not settings.l2_bytes else " (L2 %.0f MB)" % (settings.l2_bytes / 1e6),
             torch.__version__, "enable_gqa" if settings.gqa else "expanded K/V",
             settings.layers or "at least %d, a loop moving %dx the L2" % (LEAST_LAYERS, L2_CYCLES),
             settings.iters, settings.warmup), file=out)
    if args.tiny:
        print("--tiny: small shapes; the timings below say nothing about performance", file=out)
    if dev.type == "cpu":
        print("CPU: no CUDA graphs; floors are measured on the CPU", file=out)

    floors = Floors.measure(dev, clock, args.tiny)
    print("floors: device-to-device copy %.0f GB/s (read + write), fp16 matmul %.1f TFLOP/s (n = %d)"
          % (floors.copy_bytes_per_s / 1e9, floors.matmul_flops_per_s / 1e12, floors.matmul_n), file=out)

    results, sweep_results, acc, notes = [], [], {}, []
    measured = {}
    layers_cycled = {}
    memory = {}
    by_shape = {}
    for c in selected + sweep_selected:
        by_shape.setdefault(c.shape, []).append(c)
    for shape_name in ("8B", "70B"):
        group = by_shape.get(shape_name)
        if not group:
            continue
        shape = shapes[shape_name]
        layers = settings.layers or layers_to_cycle(shape, group, settings.l2_bytes)
        layers_cycled[shape_name] = layers
        t0 = time.perf_counter()
        try:
            model = Model(shape, layers, max(c.rows for c in group), max(c.kv_len for c in group), dev,
                          seed=7 if shape_name == "8B" else 70)
            clock.sync()
        except Exception as e:
            error = "building the %s layers failed: %s: %s" % (shape_name, type(e).__name__, e)
            print(error, file=out)
            for c in group:
                entry = {"name": c.name, "shape": c.shape, "batch": c.batch, "q_len": c.q_len, "past": c.past, "paged": c.paged,
                         "time": None, "notes": [], "error": error}
                entry["floor"], entry["traffic"] = case_floors(shape, c, floors)
                (sweep_results if c.name.startswith("sweep") else results).append(entry)
            continue
        print("built %d %s layers in %.1f s" % (layers, shape_name, time.perf_counter() - t0), file=out)
        memory[shape_name] = model.memory
        if model.memory:
            m = model.memory
            print("device memory per %s layer: qattn %.1f MiB of weights + %.1f MiB of scratch, cuBLAS and "
                  "state, %d layers sharing one qattn.Scratch (max_rows %d; the first layer alone %.1f MiB, "
                  "what a layer without sharing takes); PyTorch fp16 weights %.1f MiB"
                  % (shape_name, m["qattn_weights_bytes"] / 2**20, m["qattn_layer_bytes"] / 2**20,
                     m["layers_sharing_scratch"], m["max_rows"], m["qattn_first_layer_bytes"] / 2**20,
                     m["torch_weights_bytes"] / 2**20), file=out)
        for c in group:
            if c.name in ACCURACY_CASES:
                try:
                    acc[c.name] = accuracy(model, c, settings)
                except Exception as e:
                    acc[c.name] = {"error": "%s: %s" % (type(e).__name__, e)}
        for c in group:
            is_sweep = c.name.startswith("sweep")
            entry = {"name": c.name, "shape": c.shape, "batch": c.batch, "q_len": c.q_len, "past": c.past, "paged": c.paged,
                     "time": None, "notes": [], "error": None}
            entry["floor"], entry["traffic"] = case_floors(shape, c, floors)
            if is_sweep and c.key() in measured:
                entry["time"] = measured[c.key()]
            else:
                t0 = time.perf_counter()
                try:
                    entry["time"], entry["notes"], info = measure_case(model, c, settings, clock)
                    if c.paged:
                        entry["paged_cache"] = info
                    measured[c.key()] = entry["time"]
                except Exception as e:
                    entry["error"] = "%s: %s" % (type(e).__name__, e)
                print("measured %s in %.1f s%s" % (c.name, time.perf_counter() - t0,
                                                   "" if entry["error"] is None else ": FAILED " + entry["error"]),
                      file=out)
            notes += ["%s: %s" % (c.name, n) for n in entry["notes"]]
            (sweep_results if is_sweep else results).append(entry)
        model.close()
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    print("\nPer-layer medians in microseconds. Floors: bytes that must move / copy bandwidth, and FLOPs / "
          "matmul rate; ratios are to the larger of the two.", file=out)
    print_table(results + sweep_results, out)
    for r in results:
        if r["time"] is not None and r["time"].get("qattn_f1_eager") is not None:
            f1 = _best(r["time"], "qattn_f1")[0]
            f2 = _best(r["time"], "qattn_f2")[0]
            if f1 is not None and f2 is not None:
                print("%-8s projections (f1 + f2, %s): %.1f us, floor %.1f us (%.2fx)"
                      % (r["name"], _best(r["time"], "qattn_f1")[1], f1 + f2, r["floor"]["proj_us"],
                         (f1 + f2) / r["floor"]["proj_us"]), file=out)
    print_paged(results, out)
    if acc:
        print("\nAccuracy of the block output x against float64 (relative error ||out - ref|| / ||ref||;"
              " 'update' divides by ||ref - x_in|| instead):", file=out)
        for name, a in acc.items():
            if "error" in a:
                print("  %-9s failed: %s" % (name, a["error"]), file=out)
                continue
            print("  %-9s output: qattn %.3e, torch fp16 %.3e, ratio %.2f | update: qattn %.3e, torch %.3e, ratio %.2f"
                  % (name, a["qattn_output_rel_err"], a["torch_output_rel_err"], a["output_ratio"],
                     a["qattn_update_rel_err"], a["torch_update_rel_err"], a["update_ratio"]), file=out)
            if "qattn_forward_output_rel_err" in a:
                print("  %-9s Layer.forward output: qattn %.3e | update: %.3e"
                      % ("", a["qattn_forward_output_rel_err"], a["qattn_forward_update_rel_err"]), file=out)
    if notes:
        print("\nNotes:", file=out)
        for n in notes:
            print("  " + n, file=out)

    lines = evaluate_targets({r["name"]: r for r in results}, sweep_results, acc)
    print("\nTargets%s:" % (" (--tiny or CPU: not meaningful)" if dev.type == "cpu" or args.tiny else ""), file=out)
    for met, line in lines:
        print("  [%s] %s" % ({True: "MET", False: "NOT MET", None: "n/a"}[met], line), file=out)

    report = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "qattn_version": qattn.version(),
        "qattn_build_info": qattn.build_info(),
        "git_commit": _git_commit(),
        "tiny": args.tiny,
        "settings": {"iters": settings.iters, "warmup": settings.warmup, "layers_cycled": layers_cycled,
                     "sdpa_gqa": settings.gqa, "l2_bytes": settings.l2_bytes},
        "shapes": {k: dataclasses.asdict(v) for k, v in shapes.items()},
        "floors": dataclasses.asdict(floors),
        "memory_per_layer": memory,
        "cases": results,
        "sweep": sweep_results,
        "accuracy": acc,
        "targets": [{"met": met, "text": line} for met, line in lines],
        "notes": notes,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print("\nresults written to %s" % args.json, file=out)
    if sweep_results:
        write_plot(args.plot, sweep_results, device_name, args.tiny, out)
    print("total %.1f s" % (time.perf_counter() - started), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
