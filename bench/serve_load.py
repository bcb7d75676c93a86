"""Load test of ``llama4 serve`` on loopback: many concurrent streaming clients, every reply checked.

    python bench/serve_load.py                       # the embedded model, 32 clients, 200 requests
    python bench/serve_load.py --model DIR --clients 16 --requests 100 --no-write
    python bench/serve_load.py --faults --no-write      # hostile requests, an engine kill, SIGTERM (2-3 min)
    python bench/serve_load.py --lora 2 --no-write      # throughput with 2 LoRA adapters vs none

Phases (all against ``llama4 serve`` run as its own process on 127.0.0.1, with the official ``openai``
client in this one, so that the clients' parsing does not share the server's interpreter lock):
1. reference: each distinct prompt sent alone (temperature 0) - the reply every later copy must equal;
2. scaling: 1 client, then 8 concurrent clients, each side for the same time (``--scaling-seconds``;
   closed loop: every client sends its next request, cycling through the prompts, as soon as its reply
   is in; replies started before the end are finished and counted), ``--scaling-rounds`` times in turn
   - aggregate generated tokens/s over each side's rounds (continuous batching should give 8 clients
   several times one client's rate). The machine's speed drifts within minutes on a shared host:
   sides of equal length, interleaved, sample it alike (by request count, the 8-client side would run
   a quarter as long, and a slow spell would fall on one side);
3. load: ``--requests`` streaming requests from ``--clients`` concurrent clients - HTTP 5xx count,
   replies lost or different from the reference, time-to-first-token p50/p99, tokens/s;
4. prefix cache: two-turn conversations, one at a time, on this server and on one without a prefix
   cache - the share of turn-2 prompt tokens reused, and turn-2 time-to-first-token with and without.

Bounded: every phase stops at ``--time-limit`` seconds (the run then reports what finished). The
results go to docs/PERFORMANCE.md under <!-- bench-serve --> unless ``--no-write``.

Faults (``--faults``, instead of the phases above; see docs/SERVING.md): one fresh server, started with
``--drain-seconds 60``, replies as in 1., then, every plain reply checked against them (0 lost or altered):
a calm run of ``--clients`` closed-loop clients for ``--fault-seconds``; the same run while 2 threads send
hostile requests (malformed, oversized, cross-origin, slow or vanishing clients; each must get its 4xx in
the OpenAI error format, or its 200) and a third polls /health (under 1 s); the engine process SIGKILLed
under load (the requests it held fail at once, those after /health is 200 again are right); SIGTERM with
``--clients`` long streams in flight (each finishes right, the server exits). Results under
<!-- bench-serve-faults -->; exit status 1 when a pass criterion fails.

LoRA (``--lora N``, instead of the phases above; docs/FINETUNING.md): N random adapters (rank ``--lora-rank``
on attention, shared expert and routed experts) are written for the model, then ``--clients`` closed-loop
clients run for ``--lora-seconds`` against: the plain server (packed CPU kernels where the machine has them,
no adapters); a server started with ``--lora`` (the model unpacked) with every request on the base; and the
same server with requests spread over the base and the N adapters (rows of different adapters in one
batch). Each (prompt, model) reply is checked against the same request sent alone to that server. Results
under <!-- bench-serve-lora -->.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table, write_section  # noqa: E402

TOPICS = ["a dog named Max", "the park", "a red ball", "the weather in Paris", "a little cat", "the sea",
          "a birthday cake", "a rainy day", "the moon", "a tall tree", "a lost key", "a new friend"]


def prompts(count: int) -> list[list[dict]]:
    """``count`` distinct chat requests of different lengths."""
    return [[{"role": "user",
              "content": f"Tell me a short story about {TOPICS[i % len(TOPICS)]}." + " Please." * (i // 3)}]
            for i in range(count)]


@dataclass
class Outcome:
    index: int  # which prompt
    status: int = 200
    text: str = ""
    tokens: int = 0
    cached: int = 0  # prompt tokens the server reused from its prefix cache
    prompt_tokens: int = 0
    ttft: float | None = None
    seconds: float = 0.0
    error: str | None = None
    started: float = 0.0  # time.perf_counter() when it was sent


@dataclass
class LoadStats:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    mismatched: int = 0
    lost: int = 0

    @property
    def server_errors(self) -> int:
        return sum(1 for o in self.outcomes if o.status >= 500)

    @property
    def tokens_per_second(self) -> float:
        return sum(o.tokens for o in self.outcomes) / self.seconds if self.seconds else 0.0

    def count_mismatched(self, reference: dict[int, str]) -> None:
        """Replies (HTTP 200) whose text differs from the reference reply to the same prompt."""
        self.mismatched = sum(1 for o in self.outcomes if o.status == 200 and o.text != reference[o.index])

    def ttft_percentile(self, q: float) -> float:
        times = sorted(o.ttft for o in self.outcomes if o.ttft is not None)
        if not times:
            return float("nan")
        return times[min(len(times) - 1, int(q * len(times)))]


def stream_one(client, model: str, messages: list[dict], index: int, max_tokens: int) -> Outcome:
    import openai

    outcome, start = Outcome(index), time.perf_counter()
    outcome.started = start
    try:
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                outcome.tokens, outcome.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                outcome.cached = (details.cached_tokens or 0) if details is not None else 0
            for choice in chunk.choices:
                if choice.delta.content:
                    if outcome.ttft is None:
                        outcome.ttft = time.perf_counter() - start
                    outcome.text += choice.delta.content
    except openai.APIStatusError as e:
        outcome.status, outcome.error = e.status_code, str(e)
    except openai.APIError as e:  # connection errors: count them as lost replies
        outcome.status, outcome.error = 599, str(e)
    outcome.seconds = time.perf_counter() - start
    return outcome


def run_load(base_url: str, model: str, requests: list[tuple[int, list[dict]]], clients: int, max_tokens: int,
             time_limit: float, reference: dict[int, str] | None = None) -> LoadStats:
    """Send ``requests`` (prompt index, messages) from ``clients`` threads; compare with ``reference``."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=time_limit)
    stats, deadline = LoadStats(), time.monotonic() + time_limit
    lock = threading.Lock()

    def work(item):
        if time.monotonic() > deadline:
            return
        outcome = stream_one(client, model, item[1], item[0], max_tokens)
        with lock:
            stats.outcomes.append(outcome)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, requests))
    stats.seconds = time.perf_counter() - start
    stats.lost = len(requests) - sum(1 for o in stats.outcomes if o.status == 200)
    if reference is not None:
        stats.count_mismatched(reference)
    return stats


