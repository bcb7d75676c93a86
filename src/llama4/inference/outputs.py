"""Output processing for the engine: logits in, events out.

For each sequence: sample its next token (through its constraint, if any), check its stop tokens,
stop strings and token budget, detokenize what became safe to show, and send the caller
:class:`~llama4.inference.requests.TokenEvent`\\ s, a :class:`~llama4.inference.requests.PromptEvent`
(a scored prompt's own logprobs) and one final :class:`~llama4.inference.requests.FinishEvent`, all
from the engine thread; it counts tokens and latencies in the engine's metrics as it goes.
"""

from __future__ import annotations

import time

import torch

from llama4.inference.metrics import EngineMetrics
from llama4.inference.requests import ConstraintError, Event, FinishEvent, PromptEvent, TokenEvent
from llama4.inference.sampling import TokenChoice
from llama4.inference.sequence import SequenceState


class OutputProcessor:
    def __init__(self, metrics: EngineMetrics):
        self.metrics = metrics

    def accept(self, seq: SequenceState, logits: torch.Tensor, token: int | None = None) -> bool:
        """Sample the sequence's next token from logits [V] float32 (``token``: already chosen) and report
        it; False when it finished."""
        try:
            return self._sample(seq, logits, token)
        except ConstraintError as e:
            self.finish(seq, "error", error=f"the JSON schema cannot be followed: {e}", bad_request=True)
            return False
        except Exception as e:  # a failing constraint or sampler ends its own sequence, not the batch
            self.finish(seq, "error", error=f"sampling failed: {e}")
            return False

    def _sample(self, seq: SequenceState, logits: torch.Tensor, token: int | None) -> bool:
        constraint = seq.request.constraint
        if token is not None:
            choice = TokenChoice(token)
        else:
            if constraint is not None:
                logits = constraint.restrict(logits)
            choice: TokenChoice = seq.sampler.choose(logits)
        seq.generated += 1
        seq.tokens.append(choice.token)
        self._time_token(seq)
        self.metrics.add_tokens(generated=1)
        if choice.token in seq.stop_ids:
            if choice.logprob is not None:  # asked for: the stop token's logprob is reported too (as vLLM does)
                tail, _ = seq.stops.feed(seq.decoder.flush())
                self.emit(seq, TokenEvent(tail + seq.stops.flush(), choice.token, choice.logprob, choice.top))
                self.finish(seq, "stop", flush=False)
            else:
                self.finish(seq, "stop")
            return False
        if constraint is not None:
            constraint.advance(choice.token)
        piece, hit = seq.stops.feed(seq.decoder.add(choice.token))
        self.emit(seq, TokenEvent(piece, choice.token, choice.logprob, choice.top))
        if hit:
            self.finish(seq, "stop", flush=False)
            return False
        if seq.generated >= seq.max_new:
            self.finish(seq, "length")
            return False
        seq.last_token = choice.token
        return True

    def _time_token(self, seq: SequenceState) -> None:
        now = time.perf_counter()
        if seq.last_time is None:
            self.metrics.ttft.observe(now - seq.arrived)
        else:
            self.metrics.inter_token.observe(now - seq.last_time)
        seq.last_time = now

    def score_prompt(self, seq: SequenceState, at: int, logits: torch.Tensor) -> None:
        """Note the logprobs of prompt tokens at+1 .. at+len(logits) from a piece's logits [n, V] (position i
        predicts token i + 1; the prompt's last position predicts the first generated token instead)."""
        prompt, k = seq.request.prompt, seq.request.prompt_logprobs
        n = min(len(logits), len(prompt) - at - 1)
        if n <= 0:
            return
        logprobs = logits[:n].float().cpu().log_softmax(-1)
        targets = torch.tensor(prompt[at + 1:at + 1 + n])
        seq.prompt_logprobs += logprobs.gather(1, targets[:, None])[:, 0].tolist()
        if k:
            values, ids = torch.topk(logprobs, k, dim=-1)
            seq.prompt_top += [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            seq.prompt_top += [[] for _ in range(n)]

    def prompt_scored(self, seq: SequenceState) -> None:
        """Send a scored prompt's logprobs (before its first token)."""
        self.emit(seq, PromptEvent(seq.prompt_logprobs, seq.prompt_top))

    def finish(self, seq: SequenceState, reason: str, flush: bool = True, error: str | None = None,
               bad_request: bool = False) -> None:
        """Send the sequence's finish event (once): with ``flush``, the text held back for a stop string or
        a partial character goes with it when it ended normally."""
        if seq.finished:
            return
        seq.finished, seq.reason = True, reason
        seq.embeds = None
        self.metrics.count_finish(reason)
        tail = ""
        if flush and reason in ("stop", "length"):
            tail, _ = seq.stops.feed(seq.decoder.flush())
            tail += seq.stops.flush()
        self.emit(seq, FinishEvent(reason, tail, len(seq.request.prompt), seq.generated, cached_tokens=seq.reused,
                                   error=error, bad_request=bad_request))

    def emit(self, seq: SequenceState, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop generating for it
            seq.cancelled = True
