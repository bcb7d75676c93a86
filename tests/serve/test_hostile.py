"""Hostile and malformed requests (issue 24's probe): each is refused with a 4xx in the OpenAI format before
any costly work, the connection stays open for the client's next request, and an unexpected failure is a
500 in the same format (a stream's: an error event and ``[DONE]``)."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from llama4.serve.limits import ServeLimits
from tests.serve.conftest import API_KEY, MODEL_ID, LiveServer, png

HELLO = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def nested_schema(depth: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def big_blank_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


HOSTILE = {  # name: (path, raw body, status, a phrase of the message, param)
    "a body nested 100,000 deep": (CHAT, b"[" * 100_000, 400, "nested", None),
    "an object nested 200 deep": (CHAT, b'{"a":' * 200 + b"1" + b"}" * 200, 400, "nested more than 128", None),
    "a schema nested 70 deep": (CHAT, {"messages": HELLO, "response_format": schema_format(nested_schema(70))},
                                 400, "--max-schema-depth", "response_format"),
    "a schema of 5,000 properties": (
        CHAT, {"messages": HELLO, "response_format": schema_format(
            {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}})},
        400, "--max-schema-kb", "response_format"),
    "a seed of 2**64": (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
                        400, "seed", "seed"),
    "an echoed id outside the vocabulary": (COMPLETIONS, {"prompt": [1000000000], "echo": True}, 400,
                                            "outside the vocabulary", "prompt"),
    "a lone surrogate as the model": (CHAT, b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
                                      400, "lone UTF-16 surrogate", None),
    "a lone surrogate in an echoed prompt": (COMPLETIONS, b'{"prompt": "a\\udfffb", "echo": true, "stream": true}',
                                             400, "lone UTF-16 surrogate", None),
    "an image that is a number": (CHAT, {"messages": [{"role": "user", "content": [{"type": "image", "image": 123}]}]},
                                  400, "must be a PIL image, bytes or a path", "messages"),
    "a tool name that is a list": (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {
        "name": ["x"], "parameters": {"type": "object"}}}]}, 400, "must be a string", "tools[0].function.name"),
    "a tool_choice name that is a dict": (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {
        "name": "f"}}], "tool_choice": {"type": "function", "function": {"name": {"a": 1}}}}, 400,
        "not among the tools", "tool_choice"),
    "more choices than the queue holds": (COMPLETIONS, {"prompt": ["a", "b", "c", "d", "e"], "n": 16}, 400,
                                          "could never be served", "n"),
    "more images than allowed": (CHAT, {"messages": [{"role": "user", "content": [image_part(png(4, 4, "red"))] * 9}]},
                                 400, "--max-images", "messages"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_request_is_a_4xx_and_the_connection_stays_open(server, name):
    path, body, status, phrase, param = HOSTILE[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=server.url, timeout=30, headers={"content-type": "application/json"}) as client:
        started = time.monotonic()
        response = client.post(path, content=content)
        took = time.monotonic() - started
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and phrase in error["message"], error
        assert error["param"] == param
        assert response.headers.get("connection") != "close"
        assert took < 5, f"refused only after {took:.1f} s"
        again = client.post(CHAT, json={"messages": HELLO, "max_tokens": 2})
        assert again.status_code == 200, again.text


def test_a_schema_at_the_limit_compiles_once_off_the_event_loop(server):
    """2,000 properties (under the 64 KiB default) is served, and /health answers meanwhile."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}
    assert len(json.dumps(schema, separators=(",", ":"))) < ServeLimits().max_schema_bytes
    with httpx.Client(base_url=server.url, timeout=60) as client:
        import threading

        slowest = []

        def poll(stop):
            while not stop.is_set():
                started = time.monotonic()
                client.get("/health")
                slowest.append(time.monotonic() - started)
                time.sleep(0.05)

        stop = threading.Event()
        poller = threading.Thread(target=poll, args=(stop,))
        poller.start()
        try:
            reply = client.post(CHAT, json={"messages": HELLO, "max_tokens": 3, "n": 2,
                                            "response_format": schema_format(schema)})
        finally:
            stop.set()
            poller.join()
        assert reply.status_code == 200, reply.text
        assert all(c["message"]["content"].startswith("{") for c in reply.json()["choices"])
        assert max(slowest) < 1.0, slowest


