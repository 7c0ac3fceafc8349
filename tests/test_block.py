"""KV caches, attention backends and the whole block (`Layer.forward`).

References. Attention is checked against a float64 computation from the same fp16
q/k/v (written here from the contract: query t of a sequence with p cached tokens
sees keys 0..p+t; query head h reads KV head h // (NH / NKV)). The whole block is
checked against tests/reference.py's float64 layer with that float64 attention
between its phases, and against Hugging Face's decoder layers (Llama, Qwen3).

Tolerances. ATTN_TOL: fp16 attention outputs carry their
rounding (~3e-4 relative RMS measured) and SDPA accumulates in fp32; 2e-3 leaves
room for that and fails on any wrong key or mask (one wrong key among ~20 moves
the output by ~1e-1; see test_reference_catches_an_off_by_one). bfloat16 rounds
8x coarser (1e-2); float32 only accumulates (1e-5). The block's output
x = x_in + y: DELTA_TOL bounds the error of y (fp16 q/k/v, attention output and
the projections each round once: ~1e-3 measured), OUTPUT_TOL the whole x. Two
runs of qattn on the same inputs through different paths (decode vs prefill,
paged vs contiguous, batched vs alone) differ only where kernels chosen by row
count or mask round differently: up to 1 fp16 ulp (4.9e-4 relative) at each of
q/k/v, the attention output and y, so SAME_TOL is 2e-3 (the CPU backend measures
<= 1.4e-4; a position or mask bug costs > 1e-2).
"""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fake_flash_attn
import hf_model
import qattn
import reference as R
from layer_case import Spec, build, tables
from qattn import attention
from qattn.cache import ContiguousKVCache, PagedKVCache

ATTN_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
DELTA_TOL = 5e-3
OUTPUT_TOL = 2.5e-3
SAME_TOL = 2e-3

NH, NKV, D = 4, 2, 16


@pytest.fixture
def fake_flash(monkeypatch):
    """Installs tests/fake_flash_attn.py as the flash_attn package."""
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn)
    fake_flash_attn.calls.clear()
    return fake_flash_attn


