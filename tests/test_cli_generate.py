"""`llama4 generate` and `llama4 chat` end to end on a small checkpoint written by the project."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import llama4
import llama4.inference.text
from llama4.presets import text_config

CORPUS = ["The cat sat on the mat. The dog ran in the park. A bird sang a song."] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tok = llama4.train_tokenizer(CORPUS, num_base_tokens=280, out_dir=path)
    cfg = text_config(num_layers=4, vocab_size=tok.vocab_size, hidden_size=32, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=32, num_experts=4, attention_chunk_size=16,
                      bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    model = llama4.random_model(llama4.ModelConfig(text=cfg), seed=0)
    llama4.save_model(model, path)
    return path


def run(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "llama4.cli", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_generate_json_reports_tokens_and_timings(checkpoint):
    out = run("generate", "Tell me about the cat.", "--model", str(checkpoint), "--max-tokens", "8", "--json",
              "--dtype", "fp32")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["completion_tokens"] == len(result["tokens"]) <= 8
    assert result["prompt_tokens"] > 5 and result["finish_reason"] in ("stop", "length")
    # The same greedy reply through the Python API.
    model = llama4.load_model(checkpoint)
    tok = llama4.load_tokenizer(checkpoint)
    reply = llama4.inference.text.chat(model, tok, [{"role": "user", "content": "Tell me about the cat."}],
                                       max_new_tokens=8)
    assert reply.tokens == result["tokens"]


def test_generate_raw_prints_text_and_speed(checkpoint):
    out = run("generate", "The dog", "--raw", "--model", str(checkpoint), "--max-tokens", "5")
    assert out.returncode == 0, out.stderr
    assert "generated at" in out.stderr and "tok/s" in out.stderr


def test_chat_session_commands(checkpoint):
    out = run("chat", "--model", str(checkpoint), "--max-tokens", "5", "--quiet",
              stdin="hello\n/bogus\n/image\n/reset\nagain\n/quit\n")
    assert out.returncode == 0, out.stderr
    assert "unknown command /bogus" in out.stderr and "usage: /image PATH" in out.stderr
    assert "(conversation cleared)" in out.stderr


def test_chat_image_on_text_only_model_is_a_clear_error(checkpoint, tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    out = run("chat", "--model", str(checkpoint), "--quiet", stdin=f"/image {tmp_path / 'x.png'}\nwhat is it?\n/quit\n")
    assert out.returncode == 0
    assert "no vision encoder" in out.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    out = run("generate", "hi", "--model", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "not a checkpoint directory" in out.stderr


def test_generate_and_chat_take_a_quantized_kv_cache(checkpoint):
    out = run("generate", "Tell me about the cat.", "--model", str(checkpoint), "--max-tokens", "8", "--json",
              "--dtype", "fp32", "--kv-cache", "int8")
    assert out.returncode == 0, out.stderr
    model, tok = llama4.load_model(checkpoint), llama4.load_tokenizer(checkpoint)
    reply = llama4.inference.text.chat(model, tok, [{"role": "user", "content": "Tell me about the cat."}],
                                       max_new_tokens=8, kv_cache="int8")
    assert json.loads(out.stdout)["tokens"] == reply.tokens
    out = run("chat", "--model", str(checkpoint), "--max-tokens", "5", "--quiet", "--kv-cache", "fp8",
              stdin="hello\nagain\n/quit\n")
    assert out.returncode == 0, out.stderr
    out = run("generate", "hi", "--model", str(checkpoint), "--kv-cache", "int4")
    assert out.returncode == 2 and "--kv-cache: invalid choice: 'int4'" in out.stderr
