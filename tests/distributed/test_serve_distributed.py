"""`torchrun --nproc-per-node 2 -m llama4 serve --tp 2 --ep 2`: a real 2-rank server (gloo, the embedded model, fp32)
against the openai client.

Greedy replies (one alone, two concurrent with n = 2 on one of them, a streamed one, a second turn that reuses the
first's cache, one with an image) are exactly the single-process server's; SIGTERM to rank 0 drains and stops every
rank (exit status 0). A follower that dies mid-request ends the job with one error naming it. The fault is injected
by running this file as the torchrun script (see the bottom): rank 1's model exits at its N-th decode step.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import llama4

if __name__ != "__main__":  # as torchrun's script (the fault injection at the bottom) it needs no fixtures
    from tests.inference.tiny_multimodal import checkpoint, tok  # noqa: F401

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")

COMMON = ["--dtype", "fp32", "--max-batch", "4", "--prefill-chunk", "16"]  # pieces: the journal sees several


class _QueueChannel:
    """The Channel's interface within one process (headers through JSON, as broadcast): a follower in a thread."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.ops: list[str] = []  # every message's call and journaled cache operations, in order

    def send(self, header: dict, tensor=None) -> None:
        self.ops += [header["op"], *(op[0] for op in header["journal"])]
        self.queue.put((json.loads(json.dumps(header)), None if tensor is None else tensor.clone()))

    def receive(self, dtype):
        return self.queue.get(timeout=60)


def test_a_followers_cache_mirrors_rank_0s_block_for_block(checkpoint, tok):
    """Rank 0's engine (prefill pieces, rows joining and leaving, the choices of n sharing a prefill, prefix-cache
    hits and evictions, a cancelled row, the trim when idle) and a follower over its own copy of the model: the
    follower's pool ends with the same blocks, reference counts and stored keys / values, and holds the same
    sequences (the prefix cache's entries) as rank 0's."""
    from llama4.inference.engine import Engine, EngineConfig
    from llama4.inference.requests import FinishEvent, GenerationRequest
    from llama4.inference.sharded import Follower, LeaderRunner

    model = llama4.load_model(checkpoint, pack=False)  # plain, as load_sharded's shards are
    config = EngineConfig(max_batch=3, prefill_chunk=4, kv_block_size=4, prefix_cache_bytes=40_000)
    channel = _QueueChannel()
    leader = LeaderRunner(model, config, channel, heartbeat_s=600)
    follower = Follower(llama4.load_model(checkpoint, pack=False), channel)
    thread = threading.Thread(target=follower.run, daemon=True)
    thread.start()
    engine = Engine(model, tok, config, runner=leader)
    finished: list[FinishEvent] = []

    def sink(event):
        if isinstance(event, FinishEvent):
            finished.append(event)

    def submit(text: str, max_tokens: int, n: int = 1):
        ids = tok.encode(text, bos=True)
        return [engine.submit(GenerationRequest(ids, max_tokens=max_tokens, stop_tokens=[]), sink) for _ in range(n)]

    with torch.inference_mode():
        submit("Once upon a time there was a little dog", 9, n=2)  # one prefill, a copy for the other
        doomed = submit("The weather in Paris was sunny", 30)[0]
        submit("He liked to run", 5)
        for _ in range(12):
            engine.step()
        doomed.cancel()
        for text in ("Once upon a time there was a little dog named Max", "He liked to run and play in the park",
                     "Max liked the park", "The weather in Paris"):
            submit(text, 6)
        while engine.step():
            pass
    assert leader.close() is None
    thread.join(30)
    assert not thread.is_alive()
    assert len(finished) == 8 and [e.reason for e in finished].count("cancelled") == 1
    for op in ("prefill", "decode", "new", "copy", "release", "trim"):
        assert op in channel.ops, op
    ours, theirs = leader.pool, follower.pool
    for kind in (0, 1):
        assert ours._kinds[kind].refs == theirs._kinds[kind].refs
        assert ours._kinds[kind].taken == theirs._kinds[kind].taken
    for layer in range(model.config.text.num_layers):
        assert torch.equal(ours._k[layer], theirs._k[layer]) and torch.equal(ours._v[layer], theirs._v[layer])
    kept = {cache.uid: (cache.length, [h.blocks for h in cache.held]) for cache, _ in
            engine.prefix_cache._entries.values()}
    assert kept and kept == {uid: (s.length, [h.blocks for h in s.held]) for uid, s in follower.sequences.items()}
    assert follower.calls == channel.ops.count("prefill") + channel.ops.count("decode")


