"""Context parallelism (CP): one long prompt split over the ranks of a group, for the global (NoPE) layers' KV
cache that grows with the context (docs/DISTRIBUTED.md, "Context parallelism").

Prefill: the prompt's T tokens are cut into ``cp`` contiguous slices (``ContextPlan.slices``); rank r runs only
its slice through every layer, at its global sequence indices (RoPE positions and the NoPE layers' temperature).

- Global layers keep only the slice's keys/values. The queries of a slice see every earlier key: the earlier
  ranks' blocks come down a causal ring (rank r receives the blocks of ranks r-1, r-2, ..., 0 one at a time from
  rank r-1, forwarding each to rank r+1 while attending it), and the partial attentions are merged by their
  log-sum-exps. No rank ever holds more than two foreign blocks.
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

from llama4.config import TextConfig
from llama4.distributed.plan import PlanError, split
from llama4.model.cache import CacheView, DecodeSlots, KVStorage
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
    geometrically in whole blocks (at most ``limit`` entries when given: a chunked layer's chunk)."""

    def __init__(self, block: int, limit: int | None = None):
        self.block, self.limit = block, limit
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
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
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

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
    on every rank. Entries are kept in the model's dtype (a quantized KV storage is not supported here).
    """

    def __init__(self, config: TextConfig, plan: ContextPlan, group: dist.ProcessGroup | None = None,
                 block_size: int = 256):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.plan, self.group = plan, group
        self.rank, self._global = _group_ranks(plan, group)
        self.chunk = config.attention_chunk_size
        self.chunked = tuple(spec.chunked for spec in config.layers)
        self.lengths: list[int] = []  # per row: sequence index of its next token, once prefilled
        self.bounds: list[tuple[int, int]] | None = None  # every rank's prefill slice, during the prefill pass
        self.total = 0  # the prompt's length, during the prefill pass
        self._batch = 0  # the prompt's rows, during the prefill pass
        self._entries = [_Entries(block_size, self.chunk if chunked else None) for chunked in self.chunked]
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

    def begin_prefill(self, batch: int, total: int) -> tuple[int, int]:
        """Start the prefill pass of a [batch, total] prompt; returns this rank's slice [start, stop)."""
        if self.lengths or self.bounds is not None:
            raise ValueError("a context-parallel cache takes one prefill, first: this one is already in use "
                             "(continue it with decode passes, or start a new cache)")
        if batch < 1:
            raise ValueError(f"a prefill needs at least one row, got {batch}")
        self.bounds, self.total, self._batch = self.plan.slices(total), total, batch
        return self.bounds[self.rank]

    def clear(self) -> None:
        """Forget everything: an empty cache again."""
        self.lengths, self.bounds, self.total, self._batch = [], None, 0, 0
        for entries in self._entries:
            entries.n = 0

    def held(self, layer: int) -> int:
        """How many entries (per row) this rank holds for ``layer``."""
        return self._entries[layer].n

    def starts(self, batch: int) -> list[int]:
        if self.bounds is not None:
            if batch != self._batch:
                raise ValueError(f"the prefill started with {self._batch} rows but the input has {batch}")
            return [self.bounds[self.rank][0]] * batch
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
            self.lengths, self.bounds = [self.total] * self._batch, None
            return
        self.lengths = [n + num_tokens for n in self.lengths]

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished sequences), keeping the given order (every rank alike)."""
        index = torch.tensor(rows, dtype=torch.long)
        self.lengths = [self.lengths[r] for r in rows]
        for entries in self._entries:
            entries.keep_rows(index)

    # -- the Cache protocol's storage questions: entries stay in the model's dtype -----------------------

    def stored_dtype(self, layer: int, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def layer_storage(self, layer: int) -> KVStorage | None:
        return None

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

    def _prefill_chunked(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """Receive the part of the first query's chunk that precedes this slice, and the prompt's last chunk
        where it lies past this slice; send the other ranks what they need of this slice (one message per pair)."""
        chunk, total, bounds = self.chunk, self.total, self.bounds
        tail = total // chunk * chunk  # the prompt's last chunk [tail, total): what decode steps attend
        wants = []
        for start, stop in bounds:
            ranges = [(start // chunk * chunk, start), (max(tail, stop), total)]
            wants.append([(a, b) for a, b in ranges if a < b])
        start, stop = bounds[self.rank]
        kv = torch.stack((k, v))  # [2, B, Hkv, T, d]: keys and values in one message
        segments = [(start, kv)] + self._exchange(kv, wants)
        first = start // chunk * chunk
        seen = _take(segments, first, stop)
        entries = self._entries[layer]
        entries.n, self._chunk_start[layer] = 0, tail
        if tail < total:
            kept = _take(segments, tail, total)
            entries.append(kept[0], kept[1])
        return CacheView(seen[0], seen[1], first, None)

    def _exchange(self, kv: torch.Tensor, wants: list[list[tuple[int, int]]]) -> list[tuple[int, torch.Tensor]]:
        """Point to point: every rank q asks for the entries ``wants[q]`` (sequence index ranges outside its own
        slice); each rank sends what it holds of them and receives its own. Returns (first index, kv piece)."""
        me, bounds = self.rank, self.bounds
        mine = bounds[me]
        requests, incoming = [], []
        for q in range(self.world):
            if q == me:
                continue
            pieces = _overlaps(wants[q], mine)
            if pieces:
                payload = torch.cat([kv[:, :, :, a - mine[0]:b - mine[0]] for a, b in pieces], dim=3).contiguous()
                requests.append(dist.isend(payload, self._global[q], group=self.group))
        for q in range(self.world):
            if q == me:
                continue
            pieces = _overlaps(wants[me], bounds[q])
            if pieces:
                count = sum(b - a for a, b in pieces)
                buffer = kv.new_empty(*kv.shape[:3], count, kv.shape[4])
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
        """The prefill pass: the slice's queries over its own keys (causal) and every earlier rank's block.

        Causal ring: step i (0..r) attends the block of rank r - i (its own at i = 0) while sending it on to
        rank r + 1 and receiving the next one (rank r - i - 1's) from rank r - 1. Rank r receives exactly the r
        blocks before its slice and holds at most two foreign blocks at a time.
        """
        entries = self._entries[layer]
        if entries.n:
            raise AssertionError(f"layer {layer} already holds entries at prefill")
        entries.append(k, v)
        me, bounds = self.rank, self.bounds
        current = torch.stack((k, v))  # [2, B, Hkv, T, d]: keys and values in one message
        result = None
        for i in range(me + 1):
            requests = []
            if me + 1 < self.world:
                requests.append(dist.isend(current.contiguous(), self._global[me + 1], group=self.group))
            incoming = None
            if i < me:
                start, stop = bounds[me - i - 1]
                incoming = current.new_empty(*current.shape[:3], stop - start, current.shape[4])
                requests.append(dist.irecv(incoming, self._global[me - 1], group=self.group))
            part = attention_lse(q, current[0], current[1], causal=i == 0)
            result = part if result is None else merge_partials([result, part])
            for request in requests:
                request.wait()
            if incoming is not None:
                current = incoming
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
                  num_logits: int | None) -> torch.Tensor:
    if not isinstance(cache, ContextParallelCache):
        raise TypeError(f"a context-parallel prefill needs a ContextParallelCache, got {type(cache).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(ids.shape)}")
    check_token_ids(ids, model.config.text.vocab_size)
    start, stop = cache.begin_prefill(ids.shape[0], ids.shape[1])
    try:
        h = model.embed(ids[:, start:stop])  # this rank's slice only: activations follow the slice
        positions = torch.arange(start, stop, device=ids.device)[None]
        return model.text(h, positions, cache, num_logits)
    except BaseException:
        cache.clear()  # a failed pass leaves no half-prefilled state behind
        raise


def prefill_logits(model: Llama4Model, ids: torch.Tensor, cache: ContextParallelCache) -> torch.Tensor:
    """Prefill ``ids`` [B, T] (the whole prompt, on every rank) and return this rank's slice of the logits,
    [B, stop - start, vocab] for its slice [start, stop) (``ContextPlan.slices``): concatenated in rank order they
    are the prompt's logits (e.g. for prompt log-probabilities)."""
    return _prefill_pass(model, ids, cache, None)


def prefill(model: Llama4Model, ids: torch.Tensor, cache: ContextParallelCache) -> torch.Tensor:
    """Prefill ``ids`` [B, T] (the whole prompt, on every rank): the last position's logits [B, vocab], the same on
    every rank (the last rank holds them; one broadcast)."""
    logits = _prefill_pass(model, ids, cache, 1)[:, -1].contiguous()
    dist.broadcast(logits, cache._global[cache.world - 1], group=cache.group)
    return logits


def generate(model: Llama4Model, prompts: torch.Tensor | Sequence[Sequence[int]], plan: ContextPlan,
             max_new_tokens: int, stop_tokens: Sequence[int] | None = None, group: dist.ProcessGroup | None = None,
             block_size: int = 256) -> list[list[int]]:
    """Greedy generation with a context-parallel prefill; prompts [B, T] (one length). Returns prompt + new
    tokens per row (the stop token kept, as llama4.generate does); every rank returns the same lists."""
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
    cache = ContextParallelCache(model.config.text, plan, group, block_size)
    live = list(range(len(outputs)))
    with torch.inference_mode():
        logits = prefill(model, ids, cache)
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
