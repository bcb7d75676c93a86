"""Counters and latency histograms, rendered in the Prometheus text exposition format (version 0.0.4).

Written by the engine thread and the HTTP handlers, read by ``GET /metrics``: every update takes the
owner's lock, so a scrape sees consistent sums and counts. An engine in a process of its own sends its
figures over as :meth:`ServeMetrics.engine_state` snapshots. No client library: the format is a few
lines of text, and the server should not need one more dependency.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative-bucket histogram of seconds (Prometheus semantics: bucket ``le`` counts values <= le)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"histogram buckets must be non-empty and increasing, got {buckets}")
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last slot is +Inf only
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def state(self) -> dict:
        with self.lock:
            return {"counts": list(self.counts), "sum": self.sum}

    def load(self, state: dict) -> None:
        if len(state["counts"]) != len(self.counts):
            raise ValueError(f"a histogram state needs {len(self.counts)} counts, got {len(state['counts'])}")
        with self.lock:
            self.counts, self.sum = list(state["counts"]), float(state["sum"])

    def render(self, name: str, help: str) -> list[str]:
        with self.lock:
            counts, total = list(self.counts), self.sum
        lines = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        lines += [f"{name}_sum {total}", f"{name}_count {running}"]
        return lines


class ServeMetrics:
    """Everything ``/metrics`` reports that is not read live from the engine."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, HTTP status) -> count
        self.finished: Counter[str] = Counter()  # engine sequences by finish reason (stop, length, cancelled, error)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cached_tokens = 0
        self.ttft = Histogram()
        self.inter_token = Histogram()

    def count_request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] += 1

    def count_finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] += 1

    def add_tokens(self, prompt: int = 0, generated: int = 0, cached: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated
            self.cached_tokens += cached

    def engine_state(self) -> dict:
        """What the engine writes (everything but the HTTP request counts), as plain data."""
        with self.lock:
            state = {"finished": dict(self.finished), "prompt_tokens": self.prompt_tokens,
                     "generated_tokens": self.generated_tokens, "cached_tokens": self.cached_tokens}
        return {**state, "ttft": self.ttft.state(), "inter_token": self.inter_token.state()}

    def load_engine_state(self, state: dict) -> None:
        """Take over an engine's figures (an :meth:`engine_state` from the engine process)."""
        self.ttft.load(state["ttft"])
        self.inter_token.load(state["inter_token"])
        with self.lock:
            for reason, count in state["finished"].items():  # in place: readers may hold the Counter
                self.finished[reason] = count
            self.prompt_tokens, self.cached_tokens = state["prompt_tokens"], state["cached_tokens"]
            self.generated_tokens = state["generated_tokens"]

    def render(self, gauges: Iterable[tuple[str, str, float]]) -> str:
        """The exposition text; ``gauges`` are (name, help, value) read from the engine at scrape time."""
        with self.lock:
            requests, prompt, generated = dict(self.requests), self.prompt_tokens, self.generated_tokens
            cached = self.cached_tokens
            finished = dict(self.finished)
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
        lines += self.ttft.render("llama4_time_to_first_token_seconds", "Time from arrival to the first token.")
        lines += self.inter_token.render("llama4_inter_token_latency_seconds", "Time between consecutive tokens.")
        return "\n".join(lines) + "\n"
