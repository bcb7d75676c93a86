"""KV cache shaped by iRoPE: chunk-local layers keep one chunk, global layers keep everything.

The model talks to a cache through the :class:`Cache` protocol: ``update(layer, k, v)`` during a forward
pass and ``advance(num_tokens)`` once the pass is complete. Each row of the batch has its own length: a
multi-token pass (prefill) needs all rows at the same length, a one-token pass (decode) does not, so
prompts of different lengths are prefilled separately (each row exactly as its solo run) and then
decoded together (:meth:`KVCache.stack`).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from llama4.config import TextConfig


@dataclass(frozen=True)
class DecodeSlots:
    """Where one layer's keys and values live for a decode step (one new token per row), for code that
    reads and writes a cache's storage itself (the fused decode layer of llama4.kernels.cpu) instead of
    calling ``update``.

    The entry in slot s of KV head g starts at element g * head_stride + s * head_dim of ``keys`` (and of
    ``values``; s * width where the cache stores the layer through a :class:`KVStorage`). Row r writes its new
    key/value to slot write[r] and sees count[r] entries (the new one included): slots first[r] + j when
    ``first`` is given, else gather[r, j] (a gather of one row: every row's). Int64 tensors [B] / [B or 1, W].
    """

    keys: torch.Tensor
    values: torch.Tensor
    head_stride: int
    write: torch.Tensor
    count: torch.Tensor
    first: torch.Tensor | None
    gather: torch.Tensor | None


class CacheView(NamedTuple):
    """What a layer's new queries attend over, once ``update`` has added their keys and values.

    ``keys``/``values`` [B, Hkv, S, d]; ``start``: the sequence index of entry 0 when the rows are aligned;
    ``valid``: None when they are, else (a decode step over rows at different lengths) the entries row b
    sees, its first valid[b] (every one of them visible to its query; ``start`` is then not needed). A
    cache may hand over more entries than the queries see (e.g. whole key buckets) where ``valid`` or the
    attention's own causal bounds mask them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: int
    valid: torch.Tensor | list[int] | None


class KVStorage(Protocol):
    """How a cache keeps one layer's keys and values other than as the attention's own tensors (e.g. quantized:
    llama4.quant.kv_cache). An entry, one token's ``head_dim`` values of one KV head, is stored as ``width(head_dim)``
    elements of ``dtype``: ``encode`` maps k or v [..., head_dim] to [..., width] as they are written (each entry on
    its own: the caches copy, gather and pad stored entries freely), ``decode`` maps stored entries back to
    [..., head_dim] in the attention's dtype as they are read. Stored zeros must decode to zeros: unused and
    padding slots are zero-filled and may be read (masked). ``name`` says which encoding it is, for code that reads
    and writes entries itself (the fused decode layer of llama4.kernels.cpu knows ``bf16``, ``int8`` and ``fp8`` by
    their name and layout, and declines others)."""

    name: str
    dtype: torch.dtype

    def width(self, head_dim: int) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...


def storage_per_layer(storage: Sequence[KVStorage | None] | None, num_layers: int) -> tuple[KVStorage | None, ...]:
    """A cache's ``storage`` argument checked: one entry per layer (None: the attention's own dtype)."""
    if storage is None:
        return (None,) * num_layers
    storage = tuple(storage)
    if len(storage) != num_layers:
        raise ValueError(f"storage needs one entry per layer ({num_layers}; None for plain), got {len(storage)}")
    return storage


class Cache(Protocol):
    """What the model needs of a KV cache (KVCache, and the serving engine's paged batches)."""

    def starts(self, batch: int) -> list[int]:
        """Per-row sequence index of the next token, for a pass over ``batch`` rows."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, bucketed: bool = False) -> CacheView:
        """Add k/v [B, Hkv, T, d] for each row's next T tokens; ``bucketed``: the attention reads whole key
        buckets (batch invariance), so a cache may hand over that many entries where it is free to."""

    def advance(self, num_tokens: int) -> None:
        """Every row has ``num_tokens`` more tokens (after a complete pass)."""

    def decode_slots(self, layer: int, rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device, tokens: int = 1, offset: int = 0) -> DecodeSlots:
        """Where a pass that writes the storage itself puts and reads this layer's entries."""

    def stored_dtype(self, layer: int, dtype: torch.dtype) -> torch.dtype:
        """The dtype of ``layer``'s storage for keys/values computed in ``dtype`` (what ``decode_slots`` hands
        out): ``dtype`` itself unless the cache stores them otherwise (a :class:`KVStorage`)."""

    def layer_storage(self, layer: int) -> KVStorage | None:
        """How ``layer``'s entries are stored (what ``decode_slots`` hands out): its :class:`KVStorage`, or None
        (the attention's own dtype)."""


def _longs(values: list[int]) -> torch.Tensor:
    """A small int64 tensor of ``values`` (over an array's buffer: a decode step makes several of these for every
    layer, and this costs a third of torch.tensor's list parsing)."""
    return torch.frombuffer(array("q", values), dtype=torch.long) if values else torch.zeros(0, dtype=torch.long)


class KVCache:
    """Per-layer key/value buffers [B, Hkv, capacity, d]; keys post-RoPE/QK-norm, values raw.

    Chunked layers hold only keys of each row's current chunk (at most ``chunk`` entries); global layers,
    and chunked layers within their chunk, grow in blocks of ``block_size`` tokens, so memory follows the
    actual length. Reads are views: a decode step writes only the new token's k/v. ``storage`` (one
    :class:`KVStorage` or None per layer) stores a layer's entries encoded, [B, Hkv, capacity, width]: they are
    encoded as written and reads decode the entries a pass attends over.
    """

    def __init__(self, config: TextConfig, block_size: int = 256,
                 storage: Sequence[KVStorage | None] | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.storage = storage_per_layer(storage, config.num_layers)
        self.chunk = config.attention_chunk_size
        self.chunked = tuple(spec.chunked for spec in config.layers)
        self.block_size = block_size
        self.lengths: list[int] = []  # per row: sequence index of its next token (empty until first use)
        n = config.num_layers
        self._k: list[torch.Tensor | None] = [None] * n
        self._v: list[torch.Tensor | None] = [None] * n
        self._len: list[list[int]] = [[] for _ in range(n)]  # per layer, per row: valid buffer entries
        self._start: list[list[int]] = [[] for _ in range(n)]  # per layer, per row: sequence index of entry 0

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def seq_len(self) -> int:
        """The common length of all rows (0 for an unused cache); an error when rows differ."""
        if not self.lengths:
            return 0
        if any(n != self.lengths[0] for n in self.lengths):
            raise ValueError(f"rows are at different lengths {self.lengths}; use .lengths")
        return self.lengths[0]

    def starts(self, batch: int) -> list[int]:
        """Per-row sequence index of the next token, for a pass over ``batch`` rows."""
        if not self.lengths:
            return [0] * batch
        if batch != len(self.lengths):
            raise ValueError(f"the cache holds {len(self.lengths)} rows but the input has {batch}")
        return list(self.lengths)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, bucketed: bool = False) -> CacheView:
        """Add k/v [B, Hkv, T, d] for each row's next T tokens (Cache.update; ``bucketed`` changes nothing
        here: the attention pads to its bucket). For a decode step over rows at different lengths the keys
        are each row's own buffer."""
        b, t = k.shape[0], k.shape[2]
        if not self.lengths:
            self.lengths = [0] * b
        starts = self.starts(b)
        if not self._len[layer]:
            self._len[layer], self._start[layer] = [0] * b, [0] * b
        if all(s == starts[0] for s in starts):
            update = self._update_local if self.chunked[layer] else self._update_global
            keys, values, start = update(layer, self._encode(layer, k), self._encode(layer, v), starts[0])
            valid = None
        elif t != 1:
            raise ValueError(f"a {t}-token pass needs all rows at one length, got lengths {starts}")
        else:
            keys, values, start, valid = self._update_ragged(layer, self._encode(layer, k), self._encode(layer, v),
                                                             starts)
        return CacheView(self._decode(layer, keys, k.dtype), self._decode(layer, values, k.dtype), start, valid)

    def stored_dtype(self, layer: int, dtype: torch.dtype) -> torch.dtype:
        storage = self.storage[layer]
        return dtype if storage is None else storage.dtype

    def layer_storage(self, layer: int) -> KVStorage | None:
        return self.storage[layer]

    def _encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        storage = self.storage[layer]
        return x if storage is None else storage.encode(x)

    def _decode(self, layer: int, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        storage = self.storage[layer]
        return stored if storage is None else storage.decode(stored, dtype)

    def advance(self, num_tokens: int) -> None:
        self.lengths = [n + num_tokens for n in self.lengths]

    def _update_local(self, layer: int, k: torch.Tensor, v: torch.Tensor, seq: int
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
        start = (seq // self.chunk) * self.chunk  # the first query's chunk starts here
        end = seq + k.shape[2]
        kept = self._len[layer][0] if self._start[layer][0] == start else 0  # 0: the stored chunk just ended
        if end <= start + self.chunk:  # all new tokens fall in the current chunk: append in place
            self._write(layer, k, v, at=kept, limit=self.chunk)
            self._set(layer, kept + k.shape[2], start)
            n = kept + k.shape[2]
            return self._k[layer][:, :, :n], self._v[layer][:, :, :n], start
        if kept:
            k_all = torch.cat((self._k[layer][:, :, :kept], k), dim=2)
            v_all = torch.cat((self._v[layer][:, :, :kept], v), dim=2)
        else:
            k_all, v_all = k, v
        new_start = (end // self.chunk) * self.chunk  # keep only the chunk the next token belongs to
        keep = end - new_start
        self._write(layer, k_all[:, :, k_all.shape[2] - keep:], v_all[:, :, v_all.shape[2] - keep:], at=0,
                    limit=self.chunk)
        self._set(layer, keep, new_start)
        return k_all, v_all, start

    def _update_global(self, layer: int, k: torch.Tensor, v: torch.Tensor, seq: int
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = self._len[layer][0]
        self._write(layer, k, v, at=n, limit=None)
        self._set(layer, n + k.shape[2], 0)
        return self._k[layer][:, :, :n + k.shape[2]], self._v[layer][:, :, :n + k.shape[2]], 0

    def _update_ragged(self, layer: int, k: torch.Tensor, v: torch.Tensor, starts: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """One new token per row, rows at different sequence indices (k/v as stored)."""
        buf_k, buf_v, at = self._entries(layer, k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device)
        index = torch.tensor(at, device=k.device)
        rows = torch.arange(k.shape[0], device=k.device)
        buf_k[rows, :, index] = k[:, :, 0]
        buf_v[rows, :, index] = v[:, :, 0]
        valid = index + 1
        need = max(at) + 1
        return buf_k[:, :, :need], buf_v[:, :, :need], 0, valid

    def decode_slots(self, layer: int, rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device, tokens: int = 1, offset: int = 0) -> DecodeSlots:
        """Room in ``layer`` for ``tokens`` new tokens per row (more than one: a single row), starting
        ``offset`` tokens past each row's length (a pass cut into parts), as :class:`DecodeSlots` (the
        caller writes them; token t of row r is entry r * tokens + t and sees the entries before it). With a
        :class:`KVStorage` for the layer, the slots are over its stored entries (``width`` elements each)."""
        storage = self.storage[layer]
        if storage is not None:
            head_dim, dtype = storage.width(head_dim), storage.dtype
        keys, values, at = self._entries(layer, rows, kv_heads, head_dim, dtype, device, tokens, offset)
        capacity = keys.shape[2]
        first = [r * kv_heads * capacity for r in range(rows) for _ in range(tokens)]
        entry = [a + t for a in at for t in range(tokens)]
        return DecodeSlots(keys, values, capacity * head_dim, _longs([f + e for f, e in zip(first, entry)]),
                           _longs([e + 1 for e in entry]), _longs(first), None)

    def _entries(self, layer: int, rows: int, kv_heads: int, width: int, dtype: torch.dtype, device: torch.device,
                 tokens: int = 1, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Room for ``tokens`` new tokens per row in ``layer``, ``offset`` tokens past each row's length:
        the layer's key/value buffers [B, Hkv, capacity, width] (as stored) and, per row, the entry its first new token
        goes to (the others follow). Rows that entered a new chunk start their chunk-local layers over; the
        new tokens of a chunk-local layer must lie in one chunk."""
        if tokens > 1 and rows != 1:
            raise ValueError(f"a {tokens}-token pass takes one row, got {rows}")
        if not self.lengths:
            self.lengths = [0] * rows
        starts = [seq + offset for seq in self.starts(rows)]
        if not self._len[layer]:
            self._len[layer], self._start[layer] = [0] * rows, [0] * rows
        lens, firsts = self._len[layer], self._start[layer]
        for row, seq in enumerate(starts):
            if not self.chunked[layer]:
                continue
            if (seq + tokens - 1) // self.chunk != seq // self.chunk:
                raise ValueError(f"tokens {seq}..{seq + tokens - 1} cross a chunk boundary (chunk {self.chunk})")
            if firsts[row] != (seq // self.chunk) * self.chunk:
                lens[row], firsts[row] = 0, (seq // self.chunk) * self.chunk  # this row entered a new chunk
        at = list(lens)
        self._reserve(layer, (rows, kv_heads, width), dtype, device, max(at) + tokens,
                      limit=self.chunk if self.chunked[layer] else None)
        for row in range(len(lens)):
            lens[row] += tokens
        return self._k[layer], self._v[layer], at

    def _set(self, layer: int, length: int, start: int) -> None:
        self._len[layer] = [length] * len(self._len[layer])
        self._start[layer] = [start] * len(self._start[layer])

    def _reserve(self, layer: int, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, need: int,
                 limit: int | None) -> None:
        """Make the layer's buffers, [B, Hkv, capacity, w] for ``shape`` (B, Hkv, w), hold at least ``need``
        entries, growing in blocks (to at most ``limit``)."""
        buf_k = self._k[layer]
        if buf_k is not None and buf_k.shape[2] >= need and buf_k.shape[:2] == shape[:2]:
            return
        capacity = -(-need // self.block_size) * self.block_size
        if limit is not None:
            capacity = min(capacity, max(limit, need))
        full = (shape[0], shape[1], capacity, shape[2])
        # Zeros, not empty: a masked decode step still multiplies unused slots by zero weights, and
        # uninitialised memory may hold NaN.
        grown_k = torch.zeros(full, dtype=dtype, device=device)
        grown_v = torch.zeros(full, dtype=dtype, device=device)
        if buf_k is not None and buf_k.shape[:2] == shape[:2]:
            used = min(buf_k.shape[2], capacity)
            grown_k[:, :, :used] = buf_k[:, :, :used]
            grown_v[:, :, :used] = self._v[layer][:, :, :used]
        self._k[layer], self._v[layer] = grown_k, grown_v

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: int, limit: int | None) -> None:
        need = at + k.shape[2]
        self._reserve(layer, (k.shape[0], k.shape[1], k.shape[3]), k.dtype, k.device, need, limit)
        self._k[layer][:, :, at:need] = k
        self._v[layer][:, :, at:need] = v

    @classmethod
    def stack(cls, caches: list[KVCache]) -> KVCache:
        """One batched cache from single-row caches (e.g. prompts of different lengths prefilled apart)."""
        if not caches:
            raise ValueError("stack needs at least one cache")
        first = caches[0]
        if any(c.storage != first.storage for c in caches):
            raise ValueError("stack needs caches with the same storage")
        merged = cls.__new__(cls)
        merged.chunk, merged.chunked, merged.block_size = first.chunk, first.chunked, first.block_size
        merged.storage = first.storage
        merged.lengths = [n for c in caches for n in c.lengths]
        merged._k, merged._v, merged._len, merged._start = [], [], [], []
        for layer in range(len(first.chunked)):
            rows = [c for c in caches if c._k[layer] is not None]
            if len(rows) != len(caches):
                merged._k.append(None)
                merged._v.append(None)
                merged._len.append([])
                merged._start.append([])
                continue
            need = max(max(c._len[layer]) for c in caches)
            k_parts, v_parts = [], []
            for c in caches:
                pad = need - c._k[layer].shape[2]
                k_parts.append(c._k[layer][:, :, :need] if pad <= 0
                               else torch.nn.functional.pad(c._k[layer], (0, 0, 0, pad)))
                v_parts.append(c._v[layer][:, :, :need] if pad <= 0
                               else torch.nn.functional.pad(c._v[layer], (0, 0, 0, pad)))
            merged._k.append(torch.cat(k_parts))
            merged._v.append(torch.cat(v_parts))
            merged._len.append([n for c in caches for n in c._len[layer]])
            merged._start.append([s for c in caches for s in c._start[layer]])
        return merged

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (e.g. finished sequences), keeping the given order."""
        index = torch.tensor(rows, dtype=torch.long)
        self.lengths = [self.lengths[r] for r in rows]
        for layer in range(len(self._k)):
            if self._k[layer] is not None:
                self._k[layer] = self._k[layer].index_select(0, index.to(self._k[layer].device))
                self._v[layer] = self._v[layer].index_select(0, index.to(self._v[layer].device))
                self._len[layer] = [self._len[layer][r] for r in rows]
                self._start[layer] = [self._start[layer][r] for r in rows]

    def copy_rows(self, rows: list[int]) -> KVCache:
        """A new cache holding copies of rows ``rows`` only (this cache is unchanged)."""
        index = torch.tensor(rows, dtype=torch.long)
        out = KVCache.__new__(KVCache)
        out.chunk, out.chunked, out.block_size, out.storage = self.chunk, self.chunked, self.block_size, self.storage
        out.lengths = [self.lengths[r] for r in rows]
        out._k, out._v, out._len, out._start = [], [], [], []
        for layer in range(len(self._k)):
            if self._k[layer] is None:
                out._k.append(None)
                out._v.append(None)
                out._len.append([])
                out._start.append([])
                continue
            out._k.append(self._k[layer].index_select(0, index.to(self._k[layer].device)))
            out._v.append(self._v[layer].index_select(0, index.to(self._v[layer].device)))
            out._len.append([self._len[layer][r] for r in rows])
            out._start.append([self._start[layer][r] for r in rows])
        return out

    def copy_prefix(self, length: int) -> KVCache:
        """A copy of this one-row cache cut back to its first ``length`` tokens (see :meth:`truncate`)."""
        if self.batch_size != 1:
            raise ValueError(f"copy_prefix takes a one-row cache, this one has {self.batch_size} rows")
        copy = self.copy_rows([0])
        copy.truncate(length)
        return copy

    def release(self) -> None:
        """Nothing to give back: the buffers go with the object (the paged cache's sequences need this)."""

    def earliest_cut(self) -> int:
        """The shortest length :meth:`truncate` can cut back to: chunked layers hold only their current
        chunk, so a cut must not reach before the start of the chunk they hold."""
        cut = 0
        for layer, chunked in enumerate(self.chunked):
            if chunked and self._start[layer]:
                cut = max(cut, max(self._start[layer]))
        return cut

    def truncate(self, length: int) -> None:
        """Forget every token from sequence index ``length`` on (all rows at one length), as if only the
        first ``length`` tokens had been run: a cached conversation reused up to where a new prompt
        departs from it. Buffers keep their capacity; stale entries past the new lengths are never read."""
        current = self.seq_len
        if not 0 <= length <= current:
            raise ValueError(f"can only truncate to 0..{current} tokens, got {length}")
        if length < self.earliest_cut():
            raise ValueError(f"cannot truncate to {length} tokens: chunked layers keep only their current "
                             f"chunk, which starts at {self.earliest_cut()}")
        for layer, chunked in enumerate(self.chunked):
            if not self._len[layer]:
                continue
            start = self._start[layer][0] if chunked else 0
            self._len[layer] = [length - start] * len(self._len[layer])
        self.lengths = [length] * len(self.lengths)

    def nbytes(self, layers: Sequence[int] | None = None) -> int:
        """Bytes of key/value storage currently allocated (of ``layers`` only, when given)."""
        chosen = range(len(self._k)) if layers is None else layers
        return sum(t.nbytes for i in chosen for t in (self._k[i], self._v[i]) if t is not None)
