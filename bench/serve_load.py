"""Load test of ``llama4 serve`` on loopback: many concurrent streaming clients, every reply checked.

    python bench/serve_load.py                       # the embedded model, 32 clients, 200 requests
    python bench/serve_load.py --model DIR --clients 16 --requests 100 --no-write

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
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

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
            reference: dict[int, str]) -> LoadStats:
    """``clients`` closed-loop clients, each sending the next prompt (cycling through ``chats``) as soon as
    its reply is in, until ``seconds`` have passed; the replies under way then are finished and counted."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=max(60.0, seconds))
    stats, lock, counter = LoadStats(), threading.Lock(), iter(range(1 << 30))
    failures: list[BaseException] = []
    start = time.perf_counter()

    def work() -> None:
        try:
            while time.perf_counter() - start < seconds:
                with lock:
                    index = next(counter) % len(chats)
                outcome = stream_one(client, model, chats[index], index, max_tokens)
                with lock:
                    stats.outcomes.append(outcome)
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
    """``llama4 serve`` in a subprocess on a free loopback port (``options``: its command-line flags)."""

    def __init__(self, options: list[str], timeout: float = 120):
        import socket
        import subprocess

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "llama4.cli", "serve", "--port", str(port), *options],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit("the server did not start: " + self.process.communicate()[1][-2000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")
            time.sleep(0.1)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.communicate(timeout=30)
        except Exception:
            self.process.kill()


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
    args = parser.parse_args()

    import torch

    load_before = os.getloadavg()[0]  # the cores may be shared: say how busy they were
    options = ["--model-id", "bench", "--threads", str(args.threads), "--dtype", args.dtype,
               "--max-batch", str(args.max_batch), "--max-queue", str(max(args.requests, 64)),
               "--engine", args.engine]
    if args.model:
        options += ["--model", args.model]
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
