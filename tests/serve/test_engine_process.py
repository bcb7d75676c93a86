"""The engine in a child process: the same replies as the engine thread, the same refusals, cancels and
metrics across the pipe, and a clean failure when the child dies or cannot load its model.

(The live-server tests run through it too: ``llama4 serve``'s ``build_app`` uses it by default.)
"""

from __future__ import annotations

import threading

import httpx
import pytest

from llama4.inference.engine import Engine, EngineConfig
from llama4.inference.requests import ContextTooLong, FinishEvent, GenerationRequest, QueueFull, TokenEvent
from llama4.inference.sampling import SamplingParams
from llama4.serve.app import create_engine_app
from llama4.serve.engine_process import EngineProcess, EngineStopped
from tests.serve.conftest import MODEL_ID, LiveServer, wait_for

CONFIG = EngineConfig(max_batch=2, max_queue=2, max_context=512, prefill_chunk=16)


class Reply:
    """Collects one request's events (called from another thread)."""

    def __init__(self):
        self.tokens, self.text, self.finish, self.done = [], "", None, threading.Event()

    def __call__(self, event):
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token)
            self.text += event.text
        else:
            self.finish, self.text = event, self.text + event.text
            self.done.set()

    def wait(self, timeout=60.0) -> FinishEvent:
        assert self.done.wait(timeout), "no finish event"
        return self.finish


@pytest.fixture(scope="module")
def engine(checkpoint):
    process = EngineProcess(str(checkpoint), "fp32", CONFIG, threads=1)
    process.start()
    yield process
    process.stop()


def prompts(tok) -> list[list[int]]:
    return [tok.encode(text, bos=True) for text in ("Once upon a time", "The weather in Paris was", "Max liked")]


def test_replies_equal_the_engine_threads(engine, model, tok):
    requests = [GenerationRequest(p, max_tokens=24, stop_tokens=[]) for p in prompts(tok)]
    requests.append(GenerationRequest(prompts(tok)[0], params=SamplingParams(temperature=0.9, seed=7, logprobs=2),
                                      max_tokens=24, stop=["park"]))
    local = Engine(model, tok, EngineConfig(max_batch=2, max_queue=4, max_context=512, prefill_chunk=16))
    local.start()
    try:
        expected = [Reply() for _ in requests]
        for request, reply in zip(requests, expected):
            local.submit(request, reply)
            reply.wait()  # one at a time: the queue holds 2
    finally:
        local.stop()
    got = [Reply() for _ in requests]
    for request, reply in zip(requests, got):
        engine.submit(request, reply)
        reply.wait()
    for a, b in zip(expected, got):
        assert (b.tokens, b.text, b.finish) == (a.tokens, a.text, a.finish)
    assert got[0].finish.reason == "length" and got[0].finish.completion_tokens == 24


def test_bad_requests_are_refused_before_they_are_sent(engine, tok):
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.submit(GenerationRequest([]), Reply())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        engine.submit(GenerationRequest([1, engine.vocab]), Reply())
    with pytest.raises(ContextTooLong, match="the prompt has 512 tokens but the context holds 512"):
        engine.submit(GenerationRequest([1] * 512), Reply())
    assert engine.has_vision and engine.max_context == 512


def test_a_full_queue_is_refused_and_cancelled_requests_free_their_rows(engine, tok):
    replies = [Reply() for _ in range(4)]
    handles = [engine.submit(GenerationRequest(prompts(tok)[0], max_tokens=400, stop_tokens=[]), r)
               for r in replies[:2]]
    assert wait_for(lambda: engine.stats()["running"] == 2), engine.stats()
    handles += [engine.submit(GenerationRequest(prompts(tok)[1], max_tokens=400, stop_tokens=[]), r)
                for r in replies[2:]]
    assert engine.stats()["queued"] == 2
    with pytest.raises(QueueFull, match=r"the request queue is full \(2 waiting\)"):
        engine.submit(GenerationRequest(prompts(tok)[2]), Reply())
    for handle in handles:
        handle.cancel()
    assert [r.wait().reason for r in replies] == ["cancelled"] * 4
    assert all(h.finished for h in handles)
    assert wait_for(lambda: engine.stats() == {**engine.stats(), "running": 0, "queued": 0, "kv_cache_bytes": 0})
    assert wait_for(lambda: engine.metrics.finished["cancelled"] >= 4)


def test_the_childs_metrics_reach_this_process(engine, tok):
    before = engine.metrics.engine_state()
    reply = Reply()
    engine.submit(GenerationRequest(prompts(tok)[2] + [7, 8], max_tokens=5, stop_tokens=[]), reply)
    assert reply.wait().reason == "length"
    after = engine.metrics.engine_state()  # sent with the finish, before it
    assert after["generated_tokens"] - before["generated_tokens"] == 5
    assert after["finished"].get("length", 0) == before["finished"].get("length", 0) + 1
    assert sum(after["ttft"]["counts"]) == sum(before["ttft"]["counts"]) + 1
    assert sum(after["inter_token"]["counts"]) == sum(before["inter_token"]["counts"]) + 4


