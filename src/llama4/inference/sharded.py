"""The engine over the ranks of a sharded model (``torchrun ... -m llama4 serve --tp T --ep E``): rank 0 runs the
engine (scheduler, prefix cache, sampling, outputs) with a :class:`LeaderRunner`; every other rank runs
:func:`follow`, which makes the same model calls on its shard.

Why the model runner is the seam. Every collective inside a sharded model (the row-parallel all-reduces, the MoE
all-reduce, the head's all-gather; llama4.distributed) must be met by every rank with tensors of the same shape,
so every rank must make the same model calls in the same order. Everything else the engine decides (admission,
prefill pieces, which rows run, sampling from the all-gathered logits) happens on rank 0 only; the followers just
repeat the calls.

Messages. Before each model call rank 0 broadcasts one message (:class:`Channel`): a JSON header (the call: a
prefill piece with its token ids, sequence index and whether every position's logits are wanted, or a ragged
decode step with each row's token) and, for a piece of a prompt with images, the piece's embeddings (the vision
tower and the embeddings are whole on every rank, so rank 0 embeds the images alone). Nothing is pickled.

The followers' caches. Every rank keeps its own :class:`~llama4.model.paged_cache.PagedKVCache` of its KV heads.
The pool's bookkeeping (which blocks a sequence holds, reference counts, the free list, prefix copies, trims) is a
deterministic function of the operations made on it, and the pool itself does the same inside the same model call
over the same block tables, so followers replay rank 0's operations: :class:`RecordingPool` journals every
operation made outside a model call (a new sequence, a prefix copy, a release, a trim) with a sequence id, and
each message carries the journal since the previous one. Every message also carries rank 0's count of blocks in
use: a follower that counts otherwise stops with an error rather than write into another sequence's blocks.

Idle servers and failures. A follower waits for the next message in a broadcast bounded by the process group's
timeout, so an idle rank 0 sends a heartbeat (a message with no call) every ``heartbeat_s``; a follower that died
also shows at the next heartbeat, not only at the next request. Any failure while rank 0 sends or makes a call is
fatal (the ranks are then out of step): the runner refuses every later call (``down``), tells its owner
(``on_failure``) and the owner ends the job (llama4.serve.distributed).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llama4.distributed.context import ContextPlan
from llama4.inference.engine import EngineConfig, engine_pool
from llama4.inference.runner import ModelRunner
from llama4.model.paged_cache import PagedKVCache, PagedSequence
from llama4.model.transformer import Llama4Model


class ShardedRunError(RuntimeError):
    """The ranks cannot go on together (a message out of step with this rank's state)."""


class Channel:
    """Messages from rank 0 to every rank of the default process group: a JSON header and at most one tensor
    (its shape in the header, the receiver's ``dtype``). Three broadcasts at most: sizes, header, tensor."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def send(self, header: dict, tensor: torch.Tensor | None = None) -> None:
        if tensor is not None:
            header = {**header, "shape": list(tensor.shape)}
        data = json.dumps(header, separators=(",", ":")).encode()
        sizes = torch.tensor([len(data), 0 if tensor is None else tensor.numel()], dtype=torch.int64,
                             device=self.device)
        dist.broadcast(sizes, src=0)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device), src=0)
        if tensor is not None:
            dist.broadcast(tensor.contiguous().to(self.device), src=0)

    def receive(self, dtype: torch.dtype) -> tuple[dict, torch.Tensor | None]:
        sizes = torch.empty(2, dtype=torch.int64, device=self.device)
        dist.broadcast(sizes, src=0)
        length, numel = (int(n) for n in sizes.tolist())
        data = torch.empty(length, dtype=torch.uint8, device=self.device)
        dist.broadcast(data, src=0)
        header = json.loads(bytes(data.cpu().numpy()))
        if not numel:
            return header, None
        tensor = torch.empty(header["shape"], dtype=dtype, device=self.device)
        dist.broadcast(tensor, src=0)
        return header, tensor


class _RecordedSequence(PagedSequence):
    """A sequence of a :class:`RecordingPool`: its prefix copies and its release are journaled under its ``uid``."""

    pool: RecordingPool
    uid: int

    def copy_prefix(self, length: int) -> PagedSequence:
        with self.pool.lock:
            copy = super().copy_prefix(length)
            return self.pool.track(copy, ["copy", self.uid, length])

    def release(self) -> None:
        with self.pool.lock:
            if not self.released:
                self.pool.journal.append(["release", self.uid])
            super().release()


class RecordingPool(PagedKVCache):
    """Rank 0's pool: every operation made outside a model call is journaled for the followers to replay."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.RLock()
        self.journal: list[list] = []
        self._next_uid = 0

    def sequence(self) -> PagedSequence:
        with self.lock:
            return self.track(super().sequence(), ["new"])

    def trim(self) -> None:
        with self.lock:
            self.journal.append(["trim"])
            super().trim()

    def track(self, seq: PagedSequence, op: list) -> _RecordedSequence:
        """Give ``seq`` (just made by the pool's own code) an id and journal ``op`` + [its id]."""
        self._next_uid += 1
        seq.__class__ = _RecordedSequence  # the pool's code builds plain sequences; same layout, journaled methods
        seq.uid = self._next_uid
        self.journal.append([*op, seq.uid])
        return seq

    def take_journal(self) -> tuple[list[list], int]:
        """The operations since the last call, and the blocks in use after them."""
        with self.lock:
            ops, self.journal = self.journal, []
            return ops, self.blocks_used()


def _replay(pool: PagedKVCache, sequences: dict[int, PagedSequence], ops: list[list]) -> None:
    for op in ops:
        if op[0] == "new":
            sequences[op[1]] = pool.sequence()
        elif op[0] == "copy":
            sequences[op[3]] = sequences[op[1]].copy_prefix(op[2])
        elif op[0] == "release":
            sequences.pop(op[1]).release()
        elif op[0] == "trim":
            pool.trim()
        else:
            raise ShardedRunError(f"unknown cache operation from rank 0: {op!r}")


class LeaderRunner(ModelRunner):
    """Rank 0's model runner: each model call is first described to the followers (see the module docstring).

    ``heartbeat_s``: the longest time without a message (below the process group's timeout). ``on_failure``
    (settable later) is called once, with the exception, from the thread that found the failure.
    """

    def __init__(self, model: Llama4Model, config: EngineConfig, channel: Channel, heartbeat_s: float,
                 on_failure: Callable[[BaseException], None] | None = None, context: ContextSetup | None = None):
        if config.max_loras:
            raise ValueError("LoRA adapters are not served by a sharded model yet")
        super().__init__(model, engine_pool(model, config, RecordingPool), config.batch_invariant)
        self.channel, self.heartbeat_s, self.on_failure = channel, heartbeat_s, on_failure
        # with context parallelism the calls themselves are the context-parallel runner's (over the same pool)
        self._calls: ModelRunner = self if context is None else context.runner(model, self.pool, config)
        self.prefill_in_pieces, self.copies_caches = self._calls.prefill_in_pieces, self._calls.copies_caches
        self.failure: BaseException | None = None
        self._lock = threading.Lock()  # one message and its call at a time (the engine thread, the heartbeats)
        self._closed = False
        self._stopping = threading.Event()
        with self._lock:
            self._send({"op": "start", "kv_block_size": config.kv_block_size, "kv_cache": config.kv_cache,
                        "batch_invariant": config.batch_invariant, "prefill_chunk": config.prefill_chunk,
                        "context": context is not None})
        self._beats = threading.Thread(target=self._heartbeats, name="llama4-heartbeat", daemon=True)
        self._beats.start()

    @property
    def down(self) -> str | None:
        if self.failure is not None:
            return f"the sharded model's ranks are out of step after a failure: {self.failure!r}"
        return "the sharded model was stopped" if self._closed else None

    def prefill_piece(self, cache: PagedSequence, start: int, ids: list[int] | None, embeds: torch.Tensor | None,
                      every_logit: bool, slot: int = 0) -> torch.Tensor:
        header = {"op": "prefill", "seq": cache.uid, "start": start, "ids": ids, "every": every_logit}
        with self._call(header, embeds):
            if self._calls is not self:
                return self._calls.prefill_piece(cache, start, ids, embeds, every_logit, slot)
            return super().prefill_piece(cache, start, ids, embeds, every_logit, slot)

    def decode(self, tokens: list[int], caches: list[PagedSequence], slots: list[int] | None = None) -> torch.Tensor:
        with self._call({"op": "decode", "tokens": list(tokens), "seqs": [c.uid for c in caches]}):
            if self._calls is not self:
                return self._calls.decode(tokens, caches, slots)
            return super().decode(tokens, caches, slots)

    def check(self, request) -> None:
        if self._calls is not self:
            self._calls.check(request)

    def close(self) -> BaseException | None:
        """Stop the heartbeats and tell the followers to stop (unless a failure came first); returns the failure,
        if any (this one's included)."""
        self._stopping.set()
        with self._lock:
            if self.failure is None and not self._closed:
                try:
                    self._send({"op": "stop"})
                except Exception as error:  # noqa: BLE001 - reported to the caller
                    self._failed(error)
            self._closed = True
        self._beats.join(5)
        return self.failure

    @contextlib.contextmanager
    def _call(self, header: dict, tensor: torch.Tensor | None = None) -> Iterator[None]:
        with self._lock:
            if self.down is not None:
                raise ShardedRunError(self.down)
            try:
                self._send(header, tensor)
                yield
            except BaseException as error:
                self._failed(error)
                raise

    def _send(self, header: dict, tensor: torch.Tensor | None = None) -> None:
        header["journal"], header["used"] = self.pool.take_journal()
        self.channel.send(header, tensor)
        self._last = time.monotonic()

    def _heartbeats(self) -> None:
        while not self._stopping.wait(self.heartbeat_s / 4):
            with self._lock:
                if self.down is not None:
                    return
                if time.monotonic() - self._last < self.heartbeat_s:
                    continue
                try:
                    self._send({"op": "beat"})
                except Exception as error:  # noqa: BLE001 - a follower gone: the owner ends the job
                    self._failed(error)
                    return

    def _failed(self, error: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = error
        if self.on_failure is not None:
            self.on_failure(error)


class Follower:
    """A follower rank: repeats rank 0's model calls on this rank's shard, each over this rank's own pool, whose
    blocks follow rank 0's journal. Made on the first message (rank 0's settings); :meth:`run` until stopped."""

    def __init__(self, model: Llama4Model, channel: Channel, context: ContextSetup | None = None):
        self.channel, self.dtype = channel, model.text.embed.weight.dtype
        header, _ = channel.receive(self.dtype)
        if header.get("op") != "start":
            raise ShardedRunError(f"the first message from rank 0 was {header.get('op')!r}, not 'start'")
        if header["context"] != (context is not None):
            raise ShardedRunError("rank 0 and this rank disagree on context parallelism")
        config = EngineConfig(kv_block_size=header["kv_block_size"], kv_cache=header["kv_cache"],
                              batch_invariant=header["batch_invariant"], prefill_chunk=header["prefill_chunk"])
        pool = engine_pool(model, config)
        self.runner = (ModelRunner(model, pool, config.batch_invariant) if context is None
                       else context.runner(model, pool, config))
        self.pool = self.runner.pool
        self.sequences: dict[int, PagedSequence] = {}  # rank 0's sequence ids -> this rank's sequences
        self.calls = 0

    def run(self) -> int:
        """Follow until rank 0 says stop; returns the number of model calls made."""
        with torch.inference_mode():
            while self.handle(*self.channel.receive(self.dtype)):
                pass
        return self.calls

    def handle(self, header: dict, tensor: torch.Tensor | None) -> bool:
        """Replay one message's journal and make its call; False for rank 0's stop."""
        _replay(self.pool, self.sequences, header["journal"])
        if self.pool.blocks_used() != header["used"]:
            raise ShardedRunError(f"this rank's cache holds {self.pool.blocks_used()} blocks where rank 0's holds "
                                  f"{header['used']}: the caches are out of step")
        op = header["op"]
        if op == "stop":
            return False
        if op == "prefill":
            self.runner.prefill_piece(self.sequences[header["seq"]], header["start"], header["ids"], tensor,
                                      header["every"])
        elif op == "decode":
            self.runner.decode(header["tokens"], [self.sequences[uid] for uid in header["seqs"]])
        elif op != "beat":
            raise ShardedRunError(f"unknown message from rank 0: {op!r}")
        self.calls += op != "beat"
        return True


def follow(model: Llama4Model, channel: Channel, context: ContextSetup | None = None) -> int:
    """Run a :class:`Follower` until rank 0 says stop; the number of model calls made."""
    return Follower(model, channel, context).run()


@dataclass(frozen=True)
class ContextSetup:
    """Context parallelism of a sharded run (``serve --cp``): the context group of this rank and its plan; every
    rank's model calls are then a :class:`~llama4.inference.context_runner.ContextParallelRunner`'s."""

    plan: ContextPlan
    group: dist.ProcessGroup | None

    def runner(self, model: Llama4Model, pool: PagedKVCache, config: EngineConfig) -> ModelRunner:
        from llama4.inference.context_runner import ContextParallelRunner

        return ContextParallelRunner(model, pool, config.batch_invariant, self.plan, self.group,
                                     config.prefill_chunk, config.kv_cache)