@pytest.fixture
def no_flash(monkeypatch):
    """Makes flash_attn unimportable, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setattr(attention, "_flash_import_failed", True)


def make_cache(kind, device, *, rows=3, capacity=64, block_size=16, num_blocks=None, dtype=torch.float16,
               num_kv_heads=NKV, head_dim=D):
    if kind == "contiguous":
        return ContiguousKVCache(rows, capacity, num_kv_heads, head_dim, dtype=dtype, device=device)
    per_seq = -(-capacity // block_size)
    return PagedKVCache(num_blocks or rows * per_seq, block_size, num_kv_heads, head_dim, rows, per_seq,
                        device=device, dtype=dtype)


def stored(cache, seq_id):
    """(k, v) [length, NKV, D] of one sequence, read through the host bookkeeping."""
    n = cache.lengths()[seq_id]
    if isinstance(cache, PagedKVCache):
        pages = cache.pages(seq_id)
        k = cache.k[pages].reshape(-1, cache.num_kv_heads, cache.head_dim)
        v = cache.v[pages].reshape(-1, cache.num_kv_heads, cache.head_dim)
        return k[:n], v[:n]
    return cache.k[seq_id, :n], cache.v[seq_id, :n]


def snapshot(cache):
    state = {"k": cache.k.clone(), "v": cache.v.clone(), "seq_lens": cache.seq_lens.clone(),
             "lengths": cache.lengths()}
    if isinstance(cache, PagedKVCache):
        state.update(block_table=cache.block_table.clone(), free=cache.num_free_pages(),
                     pages=[cache.pages(s) for s in range(cache.max_seqs)])
    return state


def assert_unchanged(cache, before):
    after = snapshot(cache)
    for name, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[name], value), "cache %s changed" % name
        else:
            assert after[name] == value, "cache %s changed: %s -> %s" % (name, value, after[name])
    cache.check_consistency()


def expect_error(status, match, fn, *args, **kwargs):
    with pytest.raises(qattn.QattnError, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.status == status
    return info.value


def ref_attention(q, keys, values, past, scale=None):
    """float64 causal attention of q [T, NH, D] (positions past..past+T-1) over
    keys/values [past + T, NKV, D]."""
    q, keys, values = (t.detach().cpu().double() for t in (q, keys, values))
    q_len, heads, dim = q.shape
    group = heads // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, keys) * (scale if scale is not None else dim ** -0.5)
    allowed = torch.arange(keys.shape[0])[None, :] <= past + torch.arange(q_len)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), values)


# ---------------------------------------------------------------------------
# Attention over a cache (qattn.attention.attend), q/k/v given directly.

# (seq_ids, q_len): fresh batched prefill (rows 0..B-1), a uniform decode step (no
# mask), a fresh prefill of one sequence at a non-zero row, mixed-length chunks and
# decode steps with sequences out of row order, and chunks that cross pages.
SCHEDULE = [([0, 1], 4), ([0, 1], 1), ([2], 9), ([2, 0], 3), ([0, 1, 2], 1), ([2, 1, 0], 1), ([1], 12),
            ([1, 2], 2), ([0], 1)]


class Sequences:
    """Drives attention.attend on a cache with random q/k/v, remembering what each
    sequence was given, to check outputs against ref_attention and the cache contents."""

    def __init__(self, cache):
        self.cache = cache
        self.history = {s: ([], []) for s in range(cache.num_rows)}

    def run(self, gen, schedule=SCHEDULE, backend="torch", check=True, scale=None):
        cache = self.cache
        outputs = []
        for seq_ids, q_len in schedule:
            batch = len(seq_ids)
            q = torch.randn(batch, q_len, NH, cache.head_dim, generator=gen).to(cache.dtype)
            k = torch.randn(batch, q_len, cache.num_kv_heads, cache.head_dim, generator=gen).to(cache.dtype)
            v = torch.randn(batch, q_len, cache.num_kv_heads, cache.head_dim, generator=gen).to(cache.dtype)
            past = [cache.lengths()[s] for s in seq_ids]
            out = attention.attend(q.to(cache.device), k.to(cache.device), v.to(cache.device), cache, seq_ids,
                                   backend=backend, softmax_scale=scale)
            assert out.shape == q.shape and out.dtype == cache.dtype
            outputs.append(out.cpu())
            for i, s in enumerate(seq_ids):
                self.history[s][0].append(k[i])
                self.history[s][1].append(v[i])
            if check:
                expected = torch.stack([
                    ref_attention(q[i], torch.cat(self.history[s][0]), torch.cat(self.history[s][1]), past[i], scale)
                    for i, s in enumerate(seq_ids)])
                err = R.rel_err(out, expected)
                assert err < ATTN_TOL[cache.dtype], "step %s: attention differs from float64 by %.2e" % ((seq_ids, q_len), err)
            assert cache.last_backend == backend
        self.check_contents()
        return outputs

    def check_contents(self):
        cache = self.cache
        for s, (ks, vs) in self.history.items():
            k, v = stored(cache, s)
            n = sum(t.shape[0] for t in ks)
            assert cache.lengths()[s] == n
            if n:
                assert torch.equal(k.cpu(), torch.cat(ks)) and torch.equal(v.cpu(), torch.cat(vs))
        assert cache.seq_lens.cpu().tolist() == cache.lengths()
        cache.check_consistency()

    def free(self, seq_id):
        self.cache.free(seq_id)
        self.history[seq_id] = ([], [])
        self.check_contents()


def run_schedule(cache, gen, schedule=SCHEDULE, backend="torch", check=True, scale=None):
    """Runs `schedule` [(seq_ids, q_len)] on a fresh cache; returns the outputs."""
    return Sequences(cache).run(gen, schedule, backend, check, scale)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_attention_matches_float64(device, gen, kind):
    run_schedule(make_cache(kind, device), gen)


def test_attention_scale_and_mha(device, gen):
    """An explicit softmax scale is used, and NKV == NH (no grouping) works."""
    cache = make_cache("paged", device, num_kv_heads=NH)
    run_schedule(cache, gen, scale=0.37)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_attention_other_dtypes(device, gen, kind, dtype):
    """The torch backend serves bfloat16 and float32 caches too (attend used alone)."""
    run_schedule(make_cache(kind, device, dtype=dtype), gen, SCHEDULE[:5])


def test_reference_catches_an_off_by_one(gen):
    """ref_attention must tell a causal window off by one key apart by far more than
    ATTN_TOL, or the comparisons above could not catch such a mask bug."""
    q = torch.randn(3, NH, D, generator=gen).half()
    keys = torch.randn(20, NKV, D, generator=gen).half()
    values = torch.randn(20, NKV, D, generator=gen).half()
    right = ref_attention(q, keys, values, 17)
    shifted = ref_attention(q, keys[:19], values[:19], 16)
    assert R.rel_err(shifted, right) > 10 * ATTN_TOL[torch.float16]


def test_paged_equals_contiguous(device):
    paged = run_schedule(make_cache("paged", device), torch.Generator().manual_seed(5), check=False)
    contiguous = run_schedule(make_cache("contiguous", device), torch.Generator().manual_seed(5), check=False)
    for a, b in zip(paged, contiguous):
        assert R.rel_err(a, b) < SAME_TOL


def test_pages_are_taken_on_demand_and_freed(device, gen):
    cache = make_cache("paged", device, rows=3, capacity=48, num_blocks=5)
    seqs = Sequences(cache)
    seqs.run(gen, [([0], 16), ([1], 17)])
    assert cache.pages(0) == [0] and cache.pages(1) == [1, 2] and cache.num_free_pages() == 2
    seqs.run(gen, [([0], 1)])
    assert cache.pages(0) == [0, 3] and cache.num_free_pages() == 1
    seqs.free(1)
    assert cache.pages(1) == [] and cache.lengths()[1] == 0 and cache.num_free_pages() == 3
    # A new sequence takes the freed pages and sees none of the old keys.
    seqs.run(gen, [([2], 40), ([2], 1)])
    assert sorted(cache.pages(2)) == [1, 2, 4]


def test_contiguous_reset(device, gen):
    cache = make_cache("contiguous", device)
    seqs = Sequences(cache)
    seqs.run(gen, [([0, 1], 5)])
    seqs.free(0)
    assert cache.lengths() == [0, 5, 0]
    seqs.run(gen, [([0], 3), ([1, 0], 1)])
    cache.reset()
    assert cache.lengths() == [0, 0, 0] and cache.seq_lens.cpu().tolist() == [0, 0, 0]


def test_assign_pages(device, gen):
    cache = make_cache("paged", device, rows=2, capacity=32, num_blocks=4)
    cache.assign_pages(1, [3, 0])
    assert cache.pages(1) == [3, 0] and cache.num_free_pages() == 2
    Sequences(cache).run(gen, [([1], 20), ([0], 5)])
    assert cache.pages(1) == [3, 0] and cache.pages(0) == [1]
    before = snapshot(cache)
    expect_error("QATTN_ERROR_OUT_OF_RANGE", "points past the cache of 4 pages", cache.assign_pages, 0, [4])
    expect_error("QATTN_ERROR_OUT_OF_RANGE", "points past the cache", cache.assign_pages, 0, [-1])
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", r"pages \[3\] are already in use", cache.assign_pages, 0, [3])
    expect_error("QATTN_ERROR_OUT_OF_RANGE", "exceed max_blocks_per_seq 2", cache.assign_pages, 1, [2])
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", "pages must hold ints, got 2.0", cache.assign_pages, 0, [2.0])
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", "pages must hold ints, got True", cache.assign_pages, 0, [True])
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", "pages must be an iterable of ints", cache.assign_pages, 0, 2)
    assert_unchanged(cache, before)


# ---------------------------------------------------------------------------
# Backends: selection and the flash-attn adapter (through the stand-in module).

def test_backend_selection(device, fake_flash):
    assert attention.available_backends() == ["flash_attn", "torch"]
    assert attention.default_backend() == "flash_attn"
    paged = make_cache("paged", device, block_size=256, capacity=256)
    contiguous = make_cache("contiguous", device)
    small_pages = make_cache("paged", device, block_size=16)
    fp32 = make_cache("contiguous", device, dtype=torch.float32)
    on_cuda = device.type == "cuda"
    # Automatic: flash-attn only where it can run (CUDA, and a cache it supports).
    assert attention.resolve_backend(None, paged) == ("flash_attn" if on_cuda else "torch")
    assert attention.resolve_backend(None, contiguous) == ("flash_attn" if on_cuda else "torch")
    assert attention.resolve_backend(None, small_pages) == "torch"
    assert attention.resolve_backend(None, fp32) == "torch"
    assert attention.resolve_backend("torch", small_pages) == "torch"
    expect_error("QATTN_ERROR_NOT_SUPPORTED", "multiple of 256, this cache has 16", attention.resolve_backend,
                 "flash_attn", small_pages)
    expect_error("QATTN_ERROR_NOT_SUPPORTED", "float16 or bfloat16", attention.resolve_backend, "flash_attn", fp32)
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", "unknown attention backend 'sdpa'", attention.resolve_backend,
                 "sdpa", paged)


def test_backend_selection_without_flash(device, no_flash):
    assert attention.available_backends() == ["torch"]
    assert attention.default_backend() == "torch"
    cache = make_cache("contiguous", device)
    assert attention.resolve_backend(None, cache) == "torch"
    expect_error("QATTN_ERROR_NOT_SUPPORTED", "flash_attn package is not importable", attention.resolve_backend,
                 "flash_attn", cache)


# Lengths chosen so that a 256-token page boundary is crossed by a chunk.
FLASH_SCHEDULE = [([0, 1], 5), ([2], 250), ([2, 0], 9), ([1, 2, 0], 1), ([0, 1], 1)]


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_flash_adapter_matches_torch(device, kind, fake_flash):
    def cache():
        return make_cache(kind, device, block_size=256, capacity=512)

    flash = run_schedule(c_flash := cache(), torch.Generator().manual_seed(9), FLASH_SCHEDULE, backend="flash_attn")
    plain = run_schedule(c_torch := cache(), torch.Generator().manual_seed(9), FLASH_SCHEDULE, backend="torch")
    for a, b in zip(flash, plain):
        assert R.rel_err(a, b) < SAME_TOL
    assert torch.equal(c_flash.k, c_torch.k) and torch.equal(c_flash.v, c_torch.v)
    # Every step went through flash_attn_with_kvcache with the cache's own layout:
    # block_table for the paged cache, cache_batch_idx where rows are not 0..B-1.
    calls = fake_flash.calls
    assert len(calls) == len(FLASH_SCHEDULE)
    for call, (seq_ids, q_len) in zip(calls, FLASH_SCHEDULE):
        assert call["causal"] and call["appended"] == q_len and call["batch"] == len(seq_ids)
        assert call["paged"] == (kind == "paged")
        assert call["cache_batch_idx"] == (kind == "contiguous" and seq_ids != list(range(len(seq_ids))))


def test_flash_failure_gives_pages_back(device, fake_flash, monkeypatch):
    cache = make_cache("paged", device, block_size=256, capacity=512)
    run_schedule(cache, torch.Generator().manual_seed(2), [([0], 250)], backend="flash_attn")
    before = snapshot(cache)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(fake_flash, "flash_attn_with_kvcache", broken)
    q = torch.randn(1, 10, NH, D, dtype=torch.float16, device=device)
    k = torch.randn(1, 10, NKV, D, dtype=torch.float16, device=device)
    expect_error("QATTN_ERROR_NOT_SUPPORTED", "rejected the step: kernel launch failed", attention.attend, q, k,
                 k.clone(), cache, [0], backend="flash_attn")
    assert_unchanged(cache, before)


# ---------------------------------------------------------------------------
# Bad input: a clear error, and the cache as it was.

def _qkv(device, batch, q_len, dtype=torch.float16, heads=NH, kv_heads=NKV, dim=D):
    q = torch.randn(batch, q_len, heads, dim, device=device).to(dtype)
    k = torch.randn(batch, q_len, kv_heads, dim, device=device).to(dtype)
    return q, k, k.clone()


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_bad_attention_input_leaves_cache_unchanged(device, gen, kind):
    cache = make_cache(kind, device, rows=3, capacity=32)
    run_schedule(cache, gen, [([0, 1], 7), ([2], 30)])
    before = snapshot(cache)
    other = torch.device("meta") if device.type == "cpu" else torch.device("cpu")
    cases = [
        ("QATTN_ERROR_OUT_OF_RANGE", "sequence id 3 is out of range for this %s cache of 3" % kind,
         _qkv(device, 1, 1), [3]),
        ("QATTN_ERROR_OUT_OF_RANGE", "sequence id -1 is out of range", _qkv(device, 1, 1), [-1]),
        ("QATTN_ERROR_INVALID_ARGUMENT", r"seq_ids \[1, 1\] name a sequence more than once", _qkv(device, 2, 1),
         [1, 1]),
        ("QATTN_ERROR_INVALID_ARGUMENT", "2 seq_ids given for a batch of 1", _qkv(device, 1, 1), [0, 1]),
        ("QATTN_ERROR_INVALID_ARGUMENT", "seq_ids must hold ints", _qkv(device, 1, 1), [0.0]),
        ("QATTN_ERROR_OUT_OF_RANGE", "a batch of 4 sequences does not fit", _qkv(device, 4, 1), None),
        # Sequence 2 holds 30 of 32 tokens.
        ("QATTN_ERROR_OUT_OF_RANGE", "sequence 2 holds 30 tokens; 3 more", _qkv(device, 2, 3), [0, 2]),
        ("QATTN_ERROR_INVALID_ARGUMENT", "q is torch.float32 but the KV cache holds torch.float16",
         _qkv(device, 1, 1, torch.float32), [0]),
        ("QATTN_ERROR_INVALID_ARGUMENT", "q is on %s but the KV cache is on %s" % (other, cache.device),
         _qkv(other, 1, 1), [0]),
        ("QATTN_ERROR_INVALID_ARGUMENT", r"k has shape \(1, 1, 4, 16\), the cache needs \(1, 1, 2, 16\)",
         _qkv(device, 1, 1, kv_heads=NH), [0]),
        ("QATTN_ERROR_INVALID_ARGUMENT", "q has 3 heads, not a multiple", _qkv(device, 1, 1, heads=3), [0]),
    ]
    for status, match, (q, k, v), seq_ids in cases:
        expect_error(status, match, attention.attend, q, k, v, cache, seq_ids)
        assert_unchanged(cache, before)
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", "unknown attention backend", attention.attend,
                 *_qkv(device, 1, 1), cache, [0], backend="cuda")
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", "cache must be a qattn.ContiguousKVCache or PagedKVCache, got dict",
                 attention.attend, *_qkv(device, 1, 1), snapshot(cache), [0])
    assert_unchanged(cache, before)


def test_out_of_pages_leaves_cache_unchanged(device, gen):
    # 3 pages of 16: sequences 0 and 1 hold one page each, one page is free.
    cache = make_cache("paged", device, rows=2, capacity=64, num_blocks=3)
    seqs = Sequences(cache)
    seqs.run(gen, [([0, 1], 16)])
    before = snapshot(cache)
    # Sequence 0 alone could take the free page; together they need 2 (all or nothing).
    expect_error("QATTN_ERROR_OUT_OF_MEMORY", r"out of KV cache pages: sequences \[0, 1\] need 2 new pages, 1 of 3",
                 attention.attend, *_qkv(device, 2, 1), cache, [0, 1])
    assert_unchanged(cache, before)
    expect_error("QATTN_ERROR_OUT_OF_RANGE", "past max_blocks_per_seq 4", attention.attend,
                 *_qkv(device, 1, 49), cache, [0])
    assert_unchanged(cache, before)
    seqs.run(gen, [([1], 16)])
    assert cache.num_free_pages() == 0


def test_cache_construction_errors():
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", "block_size must be a multiple of 16, got 24", PagedKVCache, 4, 24,
                 NKV, D, 2, 2)
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", "max_seq must be a positive int", ContiguousKVCache, 2, 0, NKV, D)
    expect_error("QATTN_ERROR_INVALID_ARGUMENT", "dtype must be float16, bfloat16 or float32", ContiguousKVCache,
                 2, 8, NKV, D, dtype=torch.int8)
    cache = PagedKVCache(4, 16, NKV, D, 2, 2)
    expect_error("QATTN_ERROR_OUT_OF_RANGE", "sequence id 2 is out of range", cache.free, 2)


# ---------------------------------------------------------------------------
# The whole block: Layer.forward.

SPEC = Spec(hidden=64, heads=NH, kv_heads=NKV, head_dim=D, head_norm="rms", max_rows=64, max_seq_len=64)


def block_reference(ref, sin, cos, steps):
    """float64 outputs of the whole block for `steps` [(x [B, T, H], seq_ids)], each
    sequence's keys and values kept in float64 from its first step."""
    history = {}
    outputs = []
    for x, seq_ids in steps:
        past = [sum(t.shape[0] for t in history.get(s, ([],))[0]) for s in seq_ids]
        q, k, v = R.forward1(ref, x.cpu(), sin=sin.cpu(), cos=cos.cpu(), past_lens=torch.tensor(past))
        attn = []
        for i, s in enumerate(seq_ids):
            ks, vs = history.setdefault(s, ([], []))
            ks.append(k[i])
            vs.append(v[i])
            attn.append(ref_attention(q[i], torch.cat(ks), torch.cat(vs), past[i]))
        outputs.append(R.forward2(ref, x.cpu(), torch.stack(attn)))
    return outputs


