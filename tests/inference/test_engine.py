"""The continuous-batching engine, driven step by step (no thread, no HTTP) against ``llama4.generate``."""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.inference.engine import Engine, EngineConfig
from llama4.inference.requests import ContextTooLong, FinishEvent, GenerationRequest, QueueFull, TokenEvent
from llama4.inference.sampling import SamplingParams

PROMPTS = ["Once upon a time", "Max liked to run and play in the park with a little dog",
           "The weather in Paris", "He"]


class Collector:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if isinstance(e, TokenEvent)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish(self) -> FinishEvent | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, FinishEvent) else None


def solo(model, prompt, n, stop_tokens):
    return llama4.generate(model, [prompt], max_new_tokens=n, stop_tokens=stop_tokens)[0][len(prompt):]


def run_until_idle(engine, limit=500):
    with torch.inference_mode():
        for _ in range(limit):
            if not engine.step():
                return
    raise AssertionError("the engine did not become idle")


@pytest.fixture
def engine(model, tok):
    return Engine(model, tok, EngineConfig(max_batch=4, max_queue=8, max_context=512, prefill_chunk=4))


def test_requests_joining_a_running_batch_get_their_solo_tokens(engine, model, tok):
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    budgets = [12, 20, 7, 15]
    sinks = [Collector() for _ in prompts]
    with torch.inference_mode():
        engine.submit(GenerationRequest(prompts[0], max_tokens=budgets[0], stop_tokens=[]), sinks[0])
        for _ in range(6):  # the first request is decoding when the others arrive, one by one
            engine.step()
        for p, n, sink in zip(prompts[1:], budgets[1:], sinks[1:]):
            engine.submit(GenerationRequest(p, max_tokens=n, stop_tokens=[]), sink)
            engine.step()
    run_until_idle(engine)
    for p, n, sink in zip(prompts, budgets, sinks):
        assert sink.tokens == solo(model, p, n, []), "a batched reply differs from its solo run"
        assert sink.finish.reason == "length" and sink.finish.completion_tokens == n
        assert sink.text == tok.decode(sink.tokens, skip_special=True)
    stats = engine.stats()
    assert (stats["running"], stats["prefilling"], stats["queued"], stats["kv_cache_bytes"]) == (0, 0, 0, 0)


