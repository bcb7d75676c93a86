"""Stopping in bounded time: SIGTERM drains for --drain-seconds and then ends open streams with an error
event and [DONE]; a second signal does so at once; the engine process never outlives the server; a stuck
engine is reported by /health and an engine process is replaced."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from llama4.serve.monitoring import StallWatch
from tests.serve.test_command import free_port


class Served:
    """``llama4 serve`` on the test checkpoint in a subprocess, with one long stream open."""

    def __init__(self, checkpoint, tok, *flags: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama4.cli", "serve", "--model", str(checkpoint), "--port", str(self.port),
             "--threads", "1", "--dtype", "fp32", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ends = {str(t): -100 for t in tok.eos_ids}  # the stream runs to its budget
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llama4 serve did not come up"
            time.sleep(0.1)
        self.engine_pids = [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        assert self.engine_pids
        self.events: list[str] = []
        self.ended = threading.Event()
        self.reader = threading.Thread(target=self._stream, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 30
        while len(self.events) < 5:
            assert time.monotonic() < deadline and not self.ended.is_set(), self.events
            time.sleep(0.01)

    def _stream(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "stream": True, "logit_bias": self.ends}
        try:
            with httpx.stream("POST", self.base + "/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
        except httpx.HTTPError as e:
            self.events.append(f"transport error: {e}")
        finally:
            self.ended.set()

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=30)


@pytest.fixture
def served(checkpoint, tok):
    started = []

    def start(*flags):
        started.append(Served(checkpoint, tok, *flags))
        return started[-1]
    yield start
    for s in started:
        s.close()


def ends_with_an_error_and_done(events: list[str]) -> bool:
    return len(events) >= 2 and events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]


def engines_gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_sigterm_drains_for_the_drain_time_then_ends_open_streams_with_an_error(served):
    server = served("--drain-seconds", "1")
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.ended.wait(20), "the stream outlived the drain time"
    assert time.monotonic() - signalled >= 0.9  # it was given its drain time
    assert ends_with_an_error_and_done(server.events), server.events[-3:]
    assert server.process.wait(20) in (0, -signal.SIGTERM) and time.monotonic() - signalled < 20  # (uvicorn re-raises)
    assert engines_gone(server.engine_pids)


def test_a_second_signal_ends_open_streams_at_once(served):
    server = served("--drain-seconds", "600")
    server.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert not server.ended.is_set()  # draining
    again = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.ended.wait(15) and time.monotonic() - again < 15
    assert ends_with_an_error_and_done(server.events), server.events[-3:]
    server.process.wait(20)
    assert engines_gone(server.engine_pids)


def test_the_engine_process_does_not_outlive_a_killed_server(served):
    server = served()
    server.process.kill()
    assert engines_gone(server.engine_pids), "the engine process was orphaned"


class FakeEngine:
    def __init__(self):
        self.s = {"running": 0, "prefilling": 0, "queued": 0, "steps": 0}

    def stats(self):
        return dict(self.s)


def test_a_stall_is_work_waiting_and_no_iteration_for_the_timeout():
    engine, now = FakeEngine(), [0.0]
    watch = StallWatch(engine, timeout=10, clock=lambda: now[0])
    assert watch.stuck() is None
    now[0] = 100.0
    assert watch.stuck() is None  # idle for long: not stuck
    engine.s["queued"] = 2
    assert watch.stuck() is None
    now[0] = 109.0
    assert watch.stuck() is None
    now[0] = 111.0
    assert "no iteration for 11 s with 2 requests waiting" in watch.stuck()
    engine.s["steps"] = 1  # it moved
    assert watch.stuck() is None
    now[0] = 200.0
    assert StallWatch(engine, timeout=0, clock=lambda: now[0]).stuck() is None  # 0: off
