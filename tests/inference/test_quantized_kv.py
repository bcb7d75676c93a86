"""The ``kv_cache`` option of generation, chat sessions and the engine (llama4.quant.kv_cache): the global layers'
keys/values quantized in KVCache and in the engine's paged cache, replies that follow ``generate`` with the same
option, prefix-cache hits that reply as cold runs bit for bit, and refusals that name what is allowed."""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.inference.engine import Engine, EngineConfig
from llama4.inference.generate import new_cache
from llama4.inference.requests import GenerationRequest
from llama4.inference.text import ChatSession, stream_tokens_as_text
from llama4.model.paged_cache import GLOBAL, LOCAL
from llama4.quant.kv_cache import KVFormat
from tests.inference.test_engine import PROMPTS, Collector, run_until_idle

ALLOWED = "expected one of auto, bf16, int8, fp8"


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_engine_replies_follow_generate_with_the_same_kv_cache(model, tok, fmt):
    """Requests joining a running batch over the paged cache (blocks interleaved) get the tokens generate() writes
    for each alone with a KVCache of the same format; the pool's global blocks are the quantized entries."""
    engine = Engine(model, tok, EngineConfig(max_batch=4, max_context=512, prefill_chunk=4, kv_cache=fmt))
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    sinks = [Collector() for _ in prompts]
    with torch.inference_mode():
        engine.submit(GenerationRequest(prompts[0], max_tokens=20, stop_tokens=[]), sinks[0])
        for _ in range(5):
            engine.step()
        for p, sink in zip(prompts[1:], sinks[1:]):
            engine.submit(GenerationRequest(p, max_tokens=20, stop_tokens=[]), sink)
            engine.step()
    run_until_idle(engine)
    for p, sink in zip(prompts, sinks):
        expected = llama4.generate(model, [p], max_new_tokens=20, stop_tokens=[], kv_cache=fmt)[0][len(p):]
        assert sink.tokens == expected
    pool, text = engine._pool, model.config.text
    head_bytes = text.num_kv_heads * pool.block_size * 2  # one block of one layer: heads x tokens x (k, v)
    assert pool.block_bytes(GLOBAL) == len(text.global_layers) * head_bytes * KVFormat(fmt).entry_bytes(text.head_dim)
    assert pool.block_bytes(LOCAL) == len(text.local_layers) * head_bytes * text.head_dim * 4  # float32 model
    assert all(pool._k[i].dtype == torch.uint8 for i in text.global_layers)


def test_generate_and_chat_sessions_store_what_they_are_told(model, tok):
    ids = tok.encode("Once upon a time", bos=True)
    assert model.text.embed.weight.dtype == torch.float32
    assert new_cache(model, "auto").storage == (None,) * model.config.text.num_layers
    assert new_cache(model, "int8").storage[3] == KVFormat("int8")
    assert new_cache(model, "bf16").storage[3] == KVFormat("bf16")  # a float32 model's global layers in bf16
    assert len(llama4.generate(model, [ids], max_new_tokens=6, stop_tokens=[], kv_cache="bf16")[0]) == len(ids) + 6
    session = ChatSession(model, tok, max_new_tokens=4, kv_cache="fp8")
    "".join(session.send("Hello"))
    assert session.cache.storage[3] == KVFormat("fp8")
    kept = session.cache
    "".join(session.send("And then?"))
    assert session.cache is kept  # the next turn continues the quantized cache
    assert len(list(stream_tokens_as_text(model, tok, ids, max_new_tokens=3, kv_cache="int8", stop_tokens=[]))) > 0
    for bad in ("int4", "Int8", None):
        with pytest.raises(ValueError, match=ALLOWED):
            llama4.generate(model, [ids], max_new_tokens=2, kv_cache=bad)
        with pytest.raises(ValueError, match=ALLOWED):
            EngineConfig(kv_cache=bad)
        with pytest.raises(ValueError, match=ALLOWED):
            ChatSession(model, tok, kv_cache=bad)


def test_engine_config_kv_cache_survives_json():
    """The engine process gets its config as JSON (serve/engine_process.py: asdict -> EngineConfig(**))."""
    import dataclasses
    import json

    config = EngineConfig(kv_cache="fp8")
    assert EngineConfig(**json.loads(json.dumps(dataclasses.asdict(config)))).kv_cache == "fp8"


def test_a_prefix_cache_hit_replies_as_the_cold_run_bit_for_bit_with_int8_kv():
    """The shipped model in bf16 with the int8 cache (so on its torch layers: the fused C layer declines): a second
    turn that reuses the first turn's quantized blocks gives the cold run's tokens and logprobs, to the last bit."""
    from llama4.inference.sampling import SamplingParams
    from llama4.prompt.chat import encode_chat

    model, tok = llama4.load_model(dtype=torch.bfloat16), llama4.load_tokenizer()
    params = SamplingParams(logprobs=2)

    def ask(engine, ids):
        out = Collector()
        engine.submit(GenerationRequest(ids, params=params, max_tokens=24), out)
        run_until_idle(engine)
        return out

    config = EngineConfig(kv_cache="int8")
    warm = Engine(model, tok, config)
    first = [{"role": "user", "content": "Hello! How are you?"}]
    reply = ask(warm, encode_chat(tok, first).ids)
    follow = encode_chat(tok, first + [{"role": "assistant", "content": reply.text},
                                       {"role": "user", "content": "What is your name?"}]).ids
    hit, cold = ask(warm, follow), ask(Engine(model, tok, config), follow)
    assert hit.finish.cached_tokens > 0 and cold.finish.cached_tokens == 0
    assert [(e.token, e.logprob, e.top) for e in hit.events[:-1]] == [
        (e.token, e.logprob, e.top) for e in cold.events[:-1]]