def run_block(layer, cache, sin, cos, steps, backend="torch"):
    outs = []
    for x, seq_ids in steps:
        y = x.clone()
        assert layer.forward(y, cache, seq_ids, sin=sin, cos=cos, backend=backend) is y
        assert cache.last_backend == backend
        outs.append(y.cpu())
    return outs


def random_steps(schedule, gen, device, hidden=SPEC.hidden):
    return [((1.5 * torch.randn(len(ids), q_len, hidden, generator=gen) + 0.3).half().to(device), ids)
            for ids, q_len in schedule]


def assert_block_close(outs, expected, steps):
    for got, want, (x, _) in zip(outs, expected, steps):
        x = x.cpu().double()
        delta, output = R.rel_err(got.double() - x, want - x), R.rel_err(got, want)
        assert delta < DELTA_TOL and output < OUTPUT_TOL, (delta, output)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_block_matches_float64(device, gen, kind):
    layer, ref = build(SPEC, device, gen)
    with layer:
        sin, cos = tables(SPEC, device)
        steps = random_steps(SCHEDULE, gen, device)
        outs = run_block(layer, make_cache(kind, device), sin, cos, steps)
        assert_block_close(outs, block_reference(ref, sin, cos, steps), steps)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decode_steps_equal_prefill(device, gen, kind):
    n = 20
    layer, _ = build(SPEC, device, gen)
    with layer:
        sin, cos = tables(SPEC, device)
        x = (1.5 * torch.randn(1, n, SPEC.hidden, generator=gen) + 0.3).half().to(device)
        prefill_cache, decode_cache = make_cache(kind, device), make_cache(kind, device)
        (prefill,) = run_block(layer, prefill_cache, sin, cos, [(x, [1])])
        decoded = run_block(layer, decode_cache, sin, cos, [(x[:, t:t + 1], [1]) for t in range(n)])
        assert R.rel_err(torch.cat(decoded, dim=1), prefill) < SAME_TOL
        for a, b in zip(stored(prefill_cache, 1), stored(decode_cache, 1)):
            assert a.shape[0] == n and R.rel_err(a, b) < SAME_TOL
        assert prefill_cache.lengths() == decode_cache.lengths() == [0, n, 0]


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_mixed_batch_equals_each_alone(device, gen, kind):
    layer, _ = build(SPEC, device, gen)
    with layer:
        sin, cos = tables(SPEC, device)
        histories = [5, 17, 33]
        prefixes = random_steps([([s], n) for s, n in enumerate(histories)], gen, device)
        step = random_steps([([2, 0, 1], 3)], gen, device)[0][0]
        batched_cache = make_cache(kind, device)
        run_block(layer, batched_cache, sin, cos, prefixes)
        (batched,) = run_block(layer, batched_cache, sin, cos, [(step, [2, 0, 1])])
        for i, s in enumerate([2, 0, 1]):
            alone_cache = make_cache(kind, device)
            run_block(layer, alone_cache, sin, cos, [prefixes[s]])
            (alone,) = run_block(layer, alone_cache, sin, cos, [(step[i:i + 1], [s])])
            assert R.rel_err(batched[i], alone[0]) < SAME_TOL
            for a, b in zip(stored(batched_cache, s), stored(alone_cache, s)):
                assert R.rel_err(a, b) < SAME_TOL


