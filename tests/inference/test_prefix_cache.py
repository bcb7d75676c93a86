"""Prefix caching: a prompt that extends a finished sequence prefills only its new tokens, same reply."""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.inference.engine import Engine, EngineConfig
from llama4.inference.generate import prefill
from llama4.inference.prefix_cache import PrefixCache
from llama4.inference.requests import GenerationRequest
from tests.inference.test_engine import Collector, run_until_idle, solo


def cache_of(model, tokens):
    cache = llama4.KVCache(model.config.text)
    with torch.inference_mode():
        prefill(model, torch.tensor([tokens]), cache)
    return cache


def test_a_follow_up_prompt_reuses_the_finished_sequence(model, tok):
    engine = Engine(model, tok, EngineConfig(prefill_chunk=8))
    first = tok.encode("Max liked to run and play in the park with a little dog", bos=True)
    a = Collector()
    engine.submit(GenerationRequest(first, max_tokens=9, stop_tokens=[]), a)
    run_until_idle(engine)
    follow = first + a.tokens + tok.encode(" And then what happened?")
    b = Collector()
    engine.submit(GenerationRequest(follow, max_tokens=12, stop_tokens=[]), b)
    run_until_idle(engine)
    reused = len(first) + 8  # the prompt and every generated token but the last were fed to the cache
    assert b.finish.cached_tokens == reused
    assert engine.metrics.prompt_tokens == len(first) + len(follow) - reused
    assert engine.metrics.cached_tokens == reused
    assert b.tokens == solo(model, follow, 12, [])


def test_without_the_cache_everything_is_prefilled(model, tok):
    engine = Engine(model, tok, EngineConfig(prefill_chunk=8, prefix_cache_bytes=0))
    first = tok.encode("The weather in Paris", bos=True)
    a, b = Collector(), Collector()
    engine.submit(GenerationRequest(first, max_tokens=5, stop_tokens=[]), a)
    run_until_idle(engine)
    engine.submit(GenerationRequest(first + a.tokens + [5, 6], max_tokens=5, stop_tokens=[]), b)
    run_until_idle(engine)
    assert b.finish.cached_tokens == 0 and engine.stats()["prefix_cache_bytes"] == 0


def test_longest_strict_prefix_wins_and_entries_are_copied(model):
    store = PrefixCache(max_bytes=2**30)
    short, long_ = [1, 2, 3], [1, 2, 3, 4, 5]
    store.put(short, cache_of(model, short))
    store.put(long_, cache_of(model, long_))
    assert store.take([1, 2, 3, 4, 5, 6])[0] == 5
    assert store.take([1, 2, 3, 4, 5])[0] == 4  # the last prompt token must still run: [1..5] cut to 4
    assert store.take([1, 2, 3, 9, 9])[0] == 3  # shares 3 with both; the cut copy is as good as the short one
    assert store.take([9, 1, 2, 3])[0] == 0
    n, copy = store.take([1, 2, 3, 4, 5, 6])
    with torch.inference_mode():
        prefill(model, torch.tensor([[6, 7]]), copy)
    assert copy.lengths == [7] and store.take([1, 2, 3, 4, 5, 6])[1].lengths == [5]


def test_a_prompt_that_departs_from_an_entry_reuses_the_shared_part(model):
    """A re-rendered reply tokenizes differently from how it was generated: reuse up to the first
    difference, and the continuation equals a fresh prefill (fp32 1e-5)."""
    store = PrefixCache(max_bytes=2**30)
    cached = [1, 5, 9, 13, 17, 21, 25]
    store.put(cached, cache_of(model, cached))
    prompt = [1, 5, 9, 13, 40, 41, 42, 43]
    n, copy = store.take(prompt)
    assert n == 4 and copy.lengths == [4]
    with torch.inference_mode():
        got = prefill(model, torch.tensor([prompt[n:]]), copy)
        expected = prefill(model, torch.tensor([prompt]), llama4.KVCache(model.config.text))
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_no_reuse_before_the_chunk_the_entry_holds(model):
    chunk = model.config.text.attention_chunk_size
    store = PrefixCache(max_bytes=2**30)
    cached = list(range(3, 3 + chunk + 3))
    store.put(cached, cache_of(model, cached))
    assert store.take(cached[:chunk - 1] + [0, 0])[0] == 0  # departs before the held chunk: not usable
    assert store.take(cached[:chunk + 1] + [0])[0] == chunk + 1


