"""KV caches in flash-attn's layouts, with host mirrors of the bookkeeping.

The device tensors (`k`, `v`, `seq_lens`, and `block_table` for the paged cache)
are what attention kernels read. Lengths and page tables are also mirrored on the
host, so that capacity checks, page allocation and the torch backend's masks never
need to read device memory (no synchronisation on the decode path). The host
mirrors are the truth: change a cache only through its methods.

A forward step uses a cache in three moves, so that bad input leaves it untouched:
`plan()` checks everything and changes nothing, `reserve()` takes the pages the
step needs (undone by `release()` if the step fails), `advance()` moves the lengths
once the new keys and values are written.
"""
import operator

import torch

from .errors import QattnError, invalid

_ROWS_MEMO_SIZE = 16


def _out_of_range(message):
    return QattnError("QATTN_ERROR_OUT_OF_RANGE", message)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise invalid("%s must be a positive int, got %r" % (name, value))
    return value


def _int_list(values, name):
    """`values` (any iterable) as a list of ints; bools, floats and other types are
    refused rather than converted, so a wrong id never lands on another row or page."""
    try:
        values = list(values)
    except TypeError:
        raise invalid("%s must be an iterable of ints, got %r" % (name, values)) from None
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool):
                raise TypeError
            values[i] = operator.index(v)
        except TypeError:
            raise invalid("%s must hold ints, got %r" % (name, v)) from None
    return values


def _to_device(values, dtype, device):
    """A host list as a tensor on `device`, queued without waiting for the device:
    a blocking copy from host memory synchronises with the stream. On CUDA the
    data goes through pinned memory, which PyTorch's host allocator keeps until
    the copy has run."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class _Rows:
    """One choice of cache rows (a step's seq_ids) with its device index tensors.
    Decode passes the same ids every step, so a cache keeps the last few of these
    and the hot path builds nothing and makes no host-to-device transfer.

    `index` (int64) and `index32` hold the ids; `identity` says they are 0..batch-1
    in order, so the rows are a slice of the cache's own tensors (`lens_view`,
    `table_view`, `pages_view`: views of seq_lens, block_table and its int64 copy;
    no gather); `base` [batch, 1] (int64; `base32` int32) is each row's offset into
    the flattened k/v (contiguous: row * max_seq) or block table (paged: row *
    max_blocks_per_seq);
    `ones` (int32) advances the lengths of non-identity rows by one token with a
    single index_add_."""

    __slots__ = ("ids", "index", "index32", "identity", "base", "base32", "ones", "lens_view", "table_view",
                 "pages_view")

    def __init__(self, cache, ids):
        batch = len(ids)
        self.ids = ids
        self.identity = ids == tuple(range(batch))
        self.index = _to_device(ids, torch.int64, cache.device)
        self.index32 = self.index.to(torch.int32)
        self.base = (self.index * cache._row_stride)[:, None]
        self.base32 = self.base.to(torch.int32)
        self.ones = torch.ones(batch, dtype=torch.int32, device=cache.device)
        self.lens_view = cache.seq_lens[:batch] if self.identity else None
        paged = self.identity and isinstance(cache, PagedKVCache)
        self.table_view = cache.block_table[:batch] if paged else None
        self.pages_view = cache.pages64[:batch] if paged else None


def check_cache_type(cache):
    if not isinstance(cache, _KVCacheBase):
        raise invalid("cache must be a qattn.ContiguousKVCache or PagedKVCache, got %s" % type(cache).__name__)


class CacheStep:
    """What one forward step does to a cache: which rows (sequences), their
    lengths before the step, and, for the paged cache, their block-table rows.

    `seq_ids` and `past` are host lists; `index` (int64) and `index32` are the
    sequence ids on the cache's device; `past_lens` is int32 [batch] on the device
    (the lengths before the step); `identity` says the rows are 0..batch-1 in
    order, so kernels may take the cache's own tensors without a gather;
    `max_total` is the longest sequence after the step (keys the attention covers)."""

    def __init__(self, cache, rows, q_len):
        self.cache = cache
        self.rows = rows
        self.q_len = q_len
        self.index = rows.index
        self.index32 = rows.index32
        self.identity = rows.identity
        lens = cache._host_lens
        if rows.identity:
            self.past = lens[: len(rows.ids)]
            self.past_lens = rows.lens_view
        else:
            self.past = [lens[s] for s in rows.ids]
            self.past_lens = cache.seq_lens.index_select(0, rows.index)
        self.max_total = max(self.past) + q_len
        self.version = cache._version
        self.need = {}
        self.new_pages = {}

    @property
    def seq_ids(self):
        return list(self.rows.ids)

    @property
    def batch(self):
        return len(self.rows.ids)

    def block_table(self):
        """int32 [batch, max_blocks_per_seq] on the device (paged cache only)."""
        if self.identity:
            return self.rows.table_view
        return self.cache.block_table.index_select(0, self.index)

    def pages(self):
        """block_table() as int64, the index type torch's indexing takes without a conversion."""
        if self.identity:
            return self.rows.pages_view
        return self.cache.pages64.index_select(0, self.index)


