"""Chat and text completions through the official OpenAI client against the live server."""

from __future__ import annotations

import base64
import threading

import httpx
import pytest
import torch

import llama4
from tests.serve.conftest import MODEL_ID, png

HELLO = [{"role": "user", "content": "Tell me about Max and the park."}]


def reference(model, tok, messages, n):
    """The reply ``llama4.generate`` gives for the chat prompt: ids and text."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = llama4.generate(model, [prompt], max_new_tokens=n, stop_tokens=tok.eos_ids)[0][len(prompt):]
    return prompt, tok.decode([t for t in out if t not in tok.eos_ids], skip_special=True)


def ask(client, messages=HELLO, **kwargs):
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["queued"] == 0


def test_chat_reply_is_the_models_greedy_reply(client, model, tok):
    reply = ask(client, max_tokens=20)
    prompt, text = reference(model, tok, HELLO, 20)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 20
    assert reply.usage.total_tokens == len(prompt) + 20 and reply.model == MODEL_ID


def test_stream_concatenates_to_the_plain_reply(client):
    plain = ask(client, max_tokens=24)
    chunks = list(ask(client, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 5, "the reply did not arrive in pieces"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_max_completion_tokens_and_stop(client):
    free = ask(client, max_completion_tokens=30).choices[0].message.content
    assert len(free) >= 10
    stop = free[6:9]
    cut = ask(client, max_completion_tokens=30, stop=[stop, "never-seen"]).choices[0]
    assert cut.message.content == free[:free.find(stop)] and cut.finish_reason == "stop"


def test_n_choices_are_seeded_and_reproducible(client):
    first = ask(client, n=3, temperature=1.0, top_p=0.95, seed=11, max_tokens=12)
    again = ask(client, n=3, temperature=1.0, top_p=0.95, seed=11, max_tokens=12)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1, "three sampled choices were identical"
    assert first.usage.completion_tokens == 36


def test_penalties_change_a_greedy_reply(client):
    plain = ask(client, max_tokens=30).choices[0].message.content
    penalised = ask(client, max_tokens=30, frequency_penalty=2.0, presence_penalty=2.0).choices[0].message.content
    assert penalised != plain


def test_logprobs_of_greedy_tokens_are_the_top_ones(client):
    reply = ask(client, max_tokens=8, logprobs=True, top_logprobs=3).choices[0]
    content = reply.logprobs.content
    assert len(content) == 8
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        best = entry.top_logprobs[0]
        assert entry.token == best.token and entry.logprob == pytest.approx(best.logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = ask(client, max_tokens=8, logprobs=True, top_logprobs=3, stream=True)
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_an_image_reaches_the_model(client):
    def reply(colour):
        url = "data:image/png;base64," + base64.b64encode(png(400, 300, colour)).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What colour is it?"}]}]
        return ask(client, messages, max_tokens=12)

    red, blue = reply((255, 0, 0)), reply((0, 0, 255))
    assert red.usage.prompt_tokens > 144  # at least one tile of image tokens
    assert red.usage.prompt_tokens == blue.usage.prompt_tokens
    assert red.choices[0].message.content != blue.choices[0].message.content


def test_text_completions_plain_stream_and_echo(client, model, tok):
    prompt = "Once upon a time"
    ids = tok.encode(prompt, bos=True)
    expected = llama4.generate(model, [ids], max_new_tokens=10, stop_tokens=tok.eos_ids)[0][len(ids):]
    reply = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0)
    assert reply.choices[0].text == tok.decode(expected, skip_special=True)
    assert reply.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    echoed = client.completions.create(model=MODEL_ID, prompt=[prompt, "He"], max_tokens=10, temperature=0,
                                       echo=True, logprobs=2)
    assert echoed.choices[0].text == prompt + reply.choices[0].text and len(echoed.choices) == 2
    logprobs = echoed.choices[0].logprobs  # with echo: the prompt's tokens first, then the 10 generated
    assert len(logprobs.tokens) == len(ids) + 10 and logprobs.text_offset[len(ids)] == len(prompt)


def test_streamed_completion_logprobs_count_text_offsets_on_and_name_the_chosen_token(client):
    """text_offset continues across chunks (the whole reply's offsets); logprobs 0: the chosen token alone."""
    whole = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=12, temperature=0,
                                      logprobs=0).choices[0].logprobs
    assert [list(top) for top in whole.top_logprobs] == [[token] for token in whole.tokens]
    assert whole.top_logprobs[0][whole.tokens[0]] == whole.token_logprobs[0]
    offsets = []
    for chunk in client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=12,
                                           temperature=0, logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            offsets += chunk.choices[0].logprobs.text_offset
    assert offsets == whole.text_offset and offsets == sorted(offsets) and offsets[-1] > 0


