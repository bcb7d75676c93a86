"""Many LoRA adapters over HTTP, with the openai client: ``model`` picks the base or an adapter, mixed
concurrent requests get their solo replies (the solo run: llama4.generate on the model with only that adapter
applied by load_adapter), vLLM's load / unload routes, the errors, and a prefix cache that is never shared
across adapters. An engine thread serves most tests; the last ones go through ``llama4 serve``'s own argument
path (--lora, --enable-lora) and its engine process."""

from __future__ import annotations

import argparse
import threading

import httpx
import pytest
import torch

import llama4
from llama4.inference.engine import Engine, EngineConfig
from llama4.lora import LoraConfig, apply_lora, load_adapter, lora_state_dict, save_adapter
from llama4.serve.app import create_engine_app
from llama4.serve.command import add_serve_parser, build_app
from tests.serve.conftest import MODEL_ID, LiveServer, openai, wait_for

ADAPTERS = {"a": (("attention", "experts"), 4, 1), "b": (("wq", "wv", "shared"), 2, 2)}  # targets, rank, seed
PROMPTS = ["Once upon a time there was a little dog", "The weather in Paris", "Max liked to run",
           "He liked to play in the park with", "Once upon a time"]


def _plain(checkpoint):
    model = llama4.load_model(checkpoint, pack=False)
    model.set_batch_invariant(True)  # as the engine runs it
    return model


@pytest.fixture(scope="module")
def adapter_dirs(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, (targets, rank, seed) in ADAPTERS.items():
        model = llama4.load_model(checkpoint, pack=False)
        apply_lora(model, LoraConfig(rank=rank, alpha=2 * rank, targets=targets), seed=seed)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lora_state_dict(model).values():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
        save_adapter(model, root / name)
    return {name: root / name for name in ADAPTERS}


@pytest.fixture(scope="module")
def solo_models(checkpoint, adapter_dirs):
    models = {None: _plain(checkpoint)}
    for name, path in adapter_dirs.items():
        models[name] = load_adapter(_plain(checkpoint), path)
    return models


@pytest.fixture(scope="module")
def lora_server(checkpoint, tok, adapter_dirs):
    engine = Engine(llama4.load_model(checkpoint, pack=False), tok,
                    EngineConfig(max_batch=4, max_queue=16, prefill_chunk=8, max_loras=3, max_lora_rank=8))
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, str(path))
    live = LiveServer(create_engine_app(engine, tok, model_id=MODEL_ID, runtime_lora=True))
    yield live
    live.close()


def _solo(models, tok, name, ids, n):
    out = llama4.generate(models[name], [ids], max_new_tokens=n, stop_tokens=tok.eos_ids)[0][len(ids):]
    return tok.decode(out, skip_special=True)


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def test_models_lists_the_adapters_with_their_parent(lora_server, adapter_dirs):
    client = lora_server.client()
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) >= {MODEL_ID, "a", "b"}
    assert cards["a"].parent == MODEL_ID and cards["a"].root == str(adapter_dirs["a"])
    assert getattr(cards[MODEL_ID], "parent", None) is None
    assert client.models.retrieve("b").root == str(adapter_dirs["b"])


def test_model_picks_the_adapter_or_the_base(lora_server, solo_models, tok):
    client = lora_server.client()
    ids = tok.encode(PROMPTS[0], bos=True)
    texts = {}
    for name in (None, "a", "b"):
        reply = client.completions.create(model=name or MODEL_ID, prompt=ids, max_tokens=12, temperature=0)
        assert reply.model == (name or MODEL_ID)
        texts[name] = reply.choices[0].text
        assert texts[name] == _solo(solo_models, tok, name, ids, 12), name
    assert len(set(texts.values())) == 3  # the adapters change the replies
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0)
    assert chat.model == "a"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert chat.choices[0].message.content == _solo(solo_models, tok, "a", prompt, 6)


