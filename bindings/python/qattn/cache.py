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

from .errors import QattnError

_INDEX_MEMO_SIZE = 16


def _out_of_range(message):
    return QattnError("QATTN_ERROR_OUT_OF_RANGE", message)


def _invalid(message):
    return QattnError("QATTN_ERROR_INVALID_ARGUMENT", message)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _invalid("%s must be a positive int, got %r" % (name, value))
    return value


class CacheStep:
    """What one forward step does to a cache: which rows (sequences), their
    lengths before the step, and, for the paged cache, their block-table rows.

    `seq_ids` and `past` are host lists; `index` (int64) and `index32` are the
    sequence ids on the cache's device; `past_lens` is int32 [batch] on the device
    (the lengths before the step); `identity` says the rows are 0..batch-1 in
    order, so kernels may take the cache's own tensors without a gather."""

    def __init__(self, cache, seq_ids, q_len, index, index32, identity):
        self.cache = cache
        self.seq_ids = seq_ids
        self.q_len = q_len
        self.index = index
        self.index32 = index32
        self.identity = identity
        self.past = [cache._host_lens[s] for s in seq_ids]
        self.past_lens = cache.seq_lens[: len(seq_ids)] if identity else cache.seq_lens.index_select(0, index)
        self.new_pages = {}

    @property
    def batch(self):
        return len(self.seq_ids)

    @property
    def max_total(self):
        """Longest sequence after the step (keys the attention covers)."""
        return max(self.past) + self.q_len

    def block_table(self):
        """int32 [batch, max_blocks_per_seq] on the device (paged cache only)."""
        table = self.cache.block_table
        return table[: self.batch] if self.identity else table.index_select(0, self.index)


