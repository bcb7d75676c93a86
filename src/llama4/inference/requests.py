"""What callers and the engine (``llama4.inference.engine``) exchange: the request, the events that come
back, the refusals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llama4.inference.sampling import SamplingParams


class Constraint(Protocol):
    """Restricts a sequence's next token (e.g. to valid JSON); see ``llama4.inference.constrained``."""

    def restrict(self, logits: torch.Tensor) -> torch.Tensor: ...

    def advance(self, token_id: int) -> None: ...


@dataclass
class GenerationRequest:
    prompt: list[int]
    pixel_values: torch.Tensor | None = None  # image tiles for the prompt's <|patch|> slots
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None: until a stop or the end of the context
    stop: Sequence[str] = ()
    stop_tokens: Sequence[int] | None = None  # None: the tokenizer's end-of-turn / end-of-text ids
    constraint: Constraint | None = None
    # the prompt's own logprobs (a PromptEvent before the first token): None, or how many of the most likely
    # tokens to give beside each prompt token's (0: its own alone). Such a prompt is prefilled in full (no
    # prefix-cache reuse), and max_tokens may then be 0 (score the prompt, generate nothing).
    prompt_logprobs: int | None = None
    # the LoRA adapter (its name in the engine's llama4.lora.multi.MultiLora) the request runs on; None: the base
    adapter: str | None = None


@dataclass
class TokenEvent:
    """One generated token; ``text`` is what became safe to show (may be empty, e.g. half a character)."""

    text: str
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptEvent:
    """Each prompt token's logprob given the tokens before it (the first token's is None), with the most
    likely alternatives at that position (``top``: (token, logprob), most likely first)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class FinishEvent:
    reason: str  # "stop" (stop token or string), "length", "cancelled" or "error"
    text: str = ""  # text held back until the end (a possible stop-string prefix, a partial character)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # includes the stop token, which is generated but not shown
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of being prefilled
    error: str | None = None
    bad_request: bool = False  # an "error" that is the request's own fault (HTTP 400, not 500)


Event = TokenEvent | PromptEvent | FinishEvent


class ConstraintError(RuntimeError):
    """A constraint cannot go on (llguidance over its limits with a schema it compiled: one that recurses with
    no way out, say ``{"type": "array", "items": {"$ref": "#"}, "minItems": 1}``). The request's fault, found
    only while generating: it ends with an error the client is told is its own."""


class EngineError(Exception):
    pass


class QueueFull(EngineError):
    def __init__(self, queued: int):
        super().__init__(f"the request queue is full ({queued} waiting)")
        self.queued = queued


class ContextTooLong(EngineError, ValueError):
    def __init__(self, prompt_tokens: int, max_context: int):
        super().__init__(f"the prompt has {prompt_tokens} tokens but the context holds {max_context} "
                         f"(including at least one generated token); shorten the prompt")
        self.prompt_tokens, self.max_context = prompt_tokens, max_context


class AdapterInUse(EngineError):
    """An adapter cannot be unloaded while requests that name it are queued or running (refused, not deferred:
    the caller may retry once they finish)."""

    def __init__(self, name: str, users: int):
        super().__init__(f"the adapter {name!r} is in use by {users} queued or running request"
                         f"{'s' if users != 1 else ''}: unload it once they finish")
        self.name, self.users = name, users