def run_for(base_url: str, model: str, chats: list[list[dict]], clients: int, max_tokens: int, seconds: float,
            reference: dict[int, str], stop: threading.Event | None = None, error_pause: float = 0.0) -> LoadStats:
    """``clients`` closed-loop clients, each sending the next prompt (cycling through ``chats``) as soon as
    its reply is in, until ``seconds`` have passed (or ``stop`` is set); the replies under way then are finished
    and counted. A client whose request failed waits ``error_pause`` seconds before its next one."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=max(60.0, seconds))
    stats, lock, counter = LoadStats(), threading.Lock(), iter(range(1 << 30))
    failures: list[BaseException] = []
    start = time.perf_counter()

    def work() -> None:
        try:
            while time.perf_counter() - start < seconds and not (stop is not None and stop.is_set()):
                with lock:
                    index = next(counter) % len(chats)
                outcome = stream_one(client, model, chats[index], index, max_tokens)
                with lock:
                    stats.outcomes.append(outcome)
                if outcome.status != 200:
                    time.sleep(error_pause)
        except BaseException as e:  # a bug in the driver, not a failed request: end the run with it
            failures.append(e)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    stats.seconds = time.perf_counter() - start
    stats.lost = sum(1 for o in stats.outcomes if o.status != 200)
    stats.count_mismatched(reference)
    return stats


def run_jobs(base_url: str, jobs: list[tuple[str, list[dict]]], clients: int, max_tokens: int, seconds: float,
             reference: dict[int, str]) -> LoadStats:
    """As run_for, cycling through ``jobs`` (model, messages): each client sends the next job as soon as its reply
    is in, until ``seconds`` have passed; the reference is keyed by job index."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=max(60.0, seconds))
    stats, lock, counter = LoadStats(), threading.Lock(), iter(range(1 << 30))
    start = time.perf_counter()

    def work() -> None:
        while time.perf_counter() - start < seconds:
            with lock:
                index = next(counter) % len(jobs)
            outcome = stream_one(client, jobs[index][0], jobs[index][1], index, max_tokens)
            with lock:
                stats.outcomes.append(outcome)

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(work) for _ in range(clients)]:
            future.result()
    stats.seconds = time.perf_counter() - start
    stats.lost = sum(1 for o in stats.outcomes if o.status != 200)
    stats.count_mismatched(reference)
    return stats


def write_adapters(model: str | None, count: int, rank: int, root: Path) -> dict[str, Path]:
    """``count`` random PEFT adapters for ``model`` (B drawn non-zero, so that they change the replies)."""
    import torch

    import llama4
    from llama4.lora import LoraConfig, apply_lora, lora_state_dict, save_adapter

    paths = {}
    for i in range(count):
        base = llama4.load_model(model, pack=False)
        apply_lora(base, LoraConfig(rank=rank, alpha=2 * rank, targets=("attention", "shared", "experts")), seed=i)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in lora_state_dict(base).values():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        paths[f"lora{i}"] = root / f"lora{i}"
        save_adapter(base, paths[f"lora{i}"])
    return paths