def test_mixed_concurrent_requests_equal_their_solo_runs(lora_server, solo_models, tok):
    client = lora_server.client()
    jobs = [(name, tok.encode(PROMPTS[i % len(PROMPTS)], bos=True), 8 + i)
            for i, name in enumerate(["a", None, "b", "a", "b", None, "a", "b"])]
    replies: dict[int, str] = {}

    def run(i):
        name, ids, n = jobs[i]
        reply = client.completions.create(model=name or MODEL_ID, prompt=ids, max_tokens=n, temperature=0)
        replies[i] = reply.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(replies) == list(range(len(jobs)))
    for i, (name, ids, n) in enumerate(jobs):
        assert replies[i] == _solo(solo_models, tok, name, ids, n), (i, name)


def test_an_unknown_adapter_is_a_404_in_openais_format(lora_server, tok):
    client = lora_server.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="Once", max_tokens=2)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'a'" in error["message"] and "'b'" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_load_use_and_unload_an_adapter_at_run_time(lora_server, solo_models, tok, adapter_dirs):
    client = lora_server.client()
    ids = tok.encode(PROMPTS[1], bos=True)
    loaded = _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapter_dirs["b"])})
    assert loaded.status_code == 200 and "'c'" in loaded.text
    assert "c" in {m.id for m in client.models.list().data}
    reply = client.completions.create(model="c", prompt=ids, max_tokens=10, temperature=0)
    assert reply.choices[0].text == _solo(solo_models, tok, "b", ids, 10)
    again = _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapter_dirs["a"])})
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    assert _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    assert "c" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt=ids, max_tokens=2)
    gone = _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_bad_adapters_are_refused_with_the_reason(lora_server, tmp_path, checkpoint):
    missing = _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "none")})
    assert missing.status_code == 400 and "adapter_config.json" in missing.json()["error"]["message"]
    base_name = _post(lora_server, "/v1/load_lora_adapter", {"lora_name": MODEL_ID, "lora_path": str(tmp_path)})
    assert base_name.status_code == 400 and "base model" in base_name.json()["error"]["message"]
    model = llama4.load_model(checkpoint, pack=False)
    apply_lora(model, LoraConfig(rank=16, targets=("wq",)))
    save_adapter(model, tmp_path / "r16")
    too_big = _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "r16")})
    assert too_big.status_code == 400 and "rank 16 exceeds" in too_big.json()["error"]["message"]
    empty = _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "", "lora_path": "x"})
    assert empty.status_code == 400


def test_unloading_an_adapter_in_use_is_refused_until_its_requests_end(lora_server, adapter_dirs, tok):
    assert _post(lora_server, "/v1/load_lora_adapter",
                 {"lora_name": "busy", "lora_path": str(adapter_dirs["a"])}).status_code == 200
    client = lora_server.client()
    stream = client.completions.create(model="busy", prompt=tok.encode(PROMPTS[2], bos=True), max_tokens=1000,
                                       temperature=0, stream=True)
    next(iter(stream))  # running now
    refused = _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "busy"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_in_use"
    stream.close()  # the client goes: the request is cancelled
    assert wait_for(lambda: lora_server.engine.stats()["running"] == 0, 30)
    assert _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "busy"}).status_code == 200


def test_the_prefix_cache_is_never_shared_across_adapters(lora_server, solo_models, tok):
    client = lora_server.client()
    # no BOS: no earlier entry starts so; over 16 tokens: a cut past the first attention chunk is reusable
    first = tok.encode("Paris was sunny and the dog liked the weather. Max liked to run and play in the park.")
    assert len(first) > 16
    client.completions.create(model="a", prompt=first, max_tokens=3, temperature=0)
    follow = first + tok.encode(" The end.")
    for name in (None, "b"):  # the same tokens on another adapter (or none): computed afresh, the solo reply
        other = client.completions.create(model=name or MODEL_ID, prompt=follow, max_tokens=5, temperature=0)
        assert other.usage.prompt_tokens_details.cached_tokens == 0, name
        assert other.choices[0].text == _solo(solo_models, tok, name, follow, 5)
    same = client.completions.create(model="a", prompt=follow, max_tokens=5, temperature=0)
    assert same.usage.prompt_tokens_details.cached_tokens >= 16
    assert same.choices[0].text == _solo(solo_models, tok, "a", follow, 5)


