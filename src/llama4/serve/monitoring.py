"""What supervisors and scrapers poll: ``GET /health`` (503 once the engine is down or stuck, so that a
supervisor restarts the server) and ``GET /metrics``, with the middleware that counts every response for it.
/health is open without the API key; /metrics too unless the app asks otherwise (a server bound beyond
loopback with a key: its counters say how busy it is and what it is asked).

The engine is stuck when work waits or runs and no engine iteration has finished for ``stall_timeout``
seconds (:class:`StallWatch`; engines count their iterations as ``stats()["steps"]``). Then /health says so
with a 503 and an engine process is killed, which fails its requests and starts a new one; an engine thread
cannot be killed, and the 503 is for the supervisor.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from llama4.inference.engine import Engine
from llama4.serve.engine_process import EngineProcess
from llama4.serve.errors import logger
from llama4.serve.metrics import ServeMetrics
from llama4.serve.request_reader import RequestReader

ROUTES = ("/", "/static/index.html", "/static/client.js", "/static/ui.js", "/health", "/metrics", "/v1/models",
          "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
          "/tokenizer_info", "/v1/responses")  # metric labels; any other path counts as "other"


class CountRequests:
    """ASGI middleware: counts every HTTP response by route and status (streams included)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.count_request(route, status)


class StallWatch:
    """Tells a stuck engine from a busy one: stuck means work waiting or running and the iteration count
    (``stats()["steps"]``) unchanged for ``timeout`` seconds (0: never stuck)."""

    def __init__(self, engine: Engine | EngineProcess, timeout: float, clock=time.monotonic):
        self.engine, self.timeout, self.clock = engine, timeout, clock
        self._steps, self._since = None, clock()

    def stuck(self) -> str | None:
        """Why the engine looks stuck, or None."""
        stats, now = self.engine.stats(), self.clock()
        waiting = stats["running"] + stats["prefilling"] + stats["queued"]
        if stats.get("steps") != self._steps or not waiting:
            self._steps, self._since = stats.get("steps"), now
            return None
        idle = now - self._since
        if self.timeout and idle > self.timeout:
            return (f"the engine has finished no iteration for {idle:.0f} s with {waiting} requests waiting or running "
                    f"(limit: --stall-timeout {self.timeout:g})")
        return None


async def watch_for_stalls(engine: Engine | EngineProcess, watch: StallWatch, every: float = 1.0) -> None:
    """Run for the app's lifetime: kill a stuck engine process (its supervisor starts another)."""
    while True:
        await asyncio.sleep(every)
        why = watch.stuck()
        if why is not None and isinstance(engine, EngineProcess) and engine.down is None:
            logger.error("%s: killing the engine process", why)
            engine.kill(why)


def add_monitoring_routes(app: FastAPI, engine: Engine | EngineProcess, http_metrics: ServeMetrics,
                          watch: StallWatch, reader: RequestReader | None = None) -> None:
    """/health and /metrics; with ``reader``, /metrics asks for its API key."""
    metrics = engine.metrics

    @app.get("/health")
    async def health():
        down = engine.down or watch.stuck()
        if down is not None:  # e.g. the engine process died
            return JSONResponse({"status": "unavailable", "reason": down}, status_code=503)
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def prometheus(request: Request):
        if reader is not None:
            reader.authorize(request)
        s = engine.stats()
        gauges = [("llama4_running_requests", "Sequences in the running batch (decoding or prefilling).",
                   s["running"] + s["prefilling"]),
                  ("llama4_queued_requests", "Requests waiting for a batch slot.", s["queued"]),
                  ("llama4_kv_cache_bytes", "Bytes of KV cache allocated to running sequences.", s["kv_cache_bytes"]),
                  ("llama4_prefix_cache_bytes", "Bytes of KV cache kept for prefix reuse.", s["prefix_cache_bytes"])]
        return PlainTextResponse(http_metrics.render(metrics, gauges), media_type="text/plain; version=0.0.4")
