"""Tools and structured output: tool definitions in the prompt, calls parsed (and forced), JSON by constraint."""

from __future__ import annotations

import json

import openai
import pytest

from llama4.serve import translate
from llama4.serve.schemas import ChatCompletionRequest
from tests.serve.conftest import MODEL_ID

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "celsius": {"type": "boolean"}},
                   "required": ["city", "celsius"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def chat(client, **kwargs):
    kwargs.setdefault("max_tokens", 60)
    return client.chat.completions.create(model=MODEL_ID, messages=ASK, temperature=0, **kwargs)


def test_tools_are_rendered_into_the_prompt_unless_tool_choice_is_none(client, tok):
    with_tools = chat(client, tools=[WEATHER], max_tokens=2)
    without = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=2)
    assert without.usage.prompt_tokens == len(tok.apply_chat_template(ASK, add_generation_prompt=True))
    assert with_tools.usage.prompt_tokens == len(tok.apply_chat_template(ASK, add_generation_prompt=True,
                                                                         tools=[WEATHER]))


def test_a_forced_tool_call_comes_back_as_tool_calls(client):
    reply = chat(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Rome") and isinstance(arguments["celsius"], bool)


def test_a_forced_call_cut_by_max_tokens_is_a_tool_call_with_the_arguments_so_far(client):
    """finish_reason "length", the call with the arguments written before the cut, both modes (not raw text)."""
    forced = {"type": "function", "function": {"name": "get_weather"}}
    whole = chat(client, tools=[WEATHER], tool_choice=forced)
    full = json.loads(whole.choices[0].message.tool_calls[0].function.arguments)
    cut = chat(client, tools=[WEATHER], tool_choice=forced, max_tokens=whole.usage.completion_tokens - 2).choices[0]
    assert cut.finish_reason == "length" and cut.message.content is None
    (call,) = cut.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and arguments == {k: full[k] for k in arguments} and arguments != full
    chunks = list(chat(client, tools=[WEATHER], tool_choice=forced, max_tokens=whole.usage.completion_tokens - 2,
                       stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_required_tool_choice_streams_the_call_as_deltas(client):
    """The name in the first delta (with the id), the arguments in the ones after: concatenated, they
    are the non-streamed reply's arguments."""
    plain = chat(client, tools=[WEATHER, TIME], tool_choice="required")
    chunks = list(chat(client, tools=[WEATHER, TIME], tool_choice="required", stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(deltas) >= 2 and {d.index for d in deltas} == {0}
    expected = plain.choices[0].message.tool_calls[0].function
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.function.name == expected.name and not first.function.arguments
    assert all(d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == expected.arguments
    assert expected.name in ("get_weather", "get_time") and isinstance(json.loads(expected.arguments), dict)
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_calls_in_the_reply_text_are_parsed():
    tools = [WEATHER]
    content, calls = translate.tool_calls_of('[get_weather(city="Paris", celsius=True)]', tools)
    assert content is None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "celsius": True}
    assert translate.tool_calls_of("It is sunny in Paris.", tools) == ("It is sunny in Paris.", None)
    assert translate.tool_calls_of('[get_weather(city="Paris")]', None) == ('[get_weather(city="Paris")]', None)


def test_json_schema_output_is_valid_and_matches(client):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"},
                                               "days": {"type": "array", "items": {"type": "boolean"},
                                                        "maxItems": 3}},
              "required": ["city", "sunny", "days"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    reply = chat(client, response_format=fmt, max_tokens=100).choices[0]
    value = json.loads(reply.message.content)
    assert reply.finish_reason == "stop" and set(value) == {"city", "sunny", "days"}
    assert value["city"] in ("Paris", "Rome") and isinstance(value["sunny"], bool)
    assert len(value["days"]) <= 3 and all(isinstance(d, bool) for d in value["days"])
    streamed = chat(client, response_format=fmt, max_tokens=100, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.message.content


def test_json_object_output_is_an_object(client):
    reply = chat(client, response_format={"type": "json_object"}, max_tokens=200, seed=3).choices[0]
    if reply.finish_reason == "stop":  # a random model may fill a string until max_tokens: then it is a prefix
        assert isinstance(json.loads(reply.message.content), dict)
    else:
        assert reply.message.content.startswith("{")


def test_an_unsupported_schema_is_400(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}}
    with pytest.raises(openai.BadRequestError, match="(?s)unsupported JSON schema: regex parse error.*look-around"):
        chat(client, response_format=fmt)
    with pytest.raises(openai.BadRequestError, match="tool_choice names 'nope'"):
        chat(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="needs"):
        chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x"}})


def test_a_forced_call_schema_follows_each_functions_parameters():
    req = ChatCompletionRequest(messages=ASK, tools=[WEATHER, TIME], tool_choice="required")
    schema = translate._forced_tool_schema(req, [WEATHER, TIME])
    assert [alt["properties"]["name"] for alt in schema["anyOf"]] == [{"const": "get_weather"}, {"const": "get_time"}]
    assert schema["anyOf"][1]["properties"]["parameters"] == TIME["function"]["parameters"]
    named = ChatCompletionRequest(messages=ASK, tools=[WEATHER, TIME],
                                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    schema = translate._forced_tool_schema(named, [WEATHER, TIME])
    assert schema["properties"]["parameters"] == TIME["function"]["parameters"]
    assert translate._forced_tool_schema(ChatCompletionRequest(messages=ASK, tools=[TIME]), [TIME]) is None


@pytest.mark.parametrize("text, verdict", [
    ("", None), ("  ", None), ("[get_weather(", True), (' {"name"', True), ("```json", True),
    ("<function=get_weather>", True), ("get_weather(", True), ("get_weather ", None), ("weather.get (", True),
    ("Sure", None), ("Sure,", False), ("Sure thing", False), ("It is sunny", False), ("42 degrees", False),
])
def test_which_reply_openings_may_be_tool_calls(text, verdict):
    assert translate.may_be_tool_call(text) is verdict


def test_with_tools_a_prose_reply_still_streams(client):
    plain = chat(client, tools=[WEATHER], max_tokens=30).choices[0]
    assert plain.message.tool_calls is None and translate.may_be_tool_call(plain.message.content) is False
    chunks = list(chat(client, tools=[WEATHER], max_tokens=30, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == plain.message.content and len(pieces) > 3


def test_a_tool_result_turn_renders_and_gets_a_reply(client, tok):
    call = chat(client, tools=[WEATHER], tool_choice="required").choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=[WEATHER], max_tokens=5,
                                           temperature=0)
    rendered = [{"role": "user", "content": ASK[0]["content"]},
                {"role": "assistant", "tool_calls": [call.model_dump(exclude_none=True)]},
                {"role": "tool", "content": '{"temperature": 21}'}]
    assert reply.usage.prompt_tokens == len(tok.apply_chat_template(rendered, add_generation_prompt=True,
                                                                    tools=[WEATHER]))
