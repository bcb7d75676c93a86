"""Per-request sampling parameters and the logits pipeline: penalties, temperature, top-k/p, min-p.

Order (as in transformers and vLLM): logit bias (OpenAI's ``logit_bias``, added to the model's logits),
repetition penalty, frequency/presence penalties, temperature, then the truncations (top-k, top-p, min-p)
on the tempered distribution; temperature 0 is greedy.
Reported logprobs are those of the model's own distribution (log-softmax of the raw logits), so they
do not change with sampling settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llama4.model.transformer import check_token_ids

SEED_RANGE = (-(2**63), 2**64 - 1)
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW): greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in prompt or output
    frequency_penalty: float = 0.0  # OpenAI: minus penalty x count of the token in the output
    presence_penalty: float = 0.0  # OpenAI: minus penalty if the token occurs in the output
    seed: int | None = None  # makes sampling reproducible
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: plus the k most likely
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias in [-100, 100]) added to its logit

    def __post_init__(self) -> None:
        try:  # (pairs from any sequence, e.g. JSON lists, as a hashable tuple)
            object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must be (token id, bias) pairs; got {self.logit_bias!r}") from None
        checks = [
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be a finite number >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 disables it)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be None or in [0, 20]"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"seed must be None or an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (torch's generator seeds)"),
            (all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
             "logit_bias must map token ids >= 0 to biases in [-100, 100]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small (below ``GREEDY_BELOW``, as vLLM) that sampling is the argmax anyway
        (and dividing float32 logits by it would overflow them, or by its float32 rounding, 0)."""
        return self.temperature < GREEDY_BELOW

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                    output_counts: torch.Tensor | None) -> torch.Tensor:
    """logits [V] float32; ``seen`` bool [V] (prompt + output tokens); ``output_counts`` [V] of the output."""
    if params.repetition_penalty != 1 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if output_counts is not None and (params.frequency_penalty or params.presence_penalty):
        logits = logits - params.frequency_penalty * output_counts - params.presence_penalty * (output_counts > 0)
    return logits


def truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Tempered logits [V] with the tokens outside top-k / top-p / min-p set to -inf. The most likely token
    is never dropped, and the logits are shifted to a maximum of 0 before dividing, so that a tiny
    temperature cannot overflow them (inf - inf would make the softmax NaN)."""
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # (a top_p below float32's smallest number would drop it)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


@dataclass
class TokenChoice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token, logprob), most likely first


class Sampler:
    """Samples one sequence's tokens; holds its random generator and token history."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt: list[int] | None = None):
        self.params = params
        # greedy without history, logprobs or bias: the token is the row's argmax (a batch's taken at once)
        self.plain_greedy = (params.greedy and not params.uses_history and params.logprobs is None
                             and not params.logit_bias)
        check_token_ids([t for t, _ in params.logit_bias], vocab_size, "logit_bias token ids")
        self.bias = None
        if params.logit_bias:
            self.bias = (torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long),
                         torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32))
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.seen = self.counts = None
        if params.uses_history:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)
            if prompt:
                self.seen[torch.tensor(prompt, dtype=torch.long).clamp(0, vocab_size - 1)] = True

    def choose(self, logits: torch.Tensor) -> TokenChoice:
        """logits [V] float32 (CPU) -> the next token (and its logprobs if asked)."""
        raw = logits
        if self.bias is not None:
            logits = logits.index_add(0, *self.bias)
        logits = apply_penalties(logits, self.params, self.seen, self.counts)
        if self.params.greedy:
            token = int(torch.argmax(logits))
        else:
            probs = truncate(logits, self.params).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.seen is not None:
            self.seen[token] = True
            self.counts[token] += 1
        choice = TokenChoice(token)
        if self.params.logprobs is not None:
            logprobs = raw.log_softmax(-1)
            choice.logprob = float(logprobs[token])
            if self.params.logprobs:
                values, ids = torch.topk(logprobs, self.params.logprobs)
                choice.top = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != float("-inf")]
        return choice


def greedy_shortcut(logits: torch.Tensor, plain: Sequence[bool]) -> list[int | None]:
    """For a batch's logits [B, V]: row i's argmax where ``plain[i]`` (a plain greedy sampler, see
    :attr:`Sampler.plain_greedy`: its token is the argmax, with nothing else to note or report), else
    None (that row goes through its sampler). The argmaxes are taken in one call for the batch."""
    if not any(plain):
        return [None] * len(plain)
    tokens = logits.argmax(-1).tolist()
    return [token if p else None for token, p in zip(tokens, plain)]