class _KVCacheBase:
    kind = None

    def __init__(self, rows, num_kv_heads, head_dim, dtype, device):
        _positive_int("num_kv_heads", num_kv_heads)
        _positive_int("head_dim", head_dim)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise _invalid("KV cache dtype must be float16, bfloat16 or float32, got %s" % dtype)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        # The allocated tensor's device carries the index ("cuda" becomes "cuda:0"),
        # so comparisons with other tensors' devices are exact.
        self.device = self.seq_lens.device
        self.dtype = dtype
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self._host_lens = [0] * rows
        self._index_memo = {}
        self.last_backend = None

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
                raise _invalid("seq_ids must be a 1-D integer tensor or a sequence of ints")
            ids = seq_ids.tolist()
        else:
            ids = list(seq_ids)
        for i, s in enumerate(ids):
            try:
                if isinstance(s, bool):
                    raise TypeError
                ids[i] = operator.index(s)
            except TypeError:
                raise _invalid("seq_ids must hold ints, got %r" % (s,)) from None
        if len(ids) != batch:
            raise _invalid("%d seq_ids given for a batch of %d sequences" % (len(ids), batch))
        for s in ids:
            if not 0 <= s < self.num_rows:
                raise _out_of_range(
                    "sequence id %d is out of range for this %s cache of %d sequences"
                    % (s, self.kind, self.num_rows)
                )
        if len(set(ids)) != len(ids):
            raise _invalid("seq_ids %s name a sequence more than once" % ids)
        return ids

    def _index(self, ids):
        key = tuple(ids)
        found = self._index_memo.get(key)
        if found is None:
            # Decode repeats the same ids every step: keep their device copies so the
            # hot path makes no host-to-device transfer.
            if len(self._index_memo) >= _INDEX_MEMO_SIZE:
                self._index_memo.pop(next(iter(self._index_memo)))
            index = torch.tensor(ids, dtype=torch.int64, device=self.device)
            found = (index, index.to(torch.int32))
            self._index_memo[key] = found
        return found

    def plan(self, seq_ids, batch, q_len):
        """Checks that `batch` sequences can each take `q_len` more tokens; changes nothing."""
        _positive_int("batch", batch)
        _positive_int("q_len", q_len)
        ids = self._seq_ids(seq_ids, batch)
        index, index32 = self._index(ids)
        identity = ids == list(range(len(ids)))
        step = CacheStep(self, ids, q_len, index, index32, identity)
        self._check_capacity(step)
        return step

    def reserve(self, step):
        """Takes what the step needs beyond plan() (pages); undone by release()."""

    def release(self, step):
        """Undoes reserve() for a step that failed before advance()."""

    def advance(self, step):
        """Makes the step's new tokens part of their sequences."""
        if step.identity:
            self.seq_lens[: step.batch] += step.q_len
        else:
            self.seq_lens[step.index] += step.q_len
        for s in step.seq_ids:
            self._host_lens[s] += step.q_len

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
        super().__init__(batch, num_kv_heads, head_dim, dtype, device)
        shape = (batch, max_seq, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.max_seq = max_seq

    @property
    def batch(self):
        return self.num_rows

    def _check_capacity(self, step):
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
            raise _invalid("block_size must be a multiple of 16, got %d" % block_size)
        super().__init__(max_seqs, num_kv_heads, head_dim, dtype, device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.block_table = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=self.device)
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
        need = {}
        for s, p in zip(step.seq_ids, step.past):
            blocks = -(-(p + step.q_len) // self.block_size)
            if blocks > self.max_blocks_per_seq:
                raise _out_of_range(
                    "sequence %d holds %d tokens; %d more need %d pages of %d, past max_blocks_per_seq %d"
                    % (s, p, step.q_len, blocks, self.block_size, self.max_blocks_per_seq)
                )
            extra = blocks - len(self._pages[s])
            if extra > 0:
                need[s] = extra
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

    def _upload_rows(self, seq_ids):
        seq_ids = list(seq_ids)
        if not seq_ids:
            return
        rows = [self._pages[s] + [0] * (self.max_blocks_per_seq - len(self._pages[s])) for s in seq_ids]
        # One transfer for all rows: a decode step may cross page boundaries in many sequences.
        self.block_table[seq_ids] = torch.tensor(rows, dtype=torch.int32).to(self.device)

    def reserve(self, step):
        self._check_capacity(step)
        need = self._pages_needed(step)
        for s, extra in need.items():
            taken = [self._free.pop() for _ in range(extra)]
            self._pages[s].extend(taken)
            step.new_pages[s] = taken
        self._upload_rows(need)

    def release(self, step):
        for s, taken in step.new_pages.items():
            del self._pages[s][len(self._pages[s]) - len(taken):]
            self._free.extend(reversed(taken))
        self._upload_rows(step.new_pages)
        step.new_pages = {}

    def assign_pages(self, seq_id, pages):
        """Appends caller-chosen free pages to a sequence's block table (for callers
        that place pages themselves, e.g. to lay a sequence out for another engine)."""
        (s,) = self._seq_ids([seq_id], 1)
        pages = [operator.index(p) for p in pages]
        for p in pages:
            if not 0 <= p < self.num_blocks:
                raise _out_of_range(
                    "block table entry %d for sequence %d points past the cache of %d pages"
                    % (p, s, self.num_blocks)
                )
        if len(set(pages)) != len(pages):
            raise _invalid("pages %s name a page more than once" % pages)
        free = set(self._free)
        taken = [p for p in pages if p not in free]
        if taken:
            raise _invalid("pages %s are already in use by a sequence" % taken)
        if len(self._pages[s]) + len(pages) > self.max_blocks_per_seq:
            raise _out_of_range(
                "sequence %d has %d pages; %d more exceed max_blocks_per_seq %d"
                % (s, len(self._pages[s]), len(pages), self.max_blocks_per_seq)
            )
        chosen = set(pages)
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
        if self.block_table.tolist() != expected:
            raise QattnError("QATTN_ERROR_INTERNAL", "block_table on the device differs from the host mirror")

    def __repr__(self):
        return (
            "PagedKVCache(num_blocks=%d, block_size=%d, num_kv_heads=%d, head_dim=%d, max_seqs=%d, "
            "max_blocks_per_seq=%d, dtype=%s, device=%s)"
            % (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim, self.max_seqs,
               self.max_blocks_per_seq, self.dtype, self.device)
        )
