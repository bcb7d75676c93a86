"""vLLM's chat extensions that clients rely on: a last message the model continues
(``continue_final_message`` with ``add_generation_prompt: false``)."""

from __future__ import annotations

import httpx
import openai
import pytest

PREFILL = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a"}]


def test_a_continued_final_message_is_the_prompt_without_its_end_of_turn(server, client, tok):
    body = {"add_generation_prompt": False, "continue_final_message": True}
    tokens = httpx.post(server.url + "/tokenize", json={"messages": PREFILL, **body}).json()["tokens"]
    assert tokens == tok.apply_chat_template(PREFILL, add_generation_prompt=False, continue_final_message=True)
    assert tokens[-1] != tok.eot_id
    reply = client.chat.completions.create(model="tiny-llama4", messages=PREFILL, max_tokens=3, temperature=0,
                                           extra_body=body)
    assert reply.usage.prompt_tokens == len(tokens)
    closed = client.chat.completions.create(model="tiny-llama4", messages=PREFILL, max_tokens=3, temperature=0)
    assert closed.usage.prompt_tokens == len(tok.apply_chat_template(PREFILL)) != len(tokens)


def test_continuing_with_a_generation_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError, match="add_generation_prompt: false"):
        client.chat.completions.create(model="tiny-llama4", messages=PREFILL, max_tokens=3,
                                       extra_body={"continue_final_message": True})


def test_the_checkpoints_sampling_defaults_apply_to_requests_that_set_none(model, tok):
    from llama4.checkpoint.generation_config import GenerationDefaults
    from llama4.serve.app import create_app
    from tests.serve.conftest import MODEL_ID, LiveServer

    live = LiveServer(create_app(model, tok, model_id=MODEL_ID, generation_defaults=GenerationDefaults(0.0, 0.9)))
    try:
        client = live.client()
        hello = [{"role": "user", "content": "Hello"}]

        def reply(**kwargs):
            return client.chat.completions.create(model=MODEL_ID, messages=hello, max_tokens=8, **kwargs)

        greedy = reply(temperature=0).choices[0].message.content
        assert [reply().choices[0].message.content for _ in range(2)] == [greedy, greedy]  # the default: 0
        sampled = {reply(temperature=2.0, seed=s).choices[0].message.content for s in range(3)}
        assert sampled != {greedy}  # a request's own temperature wins
    finally:
        live.close()
