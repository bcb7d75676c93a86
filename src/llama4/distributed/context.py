"""Context parallelism (CP): one long prompt split over the ranks of a group, for the global (NoPE) layers' KV
cache that grows with the context (docs/DISTRIBUTED.md, "Context parallelism").

Prefill: the prompt's T tokens are cut into ``cp`` contiguous slices (``ContextPlan.slices``); rank r runs only
its slice through every layer, at its global sequence indices (RoPE positions and the NoPE layers' temperature).

- Global layers keep only the slice's keys/values. The queries of a slice see every earlier key: the earlier
  ranks' blocks come down a causal ring (rank r receives the blocks of ranks r-1, r-2, ..., 0 one at a time from
  rank r-1, forwarding each to rank r+1 while attending it), and the partial attentions are merged by their
  log-sum-exps. No rank ever holds more than three foreign blocks of at most a piece's entries.
- In pieces (``prefill(..., piece=P)``): each rank runs its slice layer by layer, each layer over pieces of at most
  P tokens, so that only the residual stream is slice-sized; the ring runs once per piece (round), re-sending the
  earlier slices in blocks of at most P entries (see :func:`_prefill_pass`).
- Chunked layers: a query sees only its own attention chunk. Where a slice starts inside a chunk, the rank
  receives exactly that chunk's earlier part from the rank(s) that hold it; in the same exchange it receives the
  prompt's last, unfinished chunk (which the decode steps attend), so that every rank holds it afterwards.

Decode (and any pass after the prefill): every rank runs the same new tokens, as under tensor parallelism. A
global layer's new keys/values are appended on one rank, ``n mod cp`` for a pass whose first token has sequence
index n (round robin: the shards stay within a token of each other); each rank attends the new queries over its
own shard and the partial outputs with their log-sum-exps are all-gathered and merged in rank order (flash-decoding
style), so every rank computes the same bits. Chunked layers attend their current chunk, which every rank keeps.

Applied from outside the model: :func:`context_parallel` swaps the global layers' attention for
:class:`ContextParallelAttention` (the same projections, the attention over ranks), and
:class:`ContextParallelCache` is the :class:`~llama4.model.cache.Cache` that holds the shards and talks to the other
ranks. It composes with a tensor / expert parallel plan over another group of ranks (:func:`context_mesh`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama4.config import TextConfig
from llama4.distributed.plan import PlanError, split
from llama4.model.cache import CacheView, DecodeSlots, KVStorage, storage_per_layer
from llama4.model.invariance import row_tiled
from llama4.model.transformer import Attention, Llama4Model, PositionTables, check_token_ids


@dataclass(frozen=True)
class ContextPlan:
    """Context-parallel degree ``cp``: a prompt is prefilled in ``cp`` contiguous slices, one per rank of the
    context group, and the global layers' keys/values stay split that way."""

    cp: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.cp, int) or isinstance(self.cp, bool) or self.cp < 1:
            raise PlanError(f"cp must be a positive integer, got {self.cp!r}")

    def slices(self, total: int) -> list[tuple[int, int]]:
        """[start, stop) of each rank's slice of a ``total``-token prompt: contiguous, in rank order, sizes
        differing by at most one (the later ranks take the extra tokens)."""
        if total < self.cp:
            raise PlanError(f"a {total}-token prompt cannot be split over cp={self.cp} ranks: every rank needs at "
                            f"least one token (prefill shorter prompts without context parallelism)")
        return [split(total, self.cp, r) for r in range(self.cp)]


def _group_ranks(plan: ContextPlan, group: dist.ProcessGroup | None) -> tuple[int, list[int]]:
    """(this process's rank in ``group``, the global rank of each group rank), after checking the group."""
    if not dist.is_available() or not dist.is_initialized():
        raise PlanError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    world = dist.get_world_size(group)
    if world != plan.cp:
        raise PlanError(f"plan cp={plan.cp} needs a group of {plan.cp} ranks, the group has {world}")
    if group is None:
        return dist.get_rank(), list(range(world))
    return dist.get_rank(group), [dist.get_global_rank(group, r) for r in range(world)]


def context_mesh(inner: int, cp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Groups for context parallelism combined with a tensor / expert parallel plan of ``inner`` ranks.

    The ``inner * cp`` ranks of the default group form a grid: global rank ``c * inner + i`` is rank i of the
    inner (tp / ep) group number c and rank c of the context group number i. Returns this process's (inner group,
    context group); every rank must call it (each group is created by all ranks, in the same order).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise PlanError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    world = dist.get_world_size()
    if inner < 1 or cp < 1 or inner * cp != world:
        raise PlanError(f"inner={inner} x cp={cp} ranks do not match the {world} ranks of the default group")
    rank = dist.get_rank()
    mine = {}
    for c in range(cp):
        ranks = [c * inner + i for i in range(inner)]
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["inner"] = group
    for i in range(inner):
        ranks = [c * inner + i for c in range(cp)]
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["context"] = group
    return mine["inner"], mine["context"]


