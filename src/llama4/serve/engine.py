"""The continuous-batching engine: one background thread owns the model and the running batch.

Each iteration of the loop (:meth:`Engine.step`) does, in order:

1. drop cancelled requests - a waiting one leaves the queue, a running one gives its cache blocks
   back now, so a client that disconnects frees its memory before the next token;
2. admit waiting requests while the batch (running + prefilling) has room;
3. take the longest cached prefix of each newly admitted text prompt (see prefix_cache.py); those left
   with a single token to run join the running batch at once (that token is their first decode
   input); then run one piece (``prefill_chunk`` tokens) of the oldest other prefilling prompt; when
   its last piece is done, sample its first token and let it join; admitted requests with the same
   prompt (the other choices of ``n``) join with a copy of its cache, unprefilled;
4. run one decode step for every running row together (a ragged one-token pass: each row at its own
   length; with ``batch_invariant`` a row computes what its solo run computes bit for bit on CPU:
   products in fixed 16-row tiles, attention over its own keys in a fixed key bucket - or, for packed
   bf16 models on AMX, the fused C layers, which compute every token as a row of its own) and drop the
   rows that finished.

With ``batch_invariant`` (the default) prefill is split-invariant too (each prompt token computed as a
decode step would compute it, see ``llama4.model.ops``), so a reply does not depend on the batch, on
how its prompt was cut into pieces, or on which prefix came from the prefix cache: at temperature 0 it
is the reply the same request gets alone on a fresh server.

Every sequence's keys and values live in one :class:`~llama4.model.paged_cache.PagedKVCache`: blocks
of ``kv_block_size`` tokens handed out as sequences grow, so rows join and leave without copying
anyone's cache and memory follows actual lengths; a finished row's blocks go to the prefix cache as
they are (no copy), and a hit shares them.

So requests join and leave at token granularity, and a long prompt delays running streams by one
piece per token rather than by its whole prefill. Each sequence has its own sampler, stop tokens,
stop strings, streaming detokenizer and (optionally) a logits constraint; results go to a ``sink``
callable as :class:`TokenEvent`\\ s and one final :class:`FinishEvent`, called from the engine thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llama4.inference.sampling import Sampler, TokenChoice
from llama4.inference.text import StopStrings
from llama4.model.ops import set_batch_invariant
from llama4.model.paged_cache import PagedKVCache, PagedSequence
from llama4.model.transformer import Llama4Model
from llama4.prompt import Tokenizer
from llama4.serve.metrics import ServeMetrics
from llama4.serve.prefix_cache import PrefixCache
from llama4.serve.protocol import (ContextTooLong, Event, FinishEvent, GenerationRequest, PromptEvent, QueueFull,
                                   TokenEvent)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # sequences decoded together (running + prefilling)
    max_queue: int = 64  # requests waiting for a batch slot; one more is refused (HTTP 429)
    max_context: int | None = None  # prompt + generated tokens per sequence; None: the model's maximum
    prefill_chunk: int = 256  # prompt tokens per prefill piece (one piece per engine iteration)
    prefix_cache_bytes: int = 256 * 2**20  # finished sequences' cache rows kept for reuse; 0: off
    kv_block_size: int = 16  # tokens per KV cache block
    batch_invariant: bool = True  # row tiles + bucketed attention (process-wide): replies = cold solo runs

    def __post_init__(self) -> None:
        for name in ("max_batch", "prefill_chunk", "kv_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "prefix_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")


def check_token_ids(ids, vocab: int, what: str = "token ids") -> None:
    """Raises ValueError naming the first few ids outside [0, vocab)."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{what} must be in [0, {vocab}), got {bad[:5]}")


def admissible(request: GenerationRequest, vocab: int, max_context: int, has_vision: bool) -> int:
    """The request's budget of new tokens; raises ValueError (bad input) or ContextTooLong."""
    prompt = request.prompt
    if not prompt:
        raise ValueError("the prompt is empty: at least one token is needed")
    check_token_ids(prompt, vocab)
    check_token_ids([t for t, _ in request.params.logit_bias], vocab, "logit_bias token ids")
    if len(prompt) >= max_context:
        raise ContextTooLong(len(prompt), max_context)
    if request.pixel_values is not None and not has_vision:
        raise ValueError("this model has no vision encoder: it cannot take images")
    if request.prompt_logprobs is not None and not 0 <= request.prompt_logprobs <= 20:
        raise ValueError(f"prompt_logprobs must be None or in [0, 20], got {request.prompt_logprobs}")
    room = max_context - len(prompt)
    max_new = room if request.max_tokens is None else min(request.max_tokens, room)
    if max_new < (0 if request.prompt_logprobs is not None else 1):
        raise ValueError(f"max_tokens must be >= 1 (0 only when scoring the prompt), got {request.max_tokens}")
    return max_new


