"""A tiny multimodal checkpoint saved to disk (tests/inference/tiny_multimodal.py), served by live
uvicorn servers on 127.0.0.1.

The main server is built by ``llama4 serve``'s own argument path (``build_app``) from the saved checkpoint; a
second, small-limits server (batch 1, queue 1, 64 KiB bodies, an API key, the model's 4,096-token
context) exercises the refusals.
"""

from __future__ import annotations

import argparse
import io
import socket
import threading
import time

import pytest
from PIL import Image

from tests.inference.tiny_multimodal import MODEL_ID, checkpoint, model, tok  # noqa: F401

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
uvicorn = pytest.importorskip("uvicorn")

from llama4.inference.engine import EngineConfig  # noqa: E402
from llama4.serve.app import create_app  # noqa: E402
from llama4.serve.command import add_serve_parser, build_app  # noqa: E402

API_KEY = "test-key-123"


def png(width: int, height: int, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll ``condition()`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


class LiveServer:
    """uvicorn in a thread on a free loopback port (bound before the thread starts: no race)."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, api_key: str = "unused", **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def close(self):
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


@pytest.fixture(scope="session")
def server(checkpoint):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(checkpoint), "--dtype", "fp32", "--max-batch", "4",
                              "--max-context", "2048", "--prefill-chunk", "64"])
    live = LiveServer(build_app(args))
    yield live
    live.close()


@pytest.fixture(scope="session")
def small_server(model, tok):
    app = create_app(model, tok, model_id=MODEL_ID, api_key=API_KEY, max_body_bytes=64 * 1024,
                     engine_config=EngineConfig(max_batch=1, max_queue=1, prefill_chunk=64))
    live = LiveServer(app)
    yield live
    live.close()


@pytest.fixture
def client(server):
    return server.client()

