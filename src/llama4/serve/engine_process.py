"""The engine in a process of its own, so that it never waits for the HTTP side's interpreter lock: the
parent's side (the child's is engine_child.py).

In one process the engine thread and the event loop take turns on one interpreter lock: the HTTP
work of every streamed token (chunks, SSE, socket writes) delays the next decode step, and a server
on a small model runs on about one core however many it has. :class:`EngineProcess` has the
caller-side interface of :class:`~llama4.inference.engine.Engine` (``submit`` -> handle with
``cancel``, ``stats``, ``metrics``, ``max_context``, ``has_vision``, ``start``/``stop``) and runs the
real engine in a child, ``python -m llama4.serve.engine_child``, which loads the model itself: the
HTTP process holds only the tokenizer, never a second copy of the weights. The child gets its
settings as one JSON argument: the model, its dtype (a name of ``llama4.dtypes``), the torch threads
and the :class:`~llama4.inference.engine.EngineConfig` as a dict.

The two talk over a pair of pipes in the frames of wire.py. Requests go down as they are submitted (by
a writer thread: submitting never blocks the event loop); the choices of ``n`` that share one image
send its tiles once and get one tensor on the other side, so the engine still prefills them once. The
child sends everything one engine iteration produced in one frame: its token and finish events, the
engine's gauges, how many submissions it has taken in, and - with each finish, and every quarter second
while they change - its metrics. The caller checks a request (prompt, context length, images) with the
engine's own rules before sending it, and counts the queue as the child's last report plus what it has
sent since, an upper bound, so a refusal (400, 429) is still immediate. If the child dies (the kernel's
out-of-memory killer picks the biggest process: the child), every request under way finishes with an
error, a new child is started, and submissions are refused (503) until it is ready - unless children
keep dying.

LoRA adapters: the parent keeps the names and paths of the adapters the child holds (``lora`` at start,
then :meth:`EngineProcess.load_adapter` / :meth:`EngineProcess.unload_adapter`, each a frame the child
answers once done). A child started after a death loads the same adapters before it is ready.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict

from llama4.dtypes import WEIGHT_DTYPES
from llama4.inference.engine import EngineConfig, admissible
from llama4.inference.metrics import EngineMetrics
from llama4.inference.requests import AdapterInUse, EngineError, Event, FinishEvent, GenerationRequest, QueueFull
from llama4.lora.multi import AdapterError, UnknownAdapter
from llama4.quant.recipe import QuantRecipe
from llama4.serve.wire import decode_event, encode_request, read_frame, write_frame


class EngineStartError(RuntimeError):
    """The engine process ended before its model was loaded (its own output says more)."""


class EngineStopped(EngineError):
    def __init__(self, why: str):
        super().__init__(f"the engine is not running: {why}")


class _Handle:
    def __init__(self, engine: EngineProcess, key: int):
        self._engine, self._key = engine, key

    def cancel(self) -> None:
        """Stop generating for this request; the child frees its cache row at its next iteration."""
        if not self.finished:
            self._engine._send({"op": "cancel", "key": self._key})

    @property
    def finished(self) -> bool:
        return self._key not in self._engine._sinks


class _Child:
    """One run of the child process: its process, its two pipes, and the queue its writer thread drains."""

    def __init__(self, settings: dict):
        to_child, child_reads = os.pipe()[::-1]
        child_writes, from_child = os.pipe()[::-1]
        command = [sys.executable, "-m", "llama4.serve.engine_child", "--requests-fd", str(child_reads),
                   "--events-fd", str(child_writes), "--settings", json.dumps(settings)]
        self.process = subprocess.Popen(command, pass_fds=(child_reads, child_writes))
        os.close(child_reads)
        os.close(child_writes)
        self.to_child, self.from_child = os.fdopen(to_child, "wb"), os.fdopen(from_child, "rb")
        self.outgoing: queue.Queue[tuple[dict, bytes] | None] = queue.Queue()
        self.threads: list[threading.Thread] = []

    def wait_ready(self) -> dict:
        """The child's ready frame, once its model is loaded; raises EngineStartError if it fails instead."""
        frame = read_frame(self.from_child)
        if frame is None or "ready" not in frame[0]:
            why = frame[0].get("error") if frame is not None else None
            code = self.process.wait()
            self.from_child.close()
            self.to_child.close()
            raise EngineStartError(f"the engine process did not start (exit code {code}): "
                                   f"{why or 'see its output above'}")
        return frame[0]["ready"]

    def write(self) -> None:
        try:
            while (item := self.outgoing.get()) is not None:
                write_frame(self.to_child, *item)
        except OSError:  # the child is gone; the reader reports it
            pass
        finally:
            try:
                self.to_child.close()
            except OSError:
                pass