def test_concurrent_replies_equal_their_solo_replies(server):
    requests = [dict(messages=[{"role": "user", "content": f"Story number {i}: " + "Max runs. " * i}],
                     max_tokens=10 + 7 * i) for i in range(6)]
    solo = [ask(server.client(), **r).choices[0].message.content for r in requests]
    together: list = [None] * len(requests)

    def run(i):
        together[i] = ask(server.client(), **requests[i]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == solo


def test_metrics_report_requests_tokens_latency_and_cache(server, client):
    ask(client, max_tokens=5)
    text = httpx.get(server.url + "/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert int(lines['llama4_requests_total{route="/v1/chat/completions",status="200"}']) >= 1
    assert int(lines["llama4_generated_tokens_total"]) >= 5 and int(lines["llama4_prompt_tokens_total"]) > 0
    assert int(lines["llama4_time_to_first_token_seconds_count"]) >= 1
    assert int(lines["llama4_inter_token_latency_seconds_count"]) >= 4
    ttft = "llama4_time_to_first_token_seconds"
    assert lines[ttft + '_bucket{le="+Inf"}'] == lines[ttft + "_count"]
    assert int(lines['llama4_sequences_finished_total{reason="length"}']) >= 1
    assert {"llama4_running_requests", "llama4_queued_requests", "llama4_kv_cache_bytes",
            "llama4_prefix_cache_bytes", "llama4_prefix_cache_hit_tokens_total"} <= set(lines)


def test_replies_carry_a_system_fingerprint(client):
    chat = ask(client, max_tokens=2)
    assert chat.system_fingerprint and chat.system_fingerprint.startswith("fp_")
    chunks = list(ask(client, max_tokens=2, stream=True))
    assert {c.system_fingerprint for c in chunks} == {chat.system_fingerprint}
    text = client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=1)
    assert text.system_fingerprint == chat.system_fingerprint


def test_vllms_tokenizer_endpoints(server, tok):
    """/tokenize, /detokenize and /tokenizer_info as vLLM serves them (lm-eval's remote tokenizer)."""
    post = lambda path, body: httpx.post(server.url + path, json=body, timeout=30)  # noqa: E731
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert (info["bos_token"], info["eos_token"]) == ("<|begin_of_text|>", "<|eot|>")
    assert (post("/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
            == [tok.eot_id])
    text = "Max runs in the park."
    out = post("/tokenize", {"model": MODEL_ID, "prompt": text, "return_token_strs": True}).json()
    assert out["tokens"] == tok.encode(text, bos=True) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 2048 and "".join(out["token_strs"]) == "<|begin_of_text|>" + text
    chat = [{"role": "user", "content": text}]
    assert post("/tokenize", {"messages": chat}).json()["tokens"] == tok.apply_chat_template(chat)
    assert post("/detokenize", {"tokens": out["tokens"]}).json() == {"prompt": "<|begin_of_text|>" + text}
    for body, message in (({"prompt": "a", "messages": chat}, "either prompt or messages"),
                          ({}, "either prompt or messages"),
                          ({"model": "gpt-4o", "prompt": "a"}, "does not exist")):
        reply = post("/tokenize", body)
        assert reply.status_code in (400, 404) and message in reply.json()["error"]["message"]
    reply = post("/detokenize", {"tokens": [tok.vocab_size]})
    assert reply.status_code == 400 and "token ids must be in" in reply.json()["error"]["message"]


def test_echo_scores_the_prompt_as_lm_eval_reads_it(client, model, tok):
    """lm-eval's loglikelihood: token ids, echo, max_tokens 0 (or 1), logprobs k -> every prompt token's logprob
    given the tokens before it (the first null), equal to the model's own forward pass."""
    ids = tok.encode("Max runs in the park. He sees a red ball and runs after it." * 6, bos=True)[:150]
    reply = client.completions.create(model=MODEL_ID, prompt=ids, echo=True, max_tokens=0, logprobs=3, temperature=0)
    got = reply.choices[0].logprobs
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 0
    assert len(got.token_logprobs) == len(ids) and got.token_logprobs[0] is None and got.top_logprobs[0] is None
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).float().log_softmax(-1)[0, :-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert torch.allclose(torch.tensor(got.token_logprobs[1:]), expected[:, 0], atol=1e-4)
    assert got.tokens == [tok.decode([t]) for t in ids] and got.text_offset[:2] == [0, 0]  # <|begin_of_text|>: 0 chars
    assert all(1 <= len(top) <= 4 and got.tokens[j + 1] in top for j, top in enumerate(got.top_logprobs[1:]))
    one = client.completions.create(model=MODEL_ID, prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0)
    assert one.choices[0].logprobs.token_logprobs[:len(ids)] == got.token_logprobs
    assert len(one.choices[0].logprobs.token_logprobs) == len(ids) + 1
    streamed = list(client.completions.create(model=MODEL_ID, prompt=ids, echo=True, max_tokens=0, logprobs=3,
                                              temperature=0, stream=True))
    assert streamed[0].choices[0].logprobs.token_logprobs == got.token_logprobs
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    with pytest.raises(Exception, match="max_tokens 0 generates nothing"):
        client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=0)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}


def streamed_message(chunks):
    """(content, [(name, arguments)], finish_reason, logprob tokens) as a client assembles them from chunks."""
    content, calls, finish, tokens = "", {}, None, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, ["", ""])
            call[0] += delta.function.name or ""
            call[1] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
        tokens += [e.token for e in choice.logprobs.content] if choice.logprobs else []
    return content or None, [tuple(calls[k]) for k in sorted(calls)], finish, tokens


@pytest.mark.parametrize("max_tokens", [7, 40])
@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_with_tools_a_streamed_reply_ends_as_the_plain_reply(client, max_tokens, tool_choice):
    """Content, calls and finish_reason agree; the logprobs too where the reply has content."""
    kwargs = dict(messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER_TOOL],
                  tool_choice=tool_choice, max_tokens=max_tokens, logprobs=True)
    plain = ask(client, **kwargs).choices[0]
    content, calls, finish, tokens = streamed_message(ask(client, stream=True, **kwargs))
    expected_calls = [(c.function.name, c.function.arguments) for c in plain.message.tool_calls or []]
    assert (content, calls, finish) == (plain.message.content, expected_calls, plain.finish_reason)
    if plain.message.content:
        assert tokens == [e.token for e in plain.logprobs.content]
    if tool_choice == "required" and max_tokens == 40:
        assert finish == "tool_calls" and calls[0][0] == "get_weather"