@pytest.mark.parametrize("flags,message", [
    (["--tp", "2"], "plan tp=2, ep=1 needs 2 ranks, this job has 1: use torchrun --nproc-per-node 2"),
    (["--tp", "1", "--ep", "1", "--quant", "int5"], "unknown weight format 'int5'"),
    (["--cp", "2"], "--cp 2 needs a multiple of 2 ranks (cp x max(tp, ep) = 2 here), this job has 1"),
    (["--ep", "1", "--lora", "a=/x"], "--lora / --enable-lora cannot be combined with --tp / --ep or torchrun yet"),
])
def test_what_a_sharded_server_cannot_do_is_a_clear_error(flags, message, capsys):
    from llama4.cli import main

    assert main(["serve", "--port", str(_free_port()), *flags]) == 2
    err = capsys.readouterr().err
    assert f"llama4: error: {message}" in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def _picture() -> list[dict]:
    """A user message with a small red PNG and a question about it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What colour is this?"}]}]


def _ask(client: openai.OpenAI, messages, n: int = 1, stream: bool = False, max_tokens: int = 12) -> list[str]:
    reply = client.chat.completions.create(model="llama4", messages=messages, max_tokens=max_tokens, temperature=0,
                                           n=n, stream=stream)
    if not stream:
        return [choice.message.content for choice in reply.choices]
    return ["".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)]


STORY = [{"role": "user", "content": "Tell me a story about a dog."}]
CAT = [{"role": "user", "content": "What does a cat like to eat?"}]
PARK = [{"role": "user", "content": "Write about a day in the park with friends and a red ball."}]


def _conversation(client: openai.OpenAI, image: bool = True) -> dict[str, list[str]]:
    """The requests both servers answer, in the same order (the image last)."""
    out = {"alone": _ask(client, STORY)}
    with ThreadPoolExecutor(2) as pool:  # in one batch on the server: rows join and leave together
        cat, park = pool.submit(_ask, client, CAT, 2), pool.submit(_ask, client, PARK)
        out["concurrent"] = cat.result() + park.result()
    out["streamed"] = _ask(client, PARK, stream=True, max_tokens=20)
    turn = STORY + [{"role": "assistant", "content": out["alone"][0]}, {"role": "user", "content": "And then?"}]
    out["second turn"] = _ask(client, turn)  # reuses the first turn's cache blocks (a prefix copy)
    if not image:
        return out
    out["image"] = _ask(client, _picture(), max_tokens=6)  # the piece's embeddings are broadcast
    return out


@pytest.fixture(scope="module")
def single_process_replies() -> dict[str, list[str]]:
    from llama4.cli import build_parser
    from llama4.serve.command import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    args = build_parser().parse_args(["serve", "--engine", "thread", *COMMON])
    server = uvicorn.Server(uvicorn.Config(build_app(args), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the single-process server did not start"
            time.sleep(0.02)
        return _conversation(_client(sock.getsockname()[1]))
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _torchrun(script: list[str], port: int, extra: list[str], plan: tuple[str, ...] = ("--tp", "2", "--ep", "2")
              ) -> subprocess.Popen:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(torchrun), "--nproc-per-node", "2", "--monitor-interval", "0.2", *script, "serve",
                             *plan, "--port", str(port), *COMMON, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).parent)


def _wait_ready(job: subprocess.Popen, port: int, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise AssertionError(f"the job ended before serving: {job.communicate()[1][-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    job.kill()
    raise AssertionError(f"no answer on port {port} within {timeout} s: {job.communicate()[1][-3000:]}")


def _worker(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (from the workers' environments)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun_pid}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds rank 0's process through /proc")
def test_two_rank_server_answers_as_one_process_and_stops_cleanly(single_process_replies):
    port = _free_port()
    job = _torchrun(["-m", "llama4"], port, ["--dist-timeout", "60"])
    try:
        _wait_ready(job, port)
        got = _conversation(_client(port))
        assert got == single_process_replies
        assert all(text for texts in got.values() for text in texts)
        assert got["concurrent"][0] == got["concurrent"][1]  # n = 2 at temperature 0: the same reply twice
    except BaseException:
        _kill(job)
        raise
    err = _stop(job)
    assert "rank 0 of 2, tp=2 ep=2" in err and "error" not in err.lower(), err[-3000:]


def _stop(job: subprocess.Popen) -> str:
    """SIGTERM to rank 0 (it drains, then stops the followers): the job's stderr, once it exited 0."""
    try:
        os.kill(_worker(job.pid, 0), signal.SIGTERM)
        _, err = job.communicate(timeout=60)
    except BaseException:
        _kill(job)
        raise
    assert job.returncode == 0, err[-3000:]
    return err


