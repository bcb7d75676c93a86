"""`llama4 serve`: arguments, and the real command serving a checkpoint in a subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llama4.cli import build_parser
from llama4.serve.command import cmd_serve
from tests.serve.conftest import LiveServer


def test_serve_arguments_and_defaults():
    args = build_parser().parse_args(["serve"])
    assert args.func is cmd_serve
    assert (args.host, args.port, args.model, args.api_key) == ("127.0.0.1", 8000, None, None)
    assert (args.max_batch, args.max_queue, args.max_context, args.allow_remote_images) == (8, 64, None, False)
    args = build_parser().parse_args(["serve", "--model", "m", "--port", "9", "--api-key", "k", "--max-batch", "2",
                                      "--max-context", "512", "--max-queue", "3"])
    assert (args.model, args.port, args.api_key, args.max_batch, args.max_context, args.max_queue) == (
        "m", 9, "k", 2, 512, 3)
    assert not args.no_batch_invariant and args.prefix_cache_mb == 256 and args.engine == "process"
    assert build_parser().parse_args(["serve", "--engine", "thread"]).engine == "thread"
    assert build_parser().parse_args(["serve", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0
    assert build_parser().parse_args(["serve", "--no-batch-invariant"]).no_batch_invariant


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llama4_serve_runs_a_checkpoint(checkpoint):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llama4.cli", "serve", "--model", str(checkpoint), "--port", str(port),
         "--api-key", "k", "--threads", "1", "--dtype", "fp32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llama4 serve did not come up"
            time.sleep(0.1)
        models = httpx.get(base + "/v1/models", headers={"authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == [checkpoint.name]
        reply = httpx.post(base + "/v1/chat/completions", headers={"authorization": "Bearer k"}, timeout=30,
                           json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/v1" in err and "Warning" not in err


def test_a_busy_port_is_one_error_line_before_anything_else(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cmd_serve(build_parser().parse_args(["serve", "--port", str(port)])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llama4: error: cannot listen on 127.0.0.1:{port}") and "\n" not in err


def test_serve_without_its_extra_says_in_one_line_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert cmd_serve(build_parser().parse_args(["serve"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "uvicorn not installed" in err and "pip install 'llama4[serve]'" in err


def test_served_model_names_default_to_the_checkpoint_or_the_embedded_models_name(checkpoint):
    from llama4.serve.command import served_names

    def names(*argv):
        return served_names(build_parser().parse_args(["serve", *argv]))

    assert names() == ["llama4-tiny", "llama4"]  # the embedded model: its own name, and the old default
    assert names("--model", str(checkpoint)) == [checkpoint.name]
    assert names("--served-model-name", "a", "b", "--model-id", "c") == ["a", "b", "c"]
    assert names("--model-id", "a", "--served-model-name", "a") == ["a"]


def test_every_served_name_is_listed_retrieved_and_accepted(model, tok):
    from llama4.serve.app import create_app

    live = LiveServer(create_app(model, tok, model_id=["first", "second"]))
    try:
        client = live.client()
        assert [m.id for m in client.models.list().data] == ["first", "second"]
        assert client.models.retrieve("second").id == "second"
        reply = client.chat.completions.create(model="second", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=2)
        assert reply.model == "first"  # as vLLM: responses carry the first name
        with pytest.raises(openai.NotFoundError, match="serves 'first', 'second'"):
            client.models.retrieve("third")
    finally:
        live.close()
    with pytest.raises(ValueError, match="non-empty name"):
        create_app(model, tok, model_id=[])


def test_build_app_runs_the_engine_in_a_process_or_a_thread(checkpoint, server):
    from llama4.inference.engine import Engine
    from llama4.serve.command import build_app
    from llama4.serve.engine_process import EngineProcess

    assert isinstance(server.engine, EngineProcess)  # the default: the live-server tests run through it

    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--dtype", "fp32", "--engine", "thread"])
    assert isinstance(build_app(args).state.engine, Engine)
    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--engine", "thread", "--kv-cache", "fp8"])
    engine = build_app(args).state.engine
    assert engine.config.kv_cache == "fp8" and engine._pool.storage[3].name == "fp8"  # layer 3: the global one
    assert build_parser().parse_args(["serve"]).kv_cache == "auto"
    missing = checkpoint.parent / "nothing-here"
    with pytest.raises(Exception, match="nothing-here"):  # the tokenizer is read before any process starts
        build_app(build_parser().parse_args(["serve", "--model", str(missing)]))


def test_serve_exits_with_a_message_when_the_engine_cannot_load_the_weights(checkpoint, tmp_path, capsys):
    import shutil

    from llama4.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    assert main(["serve", "--model", str(broken), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "llama4: error: the engine process did not start (exit code 1)" in err


def test_the_api_key_comes_from_the_flag_a_file_or_the_environment(tmp_path):
    from llama4.serve.command import UsageError, api_key_of

    def key(*argv, environ=None):
        return api_key_of(build_parser().parse_args(["serve", *argv]), environ or {})

    assert key() is None
    assert key("--api-key", "a") == "a"
    assert key(environ={"LLAMA4_API_KEY": "e"}) == "e"
    assert key("--api-key", "a", environ={"LLAMA4_API_KEY": "e"}) == "a"
    (tmp_path / "key").write_text("secret\nignored\n")
    assert key("--api-key-file", str(tmp_path / "key"), environ={"LLAMA4_API_KEY": "e"}) == "secret"
    (tmp_path / "empty").write_text("\n")
    for argv, message in [(("--api-key-file", str(tmp_path / "empty")), "is empty"),
                          (("--api-key-file", str(tmp_path / "missing")), "cannot read --api-key-file"),
                          (("--api-key", "a", "--api-key-file", str(tmp_path / "key")), "not both"),
                          (("--api-key", " "), "empty")]:
        with pytest.raises(UsageError, match=message):
            key(*argv)


def test_limit_and_guard_flags_reach_the_app(capsys):
    from llama4.serve.command import limits_of, remote_image_policy

    args = build_parser().parse_args(["serve", "--max-images", "2", "--max-schema-kb", "8", "--max-schema-depth", "9",
                                      "--max-image-megapixels", "1.5", "--max-body-mb", "1"])
    limits = limits_of(args)
    assert (limits.max_images, limits.max_schema_bytes, limits.max_schema_depth, limits.max_image_pixels,
            limits.max_body_bytes) == (2, 8192, 9, 1_500_000, 2**20)
    assert remote_image_policy(args) is None
    policy = remote_image_policy(build_parser().parse_args(["serve", "--allow-remote-images"]))
    assert policy.allowed_ports == (80, 443) and not policy.allow_private
    policy = remote_image_policy(build_parser().parse_args(
        ["serve", "--allow-remote-images", "--remote-image-ports", "8080", "--allow-private-image-addresses"]))
    assert policy.allowed_ports == (8080,) and policy.allow_private
    assert cmd_serve(build_parser().parse_args(["serve", "--port", str(free_port()), "--max-images", "-1"])) == 2
    assert "max_images must be >= 0" in capsys.readouterr().err
    assert cmd_serve(build_parser().parse_args(["serve", "--port", str(free_port()), "--remote-image-ports", "1"])) == 2
    assert "need --allow-remote-images" in capsys.readouterr().err


def test_serve_quantizes_a_float_checkpoint_as_it_loads(checkpoint):
    """--quant reaches the model the engine loads (thread engine here; the process engine passes it to its child
    and refuses a bad recipe before starting one)."""
    from llama4.kernels.cpu.packing import PackedWeight
    from llama4.quant import QuantizedLinear
    from llama4.serve.command import build_app
    from llama4.serve.engine_process import EngineProcess

    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--engine", "thread", "--quant", "int8"])
    model = build_app(args).state.engine.model
    qkv = model.text.layers[0].attn.qkv
    assert isinstance(getattr(qkv, "packed", None), PackedWeight) and qkv.packed.is_quantized or isinstance(
        qkv.wq, QuantizedLinear)
    assert build_parser().parse_args(["serve"]).quant is None
    with pytest.raises(ValueError, match="unknown weight format"):
        EngineProcess(str(checkpoint), quant="int3")
