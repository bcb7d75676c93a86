"""The engine's counters and latency histograms, as plain numbers.

Written by the engine thread, read by whoever reports them (``llama4.serve.metrics`` renders them in
the Prometheus text format): every update takes the owner's lock, so a reader sees consistent sums
and counts. An engine in a process of its own sends its figures over as
:meth:`EngineMetrics.engine_state` snapshots.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Sequence

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


class EngineMetrics:
    """What an engine counts: sequences by finish reason, tokens, time to first token, time between tokens."""

    def __init__(self):
        self.lock = threading.Lock()
        self.finished: Counter[str] = Counter()  # engine sequences by finish reason (stop, length, cancelled, error)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cached_tokens = 0
        self.ttft = Histogram()
        self.inter_token = Histogram()

    def count_finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] += 1

    def add_tokens(self, prompt: int = 0, generated: int = 0, cached: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated
            self.cached_tokens += cached

    def engine_state(self) -> dict:
        """Every figure, as plain data."""
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