def test_block_paged_equals_contiguous(device, gen):
    layer, _ = build(SPEC, device, gen)
    with layer:
        sin, cos = tables(SPEC, device)
        steps = random_steps(SCHEDULE, gen, device)
        paged = run_block(layer, make_cache("paged", device), sin, cos, steps)
        contiguous = run_block(layer, make_cache("contiguous", device), sin, cos, steps)
        for a, b in zip(paged, contiguous):
            assert R.rel_err(a, b) < SAME_TOL


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_block_flash_adapter_matches_torch(device, gen, kind, fake_flash):
    spec = Spec(hidden=64, heads=NH, kv_heads=NKV, head_dim=D, max_rows=512, max_seq_len=512)
    layer, ref = build(spec, device, gen)
    with layer:
        sin, cos = tables(spec, device)
        steps = random_steps(FLASH_SCHEDULE, gen, device)

        def cache():
            return make_cache(kind, device, block_size=256, capacity=512)

        flash = run_block(layer, cache(), sin, cos, steps, backend="flash_attn")
        plain = run_block(layer, cache(), sin, cos, steps, backend="torch")
        assert len(fake_flash.calls) == len(steps)
        for a, b in zip(flash, plain):
            assert R.rel_err(a, b) < SAME_TOL
        assert_block_close(flash, block_reference(ref, sin, cos, steps), steps)


