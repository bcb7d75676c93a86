"""What supervisors and scrapers poll: ``GET /health`` (503 once the engine is down, so that a supervisor
restarts the server) and ``GET /metrics``, with the middleware that counts every response for it. Both
routes are open without the API key.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from llama4.inference.engine import Engine
from llama4.serve.engine_process import EngineProcess
from llama4.serve.metrics import ServeMetrics

ROUTES = ("/", "/static/index.html", "/static/client.js", "/static/ui.js", "/health", "/metrics", "/v1/models",
          "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
          "/tokenizer_info")  # metric labels; any other path counts as "other"


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


def add_monitoring_routes(app: FastAPI, engine: Engine | EngineProcess, http_metrics: ServeMetrics) -> None:
    metrics = engine.metrics

    @app.get("/health")
    async def health():
        down = engine.down
        if down is not None:  # e.g. the engine process died
            return JSONResponse({"status": "unavailable", "reason": down}, status_code=503)
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def prometheus():
        s = engine.stats()
        gauges = [("llama4_running_requests", "Sequences in the running batch (decoding or prefilling).",
                   s["running"] + s["prefilling"]),
                  ("llama4_queued_requests", "Requests waiting for a batch slot.", s["queued"]),
                  ("llama4_kv_cache_bytes", "Bytes of KV cache allocated to running sequences.", s["kv_cache_bytes"]),
                  ("llama4_prefix_cache_bytes", "Bytes of KV cache kept for prefix reuse.", s["prefix_cache_bytes"])]
        return PlainTextResponse(http_metrics.render(metrics, gauges), media_type="text/plain; version=0.0.4")
