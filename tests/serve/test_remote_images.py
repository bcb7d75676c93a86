"""http(s) image URLs: fetched only with allow_remote_images, with a byte cap, errors as 400s."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from llama4.prompt import ImageError
from llama4.serve.app import create_app
from llama4.serve.remote_images import fetch_image
from tests.serve.conftest import MODEL_ID, LiveServer, png

RED = png(300, 200, (255, 0, 0))


class Images(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/red.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(RED)))
            self.end_headers()
            self.wfile.write(RED)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def fetching_server(model, tok):
    live = LiveServer(create_app(model, tok, model_id=MODEL_ID, allow_remote_images=True))
    yield live
    live.close()


def ask(client, url):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What colour?"}]}]
    return client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)


def test_a_fetched_image_gives_the_same_reply_as_its_data_url(fetching_server, client, image_host):
    fetched = ask(fetching_server.client(), image_host + "/red.png")
    inline = ask(client, "data:image/png;base64," + base64.b64encode(RED).decode())
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens > 144
    assert fetched.choices[0].message.content == inline.choices[0].message.content


def test_fetch_failures_are_400_naming_the_problem(fetching_server, image_host):
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
        ask(fetching_server.client(), image_host + "/missing.png")
    with pytest.raises(openai.BadRequestError, match="could not fetch"):
        ask(fetching_server.client(), "http://127.0.0.1:9/unreachable.png")


def test_the_byte_cap_cuts_a_large_image(image_host):
    assert fetch_image(image_host + "/red.png") == RED
    with pytest.raises(ImageError, match="larger than 100 bytes"):
        fetch_image(image_host + "/red.png", max_bytes=100)
    with pytest.raises(ImageError, match="only http"):
        fetch_image("file:///etc/passwd")