def test_block_default_backend(device, gen, no_flash):
    layer, _ = build(SPEC, device, gen)
    with layer:
        sin, cos = tables(SPEC, device)
        cache = make_cache("paged", device)
        x = random_steps([([0], 3)], gen, device)[0][0]
        layer.forward(x, cache, sin=sin, cos=cos)
        assert cache.last_backend == "torch" and cache.lengths() == [3, 0, 0]


def test_bad_block_input_leaves_cache_and_x_unchanged(device, gen):
    layer, _ = build(SPEC, device, gen)
    with layer:
        sin, cos = tables(SPEC, device)
        paged = make_cache("paged", device, rows=2, capacity=64, num_blocks=3)
        run_block(layer, paged, sin, cos, random_steps([([0, 1], 16)], gen, device))
        big = make_cache("contiguous", device, rows=1, capacity=80)
        run_block(layer, big, sin, cos, random_steps([([0], 62)], gen, device))
        other = torch.device("meta") if device.type == "cpu" else torch.device("cpu")

        def x_of(batch, q_len, dtype=torch.float16):
            return (torch.randn(batch, q_len, SPEC.hidden, generator=gen) + 0.3).to(dtype).to(device)

        cases = [
            (paged, x_of(2, 1), [0, 1], {}, "QATTN_ERROR_OUT_OF_MEMORY", "out of KV cache pages"),
            (paged, x_of(1, 1), [2], {}, "QATTN_ERROR_OUT_OF_RANGE", "sequence id 2 is out of range"),
            (paged, x_of(1, 1, torch.float32), [0], {}, "QATTN_ERROR_INVALID_ARGUMENT", "x must have dtype"),
            (paged, x_of(1, 65), [0], {}, "QATTN_ERROR_OUT_OF_RANGE", "past max_blocks_per_seq"),
            (paged, x_of(1, 1), [0], {"sin": sin[:16], "cos": cos[:16]}, "QATTN_ERROR_OUT_OF_RANGE",
             "position 16, past the 16 positions of the RoPE tables"),
            (paged, x_of(1, 1), [0], {"backend": "flash_attn"}, "QATTN_ERROR_NOT_SUPPORTED", "flash"),
            (big, x_of(1, 3), [0], {}, "QATTN_ERROR_OUT_OF_RANGE", "position 64, past the layer's max_seq_len 64"),
            (make_cache("paged", device, dtype=torch.float32), x_of(1, 1), [0], {}, "QATTN_ERROR_INVALID_ARGUMENT",
             "the KV cache holds torch.float32; the layer's keys and values are float16"),
            (make_cache("paged", device, num_kv_heads=NH), x_of(1, 1), [0], {}, "QATTN_ERROR_INVALID_ARGUMENT",
             "the KV cache has 4 KV heads of dim 16, the layer 2 of dim 16"),
            (make_cache("paged", other), x_of(1, 1), [0], {}, "QATTN_ERROR_INVALID_ARGUMENT",
             "the KV cache is on %s, the layer on %s" % (other, layer.device)),
        ]
        for cache, x, seq_ids, kwargs, status, match in cases:
            before, x_before = snapshot(cache), x.clone()
            args = dict(sin=sin, cos=cos)
            args.update(kwargs)
            expect_error(status, match, layer.forward, x, cache, seq_ids, **args)
            assert torch.equal(x, x_before), "x changed by a failed forward"
            if cache.device.type != "meta":
                assert_unchanged(cache, before)
        expect_error("QATTN_ERROR_INVALID_ARGUMENT", "cache must be a qattn.ContiguousKVCache or PagedKVCache, got "
                     "NoneType", layer.forward, x_of(1, 1), None, sin=sin, cos=cos)
        expect_error("QATTN_ERROR_INVALID_ARGUMENT", "x must be a 3-D tensor", layer.forward,
                     x_of(1, 1)[0], paged, sin=sin, cos=cos)