class EngineProcess:
    """An :class:`~llama4.inference.engine.Engine` on ``model`` (a checkpoint directory; None: the embedded
    model) in a child process; ``threads``: the child's torch threads (None: torch's choice).

    A child that dies (killed for memory, say) fails the requests it was running; with ``restart``
    (the default) a new one is started at once and serves the requests that come after it is ready,
    unless ``MAX_RESTARTS`` children have died within ``RESTART_WINDOW`` seconds."""

    MAX_RESTARTS = 3
    RESTART_WINDOW = 300.0

    def __init__(self, model: str | None, dtype: str = "bf16", config: EngineConfig = EngineConfig(),
                 threads: int | None = None, restart: bool = True, quant: str | None = None,
                 lora: dict[str, str] | None = None):
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(WEIGHT_DTYPES)}, got {dtype!r}")
        if quant is not None:
            QuantRecipe.parse(quant)  # a bad recipe fails here, not in the child
        self.config, self.metrics, self.restart = config, EngineMetrics(), restart
        self._settings = {"model": model, "dtype": dtype, "threads": threads, "config": asdict(config), "quant": quant}
        self._child: _Child | None = None
        self._lock = threading.Lock()
        self._sinks: dict[int, Callable[[Event], None]] = {}
        self._next_key = 0
        self._seen = 0  # submissions the child has taken in
        self._stats = {"running": 0, "prefilling": 0, "queued": 0, "kv_cache_bytes": 0, "prefix_cache_bytes": 0,
                       "steps": 0}
        self._killed: str | None = None  # why the running child was killed (see kill)
        self._down: str | None = "not started"  # why submissions are refused, None while running
        self._stopping = False
        self._deaths: list[float] = []  # when children died (monotonic), for the restart limit
        self._last_pixels: tuple[int | None, weakref.ref | None] = (None, None)  # the last submission's tiles
        if lora and not config.max_loras:
            raise ValueError("adapters need an engine configured for them (max_loras > 0)")
        self._adapters: dict[str, str] = dict(lora or {})  # name -> path, as the child holds them
        self._ops: dict[int, dict] = {}  # adapter loads / unloads waiting for the child's reply
        self._next_op = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the child and wait until its model is loaded (a no-op when already running)."""
        if self._child is None:
            self._stopping = False
            self._launch()

    def _launch(self) -> None:
        child = _Child({**self._settings, "lora": dict(self._adapters)})
        ready = child.wait_ready()
        with self._lock:
            if self._stopping:  # stopped while this child loaded its model
                child.process.kill()
                child.process.wait()
                return
            self.vocab, self.max_context, self.has_vision = ready["vocab"], ready["max_context"], ready["has_vision"]
            self._child, self._seen = child, self._next_key
            self._stats = dict.fromkeys(self._stats, 0)
            self._down = None
        child.threads = [threading.Thread(target=self._read, args=(child,), name="llama4-engine-events", daemon=True),
                         threading.Thread(target=child.write, name="llama4-engine-requests", daemon=True)]
        for thread in child.threads:
            thread.start()

    def stop(self, timeout: float = 30.0, reason: str = "cancelled") -> None:
        """Stop the child; every unfinished request is finished with ``reason`` ("cancelled", or "error" for a
        shutdown that cuts replies short)."""
        with self._lock:
            self._stopping = True
            self._down = "the server is shutting down"
            child = self._child
        if child is None:
            return
        child.outgoing.put(({"op": "stop", "reason": reason}, b""))
        child.outgoing.put(None)
        try:
            child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        for thread in child.threads:
            thread.join(timeout)
        self._fail_all(reason, "the server is shutting down")
        self._child = None

    def kill(self, why: str) -> None:
        """Kill the child now (e.g. it is stuck): its requests fail with ``why`` and, as after any death, a new
        child is started unless children keep dying."""
        child = self._child
        if child is not None:
            self._killed = why
            child.process.kill()

    # -- caller side (any thread) --------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> _Handle:
        """Queue a request; raises ValueError (bad input), ContextTooLong, QueueFull or EngineStopped at once."""
        if self._down is not None:
            raise EngineStopped(self._down)
        admissible(request, self.vocab, self.max_context, self.has_vision)
        if request.adapter is not None and request.adapter not in self._adapters:
            raise UnknownAdapter(request.adapter, list(self._adapters))
        pixels = request.pixel_values
        with self._lock:
            if self._down is not None:
                raise EngineStopped(self._down)
            queued = self._stats["queued"] + self._next_key - self._seen
            if queued >= self.config.max_queue:
                raise QueueFull(queued)
            previous, tiles = self._last_pixels
            shared = pixels is not None and tiles is not None and tiles() is pixels
            header, payload = encode_request(request, previous if shared else None)
            key, self._next_key = self._next_key, self._next_key + 1
            self._last_pixels = (key, None if pixels is None else weakref.ref(pixels))
            self._sinks[key] = sink
            self._child.outgoing.put(({"op": "submit", "key": key, **header}, payload))  # in key order
        return _Handle(self, key)

    @property
    def down(self) -> str | None:
        """Why the engine cannot serve (None while it runs)."""
        return self._down

    def loaded_adapters(self) -> dict[str, str]:
        """The adapters the child holds: name -> path."""
        with self._lock:
            return dict(self._adapters)

    def load_adapter(self, name: str, path: str, timeout: float = 300.0) -> None:
        """Load a PEFT adapter in the child as Engine.load_adapter does (blocks until it answers); raises its
        AdapterError, or EngineStopped."""
        if not self.config.max_loras:
            raise ValueError("this engine was configured without adapters (max_loras is 0)")
        self._adapter_op({"op": "load_lora", "name": name, "path": path}, timeout)

    def unload_adapter(self, name: str, timeout: float = 300.0) -> None:
        """Unload an adapter in the child as Engine.unload_adapter does (refused while requests use it)."""
        self._adapter_op({"op": "unload_lora", "name": name}, timeout)

    def _adapter_op(self, header: dict, timeout: float) -> None:
        done = threading.Event()
        with self._lock:
            if self._down is not None:
                raise EngineStopped(self._down)
            op_id, self._next_op = self._next_op, self._next_op + 1
            record = self._ops[op_id] = {**header, "done": done, "error": None}
            self._child.outgoing.put(({**header, "op_id": op_id}, b""))
        if not done.wait(timeout):
            with self._lock:
                self._ops.pop(op_id, None)
            raise EngineError(f"the engine process did not answer the adapter {header['op']} within {timeout:g} s")
        error = record["error"]
        if error is None:
            return
        kind, message, users = error
        if kind == "unknown":
            raise UnknownAdapter(header["name"], list(self.loaded_adapters()))
        if kind == "in_use":
            raise AdapterInUse(header["name"], users)
        if kind == "adapter":
            raise AdapterError(message)
        raise (EngineStopped(message) if kind == "stopped" else EngineError(message))

    def _answer(self, reply: dict) -> None:
        """The child's answer to an adapter op: the adapters known here follow it, its waiter wakes."""
        with self._lock:
            record = self._ops.pop(reply["op_id"], None)
            if record is None:
                return
            record["error"] = reply["error"]
            if reply["error"] is None and record["op"] == "load_lora":
                self._adapters[record["name"]] = record["path"]
            elif reply["error"] is None:
                self._adapters.pop(record["name"], None)
        record["done"].set()

    def stats(self) -> dict[str, int]:
        with self._lock:
            stats = dict(self._stats)
            stats["queued"] += self._next_key - self._seen
        return stats

    def _send(self, header: dict, payload: bytes = b"") -> None:
        child = self._child
        if child is not None:
            child.outgoing.put((header, payload))

    # -- the child's events --------------------------------------------------------------------------------

    def _read(self, child: _Child) -> None:
        why = "the engine process ended"
        self._killed = None
        try:
            while (frame := read_frame(child.from_child)) is not None:
                self._dispatch_frame(frame[0])
        except Exception as e:  # a broken frame: the child cannot be trusted to be in step any more
            why = f"the engine process sent a bad frame: {e}"
        finally:
            child.from_child.close()
        try:
            why += f" (exit code {child.process.wait(5)})"
        except subprocess.TimeoutExpired:
            child.process.kill()
        if self._killed is not None:
            why = f"the engine process was killed: {self._killed}"
        child.outgoing.put(None)  # ends its writer
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                return
            self._deaths = [t for t in self._deaths if now - t < self.RESTART_WINDOW] + [now]
            again = self.restart and len(self._deaths) <= self.MAX_RESTARTS
            self._down = why + ("; restarting it" if again else "")
        self._fail_all("error", why)
        if not again:
            return
        try:
            self._launch()
        except Exception as e:
            with self._lock:
                if not self._stopping:
                    self._down = f"{why}; its restart failed: {e}"

    def _dispatch_frame(self, header: dict) -> None:
        """One frame from the child: gauges, metrics, then its events, each to its request's sink."""
        with self._lock:
            self._stats, self._seen = header["stats"], max(self._seen, header["seen"])  # a new child starts at 0
        if "metrics" in header:
            self.metrics.load_engine_state(header["metrics"])
        for reply in header.get("replies", ()):
            self._answer(reply)
        for item in header.get("events", ()):
            key, event = decode_event(item)
            sink = self._sinks.pop(key, None) if isinstance(event, FinishEvent) else self._sinks.get(key)
            if sink is None:
                continue
            try:
                sink(event)
            except Exception:  # the consumer is gone (e.g. its event loop closed): stop generating for it
                if not isinstance(event, FinishEvent):
                    self._sinks.pop(key, None)
                    self._send({"op": "cancel", "key": key})

    def _fail_all(self, reason: str, why: str) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, {}
            ops, self._ops = self._ops, {}
        for record in ops.values():  # (an op the dead child may or may not have done: its restart loads _adapters)
            record["error"] = ["stopped", why, 0]
            record["done"].set()
        for sink in sinks.values():
            try:
                sink(FinishEvent(reason, error=why))
            except Exception:
                pass