# ----------------------------------------------------------------------------------------------------
# Attention pieces with their log-sum-exps, merged exactly: softmax over the union of two key sets is the
# weighted mean of the two partial outputs, weights exp(lse_part - lse_total).
# ----------------------------------------------------------------------------------------------------


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Tq, d] over k/v [B, Hkv, S, d] (query head h reads KV head h // (H / Hkv)) -> the output
    [B, H, Tq, d] float32 and its log-sum-exp [B, H, Tq] float32. ``causal``: Tq == S and both cover the same
    sequence indices (query i sees keys 0..i); otherwise every query sees every key. No keys: output 0, lse -inf.
    """
    b, h, tq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if s == 0:
        return q.new_zeros(b, h, tq, d, dtype=torch.float32), q.new_full((b, h, tq), float("-inf"),
                                                                         dtype=torch.float32)
    groups = h // hkv
    if causal:
        if tq != s:
            raise ValueError(f"causal attention here needs as many queries as keys, got {tq} and {s}")
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    else:  # every key visible: the GQA group folds into the query axis, the keys are not repeated
        q = q.reshape(b, hkv, groups * tq, d)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    else:
        scores = (q.float() @ k.float().transpose(-1, -2)) * d ** -0.5
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.exp(scores - lse[..., None]) @ v.float()
    return out.float().reshape(b, h, tq, d), lse.float().reshape(b, h, tq)


def merge_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets from each set's (output [..., d], lse [...]), float32."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([part[1] for part in parts])
    top = lse.max(dim=0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows no part has keys for stay 0
    weights = torch.exp(lse - top)
    total = weights.sum(dim=0)
    out = sum(part[0] * w[..., None] for part, w in zip(parts, weights))
    return out / total.clamp_min(torch.finfo(total.dtype).tiny)[..., None], top + torch.log(total)


class _Entries:
    """One layer's keys and values on this rank: [B, Hkv, capacity, d] buffers, the first ``n`` in use, grown
    geometrically in whole blocks (at most ``limit`` entries when given: a chunked layer's chunk). With a
    ``storage`` (a global layer's quantized KV) the buffers hold the stored entries [B, Hkv, capacity, width],
    encoded as they are appended and decoded, in the attention's dtype, as they are viewed."""

    def __init__(self, block: int, limit: int | None = None, storage: KVStorage | None = None):
        self.block, self.limit, self.storage = block, limit, storage
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n = 0
        self.dtype: torch.dtype | None = None  # the attention's dtype (what view returns)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.dtype = k.dtype
        if self.storage is not None:
            k, v = self.storage.encode(k), self.storage.encode(v)
        need = self.n + k.shape[2]
        if self.k is None or self.k.shape[2] < need or self.k.shape[:2] != k.shape[:2]:
            old = 0 if self.k is None else self.k.shape[2]
            capacity = -(-max(need, old + old // 2) // self.block) * self.block
            if self.limit is not None:
                capacity = min(capacity, max(self.limit, need))
            grown_k = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
            grown_v = torch.zeros_like(grown_k)
            if self.n:
                grown_k[:, :, :self.n] = self.k[:, :, :self.n]
                grown_v[:, :, :self.n] = self.v[:, :, :self.n]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, self.n:need] = k
        self.v[:, :, self.n:need] = v
        self.n = need

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            raise ValueError("no entries stored yet")
        k, v = self.k[:, :, :self.n], self.v[:, :, :self.n]
        if self.storage is None:
            return k, v
        return self.storage.decode(k, self.dtype), self.storage.decode(v, self.dtype)

    def keep_rows(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, index.to(self.k.device))
            self.v = self.v.index_select(0, index.to(self.v.device))


def _take(segments: list[tuple[int, torch.Tensor]], start: int, stop: int) -> torch.Tensor:
    """Entries [start, stop) out of (first sequence index, kv [2, B, Hkv, n, d]) segments that cover them."""
    parts, at = [], start
    for first, kv in sorted(segments, key=lambda seg: seg[0]):
        last = first + kv.shape[3]
        if last <= at or first >= stop:
            continue
        if first > at:
            break
        parts.append(kv[:, :, :, at - first:min(stop, last) - first])
        at = min(stop, last)
    if at != stop:
        raise AssertionError(f"entries [{start}, {stop}) are not all held (up to {at})")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)


class ContextParallelCache:
    """The KV cache of one context-parallel generation on this rank (the model's Cache protocol).

    Rows of a batch are at one length (a prefill of [B, T]). Until :func:`prefill` it is empty; during the prefill
    pass it knows every rank's slice; after it, every pass (a decode step, or several tokens at once) runs on
    every rank with the same tokens. Global layers hold this rank's shard: its prefill slice plus the later passes
    it owns (first sequence index n of a pass: rank ``n mod cp``). Chunked layers hold the current chunk, the same
    on every rank. ``storage`` (one per layer, as KVCache takes it: llama4.quant.kv_storage) keeps the global layers'
    shards encoded (int8 / fp8 per token and head), attended over their decoded values as a single process's
    cache attends them (the ring carries decoded entries); chunked layers keep the model's dtype.
    """

    def __init__(self, config: TextConfig, plan: ContextPlan, group: dist.ProcessGroup | None = None,
                 block_size: int = 256, storage: Sequence[KVStorage | None] | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        storage = storage_per_layer(storage, len(config.layers))
        chunked_stored = [i for i, spec in enumerate(config.layers) if spec.chunked and storage[i] is not None]
        if chunked_stored:
            raise ValueError(f"layers {chunked_stored} are chunk-local: a context-parallel cache stores only the "
                             f"global layers otherwise (their chunk is small and the same on every rank)")
        self.storage = storage
        self.plan, self.group = plan, group
        self.rank, self._global = _group_ranks(plan, group)
        self.chunk = config.attention_chunk_size
        self.chunked = tuple(spec.chunked for spec in config.layers)
        self.lengths: list[int] = []  # per row: sequence index of its next token, once prefilled
        self.bounds: list[tuple[int, int]] | None = None  # every rank's prefill slice, during the prefill pass
        self.total = 0  # the prompt's length, during the prefill pass
        self._batch = 0  # the prompt's rows, during the prefill pass
        self.pieces: list[tuple[int, int]] = []  # this rank's prefill pieces [a, b), during the prefill pass
        self.rounds = 0  # ring rounds per global layer: the most pieces any rank has
        self.message = 0  # the most entries one ring message carries (the piece size)
        self._piece: tuple[int, int] | None = None  # the piece the model runs now
        self._kept: list[list[tuple[int, torch.Tensor]]] = [[] for _ in self.chunked]  # chunked: what others want
        self._segments: list[list[tuple[int, torch.Tensor]]] = [[] for _ in self.chunked]  # chunked: own chunk
        self._tail: list[list[tuple[int, torch.Tensor]]] = [[] for _ in self.chunked]  # chunked: last chunk's rest
        self._entries = [_Entries(block_size, self.chunk if chunked else None, stored)
                         for chunked, stored in zip(self.chunked, storage)]
        self._chunk_start = [0] * len(self.chunked)  # chunked layers: sequence index of entry 0

    # -- state ------------------------------------------------------------------------------------------

    @property
    def world(self) -> int:
        return self.plan.cp

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def seq_len(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def begin_prefill(self, batch: int, total: int, piece: int | None = None) -> tuple[int, int]:
        """Start the prefill pass of a [batch, total] prompt, each rank's slice in pieces of at most ``piece``
        tokens (None: the whole slice at once); returns this rank's slice [start, stop)."""
        if self.lengths or self.bounds is not None:
            raise ValueError("a context-parallel cache takes one prefill, first: this one is already in use "
                             "(continue it with decode passes, or start a new cache)")
        if batch < 1:
            raise ValueError(f"a prefill needs at least one row, got {batch}")
        if piece is not None and (isinstance(piece, bool) or not isinstance(piece, int) or piece < 1):
            raise ValueError(f"the prefill piece must be a positive number of tokens, got {piece!r}")
        bounds = self.plan.slices(total)
        size = piece or max(stop - start for start, stop in bounds)
        self.bounds, self.total, self._batch, self.message = bounds, total, batch, size
        start, stop = bounds[self.rank]
        self.pieces = [(a, min(a + size, stop)) for a in range(start, stop, size)]
        self.rounds = max(-(-(b - a) // size) for a, b in bounds)
        return start, stop

    def clear(self) -> None:
        """Forget everything: an empty cache again."""
        self.lengths, self.bounds, self.total, self._batch = [], None, 0, 0
        self.pieces, self.rounds, self._piece = [], 0, None
        for entries in self._entries:
            entries.n = 0
        for parts in (self._kept, self._segments, self._tail):
            for layer in parts:
                layer.clear()

    def held(self, layer: int) -> int:
        """How many entries (per row) this rank holds for ``layer``."""
        return self._entries[layer].n

    def starts(self, batch: int) -> list[int]:
        if self.bounds is not None:
            if batch != self._batch:
                raise ValueError(f"the prefill started with {self._batch} rows but the input has {batch}")
            return [(self._piece or self.bounds[self.rank])[0]] * batch
        if not self.lengths:
            raise ValueError("a context-parallel cache starts with a prefill over every rank "
                             "(llama4.distributed.context.prefill); this one is empty")
        if batch != len(self.lengths):
            raise ValueError(f"the cache holds {len(self.lengths)} rows but the input has {batch}")
        return list(self.lengths)

    def advance(self, num_tokens: int) -> None:
        if self.bounds is not None:
            start, stop = self.bounds[self.rank]
            if num_tokens != stop - start:
                raise ValueError(f"the prefill pass on rank {self.rank} ran {num_tokens} tokens, its slice has "
                                 f"{stop - start}")
            self._finish_prefill()
            return
        self.lengths = [n + num_tokens for n in self.lengths]

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished sequences), keeping the given order (every rank alike)."""
        index = torch.tensor(rows, dtype=torch.long)
        self.lengths = [self.lengths[r] for r in rows]
        for entries in self._entries:
            entries.keep_rows(index)

    # -- the Cache protocol's storage questions ------------------------------------------------------------

    def stored_dtype(self, layer: int, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.storage[layer] is None else self.storage[layer].dtype

    def layer_storage(self, layer: int) -> KVStorage | None:
        return self.storage[layer]

    def decode_slots(self, layer: int, rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device, tokens: int = 1, offset: int = 0) -> DecodeSlots:
        raise PlanError("a context-parallel cache splits the global layers over ranks: no pass may write its "
                        "storage itself (context_parallel refuses models packed with a fused decode step)")

    # -- chunked layers: the model's own attention over the view handed back ------------------------------

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, bucketed: bool = False) -> CacheView:
        """A chunked layer's new k/v [B, Hkv, T, d]: the keys their queries see, from their chunk's start."""
        if not self.chunked[layer]:
            raise PlanError(f"layer {layer} is a global layer: its attention must run over the ranks "
                            f"(apply llama4.distributed.context.context_parallel to the model first)")
        if self.bounds is not None:
            return self._prefill_chunked(layer, k, v)
        return self._continue_chunked(layer, k, v)

    def _wants(self) -> list[list[tuple[int, int]]]:
        """What each rank q needs of the other ranks' entries in a chunked layer: the part of its first query's
        chunk before its slice, and the part of the prompt's last chunk [floor(T / C) * C, T) past its slice (what
        decode steps attend)."""
        chunk, total = self.chunk, self.total
        tail = total // chunk * chunk
        wants = []
        for start, stop in self.bounds:
            ranges = [(start // chunk * chunk, start), (max(tail, stop), total)]
            wants.append([(a, b) for a, b in ranges if a < b])
        return wants

    def _asked_of_me(self) -> list[tuple[int, int]]:
        """The union of what the other ranks need of this rank's slice in a chunked layer (at most two chunks'
        worth: the chunk around the slice's end, and the prompt's last chunk)."""
        wants, mine = self._wants(), self.bounds[self.rank]
        ranges = sorted(r for q, ranges in enumerate(wants) if q != self.rank for r in _overlaps(ranges, mine))
        merged: list[tuple[int, int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def staged_pieces(self, layer: int) -> list[tuple[int, int]]:
        """The pieces whose keys/values must be computed before ``layer`` runs its pieces (:meth:`stage`): the other
        ranks need them during this layer's first (chunked) or every (global) round. None with one piece a rank:
        it stores them as it runs."""
        if len(self.pieces) < 2:
            return []
        if not self.chunked[layer]:
            return list(self.pieces)
        asked = self._asked_of_me()
        return [piece for piece in self.pieces if _overlaps(asked, piece)]

    def set_piece(self, piece: tuple[int, int] | None) -> None:
        """The piece [a, b) of this rank's slice the model runs next (prefill pass only)."""
        if piece is not None and self.bounds is None:
            raise ValueError("set_piece: no prefill pass is running")
        self._piece = piece

    def stage(self, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values [B, Hkv, n, d] of this rank's entries [first, first + n) at ``layer``, computed before the
        layer's pieces run: a global layer stores them in its shard (the ring sends the whole slice in every
        round); a chunked layer keeps only the parts other ranks asked for (:meth:`_asked_of_me`)."""
        if not self.chunked[layer]:
            entries = self._entries[layer]
            if entries.n != first - self.bounds[self.rank][0]:
                raise AssertionError(f"layer {layer}: staged entries out of order at {first}")
            entries.append(k, v)
            return
        kv = torch.stack((k, v))
        for a, b in _overlaps(self._asked_of_me(), (first, first + k.shape[2])):
            self._kept[layer].append((a, kv[:, :, :, a - first:b - first].clone()))

    def _prefill_chunked(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """A piece [a, b) of the slice [s, e): the keys from its first query's chunk start. At the layer's first
        piece, one exchange: receive the part of that chunk before the slice and the part of the prompt's last
        chunk past it, and send the other ranks what they need of this slice (one message per pair). Later pieces
        find their chunk's earlier part in what this rank kept of its previous pieces (less than a chunk)."""
        chunk, (start, stop) = self.chunk, self.bounds[self.rank]
        a, b = self._piece or (start, stop)
        kv = torch.stack((k, v))  # [2, B, Hkv, n, d]: keys and values in one message
        segments = self._segments[layer]
        if a == start:
            source = self._kept[layer] if len(self.pieces) > 1 else [(a, kv)]
            received = self._exchange(lambda lo, hi: _take(source, lo, hi), kv, self._wants())
            self._kept[layer] = []
            segments[:] = [(first, part) for first, part in received if first < start]
            self._tail[layer] = [(first, part) for first, part in received if first >= stop]
        segments.append((a, kv))
        first = a // chunk * chunk
        seen = _take(segments, first, b)
        keep = b // chunk * chunk  # the next piece's chunk starts here: keep [keep, b), less than a chunk
        segments[:] = [(keep, _take(segments, keep, b))] if keep < b else []
        return CacheView(seen[0], seen[1], first, None)

    def _finish_prefill(self) -> None:
        """After the prefill pass: every chunked layer holds the prompt's last, unfinished chunk (its own part and
        what it received), and the cache continues with ordinary passes."""
        chunk, total = self.chunk, self.total
        tail = total // chunk * chunk
        for layer, chunked in enumerate(self.chunked):
            if not chunked:
                continue
            entries = self._entries[layer]
            entries.n, self._chunk_start[layer] = 0, tail
            if tail < total:
                kept = _take(self._segments[layer] + self._tail[layer], tail, total)
                entries.append(kept[0], kept[1])
            self._segments[layer], self._tail[layer], self._kept[layer] = [], [], []
        self.lengths, self.bounds = [self.total] * self._batch, None
        self.pieces, self.rounds, self._piece = [], 0, None

    def _exchange(self, fetch, template: torch.Tensor, wants: list[list[tuple[int, int]]]
                  ) -> list[tuple[int, torch.Tensor]]:
        """Point to point: every rank q asks for the entries ``wants[q]`` (sequence index ranges outside its own
        slice); each rank sends what it holds of them (``fetch(a, b)``: its entries [a, b) as [2, B, Hkv, b - a,
        d]) and receives its own. Returns (first index, kv piece)."""
        me, bounds = self.rank, self.bounds
        mine = bounds[me]
        requests, incoming = [], []
        for q in range(self.world):
            if q == me:
                continue
            pieces = _overlaps(wants[q], mine)
            if pieces:
                payload = torch.cat([fetch(a, b) for a, b in pieces], dim=3).contiguous()
                requests.append(dist.isend(payload, self._global[q], group=self.group))
        for q in range(self.world):
            if q == me:
                continue
            pieces = _overlaps(wants[me], bounds[q])
            if pieces:
                count = sum(b - a for a, b in pieces)
                buffer = template.new_empty(*template.shape[:3], count, template.shape[4])
                requests.append(dist.irecv(buffer, self._global[q], group=self.group))
                incoming.append((pieces, buffer))
        for request in requests:
            request.wait()
        out = []
        for pieces, buffer in incoming:
            at = 0
            for a, b in pieces:
                out.append((a, buffer[:, :, :, at:at + b - a]))
                at += b - a
        return out

    def _continue_chunked(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """After the prefill: every rank appends to its copy of the current chunk (as KVCache does)."""
        seq, chunk, entries = self.lengths[0], self.chunk, self._entries[layer]
        first = seq // chunk * chunk
        if self._chunk_start[layer] != first:  # the chunk held ended: this pass starts a new one
            entries.n, self._chunk_start[layer] = 0, first
        end = seq + k.shape[2]
        if end <= first + chunk:
            entries.append(k, v)
            keys, values = entries.view()
            return CacheView(keys, values, first, None)
        if entries.n:
            held_k, held_v = entries.view()
            k_all, v_all = torch.cat((held_k, k), dim=2), torch.cat((held_v, v), dim=2)
        else:
            k_all, v_all = k, v
        new_first = end // chunk * chunk
        keep = end - new_first
        entries.n, self._chunk_start[layer] = 0, new_first
        if keep:
            entries.append(k_all[:, :, k_all.shape[2] - keep:], v_all[:, :, v_all.shape[2] - keep:])
        return CacheView(k_all, v_all, first, None)

    # -- global layers: attention over every rank's shard --------------------------------------------------

    def attend_global(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A global layer's attention for the pass's queries q [B, H, T, d] and new k/v [B, Hkv, T, d] (already
        rotated / scaled as the layer does): stores the new entries where they belong and returns [B, H, T, d]."""
        if self.chunked[layer]:
            raise PlanError(f"layer {layer} is chunked: it attends through Cache.update")
        if self.bounds is not None:
            out, _ = self._ring_attention(layer, q, k, v)
        else:
            out = self._sharded_attention(layer, q, k, v)
        return out.to(q.dtype)

    def _ring_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefill piece [a, b) of the slice [s, e): its queries over this rank's entries [s, a) (earlier
        pieces, staged before the layer ran), its own keys (causal) and, in this round of the ring, every earlier
        rank's whole slice (:meth:`_ring_round`)."""
        start, stop = self.bounds[self.rank]
        a, b = self._piece or (start, stop)
        entries = self._entries[layer]
        if entries.n < b - start:  # not staged (one piece on this rank): store the piece's entries now
            entries.append(k, v)
        keys, values = entries.view()
        parts = [attention_lse(q, keys[:, :, a - start:b - start], values[:, :, a - start:b - start], causal=True)]
        if a > start:
            parts.insert(0, attention_lse(q, keys[:, :, :a - start], values[:, :, :a - start], causal=False))
        return self._ring_round(layer, q, merge_partials(parts))

    def ring_idle(self, layer: int) -> None:
        """A round of ``layer``'s ring in which this rank has no piece left (its slice has fewer pieces than
        another's): it still sends its slice on and forwards the earlier ranks' blocks."""
        if self.bounds is None or self.chunked[layer]:
            raise PlanError(f"ring_idle: layer {layer} is not a global layer in a prefill pass")
        self._ring_round(layer, None, None)

    def _ring_round(self, layer: int, q: torch.Tensor | None, result):
        """One round of the causal ring for ``layer``: rank r receives, from rank r - 1, the slices of ranks r - 1,
        r - 2, ..., 0 in blocks of at most ``message`` entries (the piece size), attends each block with ``q`` (None:
        no piece this round) merging into ``result``, and forwards it to rank r + 1 after sending its own slice's
        blocks first. At most three foreign blocks are held at once: the one attended (and being forwarded), the
        one arriving, and the previous one until its send completes."""
        me, bounds, size = self.rank, self.bounds, self.message
        start, stop = bounds[me]
        last = me + 1 == self.world
        keys, values = self._entries[layer].view()
        incoming = [(a, min(a + size, e)) for s, e in (bounds[r] for r in range(me - 1, -1, -1))
                    for a in range(s, e, size)]

        def receive(i: int):
            a, b = incoming[i]
            buffer = keys.new_empty(2, *keys.shape[:2], b - a, keys.shape[3])
            return buffer, dist.irecv(buffer, self._global[me - 1], group=self.group)

        pending = receive(0) if incoming else None
        sending = None  # (request, message): one send in flight at a time

        def send(message: torch.Tensor):
            nonlocal sending
            if sending is not None:
                sending[0].wait()
            sending = dist.isend(message, self._global[me + 1], group=self.group), message

        if not last:
            for a in range(start, stop, size):
                b = min(a + size, stop)
                send(torch.stack((keys[:, :, a - start:b - start], values[:, :, a - start:b - start])))
        for i in range(len(incoming)):
            block, request = pending
            request.wait()
            pending = receive(i + 1) if i + 1 < len(incoming) else None
            if not last:
                send(block)
            if q is not None:
                result = merge_partials([result, attention_lse(q, block[0], block[1], causal=False)])
        if sending is not None:
            sending[0].wait()
        return result

    def _sharded_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """After the prefill: the new entries go to rank ``n mod cp``; every rank attends the queries over its
        shard and one all-gather of (output, lse) lets every rank merge the same parts in rank order."""
        entries, t = self._entries[layer], q.shape[2]
        owner = self.lengths[0] % self.world
        if self.rank == owner:
            entries.append(k, v)
        keys, values = entries.view()
        old = keys.shape[2] - (t if self.rank == owner else 0)  # entries every query sees
        if self.rank == owner and t > 1:  # the pass's own keys: causal among its queries
            part = merge_partials([attention_lse(q, keys[:, :, :old], values[:, :, :old], causal=False),
                                   attention_lse(q, keys[:, :, old:], values[:, :, old:], causal=True)])
        else:
            part = attention_lse(q, keys, values, causal=False)
        packed = torch.cat((part[0], part[1][..., None]), dim=-1).contiguous()  # [B, H, T, d + 1] float32
        gathered = [torch.empty_like(packed) for _ in range(self.world)]
        dist.all_gather(gathered, packed, group=self.group)
        out, _ = merge_partials([(g[..., :-1], g[..., -1]) for g in gathered])
        return out


def _overlaps(ranges: list[tuple[int, int]], held: tuple[int, int]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` inside ``held`` = [start, stop), in order."""
    out = []
    for a, b in ranges:
        lo, hi = max(a, held[0]), min(b, held[1])
        if lo < hi:
            out.append((lo, hi))
    return out


class ContextParallelAttention(Attention):
    """A global layer's attention under context parallelism: the layer's own projections (the very modules it
    had: plain, quantized, LoRA or tensor-parallel), RoPE / QK-norm / temperature as the layer applies them, and
    the attention itself over every rank's shard through the :class:`ContextParallelCache`. The heads come from
    the layer's own :meth:`Attention.heads`; only the attention over the cache differs.
    """

    def __init__(self, attn: Attention, config: TextConfig):
        with torch.device("meta"):  # the projections are the layer's own, taken over below
            super().__init__(config, attn.spec)
        self.qkv, self.wo = attn.qkv, attn.wo
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.batch_invariant = attn.batch_invariant

    def forward(self, x: torch.Tensor, tables: PositionTables, cache: ContextParallelCache | None) -> torch.Tensor:
        if not isinstance(cache, ContextParallelCache):
            raise PlanError("a context-parallel model runs with a ContextParallelCache (its global layers' keys "
                            f"are split over ranks), got {type(cache).__name__}; see "
                            "llama4.distributed.context.prefill / prefill_logits / generate")
        b, t, _ = x.shape
        q, k, v = self.heads(x, tables)
        out = cache.attend_global(self.spec.index, q, k, v)
        invariant = self.batch_invariant and x.is_cpu
        return row_tiled(self.wo, out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), invariant)


def context_parallel(model: Llama4Model) -> Llama4Model:
    """Swap the global layers' attention for :class:`ContextParallelAttention` (in place; returns the model).

    Apply it after any tensor / expert parallel sharding (``shard_model`` / ``load_sharded`` over the inner group
    of :func:`context_mesh`). The model then runs with a :class:`ContextParallelCache` only.
    """
    if not isinstance(model, Llama4Model):
        raise TypeError(f"context_parallel takes a Llama4Model, got {type(model).__name__}")
    if model.text.fast_decode is not None:
        raise PlanError("the model is packed with a fused decode step (CPU kernels), which would bypass the "
                        "context-parallel attention: load it with pack=False")
    config = model.config.text
    for layer in model.text.layers:
        attn = layer.attn
        if isinstance(attn, ContextParallelAttention):
            raise PlanError("context_parallel was already applied to this model")
        if not attn.spec.chunked:
            layer.attn = ContextParallelAttention(attn, config)
    return model


# ----------------------------------------------------------------------------------------------------
# Running a context-parallel model: every rank of the context group calls these with the same arguments.
# ----------------------------------------------------------------------------------------------------


def _prefill_pass(model: Llama4Model, ids: torch.Tensor, cache: ContextParallelCache,
                  num_logits: int | None, piece: int | None) -> torch.Tensor:
    """This rank's slice through the model in pieces, layer by layer: the slice's hidden states (the residual
    stream, [B, slice, D] in the model's dtype) are the one slice-sized activation; everything else is a piece's.

    Layer by layer and not piece by piece through the whole model, because a piece's global attention needs every
    earlier rank's whole slice at the same layer: run piece by piece, rank r could not start a global layer before
    rank r - 1 had finished its slice, and the ranks would take turns. Before a layer's pieces run, the entries the
    other ranks need of this slice at that layer are computed (:meth:`ContextParallelCache.staged_pieces`: every
    piece of a global layer, the pieces holding what other ranks ask of a chunked one); then round j of the layer
    runs piece j on every rank (a rank without a piece j still takes part in the ring).
    """
    if not isinstance(cache, ContextParallelCache):
        raise TypeError(f"a context-parallel prefill needs a ContextParallelCache, got {type(cache).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(ids.shape)}")
    check_token_ids(ids, model.config.text.vocab_size)
    start, stop = cache.begin_prefill(ids.shape[0], ids.shape[1], piece)
    text = model.text
    try:
        h = model.embed(ids[:, start:stop])  # this rank's slice only: the residual stream, kept between layers

        def at(a: int, b: int) -> tuple[torch.Tensor, PositionTables]:
            cache.set_piece((a, b))
            x = h[:, a - start:b - start]
            return x, text.position_tables(x, torch.arange(a, b, device=ids.device)[None], cache)

        for layer in text.layers:
            index = layer.attn.spec.index
            for a, b in cache.staged_pieces(index):
                x, tables = at(a, b)
                _, k, v = layer.attn.heads(layer.attn_norm(x), tables)
                cache.stage(index, a, k, v)
            for j in range(cache.rounds):
                if j < len(cache.pieces):
                    a, b = cache.pieces[j]
                    x, tables = at(a, b)
                    h[:, a - start:b - start] = layer(x, tables, cache)
                elif not layer.attn.spec.chunked:
                    cache.ring_idle(index)
        cache.set_piece(None)
        cache.advance(stop - start)
        if num_logits is not None:
            h = h[:, h.shape[1] - num_logits:]
        head = (lambda rows: F.linear(rows, text.embed.weight)) if text.output is None else text.output
        return row_tiled(head, text.norm(h), text.batch_invariant).float()
    except BaseException:
        cache.clear()  # a failed pass leaves no half-prefilled state behind
        raise


def prefill_logits(model: Llama4Model, ids: torch.Tensor, cache: ContextParallelCache,
                   piece: int | None = None) -> torch.Tensor:
    """Prefill ``ids`` [B, T] (the whole prompt, on every rank; each rank's slice in pieces of at most ``piece``
    tokens, None: at once) and return this rank's slice of the logits, [B, stop - start, vocab] for its slice
    [start, stop) (``ContextPlan.slices``): concatenated in rank order they are the prompt's logits (e.g. for prompt
    log-probabilities)."""
    return _prefill_pass(model, ids, cache, None, piece)


def prefill(model: Llama4Model, ids: torch.Tensor, cache: ContextParallelCache,
            piece: int | None = None) -> torch.Tensor:
    """Prefill ``ids`` [B, T] (the whole prompt, on every rank; each rank's slice in pieces of at most ``piece``
    tokens, None: at once): the last position's logits [B, vocab], the same on every rank (the last rank holds
    them; one broadcast)."""
    logits = _prefill_pass(model, ids, cache, 1, piece)[:, -1].contiguous()
    dist.broadcast(logits, cache._global[cache.world - 1], group=cache.group)
    return logits


def generate(model: Llama4Model, prompts: torch.Tensor | Sequence[Sequence[int]], plan: ContextPlan,
             max_new_tokens: int, stop_tokens: Sequence[int] | None = None, group: dist.ProcessGroup | None = None,
             block_size: int = 256, piece: int | None = None, kv_cache: str = "auto") -> list[list[int]]:
    """Greedy generation with a context-parallel prefill (each rank's slice in pieces of at most ``piece``
    tokens); prompts [B, T] (one length); the global layers' shards stored as ``kv_cache`` says (as
    llama4.generate's). Returns prompt + new tokens per row (the stop token kept, as llama4.generate does);
    every rank returns the same lists."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.text.embed.weight.device
    ids = prompts if isinstance(prompts, torch.Tensor) else torch.tensor([list(p) for p in prompts])
    if ids.dim() != 2 or not ids.shape[0]:
        raise ValueError(f"prompts must be [batch, tokens] (rows of one length), got shape {tuple(ids.shape)}")
    ids = ids.to(device)
    outputs = ids.tolist()
    if max_new_tokens == 0:
        return outputs
    stops = set(model.config.text.eos_token_ids if stop_tokens is None else stop_tokens)
    from llama4.quant.kv_cache import kv_storage

    storage = kv_storage(model.config.text, kv_cache, model.text.embed.weight.dtype)
    cache = ContextParallelCache(model.config.text, plan, group, block_size, storage)
    live = list(range(len(outputs)))
    with torch.inference_mode():
        logits = prefill(model, ids, cache, piece)
        for step in range(max_new_tokens):
            tokens = logits.float().argmax(-1).tolist()
            keep = []
            for i, row in enumerate(live):
                outputs[row].append(tokens[i])
                if tokens[i] not in stops and step < max_new_tokens - 1:
                    keep.append(i)
            if not keep:
                break
            if len(keep) != len(live):
                cache.keep_rows(keep)
                live = [live[i] for i in keep]
            feed = torch.tensor([tokens[i] for i in keep], device=device)[:, None]
            logits = model(feed, cache=cache)[:, -1]
    return outputs


__all__ = ["ContextParallelAttention", "ContextParallelCache", "ContextPlan", "attention_lse", "context_mesh",
           "context_parallel", "generate", "merge_partials", "prefill", "prefill_logits"]
