"""Prefix caching over HTTP: a token prompt that extends an earlier one reports its cached tokens and
gets the cold reply (the engine's own prefix-cache tests are in tests/inference/test_prefix_cache.py)."""

from __future__ import annotations

import llama4
from tests.serve.conftest import MODEL_ID


def test_token_prompts_over_http_report_cached_tokens(server, model, tok):
    client = server.client()
    first = tok.encode("Once upon a time there was a little dog", bos=True)
    generated = llama4.generate(model, [first], max_new_tokens=6, stop_tokens=[])[0][len(first):]
    reply = client.completions.create(model=MODEL_ID, prompt=first, max_tokens=6, temperature=0)
    assert reply.choices[0].text == tok.decode(generated, skip_special=True)
    follow = first + generated + tok.encode(" The end.")
    second = client.completions.create(model=MODEL_ID, prompt=follow, max_tokens=6, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == len(first) + 5
    expected = llama4.generate(model, [follow], max_new_tokens=6, stop_tokens=tok.eos_ids)[0][len(follow):]
    assert second.choices[0].text == tok.decode(expected, skip_special=True)