def test_the_byte_budget_evicts_least_recently_used(model):
    one = cache_of(model, [1, 2, 3]).nbytes()
    store = PrefixCache(max_bytes=2 * one)
    store.put([1, 2, 3], cache_of(model, [1, 2, 3]))
    store.put([4, 5, 6], cache_of(model, [4, 5, 6]))
    assert store.take([1, 2, 3, 0])[0] == 3  # now [4, 5, 6] is the least recently used
    store.put([7, 8, 9], cache_of(model, [7, 8, 9]))
    assert len(store) == 2 and store.bytes == 2 * one
    assert store.take([4, 5, 6, 0])[0] == 0
    assert store.take([1, 2, 3, 0])[0] == 3 and store.take([7, 8, 9, 0])[0] == 3
    with pytest.raises(ValueError, match="one row holding its 2 tokens"):
        store.put([1, 2], cache_of(model, [1, 2, 3]))


def test_paged_entries_share_blocks_and_evicted_ones_give_them_back(model):
    from llama4.model.paged_cache import PagedKVCache

    pool = PagedKVCache(model.config.text, block_size=2)

    def entry(tokens):
        seq = pool.sequence()
        with torch.inference_mode():
            prefill(model, torch.tensor([tokens]), pool.batch([seq]))
        return seq

    store = PrefixCache(max_bytes=2**30)
    store.put([1, 2, 3, 4, 5], entry([1, 2, 3, 4, 5]))
    held = pool.blocks_used()
    n, copy = store.take([1, 2, 3, 4, 5, 6])
    assert n == 5 and copy.lengths == [5]
    assert pool.blocks_used() == held + 2  # the partial last block of each kind; full blocks shared
    with torch.inference_mode():
        got = prefill(model, torch.tensor([[6, 7]]), pool.batch([copy]))
        expected = prefill(model, torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), llama4.KVCache(model.config.text))
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5
    copy.release()
    assert pool.blocks_used() == held
    store.put([9, 9, 9], entry([9, 9, 9]))
    store.max_bytes = store.bytes - 1  # over budget at the next put: the least recently used entry goes
    store.put([8, 8], entry([8, 8]))
    assert len(store) == 2 and store.take([1, 2, 3, 4, 5, 6])[0] == 0
    assert pool.nbytes() == store.bytes  # the evicted entry's blocks went back to the pool
    store.clear()
    assert pool.blocks_used() == 0 and store.bytes == 0


def test_engine_rows_go_to_the_prefix_cache_without_copies(model, tok):
    engine = Engine(model, tok, EngineConfig(prefill_chunk=8))
    prompt = tok.encode("Max liked to run and play in the park with a little dog", bos=True)
    a, b = Collector(), Collector()
    engine.submit(GenerationRequest(prompt, max_tokens=5, stop_tokens=[]), a)
    run_until_idle(engine)
    pool = engine._pool
    held = pool.blocks_used()  # the finished row's blocks, now the prefix cache's
    assert held and engine.prefix_cache.bytes == pool.nbytes() and engine.stats()["kv_cache_bytes"] == 0
    engine.submit(GenerationRequest(prompt, max_tokens=5, stop_tokens=[]), b)  # all but its last token cached
    with torch.inference_mode():
        engine.step()
    # it joined the decode step at once (no prefill pass of its own) and got its first token there
    assert len(b.tokens) == 1 and engine.metrics.prompt_tokens == len(prompt) + 1
    run_until_idle(engine)
    assert b.tokens == a.tokens and b.finish.cached_tokens == len(prompt) - 1


def test_a_prefix_cache_hit_replies_as_the_cold_run_bit_for_bit():
    """The shipped model in bf16: a second turn that reuses the first turn's cache (prompt prefilled in
    one piece, reply decoded token by token, the new turn prefilled after a cut mid-piece) gives the
    same tokens and the same logprobs, to the last bit, as the same prompt sent to a fresh engine."""
    from llama4.inference.sampling import SamplingParams
    from llama4.prompt.chat import encode_chat

    model, tok = llama4.load_model(dtype=torch.bfloat16), llama4.load_tokenizer()
    params = SamplingParams(logprobs=2)

    def ask(engine, ids):
        out = Collector()
        engine.submit(GenerationRequest(ids, params=params, max_tokens=24), out)
        run_until_idle(engine)
        return out

    warm = Engine(model, tok, EngineConfig())
    first = [{"role": "user", "content": "Hello! How are you?"}]
    reply = ask(warm, encode_chat(tok, first).ids)
    follow = encode_chat(tok, first + [{"role": "assistant", "content": reply.text},
                                       {"role": "user", "content": "What is your name?"}]).ids
    hit, cold = ask(warm, follow), ask(Engine(model, tok, EngineConfig()), follow)
    assert hit.finish.cached_tokens > 0 and cold.finish.cached_tokens == 0
    assert [(e.token, e.logprob, e.top) for e in hit.events[:-1]] == [
        (e.token, e.logprob, e.top) for e in cold.events[:-1]]