class _KVCacheBase:
    kind = None

    def __init__(self, rows, num_kv_heads, head_dim, dtype, device, max_seq, row_stride):
        _positive_int("num_kv_heads", num_kv_heads)
        _positive_int("head_dim", head_dim)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise invalid("KV cache dtype must be float16, bfloat16 or float32, got %s" % dtype)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        # The allocated tensor's device carries the index ("cuda" becomes "cuda:0"),
        # so comparisons with other tensors' devices are exact.
        self.device = self.seq_lens.device
        self.dtype = dtype
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self._host_lens = [0] * rows
        self._row_stride = row_stride
        self._rows_memo = {}
        # Bumped by every change of the bookkeeping, so reserve() can tell whether
        # what plan() worked out still holds.
        self._version = 0
        # Token offsets 0..max_seq-1 on the device: positions of a prefill step's
        # tokens and the key axis of the torch backend's masks, sliced, never rebuilt.
        self.offsets = torch.arange(max_seq, device=self.device)
        self.offsets32 = self.offsets.to(torch.int32)
        self.last_backend = None
        # The layer whose heads, dtype and device were last found to fit (block.py).
        self.checked_layer = None

    def _flat_views(self):
        # k and v with their first two axes merged, so one index per token (row or
        # page, and position) writes it; views made once instead of every step.
        self.k_slots = self.k.view(-1, self.num_kv_heads, self.head_dim)
        self.v_slots = self.v.view(-1, self.num_kv_heads, self.head_dim)

    @property
    def num_rows(self):
        return len(self._host_lens)

    def lengths(self):
        """Current length of every sequence (row), from the host mirror."""
        return list(self._host_lens)

    def _seq_ids(self, seq_ids, batch):
        if seq_ids is None:
            if batch > self.num_rows:
                raise _out_of_range(
                    "a batch of %d sequences does not fit this %s cache of %d sequences"
                    % (batch, self.kind, self.num_rows)
                )
            return list(range(batch))
        if isinstance(seq_ids, torch.Tensor):
            if seq_ids.dim() != 1 or seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
                raise invalid("seq_ids must be a 1-D integer tensor or a sequence of ints")
            seq_ids = seq_ids.tolist()
        ids = _int_list(seq_ids, "seq_ids")
        if len(ids) != batch:
            raise invalid("%d seq_ids given for a batch of %d sequences" % (len(ids), batch))
        for s in ids:
            if not 0 <= s < self.num_rows:
                raise _out_of_range(
                    "sequence id %d is out of range for this %s cache of %d sequences"
                    % (s, self.kind, self.num_rows)
                )
        if len(set(ids)) != len(ids):
            raise invalid("seq_ids %s name a sequence more than once" % ids)
        return ids

    def _rows(self, seq_ids, batch):
        """The checked _Rows of seq_ids. Ids seen before skip the checks: a key of
        plain ints (bool, float and other types that hash like ints are not) that
        is in the memo passed them, and the number of rows never changes."""
        if seq_ids is None:
            key = tuple(range(batch))
        elif seq_ids.__class__ in (list, tuple):
            key = tuple(seq_ids)
        else:
            key = None
        try:
            rows = self._rows_memo.get(key)
        except TypeError:  # unhashable entries: the checks below word the error
            rows = None
        if rows is not None and len(key) == batch and all(s.__class__ is int for s in key):
            return rows
        key = tuple(self._seq_ids(seq_ids, batch))
        rows = self._rows_memo.get(key)
        if rows is None:
            if len(self._rows_memo) >= _ROWS_MEMO_SIZE:
                self._rows_memo.pop(next(iter(self._rows_memo)))
            rows = _Rows(self, key)
            self._rows_memo[key] = rows
        return rows

    def plan(self, seq_ids, batch, q_len):
        """Checks that `batch` sequences can each take `q_len` more tokens; changes nothing."""
        _positive_int("batch", batch)
        _positive_int("q_len", q_len)
        step = CacheStep(self, self._rows(seq_ids, batch), q_len)
        self._check_capacity(step)
        return step

    def reserve(self, step):
        """Takes what the step needs beyond plan() (pages); undone by release()."""
        self._version += 1

    def release(self, step):
        """Undoes reserve() for a step that failed before advance()."""
        self._version += 1

    def advance(self, step):
        """Makes the step's new tokens part of their sequences."""
        rows, q_len = step.rows, step.q_len
        if rows.identity:
            rows.lens_view.add_(q_len)
        else:
            self.seq_lens.index_add_(0, rows.index, rows.ones if q_len == 1 else rows.ones * q_len)
        lens = self._host_lens
        for s in rows.ids:
            lens[s] += q_len
        self._version += 1

    def reset(self, seq_id=None):
        """Empties one sequence (or all); the stored keys and values become unused."""
        ids = list(range(self.num_rows)) if seq_id is None else self._seq_ids([seq_id], 1)
        self._release_pages(ids)
        for s in ids:
            self._host_lens[s] = 0
        if seq_id is None:
            self.seq_lens.zero_()
        else:
            self.seq_lens[ids[0]] = 0
        self._version += 1

    def free(self, seq_id):
        """Ends a sequence: empties it and returns its pages (paged cache)."""
        self.reset(seq_id)

    def _release_pages(self, seq_ids):
        pass

    def check_consistency(self):
        """Compares the device bookkeeping with the host mirrors (synchronises);
        raises QattnError if something wrote to them behind the cache's back."""
        if self.seq_lens.tolist() != self._host_lens:
            raise QattnError(
                "QATTN_ERROR_INTERNAL",
                "seq_lens on the device %s differ from the host mirror %s"
                % (self.seq_lens.tolist(), self._host_lens),
            )


