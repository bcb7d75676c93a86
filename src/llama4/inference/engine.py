"""The continuous-batching engine: one background thread owns the model and the running batch.

Each iteration of the loop (:meth:`Engine.step`) does, in order (the policy is the scheduler's, see
scheduler.py):

1. drop cancelled requests - a waiting one leaves the queue, a running one gives its cache blocks
   back now, so a client that disconnects frees its memory before the next token;
2. admit waiting requests while the batch (running + prefilling) has room;
3. take the longest cached prefix of each newly admitted text prompt (see prefix_cache.py); those left
   with a single token to run join the running batch at once (that token is their first decode
   input); then run one piece (``prefill_chunk`` tokens) of the oldest other prefilling prompt; when
   its last piece is done, sample its first token and let it join; admitted requests with the same
   prompt (the other choices of ``n``) join with a copy of its cache, unprefilled;
4. run one decode step for every running row together (a ragged one-token pass: each row at its own
   length, see runner.py) and drop the rows that finished.

With ``batch_invariant`` (the default) a reply does not depend on the batch, on how its prompt was cut
into pieces, or on which prefix came from the prefix cache: at temperature 0 it is the reply the same
request gets alone on a fresh server.

Every sequence's keys and values live in one :class:`~llama4.model.paged_cache.PagedKVCache`: blocks
of ``kv_block_size`` tokens handed out as sequences grow, so rows join and leave without copying
anyone's cache and memory follows actual lengths; a finished row's blocks go to the prefix cache as
they are (no copy), and a hit shares them.

So requests join and leave at token granularity, and a long prompt delays running streams by one
piece per token rather than by its whole prefill. Each sequence has its own sampler, stop tokens,
stop strings, streaming detokenizer and (optionally) a logits constraint (outputs.py); results go to
a ``sink`` callable as :class:`TokenEvent`\\ s and one final :class:`FinishEvent`, called from the
engine thread.

LoRA adapters (``max_loras`` > 0: llama4.lora.multi): a request names its adapter (``adapter``), every row
of a batch computes on its own (per-row adapter slots set by the runner, no merging), and adapters are
loaded and unloaded while the engine runs (:meth:`Engine.load_adapter`, :meth:`Engine.unload_adapter`),
between iterations (a step lock). An adapter that a queued, prefilling or running request uses is not
unloaded (:class:`~llama4.inference.requests.AdapterInUse`); the prefix cache keeps each adapter's entries
apart and drops them with it. The model must be plain (not packed for the CPU kernels).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llama4.inference.metrics import EngineMetrics
from llama4.inference.outputs import OutputProcessor
from llama4.inference.prefix_cache import PrefixCache
from llama4.inference.requests import AdapterInUse, ContextTooLong, Event, GenerationRequest
from llama4.inference.runner import ModelRunner
from llama4.inference.sampling import Sampler, greedy_shortcut
from llama4.inference.scheduler import Piece, Scheduler
from llama4.inference.sequence import SequenceState
from llama4.kernels.cpu import KernelOptions
from llama4.lora.multi import LoadedAdapter, MultiLora, UnknownAdapter
from llama4.model.paged_cache import PagedKVCache
from llama4.model.transformer import Llama4Model, check_token_ids
from llama4.prompt import Tokenizer
from llama4.quant.kv_cache import check_kv_format, kv_storage


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # sequences decoded together (running + prefilling)
    max_queue: int = 64  # requests waiting for a batch slot; one more is refused (HTTP 429)
    max_context: int | None = None  # prompt + generated tokens per sequence; None: the model's maximum
    prefill_chunk: int = 256  # prompt tokens per prefill piece (one piece per engine iteration)
    prefix_cache_bytes: int = 256 * 2**20  # finished sequences' cache rows kept for reuse; 0: off
    kv_block_size: int = 16  # tokens per KV cache block
    batch_invariant: bool = True  # row tiles + bucketed attention in the model: replies = cold solo runs
    # how the global (NoPE) layers store keys/values: auto (the model's dtype), bf16, int8 or fp8 (quant.kv_cache:
    # about half the bytes, attended over dequantized); chunk-local layers keep the model's dtype
    kv_cache: str = "auto"
    # the CPU fast paths of a model the engine loads itself (its own process): from LLAMA4_CPU_KERNEL,
    # LLAMA4_FUSED_DECODE, CC and XDG_CACHE_HOME unless given
    kernels: KernelOptions = field(default_factory=lambda: KernelOptions.from_environ(os.environ))
    # LoRA adapters served at once (0: none; then requests cannot name one) and the largest rank one may have.
    # With adapters the model must be plain: an engine process then loads it unpacked (no CPU kernels).
    max_loras: int = 0
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.kernels, dict):  # from JSON (the engine process's settings)
            object.__setattr__(self, "kernels", KernelOptions(**self.kernels))
        for name in ("max_batch", "prefill_chunk", "kv_block_size", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "prefix_cache_bytes", "max_loras"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")
        check_kv_format(self.kv_cache)


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


def engine_pool(model: Llama4Model, config: EngineConfig,
                pool_class: type[PagedKVCache] = PagedKVCache) -> PagedKVCache:
    """The block pool of an engine running ``model``, for the KV heads its layers hold (a tensor-parallel
    shard holds its share of them: llama4.distributed)."""
    text = model.config.text
    attn = model.text.layers[0].attn
    local = text
    if (attn.num_heads, attn.num_kv_heads) != (text.num_heads, text.num_kv_heads):
        local = dataclasses.replace(text, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads)
    return pool_class(local, block_size=config.kv_block_size,
                      storage=kv_storage(text, config.kv_cache, model.text.embed.weight.dtype))


class Handle:
    """The caller's side of a submitted request: lets it cancel."""

    def __init__(self, engine: Engine, seq: SequenceState):
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
                 metrics: EngineMetrics | None = None, runner: ModelRunner | None = None):
        """``runner``: the model runner over its own pool (``engine_pool(model, config, ...)``), e.g. rank 0's in a
        sharded run (llama4.inference.sharded); by default a plain one."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.metrics = metrics if metrics is not None else EngineMetrics()
        text = model.config.text
        self.vocab = text.vocab_size
        self.max_context = min(config.max_context or text.max_position_embeddings, text.max_position_embeddings)
        self._cond = threading.Condition()
        if runner is not None and config.max_loras:
            raise ValueError("an engine given its model runner takes no LoRA adapters (max_loras must be 0)")
        self.adapters = MultiLora(model, config.max_loras, config.max_lora_rank) if config.max_loras else None
        self._step_lock = threading.Lock()  # an iteration, or an adapter's load / unload: never both at once
        if runner is None:
            runner = ModelRunner(model, engine_pool(model, config), config.batch_invariant,
                                 self.adapters.rows if self.adapters is not None else None)
        self.runner = runner
        self._pool = runner.pool
        self.outputs = OutputProcessor(self.metrics)
        chunk = config.prefill_chunk if runner.prefill_in_pieces else self.max_context
        self.scheduler: Scheduler[SequenceState] = Scheduler(config.max_batch, config.max_queue, chunk,
                                                             self._take_prefix, share_prompts=runner.copies_caches)
        self._idle = True  # nothing active since the pool was last trimmed
        self._kv_bytes = 0
        self.prefix_cache = (PrefixCache(config.prefix_cache_bytes)
                             if config.prefix_cache_bytes and runner.copies_caches else None)
        self._thread: threading.Thread | None = None
        self._after_step: Callable[[], None] | None = None
        self._stopping = False
        self._steps = 0  # iterations that did work: a watchdog tells a slow engine from a stuck one by it

    # -- caller side (any thread) ----------------------------------------------------------------------

    @property
    def has_vision(self) -> bool:
        return self.runner.has_vision

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Handle:
        """Queue a request; raises ValueError (bad input), ContextTooLong or QueueFull at once."""
        max_new = admissible(request, self.vocab, self.max_context, self.has_vision)
        self.runner.check(request)
        seq = SequenceState(request, sink, Sampler(request.params, self.vocab, request.prompt), self.tokenizer,
                            max_new)
        with self._cond:  # (unload_adapter checks the scheduler under this lock: no request slips past it)
            if request.adapter is not None:
                adapter = self._adapter(request.adapter)
                seq.adapter_slot, seq.adapter_uid = adapter.slot, adapter.uid
            self.scheduler.add(seq)
            self._cond.notify()
        return Handle(self, seq)

    def _adapter(self, name: str) -> LoadedAdapter:
        if self.adapters is None:
            raise UnknownAdapter(name, [])
        return self.adapters.get(name)

    def load_adapter(self, name: str, path: str) -> LoadedAdapter:
        """Load the PEFT adapter at ``path`` as ``name`` (any thread): its files are read and checked first, then
        it is put in a free slot between two iterations. Raises AdapterError (bad files, rank, targets, a name
        taken, no free slot)."""
        if self.adapters is None:
            raise ValueError("this engine was configured without adapters (max_loras is 0)")
        files = self.adapters.read(path)
        with self._step_lock:
            return self.adapters.install(name, files)

    def unload_adapter(self, name: str) -> LoadedAdapter:
        """Unload adapter ``name`` (any thread), between two iterations; refused (AdapterInUse) while a request
        that names it is queued or in the batch. Its prefix-cache entries are released."""
        with self._step_lock, self._cond:
            adapter = self._adapter(name)
            users = sum(s.adapter_uid == adapter.uid for s in (*self.scheduler.waiting, *self.scheduler.prefilling,
                                                                 *self.scheduler.running))
            if users:
                raise AdapterInUse(name, users)
            self.adapters.unload(name)
            if self.prefix_cache is not None:
                self.prefix_cache.drop(adapter.uid)
            return adapter

    def loaded_adapters(self) -> dict[str, str]:
        """The adapters loaded: name -> path."""
        return {} if self.adapters is None else {a.name: a.path for a in self.adapters.loaded.values()}

    @property
    def down(self) -> str | None:
        """Why the engine cannot serve (None while it runs)."""
        if self._thread is None:
            return "not started"
        if not self._thread.is_alive():
            return "the engine thread has ended"
        return self.runner.down

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        s = self.scheduler
        return {"running": len(s.running), "prefilling": len(s.prefilling), "queued": len(s.waiting),
                "kv_cache_bytes": self._kv_bytes, "steps": self._steps,
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

    def stop(self, timeout: float = 30.0, reason: str = "cancelled") -> None:
        """End the loop; every unfinished request is finished with ``reason`` ("cancelled", or "error" for a
        shutdown that cuts replies short)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for seq in self.scheduler.clear():
            self._end(seq, reason, error="the server is shutting down")

    # -- engine side (the engine thread, or a test calling step()) ----------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    worked = self.step()
                except Exception as e:  # a bug, not a bad request: fail what is active, keep serving
                    worked = True
                    for seq in self.scheduler.clear_batch():
                        self._end(seq, "error", error=f"engine failure: {e!r}")
                self._steps += worked
                if self._after_step is not None:
                    self._after_step()
                if not worked:
                    with self._cond:
                        if not self._stopping and not self.scheduler.waiting:
                            self._cond.wait(0.5)

    def step(self) -> bool:
        """One iteration (see the module docstring); False when there was nothing to do."""
        with self._step_lock:
            return self._step()

    def _step(self) -> bool:
        with self._cond:
            for seq in self.scheduler.admit():
                self.outputs.finish(seq, "cancelled")
        prefilling, running = self.scheduler.drop_cancelled()
        for seq in prefilling:
            self._end(seq, "cancelled")
        for seq in running:
            self.outputs.finish(seq, "cancelled")
            self._retire_row(seq)
        worked = self.scheduler.busy
        for seq in self.scheduler.join_short():
            self.metrics.add_tokens(prompt=1, cached=seq.reused)
            if seq.cache is None:
                seq.cache = self._pool.sequence()
            seq.last_token = seq.request.prompt[-1]
        piece = self.scheduler.next_piece()
        if piece is not None:
            self._prefill_piece(piece)
        if self.scheduler.running:
            self._decode()
        self._kv_bytes = sum(s.cache.nbytes() for s in (*self.scheduler.running, *self.scheduler.prefilling)
                             if s.cache is not None)
        if worked:
            self._idle = False
        elif not self._idle:  # just went idle: give back the pool capacity above the blocks still held
            self._pool.trim()
            self._idle = True
        return worked

    def _prefill_piece(self, piece: Piece[SequenceState]) -> None:
        seq = piece.seq
        try:
            if piece.first:
                self._start_prefill(seq)
            logits = self.runner.prefill(seq, piece.start, piece.size)
            if seq.request.prompt_logprobs is not None:
                self.outputs.score_prompt(seq, piece.start, logits)
            seq.prefilled += piece.size
        except Exception as e:  # e.g. image tokens that do not match the tiles: this request only
            self.scheduler.remove(seq)
            self._end(seq, "error", error=f"prefill failed: {e}")
            return
        if seq.prefilled < seq.prompt_len:
            return
        seq.embeds = None
        self.metrics.add_tokens(prompt=seq.prompt_len - seq.reused, cached=seq.reused)
        last = logits[-1].float().cpu()
        for twin in self.scheduler.prefilled(seq):  # the same prompt (e.g. the other choices of n): a copy
            self._free(twin)  # a shorter cached prefix it may have taken
            twin.cache = seq.cache.copy_prefix(seq.prompt_len)
            twin.reused = twin.prefilled = seq.prompt_len
            twin.prompt_logprobs, twin.prompt_top = seq.prompt_logprobs, seq.prompt_top
            self.metrics.add_tokens(cached=seq.prompt_len)
            self._admit(twin, last)
        self._admit(seq, last)

    def _admit(self, seq: SequenceState, logits: torch.Tensor) -> None:
        """A prefilled sequence: sample its first token and, unless that ends it, join the running batch."""
        if seq.request.prompt_logprobs is not None:
            self.outputs.prompt_scored(seq)
            if seq.max_new == 0:  # scoring only
                self.outputs.finish(seq, "length")
                self._retire(seq, list(seq.request.prompt))
                return
        if self.outputs.accept(seq, logits):
            self.scheduler.join(seq)
        else:  # finished at its first token: the cache holds exactly the prompt
            self._retire(seq, list(seq.request.prompt))

    def _take_prefix(self, seq: SequenceState) -> None:
        """Take the longest cached prefix of a text-only prompt (none for prompts with images, nor for prompts
        whose own logprobs are asked: every position must be computed). The scheduler calls it, once."""
        if self.prefix_cache is not None and not seq.whole_prompt:
            seq.reused, seq.cache = self.prefix_cache.take(seq.request.prompt, seq.adapter_uid)
            seq.prefilled = seq.reused

    def _start_prefill(self, seq: SequenceState) -> None:
        """A prompt with images is embedded whole now (its image features are computed once), a text prompt
        piece by piece as it is prefilled."""
        pixels = seq.request.pixel_values
        if pixels is not None:
            seq.embeds = self.runner.embed_images(seq.request.prompt[seq.reused:], pixels)
        if seq.cache is None:
            seq.cache = self._pool.sequence()

    def _decode(self) -> None:
        running = self.scheduler.running
        try:
            logits = self.runner.decode([s.last_token for s in running], [s.cache for s in running],
                                        [s.adapter_slot for s in running])
        except Exception as e:  # the cache may be half-updated: end every running sequence
            for seq in self.scheduler.clear_running():
                self._end(seq, "error", error=f"decode failed: {e}")
            return
        greedy = greedy_shortcut(logits, [s.plain_greedy for s in running])
        keep = [i for i, seq in enumerate(running) if self.outputs.accept(seq, logits[i], greedy[i])]
        for seq in self.scheduler.keep_rows(keep):
            self._retire_row(seq)

    # -- cache blocks -------------------------------------------------------------------------------------

    def _end(self, seq: SequenceState, reason: str, error: str | None = None) -> None:
        """Finish a sequence that leaves the engine without a reusable cache: its blocks go back to the pool."""
        self.outputs.finish(seq, reason, error=error)
        self._free(seq)

    def _free(self, seq: SequenceState) -> None:
        if seq.cache is not None:
            seq.cache.release()
            seq.cache = None

    def _retire_row(self, seq: SequenceState) -> None:
        """A finished running row leaves: its cache holds every token but the last (never fed)."""
        self._retire(seq, (seq.request.prompt + seq.tokens)[:-1])

    def _retire(self, seq: SequenceState, tokens: list[int]) -> None:
        """A sequence leaves the engine: its blocks (holding exactly ``tokens``) go to the prefix cache
        when reusable, else back to the pool."""
        reusable = self.prefix_cache is not None and seq.request.pixel_values is None and seq.reason != "error"
        if reusable and seq.cache is not None:
            self.prefix_cache.put(tokens, seq.cache, seq.adapter_uid)  # the store owns the blocks from now
            seq.cache = None
        self._free(seq)