def test_prefill_pieces_interleave_with_decode_steps(engine, model, tok):
    short, long_prompt = tok.encode("He", bos=True), tok.encode(" ".join(PROMPTS) * 2, bos=True)
    running, joining = Collector(), Collector()
    with torch.inference_mode():
        engine.submit(GenerationRequest(short, max_tokens=200, stop_tokens=[]), running)
        engine.step()
        engine.submit(GenerationRequest(long_prompt, max_tokens=3, stop_tokens=[]), joining)
        pieces = -(-len(long_prompt) // engine.config.prefill_chunk)
        for _ in range(pieces):
            assert not joining.tokens
            before = len(running.tokens)
            engine.step()
            assert len(running.tokens) == before + 1, "a decode step was skipped while a prompt was prefilling"
        # its first token came with the last piece, and it joined that same step's decode
        assert len(joining.tokens) == 2
    run_until_idle(engine)
    assert joining.tokens == solo(model, long_prompt, 3, [])


def test_a_text_prompt_is_embedded_piece_by_piece(engine, model, tok, embed_widths):
    prompt = tok.encode(" ".join(PROMPTS), bos=True)
    sink = Collector()
    engine.submit(GenerationRequest(prompt, max_tokens=2, stop_tokens=[]), sink)
    run_until_idle(engine)
    assert max(embed_widths) == engine.config.prefill_chunk  # pieces, never the whole prompt
    assert sink.tokens == solo(model, prompt, 2, [])


def test_cancel_frees_the_row_at_the_next_step_and_others_continue(engine, model, tok):
    a, b = tok.encode(PROMPTS[0], bos=True), tok.encode(PROMPTS[1], bos=True)
    sink_a, sink_b = Collector(), Collector()
    with torch.inference_mode():
        handle = engine.submit(GenerationRequest(a, max_tokens=100, stop_tokens=[]), sink_a)
        engine.submit(GenerationRequest(b, max_tokens=30, stop_tokens=[]), sink_b)
        for _ in range(20):
            engine.step()
        assert engine.stats()["running"] == 2
        two_rows = engine.stats()["kv_cache_bytes"]
        handle.cancel()
        seen = len(sink_a.tokens)
        engine.step()
        assert engine.stats()["running"] == 1 and engine.stats()["kv_cache_bytes"] < two_rows
    run_until_idle(engine)
    assert len(sink_a.tokens) == seen and sink_a.finish.reason == "cancelled"
    assert sink_b.tokens == solo(model, b, 30, [])


def test_cancelled_while_queued_never_runs(model, tok):
    engine = Engine(model, tok, EngineConfig(max_batch=1, max_queue=4, prefill_chunk=64))
    first, second = Collector(), Collector()
    with torch.inference_mode():
        engine.submit(GenerationRequest(tok.encode("He", bos=True), max_tokens=5), first)
        queued = tok.encode("Max", bos=True)
        handle = engine.submit(GenerationRequest(queued, max_tokens=5), second)
        engine.step()
        assert engine.stats()["queued"] == 1
        handle.cancel()
    run_until_idle(engine)
    assert second.events == [FinishEvent("cancelled", "", len(queued), 0)]
    assert first.finish.reason == "length"


def test_stop_strings_and_stop_tokens_are_per_request(engine, model, tok):
    prompt = tok.encode(PROMPTS[2], bos=True)
    free = Collector()
    engine.submit(GenerationRequest(prompt, max_tokens=30, stop_tokens=[]), free)
    run_until_idle(engine)
    text, tokens = free.text, free.tokens
    stop = text[5:8]
    assert len(text) >= 8 and stop.strip()
    by_string, by_token, other = Collector(), Collector(), Collector()
    engine.submit(GenerationRequest(prompt, max_tokens=30, stop=[stop], stop_tokens=[]), by_string)
    engine.submit(GenerationRequest(prompt, max_tokens=30, stop_tokens=[tokens[4]]), by_token)
    engine.submit(GenerationRequest(prompt, max_tokens=30, stop_tokens=[]), other)
    run_until_idle(engine)
    assert by_string.text == text[:text.find(stop)] and by_string.finish.reason == "stop"
    assert by_token.tokens == tokens[:tokens.index(tokens[4])] and by_token.finish.reason == "stop"
    assert other.tokens == tokens and other.finish.reason == "length"


def test_seeded_sampling_matches_generate(engine, model, tok):
    prompt = tok.encode(PROMPTS[1], bos=True)
    sink = Collector()
    engine.submit(GenerationRequest(prompt, params=SamplingParams(temperature=0.9, top_p=0.9, seed=7), max_tokens=15,
                                    stop_tokens=[]), sink)
    run_until_idle(engine)
    expected = llama4.generate(model, [prompt], max_new_tokens=15, temperature=0.9, top_p=0.9, seed=7,
                               stop_tokens=[])[0][len(prompt):]
    assert sink.tokens == expected, sink.events


def test_generation_stops_at_the_context_end(model, tok):
    engine = Engine(model, tok, EngineConfig(max_context=30, prefill_chunk=8))
    prompt = tok.encode(PROMPTS[1], bos=True)
    sink = Collector()
    engine.submit(GenerationRequest(prompt, max_tokens=100, stop_tokens=[]), sink)
    run_until_idle(engine)
    assert len(prompt) + len(sink.tokens) == 30 and sink.finish.reason == "length"


def test_refusals_name_the_problem(model, tok):
    engine = Engine(model, tok, EngineConfig(max_batch=1, max_queue=1, max_context=16))
    with pytest.raises(ContextTooLong, match="the prompt has 16 tokens but the context holds 16"):
        engine.submit(GenerationRequest(list(range(16))), Collector())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.submit(GenerationRequest([]), Collector())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        engine.submit(GenerationRequest([tok.vocab_size]), Collector())
    engine.submit(GenerationRequest([1, 2]), Collector())  # queued: the engine is not stepping
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest([1, 2]), Collector())