def lora_bench(args, options: list[str]) -> None:
    import tempfile

    chats = prompts(args.distinct)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(args.model, args.lora, args.lora_rank, Path(tmp))
        lora_flags = ["--lora", *(f"{name}={path}" for name, path in adapters.items()),
                      "--max-loras", str(args.lora), "--max-lora-rank", str(args.lora_rank)]
        models = ["bench", *adapters]
        for label, flags, names in (("plain server, no adapters", [], ["bench"]),
                                    (f"--lora ({args.lora} adapters loaded), every request on the base",
                                     lora_flags, ["bench"]),
                                    (f"--lora, requests spread over the base and {args.lora} adapters", lora_flags,
                                     models)):
            jobs = [(names[i % len(names)], chats[i % len(chats)]) for i in range(len(chats) * len(names))]
            server = Server(options + flags)
            try:
                reference = {}
                for i, (name, messages) in enumerate(jobs):
                    solo = run_load(server.url, name, [(i, messages)], 1, args.max_tokens, args.time_limit)
                    reference |= {o.index: o.text for o in solo.outcomes if o.status == 200}
                stats = run_jobs(server.url, jobs, args.clients, args.max_tokens, args.lora_seconds, reference)
            finally:
                server.close()
            results.append((label, stats))
    base_rate = results[0][1].tokens_per_second
    rows = [[label, len(s.outcomes), s.server_errors, s.lost, s.mismatched, f"{s.tokens_per_second:.1f}",
             f"{s.tokens_per_second / base_rate:.2f}x" if base_rate else "-", f"{s.ttft_percentile(0.5) * 1000:.0f}"]
            for label, s in results]
    table = markdown_table(["server / requests", "requests", "5xx", "lost", "mismatched", "tokens/s", "vs plain",
                            "TTFT p50 ms"], rows)
    setup = (f"`bench/serve_load.py --lora {args.lora}`: model {args.model or 'embedded'}, {args.dtype}, "
             f"{args.threads} threads, engine {args.engine}, {args.clients} closed-loop clients for "
             f"{args.lora_seconds:g} s per row, {args.max_tokens} new tokens, greedy; adapters of rank "
             f"{args.lora_rank} on attention, shared and routed experts; each reply compared with the same request "
             f"sent alone. {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1-minute load "
             f"average {os.getloadavg()[0]:.1f} after the run.")
    print(table + "\n\n" + setup)
    if not args.no_write:
        write_section(ROOT / "docs" / "PERFORMANCE.md", "bench-serve-lora",
                      "## Serving many LoRA adapters\n\n" + table + "\n\n" + setup)
    if any(s.server_errors or s.lost or s.mismatched for _, s in results):
        print("FAILED: 5xx, lost or mismatched replies", file=sys.stderr)
        sys.exit(1)


def scaling(base_url: str, chats: list[list[dict]], max_tokens: int, seconds: float, reference: dict[int, str],
            rounds: int) -> tuple[LoadStats, LoadStats]:
    """1 client, then 8, for ``seconds`` each, ``rounds`` times in turn; each side's outcomes and seconds summed."""
    sides = (LoadStats(), LoadStats())
    for _ in range(rounds):
        for clients, total in zip((1, 8), sides):
            stats = run_for(base_url, "bench", chats, clients, max_tokens, seconds, reference)
            total.outcomes += stats.outcomes
            total.seconds += stats.seconds
            total.lost += stats.lost
            total.mismatched += stats.mismatched
    return sides


def converse(base_url: str, model: str, chats: list[list[dict]], max_tokens: int, time_limit: float) -> list[Outcome]:
    """Two turns per chat, one chat at a time; the outcomes of the (streamed) second turns."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=time_limit)
    outcomes = []
    for i, messages in enumerate(chats):
        first = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        follow = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                             {"role": "user", "content": "And then what happened?"}]
        outcomes.append(stream_one(client, model, follow, i, max_tokens))
    return outcomes


class Server:
    """``llama4 serve`` in a subprocess on a free loopback port (``options``: its command-line flags). Its
    stderr is read by a thread (``log``: the last lines), so that a chatty server never blocks on a full pipe."""

    def __init__(self, options: list[str], timeout: float = 120):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "llama4.cli", "serve", "--port", str(port), *options],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: deque[str] = deque(maxlen=200)
        reader = threading.Thread(target=self._read_log, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                reader.join(5)
                raise SystemExit("the server did not start: " + "".join(self.log)[-2000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")
            time.sleep(0.1)

    def _read_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- --faults: hostile requests, an engine kill and SIGTERM, each under plain load -------------------------------

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ERROR_KEYS = {"message", "type", "param", "code"}
HELLO = [{"role": "user", "content": "hi"}]
HOSTILE_THREADS = 2
DRAIN_SECONDS = 60  # the server's --drain-seconds in this mode: the SIGTERM run's replies have time to finish
DRAIN_TOKENS = 200  # max_tokens of the SIGTERM run's requests, so that they are still in flight
HANG_SECONDS = 20.0  # a failed request that took this long hung instead of failing


@dataclass
class Probe:
    """One hostile request: ``send`` makes it and returns None when the reply is as ``expected``, else what is
    wrong with it."""
    name: str
    expected: str
    send: Callable[[httpx.Client], str | None]


def error_problem(response: httpx.Response, status: int) -> str | None:
    """None when ``response`` is ``status`` with an OpenAI error body, else what differs."""
    if response.status_code != status:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    try:
        error = response.json()["error"]
        ok = isinstance(error, dict) and set(error) == ERROR_KEYS
    except (ValueError, KeyError, TypeError):
        ok = False
    return None if ok else f"HTTP {status} without an OpenAI error body: {response.text[:200]}"


def refused(path: str, body: dict | bytes, status: int, headers: dict | None = None) -> Callable:
    """A POST of ``body`` that the server must refuse with ``status`` and an OpenAI error body."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    return lambda client: error_problem(client.post(path, content=content, headers=headers), status)


def served_choices(body: dict, choices: int) -> Callable:
    """A valid request the server must answer with 200 and ``choices`` choices."""
    def send(client: httpx.Client) -> str | None:
        response = client.post(CHAT, json=body)
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}"
        got = len(response.json().get("choices", []))
        return None if got == choices else f"{got} choices, not {choices}"
    return send


