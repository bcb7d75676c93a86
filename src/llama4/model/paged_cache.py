"""Paged (block-allocated) KV cache: one pool of fixed-size blocks per layer, shared by many sequences.

Layout. Each layer keeps its keys and values in one pool tensor [Hkv, capacity x block_size, d]
(block b holds slots [b * block_size, (b + 1) * block_size); keys post-RoPE/QK-norm, values raw, as in
:class:`~llama4.model.cache.KVCache`, whose per-row buffers have the same per-head layout). A
sequence owns a list of blocks per layer kind - the same list for every layer of that kind, since
they hold the same tokens:

- global (NoPE) layers: the blocks of tokens [0, length);
- chunk-local (RoPE) layers: the blocks of the chunk of the last token only, [chunk start, length);
  a pass that starts in a new chunk gives them back first, so a sequence holds at most
  ceil(chunk / block_size) of them (see ../shared/reference/llama4-architecture.md on iRoPE).

So memory follows actual lengths, and a sequence joins or leaves a batch without touching anyone
else's blocks. Blocks are reference-counted; a freed block goes back to the free list. A sequence's
next block is the one after its last when that is free, else the lowest free id; the pool grows by
doubling when none is free (rare, amortised) and :meth:`PagedKVCache.trim` gives unused capacity back.
Block 0 is all zeros and never handed out: padding of a gathered batch points at it.

Reads. A pass over one sequence whose blocks are consecutive reads its keys as a slice of the pool
(no copy); a sequence that grew in a batch (its blocks interleaved with the others') or came from a
prefix copy is moved to consecutive blocks by its first decode step alone (one copy), so decoding at
batch 1 stays copy-free. A one-token pass over several sequences (ragged decode) writes each row's new
key/value into its slot (one ``index_copy_`` per layer) and hands attention the rows' keys gathered
into a padded [B, Hkv, S, d] batch (one ``index_select`` per layer; positions past a row's valid
entries read zeros) with the valid entries per row - what KVCache's ragged step returns. That gather
is a per-step copy of the batch's keys and values (pure PyTorch has no attention over block tables);
in exchange rows join and leave without copies. Slots are worked out once per pass and layer kind.

:meth:`PagedSequence.copy_prefix` shares every full block of the prefix and copies only the partial
last one (the one both sequences could write), so taking a cached prefix costs one block copy per kind.

A forward pass runs over a :meth:`PagedKVCache.batch` of sequences, which speaks the model's cache
protocol (``starts``, ``update``, ``advance``, and ``decode_slots`` for code that writes the pool itself)
as KVCache does: a multi-token pass (prefill) over one
sequence, or a one-token pass (decode) over any number of sequences at different lengths.

Storage. A layer given a :class:`~llama4.model.cache.KVStorage` (e.g. quantized) keeps its entries encoded,
[Hkv, slots, width]; every block operation above moves stored entries as they are, ``update`` encodes the
new keys/values and decodes the entries it hands to attention.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from llama4.config import TextConfig
from llama4.model.cache import CacheView, DecodeSlots, KVStorage, storage_per_layer
from llama4.model.ops import attention_bucket

GLOBAL, LOCAL = 0, 1  # the two kinds of layer, by their index in a pool's ``_kinds`` and a sequence's ``held``


class _KindBlocks:
    """The blocks of one layer kind: reference counts, which are taken, the free list and its layers.

    ``free`` is a min-heap of candidate ids with lazy deletion: a block taken out of order (a run, or
    the one after a sequence's last) stays in the heap and is skipped when popped (``taken`` decides).
    """

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.capacity = 0  # blocks, the zero block included
        self.refs: list[int] = []
        self.taken = bytearray()  # 1: held by some sequence (or the zero block)
        self.free: list[int] = []
        self.used = 0  # blocks with a reference (the zero block not counted)


class _SequenceBlocks:
    """A sequence's blocks of one kind: they cover tokens [first, first + len(blocks) * block_size)."""

    __slots__ = ("first", "blocks", "consecutive", "_table")

    def __init__(self, first: int = 0, blocks: list[int] | None = None):
        self.first = first
        self.set_blocks(blocks if blocks is not None else [])

    def set_blocks(self, blocks: list[int]) -> None:
        self.blocks = blocks
        self.consecutive = all(b == blocks[0] + i for i, b in enumerate(blocks))
        self._table: torch.Tensor | None = None

    def append(self, block: int) -> None:
        self.consecutive = self.consecutive and (not self.blocks or block == self.blocks[-1] + 1)
        self.blocks.append(block)
        self._table = None

    def table(self) -> torch.Tensor:
        """The block ids as an int64 tensor (rebuilt only after they changed)."""
        if self._table is None:
            self._table = torch.tensor(self.blocks, dtype=torch.long)
        return self._table


class PagedSequence:
    """One sequence's place in a :class:`PagedKVCache`: its length and blocks. ``release`` gives them back."""

    def __init__(self, pool: PagedKVCache):
        self.pool = pool
        self.length = 0  # tokens in the cache: the sequence index of its next token
        self.held = (_SequenceBlocks(), _SequenceBlocks())  # GLOBAL, LOCAL
        self.released = False

    @property
    def lengths(self) -> list[int]:
        return [self.length]

    @property
    def batch_size(self) -> int:
        return 1

    def nbytes(self) -> int:
        """Bytes of the blocks this sequence holds (blocks shared with another sequence count for both)."""
        return sum(len(self.held[kind].blocks) * self.pool.block_bytes(kind) for kind in (GLOBAL, LOCAL))

    def earliest_cut(self) -> int:
        """The shortest prefix :meth:`copy_prefix` can take: the local layers hold only their chunk."""
        return self.held[LOCAL].first if self.pool.has_kind(LOCAL) else 0

    def copy_prefix(self, length: int) -> PagedSequence:
        """A new sequence holding this one's first ``length`` tokens: full blocks shared, the partial last
        block copied. This sequence is unchanged."""
        if self.released:
            raise ValueError("the sequence was released")
        if not self.earliest_cut() <= length <= self.length:
            raise ValueError(f"can only copy a prefix of {self.earliest_cut()}..{self.length} tokens, got {length}")
        pool, copy = self.pool, PagedSequence(self.pool)
        copy.length = length
        for kind in (GLOBAL, LOCAL):
            if not pool.has_kind(kind):
                continue
            held = self.held[kind]
            count = length - held.first
            blocks = held.blocks[:-(-count // pool.block_size)]
            for b in blocks:
                pool._kinds[kind].refs[b] += 1
            if count % pool.block_size:  # the partial last block: both sequences may write past `length`
                fresh = pool._alloc(kind)
                pool._copy_block(kind, blocks[-1], fresh)
                pool._release(kind, blocks[-1])
                blocks[-1] = fresh
            copy.held[kind].first = held.first
            copy.held[kind].set_blocks(blocks)
        return copy

    def release(self) -> None:
        """Give every block back (idempotent)."""
        if self.released:
            return
        self.released = True
        for kind in (GLOBAL, LOCAL):
            self.pool._drop(kind, self.held[kind])


class PagedKVCache:
    """The block pool of every layer (see the module docstring). Sequences come from :meth:`sequence`."""

    def __init__(self, config: TextConfig, block_size: int = 16, initial_blocks: int = 16,
                 storage: Sequence[KVStorage | None] | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if initial_blocks < 2:
            raise ValueError(f"initial_blocks must be >= 2 (block 0 is the zero block), got {initial_blocks}")
        self.storage = storage_per_layer(storage, config.num_layers)
        self.chunk = config.attention_chunk_size
        self.chunked = tuple(spec.chunked for spec in config.layers)
        self.block_size, self.initial_blocks = block_size, initial_blocks
        self.kv_heads, self.head_dim = config.num_kv_heads, config.head_dim
        self._kind_of = [LOCAL if c else GLOBAL for c in self.chunked]
        self._kinds = (_KindBlocks([i for i, c in enumerate(self.chunked) if not c]),
                       _KindBlocks([i for i, c in enumerate(self.chunked) if c]))
        n = config.num_layers
        self._k: list[torch.Tensor | None] = [None] * n
        self._v: list[torch.Tensor | None] = [None] * n
        self.dtype: torch.dtype | None = None  # the attention's (the keys/values given to update)
        self.device: torch.device | None = None
        self._entry: list[tuple[int, torch.dtype]] = []  # per layer: (width, dtype) of a stored entry
        self._block_bytes = (0, 0)
        self._offsets = torch.arange(block_size)

    # -- sequences and batches ----------------------------------------------------------------------

    def sequence(self) -> PagedSequence:
        """A new, empty sequence."""
        return PagedSequence(self)

    def batch(self, sequences: list[PagedSequence]) -> PagedBatch:
        """The cache of one forward pass over ``sequences`` (row b = sequences[b])."""
        return PagedBatch(self, sequences)

    # -- accounting -------------------------------------------------------------------------------------

    def has_kind(self, kind: int) -> bool:
        return bool(self._kinds[kind].layers)

    def block_bytes(self, kind: int) -> int:
        """Bytes of one block of a kind, keys and values of all its layers (0 before the first pass)."""
        return self._block_bytes[kind]

    def blocks_used(self) -> int:
        return sum(kind.used for kind in self._kinds)

    def nbytes(self) -> int:
        """Bytes of the blocks held by sequences (each shared block once)."""
        return sum(self._kinds[kind].used * self.block_bytes(kind) for kind in (GLOBAL, LOCAL))

    def capacity_bytes(self) -> int:
        """Bytes of the pool tensors (held blocks, free blocks and the zero block)."""
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None)

    def trim(self) -> None:
        """Give back the pool capacity above the highest block in use (e.g. when the server goes idle)."""
        bs = self.block_size
        for kind in self._kinds:
            top = next((b for b in range(kind.capacity - 1, 0, -1) if kind.refs[b]), 0)
            capacity = max(self.initial_blocks, top + 1)
            if capacity >= kind.capacity:
                continue
            for layer in kind.layers:
                if self._k[layer] is not None:
                    with torch.inference_mode(False):
                        self._k[layer] = self._k[layer][:, :capacity * bs].clone()
                        self._v[layer] = self._v[layer][:, :capacity * bs].clone()
            kind.capacity = capacity
            del kind.refs[capacity:]
            del kind.taken[capacity:]
            kind.free = [b for b in range(1, capacity) if not kind.taken[b]]
            heapq.heapify(kind.free)

    # -- blocks -------------------------------------------------------------------------------------------

    def stored_dtype(self, layer: int, dtype: torch.dtype) -> torch.dtype:
        """The dtype of ``layer``'s pool for keys/values computed in ``dtype`` (Cache.stored_dtype)."""
        storage = self.storage[layer]
        return dtype if storage is None else storage.dtype

    def _init_storage(self, like: torch.Tensor) -> None:
        self.dtype, self.device = like.dtype, like.device
        self._entry = [(self.head_dim, like.dtype) if st is None else (st.width(self.head_dim), st.dtype)
                       for st in self.storage]
        self._block_bytes = tuple(sum(2 * self.block_size * self.kv_heads * self._entry[layer][0]  # k and v
                                      * self._entry[layer][1].itemsize for layer in kind.layers)
                                  for kind in self._kinds)
        for kind in self._kinds:
            if kind.layers:
                self._grow(kind, max(self.initial_blocks, kind.capacity))

    def _grow(self, kind: _KindBlocks, capacity: int) -> None:
        old = kind.capacity
        if old == 0:
            kind.refs, kind.taken = [1], bytearray(b"\x01")  # the zero block, pinned
            old = kind.capacity = 1
        kind.refs.extend([0] * (capacity - old))
        kind.taken.extend(bytes(capacity - old))
        kind.free.extend(range(old, capacity))  # all larger than any id in the heap: still a heap
        kind.capacity = capacity
        if self.dtype is None:
            return
        for layer in kind.layers:
            width, dtype = self._entry[layer]
            shape = (self.kv_heads, capacity * self.block_size, width)
            for store in (self._k, self._v):
                # zeros: block 0 must read as zeros, and no slot may hold NaN (a padded gather reads them).
                # Normal tensors even under inference_mode: the pool outlives the pass that grew it, and an
                # inference tensor could not be written outside inference mode.
                with torch.inference_mode(False):
                    grown = torch.zeros(shape, dtype=dtype, device=self.device)
                    if store[layer] is not None:
                        grown[:, :store[layer].shape[1]] = store[layer]
                store[layer] = grown

    def _alloc(self, kind_id: int, after: int | None = None) -> int:
        """A free block: ``after + 1`` when that one is free (a sequence's blocks stay consecutive), else
        the lowest free id (the pool doubles when none is)."""
        kind = self._kinds[kind_id]
        if after is not None and after + 1 < kind.capacity and not kind.taken[after + 1]:
            return self._claim(kind, after + 1)
        while kind.free and kind.taken[kind.free[0]]:  # taken out of order since it was pushed
            heapq.heappop(kind.free)
        if not kind.free:
            self._grow(kind, max(self.initial_blocks, 2 * kind.capacity))
        return self._claim(kind, heapq.heappop(kind.free))

    def _alloc_run(self, kind_id: int, count: int) -> int:
        """The first of ``count`` consecutive free blocks (the pool grows when no gap is long enough)."""
        kind = self._kinds[kind_id]
        start = kind.taken.find(bytes(count), 1)
        if start < 0:
            tail = len(kind.taken) - len(kind.taken.rstrip(b"\x00"))  # free blocks at the top
            self._grow(kind, max(self.initial_blocks, 2 * kind.capacity, kind.capacity - tail + 2 * count))
            start = kind.taken.find(bytes(count), 1)
        for block in range(start, start + count):
            self._claim(kind, block)
        return start

    @staticmethod
    def _claim(kind: _KindBlocks, block: int) -> int:
        kind.refs[block] = 1
        kind.taken[block] = 1
        kind.used += 1
        return block

    def _release(self, kind_id: int, block: int) -> None:
        kind = self._kinds[kind_id]
        kind.refs[block] -= 1
        if not kind.refs[block]:
            kind.taken[block] = 0
            kind.used -= 1
            if len(kind.free) > 2 * (kind.capacity - kind.used) + 64:  # mostly stale entries: rebuild
                kind.free = [b for b in range(1, kind.capacity) if not kind.taken[b]]
                heapq.heapify(kind.free)
            else:
                heapq.heappush(kind.free, block)

    def _drop(self, kind_id: int, held: _SequenceBlocks) -> None:
        for block in held.blocks:
            self._release(kind_id, block)
        held.set_blocks([])

    def _cover(self, kind_id: int, held: _SequenceBlocks, end: int) -> None:
        """Allocate blocks until ``held`` covers tokens [first, end)."""
        need = -(-(end - held.first) // self.block_size)
        while len(held.blocks) < need:
            held.append(self._alloc(kind_id, held.blocks[-1] if held.blocks else None))

    def _relocate(self, kind_id: int, held: _SequenceBlocks) -> None:
        """Move a sequence's blocks of a kind to consecutive ones (one copy), so that its later passes
        read views; shared blocks stay with their other holders."""
        count = len(held.blocks)
        start = self._alloc_run(kind_id, count)
        bs = self.block_size
        slots = (held.table()[:, None] * bs + self._offsets).reshape(-1).to(self.device)
        for layer in self._kinds[kind_id].layers:
            for store in (self._k, self._v):
                store[layer][:, start * bs:(start + count) * bs] = store[layer].index_select(1, slots)
        for block in held.blocks:
            self._release(kind_id, block)
        held.set_blocks(list(range(start, start + count)))

    def _copy_block(self, kind_id: int, src: int, dst: int) -> None:
        bs = self.block_size
        for layer in self._kinds[kind_id].layers:
            if self._k[layer] is not None:
                self._k[layer][:, dst * bs:(dst + 1) * bs] = self._k[layer][:, src * bs:(src + 1) * bs]
                self._v[layer][:, dst * bs:(dst + 1) * bs] = self._v[layer][:, src * bs:(src + 1) * bs]

    def _slots(self, held: _SequenceBlocks, start: int, end: int) -> torch.Tensor | int:
        """Pool slots of tokens [start, end): the first slot (an int) when they are consecutive, else an
        int64 tensor of them."""
        bs = self.block_size
        lo, hi = start - held.first, end - held.first
        if held.consecutive:
            return held.blocks[0] * bs + lo
        first_block, last_block = lo // bs, -(-hi // bs)
        if last_block - first_block == 1:  # inside one block
            return held.blocks[first_block] * bs + lo % bs
        table = held.table()[first_block:last_block]
        slots = (table[:, None] * bs + torch.arange(bs)).reshape(-1)
        return slots[lo - first_block * bs:hi - first_block * bs].to(self.device)


def _read(store: torch.Tensor, slots: torch.Tensor | int, count: int) -> torch.Tensor:
    """``count`` pool entries at ``slots`` (first slot or slot tensor) as [1, Hkv, count, d]."""
    if isinstance(slots, int):
        return store[None, :, slots:slots + count]
    return store.index_select(1, slots)[None]


def _write(store: torch.Tensor, slots: torch.Tensor | int, values: torch.Tensor) -> None:
    """Write values [Hkv, count, d] at ``slots`` (first slot or slot tensor)."""
    if isinstance(slots, int):
        store[:, slots:slots + values.shape[1]] = values
    else:
        store.index_copy_(1, slots, values)


class _SinglePlan:
    """One sequence, T new tokens: where they go and which keys the queries see."""

    __slots__ = ("write", "keep_from", "old", "old_count", "read", "read_count", "k_start")

    def apply(self, ks: torch.Tensor, vs: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.old is not None:  # the pass crosses into a new chunk: old keys + all new ones, keep the tail
            k_all = torch.cat((_read(ks, self.old, self.old_count), k), dim=2) if self.old_count else k
            v_all = torch.cat((_read(vs, self.old, self.old_count), v), dim=2) if self.old_count else v
            if self.write is not None:
                _write(ks, self.write, k[0, :, self.keep_from:])
                _write(vs, self.write, v[0, :, self.keep_from:])
            return k_all, v_all, self.k_start, None
        _write(ks, self.write, k[0])
        _write(vs, self.write, v[0])
        return _read(ks, self.read, self.read_count), _read(vs, self.read, self.read_count), self.k_start, None


class _RaggedPlan:
    """B sequences, one new token each: their slots, and the gather of each row's keys."""

    __slots__ = ("write", "gather", "width", "valid")

    def apply(self, ks: torch.Tensor, vs: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        b = k.shape[0]
        ks.index_copy_(1, self.write, k[:, :, 0].transpose(0, 1))
        vs.index_copy_(1, self.write, v[:, :, 0].transpose(0, 1))
        shape = (ks.shape[0], b, self.width, ks.shape[2])
        k_all = ks.index_select(1, self.gather).view(shape).transpose(0, 1)  # [B, Hkv, width, d]
        v_all = vs.index_select(1, self.gather).view(shape).transpose(0, 1)
        return k_all, v_all, 0, self.valid


class PagedBatch:
    """The cache of one forward pass over some sequences of a pool (the model's cache protocol)."""

    def __init__(self, pool: PagedKVCache, sequences: list[PagedSequence]):
        if any(s.released for s in sequences):
            raise ValueError("a released sequence cannot run")
        self.pool, self.sequences = pool, sequences
        self.lengths = [s.length for s in sequences]
        self._plans: list[_SinglePlan | _RaggedPlan | None] = [None, None]
        self._fused_plans: dict[tuple[int, int], _SinglePlan] = {}  # decode_slots' one-sequence plans by (kind, offset)

    @property
    def batch_size(self) -> int:
        return len(self.sequences)

    def starts(self, batch: int) -> list[int]:
        if batch != len(self.sequences):
            raise ValueError(f"the batch holds {len(self.sequences)} sequences but the input has {batch} rows")
        return list(self.lengths)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, bucketed: bool = False) -> CacheView:
        """Add k/v [B, Hkv, T, d] (the Cache protocol). ``bucketed``: the entries a decode step reads span
        whole key buckets (a wider view of the store, or a wider gather), where padding would copy."""
        pool = self.pool
        if pool.dtype is None:
            pool._init_storage(k)
        kind = pool._kind_of[layer]
        plan = self._plans[kind]
        if plan is None:
            plan = self._plans[kind] = self._plan(kind, k.shape[0], k.shape[2], bucketed)
        storage = pool.storage[layer]
        if storage is None:
            return CacheView(*plan.apply(pool._k[layer], pool._v[layer], k, v))
        keys, values, start, valid = plan.apply(pool._k[layer], pool._v[layer], storage.encode(k), storage.encode(v))
        return CacheView(storage.decode(keys, k.dtype), storage.decode(values, k.dtype), start, valid)

    def stored_dtype(self, layer: int, dtype: torch.dtype) -> torch.dtype:
        return self.pool.stored_dtype(layer, dtype)

    def layer_storage(self, layer: int) -> KVStorage | None:
        return self.pool.storage[layer]

    def decode_slots(self, layer: int, rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device, tokens: int = 1, offset: int = 0) -> DecodeSlots:
        """KVCache.decode_slots over the pool: block tables become gathered slots (one-token rows of a
        ragged batch), or one sequence's entries are read where they lie. With a storage for the layer the
        slots are over its stored entries."""
        pool = self.pool
        if pool.dtype is None:
            pool._init_storage(torch.empty(0, dtype=dtype, device=device))
        if pool.dtype != dtype or (kv_heads, head_dim) != (pool.kv_heads, pool.head_dim):
            raise ValueError(f"the pool holds {pool.dtype} entries of {pool.kv_heads} x {pool.head_dim}, "
                             f"asked for {dtype} of {kv_heads} x {head_dim}")
        if rows != len(self.sequences) or (rows > 1 and (tokens, offset) != (1, 0)):
            raise ValueError(f"decode slots for {rows} rows x {tokens} tokens at +{offset} over a batch of "
                             f"{len(self.sequences)} sequences: several rows take one token each")
        kind = pool._kind_of[layer]
        if rows > 1:
            plan = self._plans[kind]
            if plan is None:
                plan = self._plans[kind] = self._ragged(kind, bucketed=False)
        else:
            plan = self._fused_plans.get((kind, offset))
            if plan is None:
                start = self.sequences[0].length + offset
                if kind == LOCAL and start // pool.chunk != (start + tokens - 1) // pool.chunk:
                    raise ValueError(f"tokens {start}..{start + tokens - 1} cross a chunk boundary "
                                     f"(chunk {pool.chunk})")
                plan = self._fused_plans[(kind, offset)] = self._single(kind, self.sequences[0], tokens, start)
        keys, values = pool._k[layer], pool._v[layer]  # after planning, which may grow the pool
        stride = keys.shape[1] * keys.shape[2]
        if rows > 1:
            return DecodeSlots(keys, values, stride, plan.write, plan.valid, None, plan.gather.view(rows, plan.width))
        held = self.sequences[0].held[kind]
        seen = self.sequences[0].length + offset - held.first  # entries before the first new token
        write = plan.write + torch.arange(tokens) if isinstance(plan.write, int) else plan.write.cpu()
        count = seen + 1 + torch.arange(tokens)
        if isinstance(plan.read, int):
            return DecodeSlots(keys, values, stride, write, count, torch.full((tokens,), plan.read), None)
        return DecodeSlots(keys, values, stride, write, count, None, plan.read[None])

    def advance(self, num_tokens: int) -> None:
        for s in self.sequences:
            s.length += num_tokens
        self.lengths = [s.length for s in self.sequences]
        self._plans = [None, None]
        self._fused_plans = {}

    def _plan(self, kind: int, batch: int, tokens: int, bucketed: bool):
        if batch != len(self.sequences):
            raise ValueError(f"the batch holds {len(self.sequences)} sequences but the input has {batch} rows")
        if batch == 1:
            return self._single(kind, self.sequences[0], tokens, bucketed=bucketed)
        if tokens != 1:
            raise ValueError(f"a {tokens}-token pass over a paged batch takes one sequence at a time, got {batch}")
        return self._ragged(kind, bucketed)

    def _start_chunk(self, kind: int, held: _SequenceBlocks, seq_index: int) -> None:
        """Local layers: a pass whose first token opens a new chunk gives the old chunk's blocks back."""
        if kind == LOCAL:
            start = (seq_index // self.pool.chunk) * self.pool.chunk
            if held.first != start:
                self.pool._drop(kind, held)
                held.first = start

    def _single(self, kind: int, seq: PagedSequence, tokens: int, start: int | None = None,
                bucketed: bool = False) -> _SinglePlan:
        pool, held, s = self.pool, seq.held[kind], seq.length if start is None else start
        end = s + tokens
        plan = _SinglePlan()
        plan.old = None
        self._start_chunk(kind, held, s)
        plan.k_start = held.first
        if kind == LOCAL and end > held.first + pool.chunk:  # crosses a chunk boundary
            plan.old_count = s - held.first
            plan.old = pool._slots(held, held.first, s) if plan.old_count else 0
            pool._drop(kind, held)
            held.first = (end // pool.chunk) * pool.chunk
            plan.keep_from = tokens - (end - held.first)
            plan.write = None
            if end > held.first:
                pool._cover(kind, held, end)
                plan.write = pool._slots(held, held.first, end)
            return plan
        pool._cover(kind, held, end)
        if tokens == 1 and not held.consecutive:
            # decoding alone after growing in a batch (or from a prefix copy): one copy now, views from now
            # on. Not for prefill pieces: between two pieces the running batch takes blocks, so a long
            # prompt would move (and need a free run) at every piece; a piece reads its keys gathered.
            pool._relocate(kind, held)
        plan.write = pool._slots(held, s, end)
        plan.read, plan.read_count = pool._slots(held, held.first, end), end - held.first
        if tokens == 1 and bucketed and isinstance(plan.read, int):
            # batch-invariant attention runs on a whole key bucket: a wider view of the store is free
            # (the entries past the sequence are masked), where padding would copy every key
            room = pool._kinds[kind].capacity * pool.block_size - plan.read
            plan.read_count = min(attention_bucket(plan.read_count), room)
        return plan

    def _ragged(self, kind: int, bucketed: bool) -> _RaggedPlan:
        pool, bs = self.pool, self.pool.block_size
        chunk = pool.chunk if kind == LOCAL else None
        slots, valid, tables = [], [], []
        for seq in self.sequences:
            held, s = seq.held[kind], seq.length
            if chunk is not None and held.first != s - s % chunk:  # a new chunk: the old one's blocks go
                pool._drop(kind, held)
                held.first = s - s % chunk
            at = s - held.first
            if at // bs == len(held.blocks):
                held.append(pool._alloc(kind, held.blocks[-1] if held.blocks else None))
            slots.append(held.blocks[at // bs] * bs + at % bs)
            valid.append(at + 1)
            tables.append(held.table())
        plan = _RaggedPlan()
        # batch-invariant attention runs on a whole key bucket: gather that wide (zero blocks past the end)
        plan.width = width = attention_bucket(max(valid)) if bucketed else max(valid)
        b = len(tables)
        table = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)  # [B, blocks]; padding: zero block
        if table.shape[1] * bs < width:
            table = torch.nn.functional.pad(table, (0, -(-width // bs) - table.shape[1]))
        gather = (table[:, :, None] * bs + pool._offsets).view(b, -1)[:, :width]
        ints = torch.tensor(slots + valid, dtype=torch.long, device=pool.device)
        plan.gather = gather.reshape(-1).to(pool.device)
        plan.write, plan.valid = ints[:b], ints[b:]
        return plan