def test_the_choices_of_an_image_request_send_its_tiles_once_and_share_one_prefill(engine, tok):
    from PIL import Image

    from llama4.inference.text import prepare_messages

    messages, pixels = prepare_messages([{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (300, 200), (200, 40, 40))},
        {"type": "text", "text": "What colour is this?"}]}])
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True))
    before = engine.metrics.engine_state()
    replies = [Reply() for _ in range(2)]
    for seed, reply in enumerate(replies):  # two choices: one request object each, the same tiles
        engine.submit(GenerationRequest(prompt, pixels, SamplingParams(temperature=1.0, seed=seed), max_tokens=4,
                                        stop_tokens=[]), reply)
    assert [r.wait().reason for r in replies] == ["length", "length"]
    after = engine.metrics.engine_state()
    assert after["prompt_tokens"] - before["prompt_tokens"] == len(prompt)  # prefilled once ...
    assert after["cached_tokens"] - before["cached_tokens"] == len(prompt)  # ... and copied to the twin
    assert [r.finish.cached_tokens for r in replies] == [0, len(prompt)]


def test_a_dead_child_fails_what_runs_and_the_server_says_so(checkpoint, tok):
    process = EngineProcess(str(checkpoint), "fp32", CONFIG, threads=1, restart=False)
    process.start()
    live = LiveServer(create_engine_app(process, tok, model_id=MODEL_ID))
    try:
        assert httpx.get(live.url + "/health").json()["status"] == "ok" and process.down is None
        reply = Reply()
        process.submit(GenerationRequest(prompts(tok)[0], max_tokens=400, stop_tokens=[]), reply)
        assert wait_for(lambda: reply.tokens)
        process._child.process.kill()
        finish = reply.wait()
        assert finish.reason == "error" and "the engine process ended (exit code -9)" in finish.error
        with pytest.raises(EngineStopped, match="the engine is not running: the engine process ended"):
            process.submit(GenerationRequest(prompts(tok)[0]), Reply())
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and "the engine process ended" in health.json()["reason"]
        refused = httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert refused.status_code == 503 and "the engine is not running" in refused.json()["error"]["message"]
    finally:
        live.close()
        process.stop()


def test_a_dead_child_is_replaced_and_the_next_requests_are_served(checkpoint, tok):
    process = EngineProcess(str(checkpoint), "fp32", CONFIG, threads=1)
    process.MAX_RESTARTS = 2  # (each replacement loads the model anew)
    process.start()
    try:
        solo = Reply()
        process.submit(GenerationRequest(prompts(tok)[1], max_tokens=6, stop_tokens=[]), solo)
        solo.wait()
        running = Reply()
        process.submit(GenerationRequest(prompts(tok)[0], max_tokens=400, stop_tokens=[]), running)
        assert wait_for(lambda: running.tokens)
        first = process._child.process
        first.kill()
        finish = running.wait()
        assert finish.reason == "error" and "the engine process ended (exit code -9)" in finish.error
        assert wait_for(lambda: process.down is None, timeout=60), process.down
        assert process._child.process.pid != first.pid
        again = Reply()
        process.submit(GenerationRequest(prompts(tok)[1], max_tokens=6, stop_tokens=[]), again)
        assert again.wait().reason == "length" and again.tokens == solo.tokens
        assert process.stats()["queued"] == 0
        for _ in range(process.MAX_RESTARTS):  # children that keep dying are not replaced for ever
            assert wait_for(lambda: process.down is None, timeout=60), process.down
            process._child.process.kill()
            assert wait_for(lambda: process.down is not None)
        assert wait_for(lambda: process.down is not None and "restarting" not in process.down)
        assert process.down.startswith("the engine process ended")
    finally:
        process.stop()


def test_a_model_that_does_not_load_fails_the_start(tmp_path):
    process = EngineProcess(str(tmp_path / "missing"), "fp32", CONFIG)
    with pytest.raises(RuntimeError, match="the engine process did not start .*missing"):
        process.start()
    with pytest.raises(EngineStopped, match="not started"):
        process.submit(GenerationRequest([1]), Reply())
    with pytest.raises(ValueError, match="dtype must be"):
        EngineProcess(None, "fp16")


def test_a_killed_child_fails_its_requests_with_the_reason_and_is_replaced(checkpoint, tok):
    process = EngineProcess(str(checkpoint), "fp32", CONFIG, threads=1)
    process.start()
    try:
        running = Reply()
        process.submit(GenerationRequest(prompts(tok)[0], max_tokens=400, stop_tokens=[]), running)
        assert wait_for(lambda: running.tokens)
        assert process.stats()["steps"] > 0
        first = process._child.process
        process.kill("stuck for a test")
        finish = running.wait()
        assert finish.reason == "error" and finish.error == "the engine process was killed: stuck for a test"
        assert wait_for(lambda: process.down is None, timeout=60), process.down
        assert process._child.process.pid != first.pid
        again = Reply()
        process.submit(GenerationRequest(prompts(tok)[1], max_tokens=3, stop_tokens=[]), again)
        assert again.wait().reason == "length"
    finally:
        process.stop()
