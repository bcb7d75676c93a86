"""A client that goes away is cancelled at once (its cache row freed) while other streams continue."""

from __future__ import annotations

import threading

import httpx

from tests.serve.conftest import MODEL_ID, wait_for

STORY = [{"role": "user", "content": "Tell me a long story about Max."}]
OTHER = [{"role": "user", "content": "And the weather in Paris?"}]


def test_disconnecting_mid_stream_frees_the_row_and_others_continue(server, client):
    engine = server.engine
    solo = client.chat.completions.create(model=MODEL_ID, messages=OTHER, max_tokens=600, temperature=0)
    other_chunks, other_done = [], threading.Event()

    def other_stream():
        stream = server.client().chat.completions.create(model=MODEL_ID, messages=OTHER, max_tokens=600,
                                                         temperature=0, stream=True)
        other_chunks.extend(c.choices[0].delta.content or "" for c in stream if c.choices)
        other_done.set()

    body = {"model": MODEL_ID, "messages": STORY, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as leaving:
        lines = leaving.iter_lines()
        next(lines), next(lines)  # the leaving stream is generating
        runner = threading.Thread(target=other_stream)
        runner.start()
        assert wait_for(lambda: engine.stats()["running"] == 2), engine.stats()  # both rows decoding
    # the connection is closed: its row must go while the other stream is still generating
    assert wait_for(lambda: engine.stats()["running"] <= 1), engine.stats()
    assert not other_done.is_set(), "the other stream ended before the disconnect was noticed (test too short)"
    runner.join(60)
    assert "".join(other_chunks) == solo.choices[0].message.content
    assert server.app.state.metrics.finished["cancelled"] >= 1
    assert wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["kv_cache_bytes"] == 0)


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(server):
    engine, finished = server.engine, server.app.state.metrics.finished
    cancelled_before = finished["cancelled"]
    body = {"model": MODEL_ID, "messages": STORY, "max_tokens": 1500, "temperature": 0}

    def post():
        try:
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.3)
        except httpx.TimeoutException:
            pass  # the client gives up and closes the connection

    poster = threading.Thread(target=post)
    poster.start()
    assert wait_for(lambda: engine.stats()["running"] == 1)
    poster.join()
    assert wait_for(lambda: finished["cancelled"] == cancelled_before + 1)
    assert wait_for(lambda: engine.stats()["running"] == 0)
