"""A request's state inside the engine: where the scheduler has it, its cache, and its output so far."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from llama4.inference.requests import Event, GenerationRequest
from llama4.inference.sampling import Sampler
from llama4.inference.text import StopStrings
from llama4.model.paged_cache import PagedSequence
from llama4.prompt import Tokenizer


class SequenceState:
    """One request in the engine (see :class:`~llama4.inference.scheduler.Schedulable` for the scheduler's
    fields, ``llama4.inference.outputs`` for the output's)."""

    def __init__(self, request: GenerationRequest, sink: Callable[[Event], None], sampler: Sampler,
                 tokenizer: Tokenizer, max_new: int):
        self.request, self.sink, self.sampler, self.max_new = request, sink, sampler, max_new
        self.stop_ids = frozenset(tokenizer.eos_ids if request.stop_tokens is None else request.stop_tokens)
        self.decoder = tokenizer.stream_decoder(skip_special=True)
        self.stops = StopStrings(request.stop)
        self.generated = 0
        self.tokens: list[int] = []  # every sampled token (the cache holds all but the last)
        self.reason: str | None = None
        self.last_token: int | None = None
        self.cancelled = False
        self.finished = False
        self.cache: PagedSequence | None = None  # its blocks in the engine's cache
        self.embeds: torch.Tensor | None = None  # [1, T, D] while prefilling a prompt with images
        self.prefilled = 0  # prompt tokens in the cache, reused ones included
        self.reused = 0  # prompt tokens that came from the prefix cache
        self.started = False  # the prefix cache has been consulted (prefilled / reused are set)
        self.pieces = 0  # prefill pieces scheduled
        self.prompt_logprobs: list[float | None] = [None]  # the prompt's own, when asked (the first has none)
        self.prompt_top: list[list[tuple[int, float]] | None] = [None]
        self.adapter_slot = 0  # the row's LoRA slot in the engine's model (0: the base), set when submitted
        self.adapter_uid = 0  # that adapter's unique id: the row's prefix-cache namespace
        self.plain_greedy = sampler.plain_greedy and request.constraint is None
        self.arrived = time.perf_counter()
        self.last_time: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def whole_prompt(self) -> bool:
        """Prefilled in full, every position computed: a prompt with images (its keys depend on pixels, not
        only on token ids) or one whose own logprobs are asked."""
        return self.request.pixel_values is not None or self.request.prompt_logprobs is not None

    def shares_prompt(self, other: SequenceState) -> bool:
        """Its prefilled cache would be ``other``'s (the same prompt and images, scored alike, the same adapter)."""
        a, b = self.request, other.request
        return (a.prompt == b.prompt and a.pixel_values is b.pixel_values and a.prompt_logprobs == b.prompt_logprobs
                and self.adapter_uid == other.adapter_uid)