def leave_after_first_chunk(body: dict) -> Callable:
    """A stream whose client reads its first chunk and disconnects (a connection of its own, closed)."""
    def send(client: httpx.Client) -> str | None:
        with httpx.Client(base_url=client.base_url, timeout=client.timeout) as own:
            with own.stream("POST", CHAT, json=body) as response:
                if response.status_code != 200:
                    return f"HTTP {response.status_code}"
                if not any(line.startswith("data:") for line in response.iter_lines()):
                    return "the stream ended without a chunk"
        return None  # any() stopped at the first chunk; leaving the blocks closes the connection
    return send


def read_slowly(body: dict, reference: str, pause: float = 0.2) -> Callable:
    """A stream read one event every ``pause`` seconds; its text must equal ``reference``, then ``[DONE]``."""
    def send(client: httpx.Client) -> str | None:
        text = ""
        with client.stream("POST", CHAT, json=body) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                if line[5:].strip() == "[DONE]":
                    return None if text == reference else "the text differs from the reference"
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return f"error event: {chunk['error']}"
                text += "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
                time.sleep(pause)
        return "the stream ended without [DONE]"
    return send


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def properties_schema(count: int) -> dict:
    return schema_format({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(count)}})


def nested_schema(depth: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema_format(schema)


def png_part(side: int) -> dict:
    """An all-black ``side`` x ``side`` PNG as a data-URL image part."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def hostile_probes(messages: list[dict], reference: str, max_tokens: int) -> list[Probe]:
    """The security probe's requests, each with the reply it must get (``reference``: ``messages``' solo reply)."""
    valid = {"model": "bench", "messages": HELLO, "max_tokens": 2}
    stream = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    images = lambda part, count: {"messages": [{"role": "user", "content": [part] * count}]}  # noqa: E731
    return [
        Probe("malformed JSON", "400", refused(CHAT, b'{"messages": [', 400)),
        Probe("a body nested 100,000 deep", "400", refused(CHAT, b"[" * 100_000, 400)),
        Probe("a 2,000-property schema, n=2, max_tokens 2", "200, 2 choices",
              served_choices({**valid, "n": 2, "response_format": properties_schema(2000)}, 2)),
        Probe("a 5,000-property schema", "400",
              refused(CHAT, {**valid, "response_format": properties_schema(5000)}, 400)),
        Probe("a schema nested 70 deep", "400", refused(CHAT, {**valid, "response_format": nested_schema(70)}, 400)),
        Probe("seed 2**64", "400",
              refused(CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', 400)),
        Probe('{"prompt": [1000000000], "echo": true}', "400",
              refused(COMPLETIONS, {"prompt": [1000000000], "echo": True}, 400)),
        Probe("a lone surrogate as the model", "400",
              refused(CHAT, b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 400)),
        Probe('{"type": "image", "image": 123}', "400",
              refused(CHAT, {"messages": [{"role": "user", "content": [{"type": "image", "image": 123}]}]}, 400)),
        Probe("9 tiny images", "400", refused(CHAT, images(png_part(4), 9), 400)),
        Probe("ten 7000 x 7000 black PNGs", "400", refused(CHAT, images(png_part(7000), 10), 400)),
        Probe("a text/plain POST", "415", refused(CHAT, valid, 415, {"content-type": "text/plain"})),
        Probe("Origin: http://evil.example", "403", refused(CHAT, valid, 403, {"origin": "http://evil.example"})),
        Probe("Host: evil.example", "421", refused(CHAT, valid, 421, {"host": "evil.example"})),
        Probe("a stream left after its first chunk", "200", leave_after_first_chunk(stream)),
        Probe("a stream read at 0.2 s a chunk", "200, the reference reply", read_slowly(stream, reference)),
    ]


def send_hostile(url: str, probes: list[Probe], stop: threading.Event, counter, lock: threading.Lock,
                 results: list[tuple[str, str | None, float]]) -> None:
    """Send the probes in turn (shared ``counter``) until ``stop``; record (name, problem or None, seconds)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            with lock:
                probe = probes[next(counter) % len(probes)]
            start = time.perf_counter()
            try:
                problem = probe.send(client)
            except Exception as e:  # transport errors, unreadable replies
                problem = f"{type(e).__name__}: {e}"
            with lock:
                results.append((probe.name, problem, time.perf_counter() - start))