class _Sequence:
    """A request's state inside the engine."""

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
        self.pieces = 0  # prefill pieces run
        self.prompt_logprobs: list[float | None] = [None]  # the prompt's own, when asked (the first has none)
        self.prompt_top: list[list[tuple[int, float]] | None] = [None]
        self.plain_greedy = sampler.plain_greedy and request.constraint is None
        self.arrived = time.perf_counter()
        self.last_time: float | None = None


class Handle:
    """The caller's side of a submitted request: lets it cancel."""

    def __init__(self, engine: Engine, seq: _Sequence):
        self._engine, self._seq = engine, seq

    def cancel(self) -> None:
        """Stop generating for this request; its cache row is freed at the next engine iteration."""
        if not self._seq.finished:
            self._seq.cancelled = True
            self._engine.wake()

    @property
    def finished(self) -> bool:
        return self._seq.finished


class Engine:
    def __init__(self, model: Llama4Model, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 metrics: ServeMetrics | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        if config.batch_invariant:
            set_batch_invariant(True)
        self.metrics = metrics if metrics is not None else ServeMetrics()
        text = model.config.text
        self.vocab = text.vocab_size
        self.max_context = min(config.max_context or text.max_position_embeddings, text.max_position_embeddings)
        self.device = model.text.embed.weight.device
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []
        self._running: list[_Sequence] = []  # in batch row order
        self._pool = PagedKVCache(text, block_size=config.kv_block_size)
        self._idle = True  # nothing active since the pool was last trimmed
        self._kv_bytes = 0
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes else None
        self._thread: threading.Thread | None = None
        self._after_step: Callable[[], None] | None = None
        self._stopping = False

    # -- caller side (any thread) ----------------------------------------------------------------------

    @property
    def has_vision(self) -> bool:
        return self.model.vision is not None

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Handle:
        """Queue a request; raises ValueError (bad input), ContextTooLong or QueueFull at once."""
        max_new = admissible(request, self.vocab, self.max_context, self.has_vision)
        seq = _Sequence(request, sink, Sampler(request.params, self.vocab, request.prompt), self.tokenizer, max_new)
        with self._cond:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(len(self._waiting))
            self._waiting.append(seq)
            self._cond.notify()
        return Handle(self, seq)

    @property
    def down(self) -> str | None:
        """Why the engine cannot serve (None while it runs)."""
        if self._thread is None:
            return "not started"
        return None if self._thread.is_alive() else "the engine thread has ended"

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        return {"running": len(self._running), "prefilling": len(self._prefilling), "queued": len(self._waiting),
                "kv_cache_bytes": self._kv_bytes,
                "prefix_cache_bytes": self.prefix_cache.bytes if self.prefix_cache is not None else 0}

    def start(self, after_step: Callable[[], None] | None = None) -> None:
        """Run the loop in a thread of its own; ``after_step`` (if given) is called after every iteration,
        from that thread (e.g. to send the events of one iteration together)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._after_step = after_step
        self._thread = threading.Thread(target=self._run, name="llama4-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop; every unfinished request is finished as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for seq in [*self._waiting, *self._prefilling, *self._running]:
            self._finish(seq, "cancelled", error="the server is shutting down")
            self._free(seq)
        self._waiting.clear()
        self._prefilling, self._running = [], []

    # -- engine side (the engine thread, or a test calling step()) ----------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    worked = self.step()
                except Exception as e:  # a bug, not a bad request: fail what is active, keep serving
                    worked = True
                    for seq in [*self._prefilling, *self._running]:
                        self._finish(seq, "error", error=f"engine failure: {e!r}")
                        self._free(seq)
                    self._prefilling, self._running = [], []
                if self._after_step is not None:
                    self._after_step()
                if not worked:
                    with self._cond:
                        if not self._stopping and not self._waiting:
                            self._cond.wait(0.5)

    def step(self) -> bool:
        """One iteration (see the module docstring); False when there was nothing to do."""
        with self._cond:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._finish(seq, "cancelled")
            while self._waiting and len(self._running) + len(self._prefilling) < self.config.max_batch:
                self._prefilling.append(self._waiting.popleft())
        for seq in [s for s in self._prefilling if s.cancelled]:
            self._prefilling.remove(seq)
            self._finish(seq, "cancelled")
            self._free(seq)
        self._drop_rows([i for i, s in enumerate(self._running) if not s.cancelled], "cancelled")
        worked = bool(self._prefilling or self._running)
        self._join_short()
        if self._prefilling:
            self._prefill_piece(self._prefilling[0])
        if self._running:
            self._decode()
        self._kv_bytes = sum(s.cache.nbytes() for s in (*self._running, *self._prefilling) if s.cache is not None)
        if worked:
            self._idle = False
        elif not self._idle:  # just went idle: give back the pool capacity above the blocks still held
            self._pool.trim()
            self._idle = True
        return worked

    def _join_short(self) -> None:
        """Text prompts with one token left to run (the rest came from the prefix cache) join the decode
        batch at once: that token is their decode input, so they need no forward pass of their own."""
        for seq in list(self._prefilling):
            if seq.request.pixel_values is not None or seq.pieces or seq.request.prompt_logprobs is not None:
                continue
            if not seq.started:
                self._take_prefix(seq)
            if len(seq.request.prompt) - seq.prefilled != 1:
                continue
            self._prefilling.remove(seq)
            self.metrics.add_tokens(prompt=1, cached=seq.reused)
            if seq.cache is None:
                seq.cache = self._pool.sequence()
            seq.last_token = seq.request.prompt[-1]
            self._running.append(seq)

    def _prefill_piece(self, seq: _Sequence) -> None:
        prompt = seq.request.prompt
        try:
            if not seq.pieces:
                self._start_prefill(seq)
            seq.pieces += 1
            at, size = seq.prefilled, self.config.prefill_chunk
            if seq.embeds is not None:
                piece = seq.embeds[:, at - seq.reused:at - seq.reused + size]
            else:  # text: embedded piece by piece, never the whole prompt at once
                piece = self.model.embed(torch.tensor([prompt[at:at + size]], device=self.device))
            positions = torch.arange(at, at + piece.shape[1], device=self.device)[None]
            scored = seq.request.prompt_logprobs is not None
            logits = self.model.text(piece, positions, self._pool.batch([seq.cache]),
                                     num_logits=piece.shape[1] if scored else 1)
            if scored:
                self._score_prompt(seq, at, logits[0])
            seq.prefilled += piece.shape[1]
        except Exception as e:  # e.g. image tokens that do not match the tiles: this request only
            self._prefilling.remove(seq)
            self._finish(seq, "error", error=f"prefill failed: {e}")
            self._free(seq)
            return
        if seq.prefilled < len(prompt):
            return
        self._prefilling.remove(seq)
        seq.embeds = None
        self.metrics.add_tokens(prompt=len(prompt) - seq.reused, cached=seq.reused)
        last = logits[0, -1].float().cpu()
        # Admitted requests with the same prompt (e.g. the other choices of n) take a copy instead of a prefill.
        twins = [s for s in self._prefilling if not s.pieces and s.request.prompt == prompt
                 and s.request.pixel_values is seq.request.pixel_values
                 and s.request.prompt_logprobs == seq.request.prompt_logprobs]
        for twin in twins:
            self._prefilling.remove(twin)
            self._free(twin)  # a shorter cached prefix it may have taken
            twin.cache = seq.cache.copy_prefix(len(prompt))
            twin.reused = twin.prefilled = len(prompt)
            twin.prompt_logprobs, twin.prompt_top = seq.prompt_logprobs, seq.prompt_top
            self.metrics.add_tokens(cached=len(prompt))
            self._admit(twin, last)
        self._admit(seq, last)

    def _score_prompt(self, seq: _Sequence, at: int, logits: torch.Tensor) -> None:
        """The logprobs of prompt tokens at+1 .. at+len(logits) from a piece's logits [n, V] (position i
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

    def _admit(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """A prefilled sequence: sample its first token and, unless that ends it, join the running batch."""
        if seq.request.prompt_logprobs is not None:
            self._emit(seq, PromptEvent(seq.prompt_logprobs, seq.prompt_top))
            if seq.max_new == 0:  # scoring only
                self._finish(seq, "length")
                self._retire(seq, list(seq.request.prompt))
                return
        if self._accept(seq, logits):
            self._running.append(seq)
        else:  # finished at its first token: the cache holds exactly the prompt
            self._retire(seq, list(seq.request.prompt))

    def _take_prefix(self, seq: _Sequence) -> None:
        """Take the longest cached prefix of a text-only prompt (none for prompts with images, nor for prompts
        whose own logprobs are asked: every position must be computed)."""
        seq.started = True
        if self.prefix_cache is not None and seq.request.pixel_values is None and seq.request.prompt_logprobs is None:
            seq.reused, seq.cache = self.prefix_cache.take(seq.request.prompt)
            seq.prefilled = seq.reused

    def _start_prefill(self, seq: _Sequence) -> None:
        """Take the cached prefix; a prompt with images is embedded whole now (its image features are
        computed once), a text prompt piece by piece as it is prefilled."""
        if not seq.started:
            self._take_prefix(seq)
        prompt, pixels = seq.request.prompt, seq.request.pixel_values
        if pixels is not None:
            ids = torch.tensor([prompt[seq.reused:]], device=self.device)
            seq.embeds = self.model.embed(ids, pixels.to(device=self.device, dtype=self.model.text.embed.weight.dtype))
        if seq.cache is None:
            seq.cache = self._pool.sequence()

    def _reusable(self, seq: _Sequence) -> bool:
        return self.prefix_cache is not None and seq.request.pixel_values is None and seq.reason != "error"

    def _free(self, seq: _Sequence) -> None:
        if seq.cache is not None:
            seq.cache.release()
            seq.cache = None

    def _retire(self, seq: _Sequence, tokens: list[int]) -> None:
        """A sequence leaves the engine: its blocks (holding exactly ``tokens``) go to the prefix cache
        when reusable, else back to the pool."""
        if self._reusable(seq) and seq.cache is not None:
            self.prefix_cache.put(tokens, seq.cache)  # the store owns the blocks from now
            seq.cache = None
        self._free(seq)

    def _decode(self) -> None:
        ids = torch.tensor([[s.last_token] for s in self._running], device=self.device)
        try:
            batch = self._pool.batch([s.cache for s in self._running])
            logits = self.model(ids, cache=batch)[:, -1].float().cpu()
        except Exception as e:  # the cache may be half-updated: end every running sequence
            for seq in self._running:
                self._finish(seq, "error", error=f"decode failed: {e}")
                self._free(seq)
            self._running = []
            return
        greedy = logits.argmax(-1).tolist() if any(s.plain_greedy for s in self._running) else None
        keep = [i for i, seq in enumerate(self._running)
                if self._accept(seq, logits, i, greedy[i] if greedy is not None and seq.plain_greedy else None)]
        self._drop_rows(keep, None)

    def _drop_rows(self, keep: list[int], reason: str | None) -> None:
        """Keep only running rows ``keep``; the others are finished with ``reason`` (None: already)."""
        if len(keep) == len(self._running):
            return
        kept = set(keep)
        for i, seq in enumerate(self._running):
            if i in kept:
                continue
            if reason is not None:
                self._finish(seq, reason)
            self._retire(seq, (seq.request.prompt + seq.tokens)[:-1])  # all but the token not yet fed
        self._running = [self._running[i] for i in keep]

    def _accept(self, seq: _Sequence, logits: torch.Tensor, row: int | None = None, token: int | None = None
                ) -> bool:
        """Sample the sequence's next token from logits [V] (or row ``row`` of logits [B, V]; ``token``:
        already chosen) and report it; False when it finished."""
        try:
            return self._sample(seq, logits if row is None else logits[row], token)
        except Exception as e:  # a failing constraint or sampler ends its own sequence, not the batch
            self._finish(seq, "error", error=f"sampling failed: {e}")
            return False

    def _sample(self, seq: _Sequence, logits: torch.Tensor, token: int | None = None) -> bool:
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
            self._finish(seq, "stop")
            return False
        if constraint is not None:
            constraint.advance(choice.token)
        piece, hit = seq.stops.feed(seq.decoder.add(choice.token))
        self._emit(seq, TokenEvent(piece, choice.token, choice.logprob, choice.top))
        if hit:
            self._finish(seq, "stop", flush=False)
            return False
        if seq.generated >= seq.max_new:
            self._finish(seq, "length")
            return False
        seq.last_token = choice.token
        return True

    def _time_token(self, seq: _Sequence) -> None:
        now = time.perf_counter()
        if seq.last_time is None:
            self.metrics.ttft.observe(now - seq.arrived)
        else:
            self.metrics.inter_token.observe(now - seq.last_time)
        seq.last_time = now

    def _finish(self, seq: _Sequence, reason: str, flush: bool = True, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished, seq.reason = True, reason
        seq.embeds = None
        self.metrics.count_finish(reason)
        tail = ""
        if flush and reason in ("stop", "length"):
            tail, _ = seq.stops.feed(seq.decoder.flush())
            tail += seq.stops.flush()
        self._emit(seq, FinishEvent(reason, tail, len(seq.request.prompt), seq.generated, cached_tokens=seq.reused,
                                    error=error))

    def _emit(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop generating for it
            seq.cancelled = True
