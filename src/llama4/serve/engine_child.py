"""The engine process's side of llama4 serve (the parent's is engine_process.py):
``python -m llama4.serve.engine_child`` loads the model, runs the engine, reads request frames from one
pipe and writes each engine iteration's events to the other. A module of its own (imported by nobody),
so that running it with ``-m`` does not find it already imported.

With LoRA adapters (``max_loras`` in the config) the model is loaded unpacked (the CPU kernels take no
adapters), the adapters of the settings' ``lora`` ({name: path}) are loaded before the ready frame, and
``load_lora`` / ``unload_lora`` frames are answered (in a frame's ``replies``) once done.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

import torch

from llama4.dtypes import torch_dtype
from llama4.inference.engine import Engine, EngineConfig
from llama4.inference.requests import AdapterInUse, Event, FinishEvent
from llama4.lora.multi import AdapterError, UnknownAdapter
from llama4.serve.wire import decode_request, encode_event, read_frame, write_frame

METRICS_INTERVAL = 0.25  # seconds between metrics snapshots while nothing finishes


class _Outbox:
    """The child's events, sent to the parent one frame per engine iteration (see the module docstring)."""

    def __init__(self, engine, out):
        self.engine, self.out = engine, out
        self.lock = threading.Lock()
        self.events: list[list] = []
        self.replies: list[dict] = []  # answers to adapter loads / unloads
        self.finished = False  # a finish event is among ``events``
        self.seen = 0
        self.sent: tuple | None = None  # (stats, seen) last sent
        self.sent_metrics: dict | None = None
        self.metrics_at = 0.0  # when the metrics were last looked at

    def sink(self, key: int) -> Callable[[Event], None]:
        def put(event: Event) -> None:
            with self.lock:
                self.events.append(encode_event(key, event))
                self.finished |= isinstance(event, FinishEvent)
        return put

    def flush(self) -> None:
        with self.lock:
            events, self.events = self.events, []
            replies, self.replies = self.replies, []
            finished, self.finished = self.finished, False
            seen = self.seen  # before the stats: they then count every request up to ``seen``
        stats = self.engine.stats()
        now = time.monotonic()
        metrics = None
        if finished or now - self.metrics_at >= METRICS_INTERVAL:
            metrics, self.metrics_at = self.engine.metrics.engine_state(), now
            if metrics == self.sent_metrics:  # nothing new (e.g. idle)
                metrics = None
        if not events and not replies and metrics is None and (stats, seen) == self.sent:
            return
        header = {"stats": stats, "seen": seen}
        if events:
            header["events"] = events
        if replies:
            header["replies"] = replies
        if metrics is not None:
            header["metrics"] = self.sent_metrics = metrics
        self.sent = (stats, seen)
        if self.out is None:
            return
        try:
            write_frame(self.out, header)
        except OSError:  # the parent is gone: nobody to tell; the main thread sees the end of its requests
            try:
                self.out.close()
            except OSError:
                pass
            self.out = None
        except Exception:  # events lost by a bug: end loudly, so the parent fails every request (no hang)
            traceback.print_exc()
            os._exit(1)


def _load(settings: dict) -> Engine:
    """The engine of the parent's settings (JSON: model, dtype, quant, threads, config), its model loaded."""
    from llama4.build import load_model
    from llama4.prompt import load_tokenizer

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    config = EngineConfig(**settings["config"])
    tokenizer = load_tokenizer(settings["model"])
    # adapters need the plain model: the CPU kernels' packed weights and fused decode take none
    model = load_model(settings["model"], dtype=torch_dtype(settings["dtype"]), kernels=config.kernels,
                       quant=settings.get("quant"), pack=False if config.max_loras else None)
    engine = Engine(model, tokenizer, config)
    for name, path in (settings.get("lora") or {}).items():
        engine.load_adapter(name, path)
    return engine


def adapter_op(engine: Engine, header: dict) -> dict:
    """Run a load_lora / unload_lora frame; the reply: {"op_id", "error": None or [kind, message, users]}."""
    reply = {"op_id": header["op_id"], "error": None}
    try:
        if header["op"] == "load_lora":
            engine.load_adapter(header["name"], header["path"])
        else:
            engine.unload_adapter(header["name"])
    except UnknownAdapter as e:
        reply["error"] = ["unknown", str(e), 0]
    except AdapterInUse as e:
        reply["error"] = ["in_use", str(e), e.users]
    except (AdapterError, ValueError) as e:
        reply["error"] = ["adapter", str(e), 0]
    except Exception as e:  # a bug: the request fails with its text, the engine goes on
        traceback.print_exc()
        reply["error"] = ["error", f"{type(e).__name__}: {e}", 0]
    return reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the engine process of llama4 serve (started by the server)")
    parser.add_argument("--requests-fd", type=int, required=True)
    parser.add_argument("--events-fd", type=int, required=True)
    parser.add_argument("--settings", required=True, help="JSON: model, dtype, threads, config (an EngineConfig)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    _exit_with_parent()
    requests, events = os.fdopen(args.requests_fd, "rb"), os.fdopen(args.events_fd, "wb")
    try:
        engine = _load(json.loads(args.settings))
    except Exception as e:
        write_frame(events, {"error": f"{type(e).__name__}: {e}"})
        return 1
    write_frame(events, {"ready": {"vocab": engine.vocab, "max_context": engine.max_context,
                                   "has_vision": engine.has_vision}})
    serve(engine, requests, events)
    return 0


def serve(engine: Engine, requests, events) -> None:
    """Submit and cancel what the parent sends until it says stop (or goes), then stop the engine."""
    outbox = _Outbox(engine, events)
    engine.start(after_step=outbox.flush)
    handles = {}
    reason = "cancelled"
    last_pixels = (None, None)  # (key, tiles) of the last submission: the next may share them
    while (frame := read_frame(requests)) is not None:
        header, payload = frame
        if header["op"] == "stop":
            reason = header.get("reason", "cancelled")
            break
        if header["op"] in ("load_lora", "unload_lora"):  # (waits for the iteration under way, at most)
            reply = adapter_op(engine, header)
            with outbox.lock:
                outbox.replies.append(reply)
            engine.wake()  # an iteration sends the reply
            continue
        key = header["key"]
        if header["op"] == "cancel":
            handle = handles.pop(key, None)
            if handle is not None:
                handle.cancel()
            continue
        try:
            request = decode_request(header, payload, engine.tokenizer,
                                     lambda k: last_pixels[1] if last_pixels[0] == k else None)
            last_pixels = (key, request.pixel_values)
            handles[key] = engine.submit(request, outbox.sink(key))
        except Exception as e:  # the parent checked it already; answer rather than lose it
            outbox.sink(key)(FinishEvent("error", error=f"the engine refused the request: {e}"))
            engine.wake()  # an iteration sends the answer
        with outbox.lock:
            outbox.seen = key + 1
        if len(handles) > 4 * engine.config.max_batch + engine.config.max_queue:
            handles = {k: h for k, h in handles.items() if not h.finished}
    engine.stop(reason=reason)
    outbox.flush()


def _exit_with_parent(poll: float = 0.5) -> None:
    """End this process as soon as the server that started it is gone (killed, say, in the middle of a
    request this process is busy with): an orphaned engine would hold the model's memory forever."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)
    threading.Thread(target=watch, name="llama4-parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