class ForceTokens:
    """A stand-in constraint that allows exactly one scripted token per step, then only stop."""

    def __init__(self, script, stop):
        self.script, self.stop, self.seen = list(script), stop, []

    def restrict(self, logits):
        allowed = self.script[len(self.seen)] if len(self.seen) < len(self.script) else self.stop
        out = torch.full_like(logits, float("-inf"))
        out[allowed] = logits[allowed]
        return out

    def advance(self, token_id):
        self.seen.append(token_id)


def test_a_constraint_restricts_every_token(engine, tok):
    script = tok.encode(' {"ok": true}')
    constraint = ForceTokens(script, tok.eot_id)
    sink = Collector()
    engine.submit(GenerationRequest(tok.encode("He", bos=True), max_tokens=50, constraint=constraint), sink)
    run_until_idle(engine)
    assert sink.text == ' {"ok": true}' and constraint.seen == script and sink.finish.reason == "stop"


class Broken:
    def restrict(self, logits):
        raise ValueError("constraint exploded")

    def advance(self, token_id):
        pass


def test_a_failing_request_ends_alone(engine, model, tok):
    good, bad = Collector(), Collector()
    prompt = tok.encode(PROMPTS[1], bos=True)
    engine.submit(GenerationRequest(prompt, max_tokens=12, stop_tokens=[]), good)
    engine.submit(GenerationRequest(prompt, max_tokens=12, constraint=Broken()), bad)
    run_until_idle(engine)
    assert bad.events == [FinishEvent("error", "", len(prompt), 0, cached_tokens=len(prompt),  # a twin of good
                                      error="sampling failed: constraint exploded")]
    assert good.tokens == solo(model, prompt, 12, [])


def test_identical_prompts_are_prefilled_once(model, tok):
    engine = Engine(model, tok, EngineConfig(max_batch=4, prefill_chunk=64))
    prompt = tok.encode(PROMPTS[1], bos=True)
    sinks = [Collector() for _ in range(3)]
    for seed, sink in enumerate(sinks):
        engine.submit(GenerationRequest(prompt, params=SamplingParams(temperature=1.0, seed=seed), max_tokens=10,
                                        stop_tokens=[]), sink)
    with torch.inference_mode():
        engine.step()
    assert all(len(s.tokens) == 2 for s in sinks)  # one prefill gave all three their first token
    assert (engine.metrics.prompt_tokens, engine.metrics.cached_tokens) == (len(prompt), 2 * len(prompt))
    run_until_idle(engine)
    for seed, sink in enumerate(sinks):
        expected = llama4.generate(model, [prompt], max_new_tokens=10, temperature=1.0, seed=seed, stop_tokens=[])
        assert sink.tokens == expected[0][len(prompt):]
    assert [s.finish.cached_tokens for s in sinks] == [0, len(prompt), len(prompt)]


def test_the_engine_turns_on_batch_invariant_products_unless_told_not_to(model, tok):
    from llama4.model.invariance import is_batch_invariant

    previous = is_batch_invariant(model)
    model.set_batch_invariant(False)
    try:
        Engine(model, tok, EngineConfig(batch_invariant=False))
        assert not is_batch_invariant(model)
        Engine(model, tok, EngineConfig())
        assert is_batch_invariant(model)
    finally:
        model.set_batch_invariant(previous)


def test_the_engine_says_when_it_cannot_serve(model, tok):
    engine = Engine(model, tok, EngineConfig())
    assert engine.down == "not started"
    engine.start()
    try:
        assert engine.down is None
    finally:
        engine.stop()
    assert engine.down == "not started"
