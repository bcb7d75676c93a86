"""Tool-call parsing checked against the shapes other projects' parser tests exercise.

The cases restate, with our own names and values, what vLLM's llama4_pythonic / pythonic / llama3_json /
llama4_json parsers, SGLang's pythonic and Llama 3.2 detectors and Meta's llama-models / llama-stack tool
utilities are tested on, and the defects replaying them found: non-finite numbers, hyphenated (MCP) names,
prose after ``<|python_end|>``, ``<function=...>`` without its closing tag, several groups with prose
between, calls followed by prose, and one malformed call in a list. Where the peers disagree the case
follows the policy in :mod:`llama4.prompt.tool_parsing`'s docstring. tests/serve/test_tool_stream.py
streams every case and checks the stream ends where this parse does.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from llama4.prompt import parse_assistant_output


def tool(name: str, *params: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {p: {"type": "string"} for p in params}}}}


FORECAST_TOOLS = [tool("weather-forecast", "city", "days"), tool("get_time", "zone")]


class Case(NamedTuple):
    """A reply, the calls it holds (name, arguments) and its content; ``tools`` as the request gave them."""

    text: str
    calls: list[tuple[str, dict]]
    content: str | None
    tools: list[dict] | None = None


FLIGHT = ("lookup_flight", {"origin": "OSL", "dest": "LIS"})
ZONES = ("list_timezones", {})
TEXT = "(the reply itself)"  # the content of a reply with no call in it


PEER_CASES: dict[str, Case] = {
    # vLLM llama4_pythonic / pythonic: the shapes Llama 4 writes.
    "pythonic, single-quoted strings": Case("[lookup_flight(origin='OSL', dest='LIS')]", [FLIGHT], None),
    "pythonic, every literal type": Case(
        "[create_account(handle='mira', age=31, address={'town': 'Bergen', 'zip': '5003'}, referrer=None, "
        "verified=True, tags=['hiker', 'cook'])]",
        [("create_account", {"handle": "mira", "age": 31, "address": {"town": "Bergen", "zip": "5003"},
                             "referrer": None, "verified": True, "tags": ["hiker", "cook"]})], None),
    "pythonic, no arguments": Case("[list_timezones()]", [ZONES], None),
    "pythonic, empty dict argument": Case("[configure(options={})]", [("configure", {"options": {}})], None),
    "pythonic, empty list argument": Case("[schedule(slots=[])]", [("schedule", {"slots": []})], None),
    "pythonic, escaped quotes": Case(
        r"""[translate(text='It\'s fine', style='\"formal\"')]""",
        [("translate", {"text": "It's fine", "style": '"formal"'})], None),
    "pythonic, parallel calls without spaces": Case(
        "[lookup_flight(origin='OSL',dest='LIS'),create_account(handle='mira',age=31)]",
        [FLIGHT, ("create_account", {"handle": "mira", "age": 31})], None),
    "python tags around a list": Case("<|python_start|>[lookup_flight(origin='OSL', dest='LIS')]<|python_end|>",
                                      [FLIGHT], None),
    "python_start, three calls, no python_end": Case(
        "<|python_start|>[lookup_flight(origin='OSL', dest='LIS'), list_timezones(), schedule(slots=[])]",
        [FLIGHT, ZONES, ("schedule", {"slots": []})], None),
    "brackets and quotes inside a string": Case(
        '[annotate(note="see (a)] and {b}, \\"c\\"")]', [("annotate", {"note": 'see (a)] and {b}, "c"'})], None),
    "no call at all": Case("Happy to help with that. Which city are you flying from?", [], TEXT),
    "mismatched brackets stay text": Case("<|python_start|>[resize(width=1])]<|python_end|>", [], TEXT),
    # Defect 1: arguments are strict JSON; a non-finite number makes the call malformed (vLLM rejects it).
    "non-finite number: the call is text": Case("[scale(factor=1e999)]", [], TEXT),
    "negative overflow: the call is text": Case("[scale(factor=-1e400)]", [], TEXT),
    "non-finite sibling dropped, the good call kept": Case(
        "[scale(factor=1e999), list_timezones()]", [ZONES], "scale(factor=1e999)"),
    "JSON NaN: the call is text": Case('{"name": "scale", "parameters": {"factor": NaN}}', [], TEXT),
    "JSON overflowing number: the call is text": Case('{"name": "scale", "parameters": {"factor": 2e400}}', [], TEXT),
    "JSON Infinity inside string arguments": Case('{"name": "scale", "arguments": "{\\"factor\\": -Infinity}"}', [],
                                                  TEXT),
    # Defect 7: one malformed sibling does not spoil the list (vLLM keeps the good calls).
    "bytes argument sibling dropped": Case(
        "<|python_start|>[broken(blob=b'zz'), lookup_flight(origin='OSL', dest='LIS')]<|python_end|>",
        [FLIGHT], "broken(blob=b'zz')"),
    "free-variable sibling in the middle": Case(
        "[list_timezones(), ping(host=localhost), schedule(slots=[])]",
        [ZONES, ("schedule", {"slots": []})], "ping(host=localhost)"),
    "JSON list with one NaN member": Case(
        '[{"name": "scale", "parameters": {"factor": NaN}}, {"name": "list_timezones", "parameters": {}}]',
        [ZONES], '{"name": "scale", "parameters": {"factor": NaN}}'),
    "a list with a member that is no call is not a call list": Case("[lookup(id=1), 42]", [], TEXT),
    # Defect 2: hyphenated (MCP-style) names.
    "hyphenated name": Case('[weather-forecast(city="London")]', [("weather-forecast", {"city": "London"})], None),
    "hyphenated name, positional argument named by the tool": Case(
        '[weather-forecast("London", days=2)]', [("weather-forecast", {"city": "London", "days": 2})], None,
        FORECAST_TOOLS),
    "hyphenated and dotted name": Case('[files.read-text(path="/tmp/a.txt")]',
                                       [("files.read-text", {"path": "/tmp/a.txt"})], None),
    "hyphenated bare call": Case('search-docs(query="llama")', [("search-docs", {"query": "llama"})], None),
    "a hyphen in an argument string is left alone": Case(
        '[weather-forecast(city="Stratford-upon-Avon(UK)")]',
        [("weather-forecast", {"city": "Stratford-upon-Avon(UK)"})], None),
    # Defect 3: prose after <|python_end|>.
    "prose after python_end": Case("<|python_start|>[lookup(id=7)]<|python_end|>Anything else?",
                                   [("lookup", {"id": 7})], "Anything else?"),
    "prose before and after python tags": Case(
        "Let me look.<|python_start|>[lookup(id=7)]<|python_end|>Back shortly.",
        [("lookup", {"id": 7})], "Let me look.\n\nBack shortly."),
    # Defect 4: <function=...> without </function> (Meta's tool utils read it).
    "function tag without closing tag": Case('<function=convert>{"amount": 12.5, "to": "EUR"}',
                                             [("convert", {"amount": 12.5, "to": "EUR"})], None),
    "unclosed function tag after prose": Case('Converting now.\n<function=convert>{"amount": 3}',
                                              [("convert", {"amount": 3})], "Converting now."),
    "closed then unclosed function tags": Case('<function=a>{"x": 1}</function><function=b>{"y": 2}',
                                               [("a", {"x": 1}), ("b", {"y": 2})], None),
    "empty function tag": Case("<function=ping></function>", [("ping", {})], None),
    # Defect 5: several groups with prose between: all of them, in order.
    "two lists with prose between": Case(
        "[lookup(id=1)]\nNow the second batch:\n[lookup(id=2), list_timezones()]",
        [("lookup", {"id": 1}), ("lookup", {"id": 2}), ZONES], "Now the second batch:"),
    "JSON, prose, pythonic": Case(
        '{"name": "lookup", "parameters": {"id": 1}}\nAnd also:\nlist_timezones()',
        [("lookup", {"id": 1}), ZONES], "And also:"),
    # Defect 6: calls followed by prose are calls (vLLM llama3_json, SGLang); prose kept as content.
    "pythonic list then prose": Case("[lookup(id=3)]\nI'll report back once it finishes.",
                                     [("lookup", {"id": 3})], "I'll report back once it finishes."),
    "JSON between prose on one line": Case(
        'Here is the result: {"name": "open_tickets", "parameters": {}} Would you like details?',
        [("open_tickets", {})], "Here is the result: Would you like details?"),
    "semicolon-separated JSON inside prose": Case(
        'Running these: {"name": "find", "parameters": {"q": "one"}}; {"name": "open_tickets", "parameters": {}}; '
        '{"name": "find", "parameters": {"q": "two"}} Shall I go on?',
        [("find", {"q": "one"}), ("open_tickets", {}), ("find", {"q": "two"})], "Running these: Shall I go on?"),
    "braces in trailing prose": Case('{"name": "find", "parameters": {"q": "x"}} I used {find} for that.',
                                     [("find", {"q": "x"})], "I used {find} for that."),
    "JSON fragment in trailing prose": Case(
        '{"name": "find", "parameters": {"q": "x"}} The arguments were {"q": "x"}.',
        [("find", {"q": "x"})], 'The arguments were {"q": "x"}.'),
    "list after a sentence, prose after it on the same line": Case(
        "Checking now. [lookup(id=4)] Back soon.", [("lookup", {"id": 4})], "Checking now. Back soon."),
    "fenced call then prose": Case("```python\n[lookup(id=5)]\n```\nThat should do it.",
                                   [("lookup", {"id": 5})], "That should do it."),
    "bare call then prose on the next line": Case("lookup(id=3)\nI'll report back.",
                                                  [("lookup", {"id": 3})], "I'll report back."),
    "a call mentioned mid-sentence after a real one": Case(
        "[lookup(id=1)] and maybe [lookup(id=2)] later", [("lookup", {"id": 1})], "and maybe [lookup(id=2)] later"),
    "inline backticks are a mention": Case("Call `get_time(zone='UTC')` whenever you need the clock.", [], TEXT),
    "a call mid-sentence is prose": Case("I would run lookup(id=3) next, if you agree.", [], TEXT),
    "an abbreviation's full stop does not end the sentence": Case("A helper, e.g. lookup(id=3), would do.", [], TEXT),
    "a method chained on a call is prose": Case("lookup(id=1).result", [], TEXT),
    "an extra closing bracket is no call": Case("[lookup(id=1)]]", [], TEXT),
    "prose glued to a call": Case("[lookup(id=1)]Done.", [("lookup", {"id": 1})], "Done."),
    "JSON calls glued together": Case(
        '{"name": "find", "parameters": {"q": "a"}}{"name": "open_tickets", "parameters": {}}',
        [("find", {"q": "a"}), ("open_tickets", {})], None),
    # llama3_json: the separators between JSON calls; missing name is no call.
    "JSON calls separated by a bare semicolon": Case(
        '{"name": "find", "parameters": {"q": "a"}};{"name": "find", "parameters": {"q": "b"}}',
        [("find", {"q": "a"}), ("find", {"q": "b"})], None),
    "JSON calls on separate lines": Case(
        '{"name": "find", "parameters": {"q": "a"}}\n{"name": "open_tickets", "parameters": {}}',
        [("find", {"q": "a"}), ("open_tickets", {})], None),
    "deeply nested JSON arguments": Case(
        '{"name": "deploy", "parameters": {"a": {"b": {"c": {"d": {"e": "deep"}}}}}}',
        [("deploy", {"a": {"b": {"c": {"d": {"e": "deep"}}}}})], None),
    "JSON without a name": Case('{"parameters": {"q": "a"}}', [], TEXT),
    # Meta's llama-stack / llama-models: the JSON type=function shape and built-in tools' dotted calls.
    "type=function JSON": Case('{"type": "function", "name": "find", "parameters": {"q": "a"}}', [("find", {"q": "a"})],
                               None),
    "dotted built-in tool call": Case('web_search.call(query="ferry times")',
                                      [("web_search.call", {"query": "ferry times"})], None),
    # Policy 8: bare calls count like lists; names are not checked against the tools.
    "bare calls separated by a semicolon": Case('get_time(zone="UTC"); lookup(id=2)',
                                                [("get_time", {"zone": "UTC"}), ("lookup", {"id": 2})], None),
    "a name not among the tools is still a call": Case('[unknown_tool(a="b")]', [("unknown_tool", {"a": "b"})], None,
                                                       FORECAST_TOOLS),
}


def parsed(case: Case):
    out = parse_assistant_output(case.text, tools=case.tools, id_factory=lambda: "call_x")
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls or []]
    return calls, out.content


@pytest.mark.parametrize("name", list(PEER_CASES))
def test_peer_cases(name):
    case = PEER_CASES[name]
    calls, content = parsed(case)
    assert calls == case.calls
    assert content == (case.text if case.content is TEXT else case.content)


def strict(args: dict) -> str:
    return json.dumps(args, allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(hst.lists(hst.sampled_from(
    [*'[](){}"\',=:;. _-aAz0189\\\n`eE+', "NaN", "Infinity", "1e999", "<function=f>", "</function>",
     "<|python_start|>", "<|python_end|>", "f(", "x-y(", "True", "null", "```"]), max_size=40).map("".join))
def test_never_raises_and_arguments_are_strict_json(text):
    out = parse_assistant_output(text)
    for call in out.tool_calls or []:
        assert call["function"]["name"]
        strict(json.loads(call["function"]["arguments"]))
