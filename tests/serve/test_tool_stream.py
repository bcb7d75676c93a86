"""Tool calls streamed while they are written: fed a reply one character at a time, the deltas give the
name early, the arguments member by member, and concatenate to exactly the non-streamed call."""

from __future__ import annotations

import json

import pytest

from llama4.serve import translate
from llama4.serve.tool_stream import ToolCallStream, closed_view

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}]


def stream(text: str, tools=TOOLS, step: int = 1, cut_short: bool = False):
    """Feed ``text`` in ``step``-character pieces; returns (deltas with the text length at which each
    went out, the final content or None). ``cut_short``: the reply ended on the token budget."""
    s, out = ToolCallStream(tools), []
    for end in range(step, len(text) + step, step):
        out += [(min(end, len(text)), d) for d in s.feed(text[:end])]
    deltas, content = s.finish(text, cut_short)
    return out + [(len(text), d) for d in deltas], content


def assembled(deltas) -> list[dict]:
    """What an OpenAI client builds from the deltas: calls by index, arguments concatenated."""
    calls: dict[int, dict] = {}
    for _, d in deltas:
        call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
        if d.id is not None:
            assert call["id"] is None, "the id comes once, in the call's first delta"
            call["id"], call["name"] = d.id, d.function.name
        call["arguments"] += d.function.arguments or ""
    return [calls[k] for k in sorted(calls)]


REPLIES = [
    '{"name": "get_weather", "parameters": {"city": "Paris, France", "days": 3}}',
    '{"name": "get_weather", "arguments": {"city": "Rome"}}',
    '[get_weather(city="Paris", days=2), get_time(zone="CET")]',
    'get_weather(city="Oslo")',
    '<function=get_weather>{"city": "Bern", "days": 1}</function>',
    '```json\n{"name": "get_time", "parameters": {}}\n```',
    '[{"name": "get_time", "parameters": {"zone": "UTC"}}, {"name": "get_weather", "parameters": {"city": "{a, b}"}}]',
    '{"name": "get_weather", "parameters": {"city": "Lima", "extra": {"nested": [1, 2, {"x": "y,z"}]}, "days": 5}}',
]


@pytest.mark.parametrize("reply", REPLIES)
@pytest.mark.parametrize("step", [1, 7])
def test_streamed_calls_assemble_to_the_non_streamed_calls(reply, step):
    deltas, content = stream(reply, step=step)
    assert content is None
    _, expected = translate.tool_calls_of(reply, TOOLS)
    got = assembled(deltas)
    assert [(c["name"], c["arguments"]) for c in got] == [
        (c.function.name, c.function.arguments) for c in expected]
    assert all(c["id"].startswith("call_") for c in got)
    assert {d.index for _, d in deltas} == set(range(len(expected)))


def test_the_name_and_each_finished_argument_go_out_while_the_call_is_written():
    reply = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3, "unit": "C", "lang": "en"}}'
    deltas, _ = stream(reply)
    at = {(d.function.name or d.function.arguments): n for n, d in deltas}
    assert at["get_weather"] <= reply.index('"parameters"') + 1  # before any argument is written
    assert at['{"city": "Paris"'] <= reply.index('"unit"')  # once the argument after it is written
    assert at[', "days": 3'] <= reply.index('"lang"')
    assert [d.function.arguments for _, d in deltas[1:]] == ['{"city": "Paris"', ', "days": 3',
                                                             ', "unit": "C", "lang": "en"}']


def test_a_reply_that_breaks_off_comes_back_as_content():
    reply = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3'  # cut by max_tokens
    deltas, content = stream(reply)
    assert assembled(deltas)[0]["name"] == "get_weather" and content == reply
    prose = "It is sunny."
    assert stream(prose) == ([], prose)


def test_a_call_cut_by_the_token_budget_ends_with_the_arguments_written_so_far():
    reply = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3'
    deltas, content = stream(reply, cut_short=True)
    (call,) = assembled(deltas)
    assert content is None and call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    _, calls = translate.tool_calls_of(reply, TOOLS, cut_short=True)  # the non-streamed reply: the same call
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert translate.tool_calls_of(reply, TOOLS) == (reply, None)  # not cut short: the text stays content
    prose = "It is sunny and"
    assert stream(prose, cut_short=True) == ([], prose)
    assert translate.tool_calls_of(prose, TOOLS, cut_short=True) == (prose, None)


def test_call_like_text_inside_an_argument_is_not_a_call():
    reply = '{"name": "get_weather", "parameters": {"city": "get_time(zone=1), x'
    deltas, _ = stream(reply + '"}}')
    assert [c["name"] for c in assembled(deltas)] == ["get_weather"]
    assert json.loads(assembled(deltas)[0]["arguments"]) == {"city": "get_time(zone=1), x"}


def test_closed_view_cuts_at_the_last_member_boundary():
    assert closed_view('{"a": 1, "b": [2, 3') == '{"a": 1, "b": [2]}'
    assert closed_view('f(x="a, b", y=') == 'f(x="a, b")'
    assert closed_view("g(") == "g()"
    assert closed_view('<function=f>{"a": 1, "b') == '<function=f>{"a": 1}</function>'
    assert closed_view("f(]") is None
