"""Every refusal in the OpenAI error format, with its status, while the server keeps serving."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from tests.serve.conftest import API_KEY, MODEL_ID

HELLO = [{"role": "user", "content": "Hello"}]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_missing_or_wrong_api_key_is_401(small_server):
    with pytest.raises(openai.AuthenticationError, match="API key"):
        small_server.client("wrong").chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=2)
    response = httpx.post(small_server.url + "/v1/chat/completions", json={"model": MODEL_ID, "messages": HELLO})
    assert response.status_code == 401 and error_of(response)["type"] == "authentication_error"
    assert httpx.get(small_server.url + "/v1/models").status_code == 401
    assert small_server.client(API_KEY).models.list().data[0].id == MODEL_ID


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' does not exist") as raised:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert raised.value.body["code"] == "model_not_found"
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError, match=f"this server serves '{MODEL_ID}'"):
        client.models.retrieve("gpt-4o")


def test_malformed_json_and_bad_values_are_400(server, client):
    response = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in error_of(response)["message"]
    response = httpx.post(server.url + "/v1/chat/completions", json=[1, 2])
    assert response.status_code == 400 and "JSON object" in error_of(response)["message"]
    with pytest.raises(openai.BadRequestError, match="temperature") as raised:
        client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=5)
    assert raised.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL_ID, messages=[])
    with pytest.raises(openai.BadRequestError, match="at most 64 stop sequences are allowed, got 65"):
        client.chat.completions.create(model=MODEL_ID, messages=HELLO, stop=[str(i) for i in range(65)])
    with pytest.raises(openai.BadRequestError, match="at most 1024 characters"):
        client.chat.completions.create(model=MODEL_ID, messages=HELLO, stop=["x" * 1025])


def test_more_stop_sequences_than_openais_four_are_taken(client):
    """lm-eval sends a task's stops plus the end-of-turn string (vLLM takes any number)."""
    stops = ["\n\n", "Question:", "Q:", "</s>", "<|eot|>"]
    reply = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=4, temperature=0,
                                      stop=stops)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_prompt_over_the_context_states_both_numbers(client):
    long = [{"role": "user", "content": "Max runs in the park. " * 600}]
    with pytest.raises(openai.BadRequestError, match=r"the prompt has \d+ tokens but the context holds 2048") as raised:
        client.chat.completions.create(model=MODEL_ID, messages=long, max_tokens=2)
    assert raised.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("url, problem", [
    ("data:image/png;base64,not-base64!!", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"GIF89a but not really an image").decode(), "bad image"),
    ("https://example.com/cat.png", "remote image URLs are not fetched"),
    ("/etc/passwd", "unsupported image URL"),
])
def test_bad_images_are_400_naming_the_problem(client, url, problem):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is it?"}]}]
    with pytest.raises(openai.BadRequestError, match=problem) as raised:
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=2)
    assert raised.value.body["code"] == "invalid_image"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # raised by the server, as it refuses
def test_a_100_megapixel_image_is_refused_from_its_header(client):
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # bilevel: 12 MB in memory, a small file
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError, match="10000x10000 = 100000000 pixels"):
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=2)


def test_a_body_over_the_limit_is_413(small_server):
    headers = {"authorization": f"Bearer {API_KEY}"}
    big = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * 100_000}]}
    response = httpx.post(small_server.url + "/v1/chat/completions", json=big, headers=headers)
    assert response.status_code == 413 and "65,536 bytes" in error_of(response)["message"]


def test_a_declared_1gb_body_is_refused_before_it_is_sent(small_server):
    """Only the headers go out: the 413 must come from the declared length, not from reading 1 GB."""
    port = int(small_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n{")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")


def test_a_full_queue_is_429_with_retry_after(small_server):
    client = small_server.client(API_KEY)
    engine = small_server.engine
    # thousands of tokens: still generating when the third request arrives, however fast the machine
    running = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=4000, temperature=0,
                                             stream=True)
    next(iter(running))  # the one batch slot is taken
    queued_reply = []
    waiter = threading.Thread(target=lambda: queued_reply.append(
        client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=3, temperature=0)))
    waiter.start()
    deadline = time.monotonic() + 10
    while engine.stats()["queued"] < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.005)
    with pytest.raises(openai.RateLimitError, match="busy") as raised:
        client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=3)
    assert int(raised.value.response.headers["retry-after"]) >= 1
    running.close()  # frees the slot: the queued request runs
    waiter.join(30)
    assert queued_reply and queued_reply[0].choices[0].finish_reason in ("length", "stop")


def test_logit_bias_bans_and_forces_tokens(client, tok):
    """Two tokens forced to the top: the model's favourite of the two wins; banned, the other one does."""
    words = {tok.encode(word, bos=False)[0]: word for word in (" the", " and")}
    both = {str(t): 100 for t in words}
    reply = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=3, temperature=0,
                                      logit_bias=both).choices[0].text
    winner = next(t for t, word in words.items() if reply == word * 3)
    banned = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=3, temperature=0,
                                       logit_bias={**both, str(winner): -100}).choices[0].text
    assert banned == next(word for t, word in words.items() if t != winner) * 3
    chat = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=2, temperature=0,
                                          logit_bias={str(winner): 100})  # chat takes it too
    assert chat.choices[0].message.content == words[winner] * 2


def test_bad_logit_bias_best_of_and_suffix_are_400(client):
    with pytest.raises(openai.BadRequestError, match=r"logit_bias token ids must be in \[0, \d+\), got \[9999999\]"):
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=1, logit_bias={"9999999": 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias keys must be token ids"):
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=1, logit_bias={"cat": 1})
    with pytest.raises(openai.BadRequestError, match=r"logit_bias values must be in \[-100, 100\]"):
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=1, logit_bias={"5": 200})
    with pytest.raises(openai.BadRequestError, match="best_of other than n is not supported"):
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=1, best_of=3)
    with pytest.raises(openai.BadRequestError, match="suffix .insertion. is not supported"):
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=1, suffix="end")
    assert client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=1, best_of=1, suffix="").choices