def test_runtime_loading_is_off_unless_enabled(checkpoint, tok, adapter_dirs):
    engine = Engine(llama4.load_model(checkpoint, pack=False), tok, EngineConfig(max_loras=1))
    engine.load_adapter("a", str(adapter_dirs["a"]))
    live = LiveServer(create_engine_app(engine, tok, model_id=MODEL_ID))
    try:
        off = _post(live, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(adapter_dirs["b"])})
        assert off.status_code == 400 and "--enable-lora" in off.json()["error"]["message"]
        assert "a" in {m.id for m in live.client().models.list().data}
    finally:
        live.close()


# -- llama4 serve's own path: flags, the engine process --------------------------------------------------------


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_the_serve_flags_are_checked(checkpoint, adapter_dirs):
    from llama4.serve.command import UsageError, lora_modules_of

    assert lora_modules_of(_args("--lora", f"a={adapter_dirs['a']}"), [MODEL_ID]) == {"a": str(adapter_dirs["a"])}
    for argv, message in [(["--lora", "a"], "NAME=PATH"),
                          (["--lora", f"{MODEL_ID}=x"], "is taken"),
                          (["--lora", "a=x", "a=y"], "is taken"),
                          (["--lora", "a=x", "b=y", "--max-loras", "1"], "--max-loras is 1")]:
        with pytest.raises(UsageError, match=message):
            lora_modules_of(_args(*argv), [MODEL_ID])


def test_the_engine_process_serves_loads_and_unloads_adapters(checkpoint, adapter_dirs, solo_models, tok):
    args = _args("--model", str(checkpoint), "--dtype", "fp32", "--max-batch", "4", "--prefill-chunk", "8",
                 "--lora", f"a={adapter_dirs['a']}", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "4",
                 "--engine", "process")
    live = LiveServer(build_app(args))
    try:
        client = live.client()
        ids = tok.encode(PROMPTS[3], bos=True)
        for name in ("a", None):
            reply = client.completions.create(model=name or MODEL_ID, prompt=ids, max_tokens=8, temperature=0)
            assert reply.choices[0].text == _solo(solo_models, tok, name, ids, 8), name
        assert _post(live, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(adapter_dirs["b"])}
                     ).status_code == 200
        reply = client.completions.create(model="b", prompt=ids, max_tokens=8, temperature=0)
        assert reply.choices[0].text == _solo(solo_models, tok, "b", ids, 8)
        full = _post(live, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapter_dirs["b"])})
        assert full.status_code == 400 and "all 2 adapter slots are taken" in full.json()["error"]["message"]
        assert _post(live, "/v1/unload_lora_adapter", {"lora_name": "b"}).status_code == 200
        assert {m.id for m in client.models.list().data} == {MODEL_ID, "a"}
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="b", prompt=ids, max_tokens=2)
    finally:
        live.close()


def test_a_bad_adapter_given_at_start_fails_the_start(checkpoint, tmp_path):
    from llama4.serve.command import UsageError
    from llama4.serve.engine_process import EngineStartError

    with pytest.raises(UsageError, match="adapter_config.json"):
        build_app(_args("--model", str(checkpoint), "--dtype", "fp32", "--engine", "thread", "--lora",
                        f"x={tmp_path}"))
    with pytest.raises(EngineStartError, match="adapter_config.json"):
        build_app(_args("--model", str(checkpoint), "--dtype", "fp32", "--engine", "process", "--lora",
                        f"x={tmp_path}"))

