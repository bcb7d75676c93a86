"""``GET /metrics``: the HTTP request counts and the engine's figures (``llama4.inference.metrics``) in the
Prometheus text exposition format (version 0.0.4).

No client library: the format is a few lines of text, and the server should not need one more
dependency.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable

from llama4.inference.metrics import EngineMetrics, Histogram


class ServeMetrics:
    """The HTTP side's own counts (requests by route and status), and the rendering of everything."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, HTTP status) -> count

    def count_request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] += 1

    def render(self, engine: EngineMetrics, gauges: Iterable[tuple[str, str, float]]) -> str:
        """The exposition text; ``gauges`` are (name, help, value) read from the engine at scrape time."""
        with self.lock:
            requests = dict(self.requests)
        with engine.lock:
            prompt, generated, cached = engine.prompt_tokens, engine.generated_tokens, engine.cached_tokens
            finished = dict(engine.finished)
        lines = ["# HELP llama4_requests_total HTTP requests by route and status.",
                 "# TYPE llama4_requests_total counter"]
        for (route, status), n in sorted(requests.items()):
            lines.append(f'llama4_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += ["# HELP llama4_sequences_finished_total Generated sequences (choices) by finish reason.",
                  "# TYPE llama4_sequences_finished_total counter"]
        lines += [f'llama4_sequences_finished_total{{reason="{r}"}} {n}' for r, n in sorted(finished.items())]
        for name, help, value in (("llama4_prompt_tokens_total", "Prompt tokens prefilled.", prompt),
                                  ("llama4_prefix_cache_hit_tokens_total",
                                   "Prompt tokens reused from the prefix cache (not prefilled).", cached),
                                  ("llama4_generated_tokens_total", "Tokens generated.", generated)):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
        for name, help, value in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
        lines += render_histogram(engine.ttft, "llama4_time_to_first_token_seconds",
                                  "Time from arrival to the first token.")
        lines += render_histogram(engine.inter_token, "llama4_inter_token_latency_seconds",
                                  "Time between consecutive tokens.")
        return "\n".join(lines) + "\n"


def render_histogram(histogram: Histogram, name: str, help: str) -> list[str]:
    """A histogram's exposition lines: cumulative buckets, sum, count."""
    with histogram.lock:
        counts, total = list(histogram.counts), histogram.sum
    lines = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
    running = 0
    for bound, n in zip((*histogram.buckets, float("inf")), counts):
        running += n
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{{le="{le}"}} {running}')
    lines += [f"{name}_sum {total}", f"{name}_count {running}"]
    return lines
