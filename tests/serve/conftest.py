"""A tiny multimodal checkpoint saved to disk, served by live uvicorn servers on 127.0.0.1.

The model has random weights, with the output projection biased towards ordinary text (a random
head mostly picks one of the 2,048 special tokens, which would end every reply at once). The main
server is built by ``llama4 serve``'s own argument path (``build_app``) from the saved checkpoint; a
second, small-limits server (batch 1, queue 1, 64 KiB bodies, an API key, the model's 4,096-token
context) exercises the refusals.
"""

from __future__ import annotations

import argparse
import io
import socket
import threading
import time
from dataclasses import replace

import pytest
import torch
from PIL import Image

import llama4
from llama4.presets import LLAMA4_VISION, text_config

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
uvicorn = pytest.importorskip("uvicorn")

from llama4.serve.app import create_app  # noqa: E402
from llama4.serve.command import add_serve_parser, build_app  # noqa: E402
from llama4.serve.engine import EngineConfig  # noqa: E402

CORPUS = ["Once upon a time there was a little dog named Max. He liked to run and play in the park. "
          'The weather in Paris was sunny, {"city": "Paris", "ok": true}.'] * 20
API_KEY = "test-key-123"
MODEL_ID = "tiny-llama4"


def png(width: int, height: int, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tok():
    return llama4.train_tokenizer(CORPUS, num_base_tokens=320)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tok):
    text = text_config(num_layers=4, vocab_size=tok.vocab_size, hidden_size=32, num_heads=4, num_kv_heads=2,
                       head_dim=8, intermediate_size=32, num_experts=4, attention_chunk_size=16, floor_scale=8,
                       max_position_embeddings=4096,
                       bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    vision = replace(LLAMA4_VISION, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=128,
                     vision_output_dim=48, projector_input_dim=48, projector_output_dim=48)
    config = llama4.ModelConfig(text=text, vision=vision, image_token_id=tok.patch_id,
                                boi_token_id=tok.image_start_id, eoi_token_id=tok.image_end_id)
    model = llama4.random_model(config, std=0.3, seed=1)
    with torch.no_grad():
        model.text.output.weight[tok.num_base_tokens:] = 0
        model.text.output.weight[:tok.num_base_tokens] *= 10
    path = tmp_path_factory.mktemp("checkpoint") / MODEL_ID
    llama4.save_model(model, path)
    tok.save(path)
    return path


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


@pytest.fixture(scope="session")
def model(checkpoint):
    return llama4.load_model(checkpoint)
