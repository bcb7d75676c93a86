"""The engine's model calls with context parallelism (``torchrun ... -m llama4 serve --cp C``): every rank of a
context group makes the same calls, and each sequence's prompt is prefilled context-parallel, each rank its slice
(llama4.distributed.context), so that its global layers' keys and values stay split over the group.

What changes for the engine. Each sequence has a :class:`~llama4.distributed.context.ContextParallelCache` of its
own (its prompt prefilled whole, in one call: the cache takes one prefill), keyed by the sequence's place in the
engine's pool, which then holds no blocks; the engine's paged pool still names the sequences (and, under a sharded
run, journals them for the other ranks). So the engine runs each prompt as one piece (``prefill_in_pieces``) and
copies no caches (``copies_caches``: no prefix cache, no shared prefill for the choices of ``n``). A decode step
runs its rows one at a time, each over its own cache. Refused per request (:meth:`check`): images, the prompt's own
logprobs and prompts shorter than the context group (every rank prefills a slice).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from llama4.distributed.context import ContextParallelCache, ContextPlan, prefill
from llama4.inference.requests import GenerationRequest
from llama4.inference.runner import ModelRunner
from llama4.model.paged_cache import PagedKVCache, PagedSequence
from llama4.model.transformer import Llama4Model
from llama4.quant.kv_cache import kv_storage


class ContextParallelRunner(ModelRunner):
    """Model calls over the context group ``group`` of ``plan`` (every rank of it makes the same calls): prompts
    prefilled context-parallel in pieces of at most ``piece`` tokens per rank, the global layers' shards stored as
    ``kv_cache`` says (auto, bf16, int8, fp8)."""

    prefill_in_pieces = False
    copies_caches = False

    def __init__(self, model: Llama4Model, pool: PagedKVCache, batch_invariant: bool, plan: ContextPlan,
                 group: dist.ProcessGroup | None, piece: int | None, kv_cache: str = "auto", block_size: int = 256):
        super().__init__(model, pool, batch_invariant)
        self.plan, self.group, self.piece, self.block_size = plan, group, piece, block_size
        text = model.config.text
        self.storage = kv_storage(text, kv_cache, model.text.embed.weight.dtype)
        # a sequence's cache lives as long as the engine's (or a follower's) sequence does
        self.caches: weakref.WeakKeyDictionary[PagedSequence, ContextParallelCache] = weakref.WeakKeyDictionary()

    def check(self, request: GenerationRequest) -> None:
        cp = self.plan.cp
        if request.pixel_values is not None:
            raise ValueError(f"images are not supported with context parallelism (--cp {cp}) yet")
        if request.prompt_logprobs is not None:
            raise ValueError(f"the prompt's own logprobs are not returned with context parallelism (--cp {cp})")
        if len(request.prompt) < cp:
            raise ValueError(f"a {len(request.prompt)}-token prompt cannot be split over --cp {cp} ranks: each rank "
                             f"of the context group prefills a slice (at least {cp} tokens)")

    def prefill_piece(self, cache: PagedSequence, start: int, ids: list[int] | None, embeds: torch.Tensor | None,
                      every_logit: bool, slot: int = 0) -> torch.Tensor:
        if start != 0 or ids is None or embeds is not None or every_logit or cache in self.caches:
            raise ValueError("a context-parallel prefill runs a whole text prompt into a new sequence, once, and "
                             "returns its last logits")
        shard = ContextParallelCache(self.model.config.text, self.plan, self.group, self.block_size, self.storage)
        logits = prefill(self.model, torch.tensor([ids], device=self.device), shard, self.piece)
        self.caches[cache] = shard
        return logits

    def decode(self, tokens: list[int], caches: list[PagedSequence], slots: list[int] | None = None) -> torch.Tensor:
        missing = [i for i, cache in enumerate(caches) if cache not in self.caches]
        if missing:
            raise ValueError(f"rows {missing} have no context-parallel prefill to continue")
        rows = [self.model(torch.tensor([[token]], device=self.device), cache=self.caches[cache])[:, -1]
                for token, cache in zip(tokens, caches)]
        return torch.cat(rows).float().cpu()