def test_an_image_prompt_that_cannot_fit_is_refused_from_the_headers_before_any_decode(tok, monkeypatch):
    """Forty 7000 x 7000 PNGs: refused by their headers' tile count, no pixel decoded."""
    from llama4.inference import text
    from llama4.serve import translate
    from llama4.serve.errors import APIError
    from llama4.serve.schemas import ChatCompletionRequest

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(text, "decode_frame", no_decoding)
    blank = big_blank_png(7000)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [image_part(blank)] * 40}])
    started = time.monotonic()
    with pytest.raises(APIError) as refused:
        translate.plan_chat(req, tok, True, ServeLimits(max_images=64), max_context=4096)
    assert refused.value.code == "context_length_exceeded" and "4096" in refused.value.message
    assert time.monotonic() - started < 5
    with pytest.raises(APIError, match="at most 8 per request"):  # the default limit, before anything is read
        translate.plan_chat(req, tok, True, max_context=4096)


def test_a_client_that_leaves_stops_the_image_decoding(tok):
    from llama4.serve import translate
    from llama4.serve.schemas import ChatCompletionRequest
    from llama4.serve.streams import ClientGone

    req = ChatCompletionRequest(messages=[{"role": "user", "content": [image_part(png(8, 8, "red"))] * 3}])
    decodes = []

    def checkpoint():
        decodes.append(1)
        if len(decodes) > 1:
            raise ClientGone()

    with pytest.raises(ClientGone):
        translate.plan_chat(req, tok, True, checkpoint=checkpoint)


@pytest.fixture
def failing_server(model, tok, monkeypatch):
    from llama4.serve import app as app_module
    from llama4.serve.app import create_app

    live = LiveServer(create_app(model, tok, model_id=MODEL_ID))
    yield live, app_module, monkeypatch
    live.close()


def test_an_unexpected_failure_is_a_500_in_the_openai_format_on_a_live_connection(failing_server):
    live, app_module, monkeypatch = failing_server

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module.translate, "plan_completion", broken)
    with httpx.Client(base_url=live.url, timeout=30) as client:
        response = client.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 2})
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        assert "a bug" not in response.text and response.headers.get("connection") != "close"
        assert client.post(CHAT, json={"messages": HELLO, "max_tokens": 2}).status_code == 200


def test_a_stream_that_fails_after_its_200_ends_with_an_error_event_and_done(failing_server):
    live, app_module, monkeypatch = failing_server

    def broken(self, i, run):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module._CompletionReply, "_run_chunk", broken)
    with httpx.Client(base_url=live.url, timeout=30) as client:
        response = client.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 4, "stream": True})
        assert response.status_code == 200
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
        assert client.post(CHAT, json={"messages": HELLO, "max_tokens": 2}).status_code == 200


def test_metrics_ask_for_the_key_when_the_server_says_so(model, tok):
    from llama4.serve.app import create_app

    live = LiveServer(create_app(model, tok, model_id=MODEL_ID, api_key=API_KEY, metrics_need_key=True))
    try:
        assert httpx.get(live.url + "/metrics").status_code == 401
        assert httpx.get(live.url + "/metrics", headers={"authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert httpx.get(live.url + "/health").status_code == 200  # for supervisors, always open
    finally:
        live.close()


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_schema_bytes must be >= 1"):
        ServeLimits(max_schema_bytes=0)
    with pytest.raises(ValueError, match="max_images must be >= 0"):
        ServeLimits(max_images=-1)