def _kill(job: subprocess.Popen) -> None:
    if job.poll() is None:
        job.kill()
        job.communicate()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds rank 0's process through /proc")
def test_context_parallel_server_answers_as_one_process(single_process_replies):
    """serve --cp 2: every prompt prefilled in two slices (the global layers' KV split over the ranks), each row
    decoded over its own cache; the text replies are the single-process server's (n = 2 prefills twice, the second
    turn prefills whole: no shared or cached prefixes); a request with an image is refused with a clear 400."""
    port = _free_port()
    job = _torchrun(["-m", "llama4"], port, ["--dist-timeout", "60"], plan=("--cp", "2"))
    try:
        _wait_ready(job, port)
        client = _client(port)
        got = _conversation(client, image=False)
        assert got == {k: v for k, v in single_process_replies.items() if k != "image"}
        with pytest.raises(openai.BadRequestError, match="images are not supported with context parallelism"):
            _ask(client, _picture(), max_tokens=4)
        assert _ask(client, CAT) == single_process_replies["concurrent"][:1]  # the ranks still in step
    except BaseException:
        _kill(job)
        raise
    err = _stop(job)
    assert "rank 0 of 2, tp=1 ep=1 cp=2" in err and "error" not in err.lower(), err[-3000:]


def test_a_follower_that_dies_ends_the_job_with_an_error_naming_it():
    port = _free_port()
    job = _torchrun([Path(__file__).name, "3"], port, ["--dist-timeout", "30"])
    try:
        _wait_ready(job, port)
        started = time.monotonic()
        with pytest.raises(openai.APIError):  # its decode steps end with rank 1: the reply is an error
            _ask(_client(port), STORY, max_tokens=10)
        _, err = job.communicate(timeout=60)
    finally:
        _kill(job)
    assert job.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("llama4: error:")]
    assert len(errors) == 1, err[-3000:]
    assert "rank 1 stopped taking part" in errors[0], errors[0]
    assert time.monotonic() - started < 30  # found at the collective that failed, not at the timeout


if __name__ == "__main__":  # torchrun ... test_serve_distributed.py STEP llama4-arguments...
    from test_launch import inject_fault  # (this file's folder is the script's first path entry)

    inject_fault("exit", int(sys.argv[1]))  # rank 1's model exits at its N-th forward
    from llama4.cli import main

    sys.exit(main(sys.argv[2:]))