class ContiguousKVCache(_KVCacheBase):
    """k and v [batch, max_seq, num_kv_heads, head_dim]; row b holds sequence b."""

    kind = "contiguous"

    def __init__(self, batch, max_seq, num_kv_heads, head_dim, dtype=torch.float16, device="cpu"):
        _positive_int("batch", batch)
        _positive_int("max_seq", max_seq)
        super().__init__(batch, num_kv_heads, head_dim, dtype, device, max_seq, max_seq)
        shape = (batch, max_seq, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.max_seq = max_seq
        self._flat_views()

    @property
    def batch(self):
        return self.num_rows

    def _check_capacity(self, step):
        if step.max_total <= self.max_seq:
            return
        for s, p in zip(step.seq_ids, step.past):
            if p + step.q_len > self.max_seq:
                raise _out_of_range(
                    "sequence %d holds %d tokens; %d more exceed the cache's max_seq %d"
                    % (s, p, step.q_len, self.max_seq)
                )

    def __repr__(self):
        return "ContiguousKVCache(batch=%d, max_seq=%d, num_kv_heads=%d, head_dim=%d, dtype=%s, device=%s)" % (
            self.batch, self.max_seq, self.num_kv_heads, self.head_dim, self.dtype, self.device)


class PagedKVCache(_KVCacheBase):
    """k and v [num_blocks, block_size, num_kv_heads, head_dim]; token t of sequence
    s lives in page block_table[s, t // block_size] at slot t % block_size.

    Pages come from a free list: a step takes the pages its sequences grow into,
    `free(seq_id)` gives a finished sequence's pages back. Unused block-table
    entries hold 0 (a valid page) so kernels that read a whole row stay in bounds."""

    kind = "paged"

    def __init__(self, num_blocks, block_size, num_kv_heads, head_dim, max_seqs, max_blocks_per_seq,
                 device="cpu", dtype=torch.float16):
        _positive_int("num_blocks", num_blocks)
        _positive_int("block_size", block_size)
        _positive_int("max_seqs", max_seqs)
        _positive_int("max_blocks_per_seq", max_blocks_per_seq)
        if block_size % 16 != 0:
            raise invalid("block_size must be a multiple of 16, got %d" % block_size)
        super().__init__(max_seqs, num_kv_heads, head_dim, dtype, device, max_blocks_per_seq * block_size,
                         max_blocks_per_seq)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.block_table = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=self.device)
        # An int64 copy of block_table for the torch backend's indexing (int32
        # indices cost a conversion on every use), kept equal by _upload_rows.
        self.pages64 = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int64, device=self.device)
        self._flat_views()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self._pages = [[] for _ in range(max_seqs)]
        # Popped from the end: pages are handed out in increasing order.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def max_seqs(self):
        return self.num_rows

    @property
    def max_seq(self):
        return self.max_blocks_per_seq * self.block_size

    def num_free_pages(self):
        return len(self._free)

    def pages(self, seq_id):
        """The pages of one sequence, in order (host mirror of its block-table row)."""
        (s,) = self._seq_ids([seq_id], 1)
        return list(self._pages[s])

    def _pages_needed(self, step):
        """{sequence: pages it still needs} for the step; raises if one would grow
        past max_blocks_per_seq."""
        need = {}
        size, pages, q_len = self.block_size, self._pages, step.q_len
        for s, p in zip(step.rows.ids, step.past):
            have = len(pages[s])
            if p + q_len > have * size:
                blocks = -(-(p + q_len) // size)
                if blocks > self.max_blocks_per_seq:
                    raise _out_of_range(
                        "sequence %d holds %d tokens; %d more need %d pages of %d, past max_blocks_per_seq %d"
                        % (s, p, q_len, blocks, size, self.max_blocks_per_seq)
                    )
                need[s] = blocks - have
        return need

    def _check_capacity(self, step):
        need = self._pages_needed(step)
        total = sum(need.values())
        if total > len(self._free):
            raise QattnError(
                "QATTN_ERROR_OUT_OF_MEMORY",
                "out of KV cache pages: sequences %s need %d new pages, %d of %d are free"
                % (sorted(need), total, len(self._free), self.num_blocks),
            )
        step.need = need

    def _upload_rows(self, seq_ids):
        seq_ids = list(seq_ids)
        if not seq_ids:
            return
        rows = [self._pages[s] + [0] * (self.max_blocks_per_seq - len(self._pages[s])) for s in seq_ids]
        # One transfer for all rows: a decode step may cross page boundaries in many sequences.
        rows = _to_device(rows, torch.int64, self.device)
        index = _to_device(seq_ids, torch.int64, self.device)
        self.pages64.index_copy_(0, index, rows)
        self.block_table.index_copy_(0, index, rows.to(torch.int32))

    def reserve(self, step):
        if step.version != self._version:
            # The cache changed since plan(): what it worked out may no longer hold.
            self._check_capacity(step)
        super().reserve(step)
        for s, extra in step.need.items():
            taken = [self._free.pop() for _ in range(extra)]
            self._pages[s].extend(taken)
            step.new_pages[s] = taken
        self._upload_rows(step.new_pages)

    def release(self, step):
        super().release(step)
        for s, taken in step.new_pages.items():
            del self._pages[s][len(self._pages[s]) - len(taken):]
            self._free.extend(reversed(taken))
        self._upload_rows(step.new_pages)
        step.new_pages = {}

    def assign_pages(self, seq_id, pages):
        """Appends caller-chosen free pages to a sequence's block table (for callers
        that place pages themselves, e.g. to lay a sequence out for another engine)."""
        (s,) = self._seq_ids([seq_id], 1)
        pages = _int_list(pages, "pages")
        for p in pages:
            if not 0 <= p < self.num_blocks:
                raise _out_of_range(
                    "block table entry %d for sequence %d points past the cache of %d pages"
                    % (p, s, self.num_blocks)
                )
        if len(set(pages)) != len(pages):
            raise invalid("pages %s name a page more than once" % pages)
        free = set(self._free)
        taken = [p for p in pages if p not in free]
        if taken:
            raise invalid("pages %s are already in use by a sequence" % taken)
        if len(self._pages[s]) + len(pages) > self.max_blocks_per_seq:
            raise _out_of_range(
                "sequence %d has %d pages; %d more exceed max_blocks_per_seq %d"
                % (s, len(self._pages[s]), len(pages), self.max_blocks_per_seq)
            )
        chosen = set(pages)
        self._version += 1
        self._free = [p for p in self._free if p not in chosen]
        self._pages[s].extend(pages)
        self._upload_rows([s])

    def _release_pages(self, seq_ids):
        holding = [s for s in seq_ids if self._pages[s]]
        for s in holding:
            self._free.extend(reversed(self._pages[s]))
            self._pages[s] = []
        self._upload_rows(holding)

    def check_consistency(self):
        super().check_consistency()
        expected = [p + [0] * (self.max_blocks_per_seq - len(p)) for p in self._pages]
        if self.block_table.tolist() != expected or self.pages64.tolist() != expected:
            raise QattnError("QATTN_ERROR_INTERNAL", "block_table on the device differs from the host mirror")

    def __repr__(self):
        return (
            "PagedKVCache(num_blocks=%d, block_size=%d, num_kv_heads=%d, head_dim=%d, max_seqs=%d, "
            "max_blocks_per_seq=%d, dtype=%s, device=%s)"
            % (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim, self.max_seqs,
               self.max_blocks_per_seq, self.dtype, self.device)
        )
