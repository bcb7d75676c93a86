"""The continuous-batching policy: which requests run, and what each engine iteration does for them.

Pure Python, no tensors: the engine (``llama4.inference.engine``) asks it what to do next and tells it
what happened; a test drives it with a fake model step. The policy:

- **Queue.** Requests wait in arrival order (FIFO), at most ``max_queue`` of them; one more is refused
  at once (:class:`~llama4.inference.requests.QueueFull`).
- **Cancellation.** A cancelled waiting request leaves the queue without ever running; a cancelled
  prefilling or running sequence leaves the batch at the next iteration, so its cache blocks are
  freed before the next token.
- **Admission.** Waiting requests enter the batch, oldest first, while the batch (running +
  prefilling) has fewer than ``max_batch`` sequences.
- **Prefix cache.** Each admitted sequence consults the prefix cache once, in admission order, before
  its first prefill piece (``consult``: set by the engine). A text prompt left with a single token to
  run joins the running batch at once: that token is its first decode input, it needs no prefill pass
  of its own. Prompts with images, and prompts whose own logprobs are asked, are prefilled in full.
- **Prefill.** One piece per iteration, of at most ``prefill_chunk`` tokens, for the oldest admitted
  prompt still prefilling (one prompt is prefilled to its end before the next starts). So a long
  prompt delays the running rows by one piece per iteration, not by its whole prefill.
- **Joining.** When a prompt's last piece is done it joins the running batch (once its first token is
  sampled), and the admitted sequences with the same prompt that have not started a prefill of their
  own (the other choices of ``n``) join with it, taking a copy of its cache.
- **Decode.** Every running row, in the order the rows joined, steps together; finished rows leave.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from llama4.inference.requests import QueueFull


class Schedulable(Protocol):
    """What the scheduler reads and writes of a sequence."""

    cancelled: bool
    started: bool  # the prefix cache has been consulted
    prefilled: int  # prompt tokens in the cache (reused ones included)
    pieces: int  # prefill pieces scheduled

    @property
    def prompt_len(self) -> int: ...

    @property
    def whole_prompt(self) -> bool:
        """Every prompt token must go through a prefill pass (images, the prompt's own logprobs)."""

    def shares_prompt(self, other) -> bool:
        """Its prefilled cache would be ``other``'s: the same prompt (and images), scored alike."""


S = TypeVar("S", bound=Schedulable)


@dataclass(frozen=True)
class Piece(Generic[S]):
    """One prefill piece: prompt tokens ``start`` .. ``start + size`` of ``seq``; ``first``: its first piece."""

    seq: S
    start: int
    size: int
    first: bool


class Scheduler(Generic[S]):
    def __init__(self, max_batch: int, max_queue: int, prefill_chunk: int, consult: Callable[[S], None],
                 share_prompts: bool = True):
        """``consult(seq)``: take the longest cached prefix of ``seq``'s prompt (sets ``seq.prefilled``).
        ``share_prompts``: sequences admitted with the same prompt take a copy of the first one's prefilled cache
        (False: each prefills its own)."""
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.consult, self.share_prompts = consult, share_prompts
        self.waiting: deque[S] = deque()
        self.prefilling: list[S] = []  # in admission order
        self.running: list[S] = []  # in batch row order

    @property
    def busy(self) -> bool:
        """Sequences are in the batch (prefilling or running)."""
        return bool(self.prefilling or self.running)

    def add(self, seq: S) -> None:
        """Queue a request; raises QueueFull when ``max_queue`` are waiting."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(len(self.waiting))
        self.waiting.append(seq)

    def admit(self) -> list[S]:
        """Drop the cancelled waiting requests (returned: they never ran), then admit waiting ones while the
        batch has room."""
        cancelled = [s for s in self.waiting if s.cancelled]
        for seq in cancelled:
            self.waiting.remove(seq)
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch:
            self.prefilling.append(self.waiting.popleft())
        return cancelled

    def drop_cancelled(self) -> tuple[list[S], list[S]]:
        """Cancelled sequences leave the batch: (those that were prefilling, those that were running)."""
        prefilling = [s for s in self.prefilling if s.cancelled]
        for seq in prefilling:
            self.prefilling.remove(seq)
        return prefilling, self.keep_rows([i for i, s in enumerate(self.running) if not s.cancelled])

    def join_short(self) -> list[S]:
        """Text prompts with one token left to run once the prefix cache is consulted join the running batch
        (returned, in order)."""
        joined = []
        for seq in list(self.prefilling):
            if seq.whole_prompt or seq.pieces:
                continue
            self._consult(seq)
            if seq.prompt_len - seq.prefilled == 1:
                self.prefilling.remove(seq)
                self.running.append(seq)
                joined.append(seq)
        return joined

    def next_piece(self) -> Piece[S] | None:
        """The prefill piece to run now (the oldest prefilling prompt's next one), or None."""
        if not self.prefilling:
            return None
        seq = self.prefilling[0]
        self._consult(seq)
        first = not seq.pieces
        seq.pieces += 1
        return Piece(seq, seq.prefilled, min(self.prefill_chunk, seq.prompt_len - seq.prefilled), first)

    def prefilled(self, seq: S) -> list[S]:
        """``seq``'s last piece is done: it leaves the prefilling sequences, with the admitted ones that share
        its prompt and have not started a prefill (returned: they take a copy of its cache)."""
        self.prefilling.remove(seq)
        twins = [s for s in self.prefilling if self.share_prompts and not s.pieces and s.shares_prompt(seq)]
        for twin in twins:
            self.prefilling.remove(twin)
        return twins

    def remove(self, seq: S) -> None:
        """A prefilling sequence that failed leaves the batch."""
        self.prefilling.remove(seq)

    def join(self, seq: S) -> None:
        """A prefilled sequence (its first token sampled) joins the running batch as its last row."""
        self.running.append(seq)

    def keep_rows(self, keep: list[int]) -> list[S]:
        """Keep only running rows ``keep`` (increasing); the others are returned, in row order."""
        if len(keep) == len(self.running):
            return []
        kept = set(keep)
        dropped = [seq for i, seq in enumerate(self.running) if i not in kept]
        self.running = [self.running[i] for i in keep]
        return dropped

    def clear_running(self) -> list[S]:
        running, self.running = self.running, []
        return running

    def clear_batch(self) -> list[S]:
        """Empty the batch: every prefilling and running sequence, returned."""
        batch = [*self.prefilling, *self.running]
        self.prefilling, self.running = [], []
        return batch

    def clear(self) -> list[S]:
        """Empty the queue and the batch: every sequence, returned."""
        everyone = [*self.waiting, *self.clear_batch()]
        self.waiting.clear()
        return everyone

    def _consult(self, seq: S) -> None:
        if not seq.started:
            seq.started = True
            self.consult(seq)