class HealthWatch:
    """GET /health every ``interval`` seconds in a thread while the block runs: its latencies, and the answers
    that were not 200."""

    def __init__(self, url: str, interval: float = 0.2):
        self.url, self.interval = url, interval
        self.latencies: list[float] = []
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    status = str(client.get("/health").status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.latencies.append(time.perf_counter() - start)
                if status != "200":
                    self.bad.append(status)
                self._stop.wait(self.interval)

    @property
    def slowest(self) -> float:
        return max(self.latencies, default=float("nan"))


@dataclass
class HostileRun:
    load: LoadStats
    health: HealthWatch
    probes: list[Probe]
    results: list[tuple[str, str | None, float]]  # (probe name, what was wrong or None, seconds)

    @property
    def unexpected(self) -> list[tuple[str, str]]:
        return [(name, problem) for name, problem, _ in self.results if problem is not None]


def hostile_run(url: str, chats: list[list[dict]], args, reference: dict[int, str],
                probes: list[Probe]) -> HostileRun:
    """Plain closed-loop clients for ``--fault-seconds`` while HOSTILE_THREADS threads send the probes."""
    stop, lock, counter, results = threading.Event(), threading.Lock(), iter(range(1 << 30)), []
    threads = [threading.Thread(target=send_hostile, args=(url, probes, stop, counter, lock, results))
               for _ in range(HOSTILE_THREADS)]
    with HealthWatch(url) as health:
        for thread in threads:
            thread.start()
        try:
            load = run_for(url, "bench", chats, args.clients, args.max_tokens, args.fault_seconds, reference)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    return HostileRun(load, health, probes, results)


def health_status(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> float | None:
    """Poll ``condition`` until true: the time.perf_counter() it was seen true, or None after ``timeout``."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if condition():
            return time.perf_counter()
        time.sleep(interval)
    return None


def engine_process(server: Server):
    """The server's engine child process (psutil), found by its module name."""
    import psutil

    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "llama4.serve.engine_child" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise SystemExit("no engine process (llama4.serve.engine_child) found under the server")


@dataclass
class KillRun:
    outcomes: list[Outcome]
    killed: float  # time.perf_counter() of the SIGKILL
    down: float | None  # when /health first answered other than 200 after it
    recovered: float | None  # when /health answered 200 again
    new_engine: bool  # a new engine process runs (another pid)
    kinds: dict[str, int] = field(default_factory=dict)  # outcomes by classify_kill
    down_statuses: set[int] = field(default_factory=set)  # HTTP statuses of those failed while down (599: transport)

    @property
    def recovery_seconds(self) -> float:
        return self.recovered - self.killed if self.recovered is not None else float("nan")

    @property
    def failed_within(self) -> float:
        """Seconds from the kill to the end of the last request in flight then that failed."""
        ends = [o.started + o.seconds - self.killed for o in self.outcomes
                if o.status != 200 and o.started < self.killed <= o.started + o.seconds]
        return max(ends, default=0.0)


KILL_KINDS = ("ok", "failed by the kill", "failed while down", "ok after recovery", "lost", "altered", "hung")


def classify_kill(outcome: Outcome, reference: dict[int, str], killed: float, recovered: float | None) -> str:
    """What one request of the engine-kill run came to."""
    if outcome.status == 200:
        if outcome.text != reference[outcome.index]:
            return "altered"
        return "ok after recovery" if recovered is not None and outcome.started >= recovered else "ok"
    if outcome.seconds >= HANG_SECONDS:
        return "hung"
    if outcome.started < killed <= outcome.started + outcome.seconds:
        return "failed by the kill"
    if killed <= outcome.started and (recovered is None or outcome.started < recovered):
        return "failed while down"
    return "lost"


def kill_run(server: Server, chats: list[list[dict]], args, reference: dict[int, str]) -> KillRun:
    """Plain clients; SIGKILL the engine process after a few seconds; go on for ``--fault-seconds`` / 2 after
    /health answers 200 again. A client whose request failed waits 0.5 s, as a retrying client would."""
    stop, box = threading.Event(), {}

    def clients() -> None:
        box["stats"] = run_for(server.url, "bench", chats, args.clients, args.max_tokens, 120, reference, stop, 0.5)

    worker = threading.Thread(target=clients)
    worker.start()
    try:
        time.sleep(min(3.0, args.fault_seconds / 4))
        engine = engine_process(server)
        killed = time.perf_counter()
        engine.kill()
        down = wait_until(lambda: health_status(server.url) != 200, 10)
        recovered = wait_until(lambda: health_status(server.url) == 200, 120, 0.1) if down is not None else None
        if recovered is not None:
            time.sleep(args.fault_seconds / 2)
    finally:
        stop.set()
        worker.join()
    if "stats" not in box:
        raise SystemExit("the engine-kill run's clients failed")
    new_engine = recovered is not None and engine_process(server).pid != engine.pid
    run = KillRun(box["stats"].outcomes, killed, down, recovered, new_engine)
    for outcome in run.outcomes:
        kind = classify_kill(outcome, reference, killed, recovered)
        run.kinds[kind] = run.kinds.get(kind, 0) + 1
        if kind == "failed while down":
            run.down_statuses.add(outcome.status)
    return run


@dataclass
class DrainRun:
    stats: LoadStats
    in_flight: int  # requests in the engine when SIGTERM was sent
    seconds: float  # SIGTERM to the server's exit (nan: it did not exit)
    exit_code: int | None
    engine_ended: bool


def in_flight(url: str) -> int:
    try:
        stats = httpx.get(url + "/health", timeout=2).json()
        return stats["running"] + stats["prefilling"] + stats["queued"]
    except (httpx.HTTPError, ValueError, KeyError):
        return 0


def drain_run(server: Server, chats: list[list[dict]], args, reference: dict[int, str]) -> DrainRun:
    """``--clients`` streams of up to DRAIN_TOKENS tokens (``chats``: prompts whose replies are long, so that none
    ends before the last has started); SIGTERM to the server once the engine holds them all; every one must finish
    (200, its reference reply) and the server and its engine process must exit."""
    requests = [(i % len(chats), chats[i % len(chats)]) for i in range(args.clients)]
    box = {}
    worker = threading.Thread(target=lambda: box.update(stats=run_load(
        server.url, "bench", requests, args.clients, DRAIN_TOKENS, DRAIN_SECONDS + 30, reference)))
    worker.start()
    wait_until(lambda: in_flight(server.url) >= args.clients, 15)
    holding, engine = in_flight(server.url), engine_process(server)
    sent = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    try:
        exit_code, seconds = server.process.wait(DRAIN_SECONDS + 20), time.perf_counter() - sent
    except subprocess.TimeoutExpired:
        exit_code, seconds = None, float("nan")
    worker.join()
    ended = wait_until(lambda: process_ended(engine), 10)
    return DrainRun(box["stats"], holding, seconds, exit_code, ended is not None)


def process_ended(process) -> bool:
    """Whether a psutil process has exited (a zombie counts: it has, and waits for its parent to reap it)."""
    import psutil

    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def solo_replies(url: str, chats: list[list[dict]], max_tokens: int, time_limit: float) -> dict[int, Outcome]:
    """Each prompt's reply sent alone (greedy), by prompt index: what every later copy must equal."""
    solo = run_load(url, "bench", list(enumerate(chats)), 1, max_tokens, time_limit)
    replies = {o.index: o for o in solo.outcomes if o.status == 200}
    if len(replies) != len(chats):
        raise SystemExit(f"reference phase: {len(chats) - len(replies)} requests failed or timed out")
    return replies


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def fault_failures(calm: LoadStats, hostile: HostileRun, kill: KillRun, drain: DrainRun, clients: int) -> list[str]:
    """Each pass criterion that failed, in words."""
    checks = {
        "calm run: lost or altered replies": calm.lost or calm.mismatched,
        "hostile run: lost or altered plain replies": hostile.load.lost or hostile.load.mismatched,
        "hostile run: unexpected replies to hostile requests": hostile.unexpected,
        "hostile run: /health slower than 1 s or not 200": not hostile.health.slowest < 1 or hostile.health.bad,
        "engine kill: lost, altered or hung replies": any(kill.kinds.get(k) for k in ("lost", "altered", "hung")),
        "engine kill: no recovery, or no reply after it": not (kill.new_engine and kill.kinds.get("ok after recovery")),
        "SIGTERM: fewer requests in flight at the signal than clients": drain.in_flight < clients,
        "SIGTERM: a started reply lost or altered": drain.stats.lost or drain.stats.mismatched
        or len(drain.stats.outcomes) != clients,
        "SIGTERM: the server did not exit cleanly, or its engine process lived on":
        drain.exit_code not in (0, -signal.SIGTERM) or not drain.engine_ended,
    }
    return [name for name, failed in checks.items() if failed]


def runs_table(args, calm: LoadStats, calm_health: HealthWatch, hostile: HostileRun, kill: KillRun,
               drain: DrainRun) -> str:
    """One row per run: plain replies, lost, altered, TTFT, /health, and what the faults came to."""
    seconds = f"{args.fault_seconds:g} s"
    served = LoadStats([o for o in kill.outcomes if o.status == 200])
    kinds = ", ".join(f"{kill.kinds[kind]} {kind}" for kind in KILL_KINDS if kill.kinds.get(kind))
    statuses = "/".join(str(status) for status in sorted(kill.down_statuses))
    statuses = f", those failed while down got HTTP {statuses}" if statuses else ""
    signalled = " (SIGTERM, re-raised by uvicorn after its shutdown)" if drain.exit_code == -signal.SIGTERM else ""
    yes = {True: "yes", False: "no"}
    rows = [
        [f"calm, {seconds}", len(calm.outcomes), calm.lost, calm.mismatched, ms(calm.ttft_percentile(0.5)),
         ms(calm.ttft_percentile(0.99)), ms(calm_health.slowest), "-"],
        [f"hostile, {seconds}", len(hostile.load.outcomes), hostile.load.lost, hostile.load.mismatched,
         ms(hostile.load.ttft_percentile(0.5)), ms(hostile.load.ttft_percentile(0.99)), ms(hostile.health.slowest),
         f"{len(hostile.results)} hostile requests: {len(hostile.results) - len(hostile.unexpected)} as expected, "
         f"{len(hostile.unexpected)} unexpected; /health not 200: {len(hostile.health.bad)}"],
        ["engine SIGKILL", len(kill.outcomes), kill.kinds.get("lost", 0), kill.kinds.get("altered", 0),
         ms(served.ttft_percentile(0.5)), ms(served.ttft_percentile(0.99)), "-",
         f"{kinds}; those failed by the kill ended by {kill.failed_within:.1f} s after it{statuses}; /health 200 "
         f"again {kill.recovery_seconds:.1f} s after the kill, new engine process: {yes[kill.new_engine]}"],
        [f"SIGTERM, {drain.in_flight} in flight", len(drain.stats.outcomes), drain.stats.lost, drain.stats.mismatched,
         ms(drain.stats.ttft_percentile(0.5)), ms(drain.stats.ttft_percentile(0.99)), "-",
         f"drained in {drain.seconds:.1f} s, exit status {drain.exit_code}{signalled}, engine process ended: "
         f"{yes[drain.engine_ended]}"],
    ]
    return markdown_table(["run", "plain replies", "lost", "altered", "TTFT p50 ms", "TTFT p99 ms", "/health max ms",
                           "faults"], rows)


def probes_table(hostile: HostileRun) -> str:
    """One row per kind of hostile request: how many were sent, how they were answered, the slowest; then the
    unexpected replies."""
    tally = {p.name: [0, 0, 0.0] for p in hostile.probes}  # sent, unexpected, slowest
    for name, problem, seconds in hostile.results:
        tally[name][0] += 1
        tally[name][1] += problem is not None
        tally[name][2] = max(tally[name][2], seconds)
    table = markdown_table(["hostile request", "expected", "sent", "as expected", "unexpected", "slowest ms"],
                           [[p.name, p.expected, sent, sent - wrong, wrong, ms(slowest)]
                            for p in hostile.probes for sent, wrong, slowest in [tally[p.name]]])
    return table + unexpected_list(hostile.unexpected)


def unexpected_list(unexpected: list[tuple[str, str]]) -> str:
    """The unexpected replies to hostile requests, each kind once with its count (empty when none)."""
    counts: dict[tuple[str, str], int] = {}
    for name, problem in unexpected:
        key = (name, " ".join(problem.split()))
        counts[key] = counts.get(key, 0) + 1
    items = "".join(f"\n- unexpected: {name} (x{n}): {problem}" for (name, problem), n in counts.items())
    return "\n" + items if items else ""


def faults(args, options: list[str]) -> None:
    """``--faults``: the security probe's load and fault runs against a fresh server (started with
    ``--drain-seconds`` DRAIN_SECONDS), every plain reply compared with its solo reference:

    1. calm: ``--clients`` closed-loop streaming clients for ``--fault-seconds``, /health polled every 0.2 s;
    2. hostile: the same, while HOSTILE_THREADS threads send the requests of :func:`hostile_probes` in turn,
       each checked (its 4xx with an OpenAI error body, or its 200); TTFT compared with the calm run;
    3. engine kill: the engine process SIGKILLed under load; the requests it held must fail (not hang), every
       reply started once /health answers 200 again must be right;
    4. SIGTERM: ``--clients`` streams of DRAIN_TOKENS tokens in flight, then SIGTERM: each must finish right,
       and the server and its engine process exit.

    Prints the tables (and writes them under <!-- bench-serve-faults --> unless ``--no-write``); exits 1 with a
    FAILED line when a pass criterion fails."""
    import torch

    if args.engine != "process":
        raise SystemExit("--faults kills the engine process: it needs --engine process")
    load_before = os.getloadavg()[0]
    server = Server(options + ["--drain-seconds", str(DRAIN_SECONDS)])
    try:
        chats = prompts(args.distinct)
        solo = solo_replies(server.url, chats, args.max_tokens, args.time_limit)
        reference = {i: o.text for i, o in solo.items()}
        long_chats = [chats[i] for i, o in solo.items() if o.tokens == args.max_tokens][:args.clients] or chats[:1]
        long_reference = {i: o.text for i, o in solo_replies(server.url, long_chats, DRAIN_TOKENS,
                                                             args.time_limit).items()}
        probes = hostile_probes(chats[0], reference[0], args.max_tokens)
        with HealthWatch(server.url) as calm_health:
            calm = run_for(server.url, "bench", chats, args.clients, args.max_tokens, args.fault_seconds, reference)
        hostile = hostile_run(server.url, chats, args, reference, probes)
        kill = kill_run(server, chats, args, reference)
        drain = drain_run(server, long_chats, args, long_reference)
    finally:
        server.close()
    failures = fault_failures(calm, hostile, kill, drain, args.clients)
    p50, p99 = (hostile.load.ttft_percentile(q) / calm.ttft_percentile(q) for q in (0.5, 0.99))
    setup = (f"`python bench/serve_load.py --faults`: `llama4 serve --drain-seconds {DRAIN_SECONDS}` in its own "
             f"process (engine: process), model {args.model or 'embedded'}, {args.dtype}, {args.threads} threads, "
             f"max batch {args.max_batch}; {args.clients} closed-loop streaming clients of {args.max_tokens} new "
             f"tokens (the SIGTERM run: one request each, up to {DRAIN_TOKENS}), greedy, every reply compared with "
             f"the same prompt sent alone (the SIGTERM run's: the {len(long_chats)} prompts whose replies run past "
             f"{args.max_tokens} tokens); {HOSTILE_THREADS} threads send the hostile requests in turn. Plain TTFT "
             f"with the hostile threads / calm: p50 {p50:.2f}x, p99 {p99:.2f}x. Lost: not 200 (or a transport "
             f"error); altered: text not the reference. {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}; 1-minute load average {load_before:.1f} before the run, "
             f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores. "
             + ("Passed: 0 lost or altered replies." if not failures else "FAILED: " + "; ".join(failures) + "."))
    tables = runs_table(args, calm, calm_health, hostile, kill, drain) + "\n\n" + probes_table(hostile)
    print(tables + "\n\n" + setup)
    if not args.no_write:
        body = "## Serving under hostile requests and faults\n\n" + tables + "\n\n" + setup
        write_section(ROOT / "docs" / "PERFORMANCE.md", "bench-serve-faults", body)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        if server.log:
            print("server log (last lines):\n" + "".join(server.log)[-4000:], file=sys.stderr)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--distinct", type=int, default=24,
                        help="distinct prompts (each checked against its solo reply)")
    parser.add_argument("--scaling-seconds", type=float, default=8.0,
                        help="length of each 1-client and 8-client phase of the scaling test")
    parser.add_argument("--scaling-rounds", type=int, default=3, help="1-client / 8-client phases run in turn")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", choices=("process", "thread"), default="process",
                        help="llama4 serve --engine: the model in a process of its own, or in a server thread")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="bf16 rounding can make a batched greedy reply differ from its solo run at near-ties")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds per phase")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/PERFORMANCE.md")
    parser.add_argument("--faults", action="store_true",
                        help="instead of the phases above: hostile requests, an engine kill and SIGTERM under load")
    parser.add_argument("--fault-seconds", type=float, default=20.0,
                        help="--faults: length of the calm and the hostile runs")
    parser.add_argument("--lora", type=int, default=0, metavar="N",
                        help="instead of the phases above: throughput with N LoRA adapters vs none")
    parser.add_argument("--lora-rank", type=int, default=8, help="--lora: the adapters' rank")
    parser.add_argument("--lora-seconds", type=float, default=20.0, help="--lora: length of each run")
    args = parser.parse_args()

    import torch

    load_before = os.getloadavg()[0]  # the cores may be shared: say how busy they were
    options = ["--model-id", "bench", "--threads", str(args.threads), "--dtype", args.dtype,
               "--max-batch", str(args.max_batch), "--max-queue", str(max(args.requests, 64)),
               "--engine", args.engine]
    if args.model:
        options += ["--model", args.model]
    if args.faults:
        faults(args, options)
        return
    if args.lora:
        lora_bench(args, options)
        return
    server = Server(options)
    try:
        chats = prompts(args.distinct)
        solo = run_load(server.url, "bench", list(enumerate(chats)), 1, args.max_tokens, args.time_limit)
        reference = {o.index: o.text for o in solo.outcomes if o.status == 200}
        if len(reference) != len(chats):
            raise SystemExit(f"reference phase: {len(chats) - len(reference)} requests failed or timed out")
        one, eight = scaling(server.url, chats, args.max_tokens, args.scaling_seconds, reference, args.scaling_rounds)
        load_requests = [(i % len(chats), chats[i % len(chats)]) for i in range(args.requests)]
        load = run_load(server.url, "bench", load_requests, args.clients, args.max_tokens, args.time_limit, reference)
        with_prefix = converse(server.url, "bench", chats[:8], args.max_tokens, args.time_limit)
    finally:
        server.close()
    plain = Server(options + ["--prefix-cache-mb", "0"])
    try:
        without_prefix = converse(plain.url, "bench", chats[:8], args.max_tokens, args.time_limit)
    finally:
        plain.close()

    rows = [[name, s.server_errors, s.lost, s.mismatched, f"{s.tokens_per_second:.1f}",
             f"{s.ttft_percentile(0.5) * 1000:.0f}", f"{s.ttft_percentile(0.99) * 1000:.0f}"]
            for name, s in ((f"1 client, {args.scaling_rounds} x {args.scaling_seconds:g} s "
                             f"({len(one.outcomes)} requests)", one),
                            (f"8 clients, {args.scaling_rounds} x {args.scaling_seconds:g} s "
                             f"({len(eight.outcomes)} requests)", eight),
                            (f"{args.clients} clients, {args.requests} requests", load))]
    table = markdown_table(["phase", "5xx", "lost", "mismatched", "tokens/s", "TTFT p50 ms", "TTFT p99 ms"], rows)
    ratio = eight.tokens_per_second / one.tokens_per_second if one.tokens_per_second else float("nan")
    setup = (f"`bench/serve_load.py`: `llama4 serve` in its own process (engine: {args.engine}), model "
             f"{args.model or 'embedded'}, {args.dtype}, {args.threads} threads, max batch {args.max_batch}, "
             f"{args.max_tokens} new tokens per request, greedy; every reply compared with the same "
             f"prompt sent alone. 8 clients / 1 client aggregate tokens/s: {ratio:.2f}x. "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}; 1-minute load average "
             f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores.")
    reused = sum(o.cached for o in with_prefix) / max(1, sum(o.prompt_tokens for o in with_prefix))
    with_ms = statistics.median(o.ttft for o in with_prefix if o.ttft is not None) * 1000
    without_ms = statistics.median(o.ttft for o in without_prefix if o.ttft is not None) * 1000
    setup += (f" Prefix cache, {len(with_prefix)} two-turn chats: {reused:.0%} of turn-2 prompt tokens reused; "
              f"turn-2 TTFT median {with_ms:.0f} ms with, {without_ms:.0f} ms without.")
    print(table + "\n\n" + setup)
    if not args.no_write:
        body = "## Serving under load\n\n" + table + "\n\n" + setup
        write_section(ROOT / "docs" / "PERFORMANCE.md", "bench-serve", body)
    if any(s.server_errors or s.lost or s.mismatched for s in (one, eight, load)) or not ratio >= 4:
        print("FAILED: 5xx, lost or mismatched replies, or 8-client scaling under 4x", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