def test_seq_ids_seen_before_are_still_checked(device, gen):
    """Decode reuses the device index tensors of ids seen before; ids that only
    hash like them (bool, float) must still be refused, the cache unchanged."""
    layer, _ = build(SPEC, device, gen)
    with layer:
        sin, cos = tables(SPEC, device)
        for kind in ("contiguous", "paged"):
            cache = make_cache(kind, device)
            run_block(layer, cache, sin, cos, random_steps([([1, 0], 2), ([1, 0], 1)], gen, device))
            x = (torch.randn(2, 1, SPEC.hidden, generator=gen) + 0.3).half().to(device)
            for bad in ([True, 0], [1.0, 0], (1, False)):
                before = snapshot(cache)
                expect_error("QATTN_ERROR_INVALID_ARGUMENT", "seq_ids must hold ints", layer.forward, x, cache, bad,
                             sin=sin, cos=cos, backend="torch")
                assert_unchanged(cache, before)
            expect_error("QATTN_ERROR_INVALID_ARGUMENT", "2 seq_ids given for a batch of 1 sequences",
                         layer.forward, x[:1], cache, [1, 0], sin=sin, cos=cos, backend="torch")


class _OpLog(TorchDispatchMode):
    """Records every aten op, and as "host_to_device" each copy or conversion whose
    source is host memory and whose result is not (SDPA's CUDA kernels convert
    dtypes on the device internally: those are not transfers)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        result = func(*args, **(kwargs or {}))
        if name in ("aten._to_copy", "aten.copy_"):
            source = args[1] if name == "aten.copy_" else args[0]
            if source.device.type == "cpu" and result.device.type != "cpu":
                name = "host_to_device"
        self.ops.append(name)
        return result


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decode_step_makes_no_transfer_or_sync(device, gen, kind):
    """A decode step whose ids were seen before and that takes no new page runs on
    the device only: no tensor built from host data (a host-to-device copy on
    CUDA), no dtype conversion, no scalar read back (a synchronisation)."""
    layer, ref = build(SPEC, device, gen)
    with layer:
        sin, cos = tables(SPEC, device)
        cache = make_cache(kind, device)
        # Unequal lengths (3 and 7, not at a page boundary) so the step needs a mask.
        steps = random_steps([([2, 0], 3), ([0], 4), ([2, 0], 1), ([2, 0], 1)], gen, device)
        with _OpLog() as log:
            outs = run_block(layer, cache, sin, cos, steps[:3])
        assert "aten.lift_fresh" in log.ops  # the log sees where the ids first go to the device
        with _OpLog() as log:
            outs += run_block(layer, cache, sin, cos, steps[3:])
        forbidden = {"aten.lift_fresh", "aten.lift_fresh_copy", "host_to_device", "aten._local_scalar_dense"}
        if device.type == "cpu":  # no dtype conversion either; on CUDA, SDPA may convert its mask on the device
            forbidden.add("aten._to_copy")
        assert not forbidden & set(log.ops), log.ops
        assert cache.lengths() == [9, 0, 5]
        assert_block_close(outs, block_reference(ref, sin, cos, steps), steps)
        cache.check_consistency()


# ---------------------------------------------------------------------------
# Parity with Hugging Face: the attention half of a decoder layer, run as
# prefill + decode steps through Layer.forward with a paged cache.

HF_CASES = {
    "llama": ("LlamaConfig", dict(attention_bias=True)),
    "qwen3": ("Qwen3Config", dict()),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_block_matches_hf(device, case):
    transformers = pytest.importorskip("transformers")
    hf = pytest.importorskip("qattn.hf")
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    name, extra = HF_CASES[case]
    # Two layers: hidden_states[1] is then layer 0's output (the last one is normed).
    config = getattr(transformers, name)(hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=32,
                                         max_position_embeddings=64, **extra)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    hf_model.randomize(model, gen)
    prefill, decode = 11, 6
    total = prefill + decode
    x = torch.randn(2, total, 128, generator=gen).half()
    expected = hf_model.attention_half(model, x)

    layer, info = hf.from_hf_attention(model.layers[0], config, device=device, max_rows=64, max_seq_len=32)
    with layer:
        sin, cos = hf.rope_tables_from_hf(model, 32, device)
        cache = PagedKVCache(8, 16, info.num_kv_heads, info.head_dim, 3, 2, device=device)
        # Sequence 1 of the batch lives in row 2 of the block table; the second
        # sequence starts 4 tokens later, so the decode steps mix lengths.
        steps = [(x[:1, :prefill], [0]), (x[1:, :prefill - 4], [2])]
        steps += [(torch.stack([x[0, prefill + t], x[1, prefill - 4 + t]])[:, None], [0, 2]) for t in range(decode)]
        got = torch.full(expected.shape, float("nan"), dtype=torch.float64)
        for chunk, seq_ids in steps:
            past = [cache.lengths()[s] for s in seq_ids]
            y = chunk.to(device).clone()
            layer.forward(y, cache, seq_ids, sin=sin, cos=cos, softmax_scale=info.softmax_scale)
            for i, s in enumerate(seq_ids):
                got[{0: 0, 2: 1}[s], past[i]:past[i] + y.shape[1]] = y[i].double().cpu()
        lengths = [prefill + decode, prefill - 4 + decode]
        assert cache.lengths() == [lengths[0], 0, lengths[1]]
        for b, n in enumerate(lengths):
            x_b, want, have = x[b, :n].double(), expected[b, :n], got[b, :n]
            delta, output = R.rel_err(have - x_b, want - x_b), R.rel_err(have, want)
            assert delta < DELTA_TOL and output < OUTPUT_TOL, (case, b, delta, output)
