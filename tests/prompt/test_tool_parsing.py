"""Model output -> OpenAI tool calls: the shapes real models emit, and the ones that must stay text."""

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from llama4.prompt import new_call_id, parse_assistant_output, parse_tool_calls


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def calls(text, **kwargs):
    """``[(name, arguments dict), ...]`` or None."""
    found = parse_tool_calls(text, id_factory=ids(), **kwargs)
    return None if found is None else [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found]


PARIS = [("get_weather", {"city": "Paris"})]

SHAPES = {
    "pythonic list": ('[get_weather(city="Paris")]', PARIS),
    "pythonic, single quotes": ("[get_weather(city='Paris')]", PARIS),
    "pythonic without brackets": ('get_weather(city="Paris")', PARIS),
    "multiple pythonic calls": (
        '[get_weather(city="Paris"), get_time(tz="Europe/Paris")]',
        [*PARIS, ("get_time", {"tz": "Europe/Paris"})],
    ),
    "call after prose": ('Let me check that for you.\n\n[get_weather(city="Paris")]', PARIS),
    "nested lists and dicts": (
        '[plot(points=[[1, 2], [3, -4.5]], style={"color": "red", "dash": [1, 2]}, meta={})]',
        [("plot", {"points": [[1, 2], [3, -4.5]], "style": {"color": "red", "dash": [1, 2]}, "meta": {}})],
    ),
    "True/False/None keyword values": (
        "[search(exact=True, safe=False, limit=None)]",
        [("search", {"exact": True, "safe": False, "limit": None})],
    ),
    "JSON literals in pythonic call": (
        "[search(exact=true, limit=null)]",
        [("search", {"exact": True, "limit": None})],
    ),
    "negative numbers": ("[move(dx=-3, dy=-0.5, dz=+2)]", [("move", {"dx": -3, "dy": -0.5, "dz": 2})]),
    "strings with brackets, commas and quotes": (
        """[note(text="a [b], (c) {d}, \\"q\\" it's", sep=')]')]""",
        [("note", {"text": 'a [b], (c) {d}, "q" it\'s', "sep": ")]"})],
    ),
    "dotted name": ('[weather.current(city="Paris")]', [("weather.current", {"city": "Paris"})]),
    "no arguments": ("[get_time()]", [("get_time", {})]),
    "JSON name/parameters (HF template format)": ('{"name": "get_weather", "parameters": {"city": "Paris"}}', PARIS),
    "JSON where pythonic was expected, after prose": (
        'Sure!\n{"name": "get_weather", "parameters": {"city": "Paris"}}',
        PARIS,
    ),
    "JSON type=function (Meta json format)": (
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
        PARIS,
    ),
    "JSON OpenAI shape with string arguments": (
        '{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}',
        PARIS,
    ),
    "JSON list of calls": (
        '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
        [*PARIS, ("get_time", {})],
    ),
    "JSON calls separated by semicolons": (
        '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}',
        [("a", {}), ("b", {"x": 1})],
    ),
    "JSON with Python literals": (
        "{'name': 'get_weather', 'parameters': {'city': 'Paris', 'metric': True}}",
        [("get_weather", {"city": "Paris", "metric": True})],
    ),
    "python_start tags": ('<|python_start|>[get_weather(city="Paris")]<|python_end|><|eom|>', PARIS),
    "HF rendering: empty python tags then JSON": (
        '<|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot|>',
        PARIS,
    ),
    "python_start without python_end (stopped early)": ('<|python_start|>[get_weather(city="Paris")]', PARIS),
    "markdown code fence": (
        'Here you go:\n```json\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```',
        PARIS,
    ),
    "function tag format": ('<function=get_weather>{"city": "Paris"}</function>', PARIS),
    "unicode arguments": (
        '[get_weather(city="Köln", note="東京")]',
        [("get_weather", {"city": "Köln", "note": "東京"})],
    ),
    "trailing end token": ('[get_weather(city="Paris")]<|eot|>', PARIS),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_parses_real_world_shapes(shape):
    text, expected = SHAPES[shape]
    assert calls(text) == expected


PLAIN = {
    "truncated pythonic": '[get_weather(city="Par',
    "truncated JSON": '{"name": "get_weather", "parameters": {"city": "Pa',
    "prose only": "The weather in Paris is sunny.",
    "a list that is not calls": "The answer is [1, 2, 3].",
    "JSON data that is not a call": '{"name": "Bob", "age": 42}',
    "call mentioned mid-sentence": 'You could call get_weather(city="Paris") yourself.',
    "free variable argument": "[get_weather(city=paris)]",
    "code, not a call": "<|python_start|>import os\nprint(os.getcwd())<|python_end|>",
    "positional argument without schema": '[get_weather("Paris")]',
    "expression argument": "[add(a=1+2)]",
    "kwargs unpacking": "[f(**opts)]",
    "empty list": "[]",
    "unbalanced brackets": "[f(x=1)]]",
    "python code injection attempt": '[__import__("os").system(cmd="rm -rf /")]',
}


@pytest.mark.parametrize("case", list(PLAIN))
def test_malformed_or_non_call_output_is_plain_text(case):
    text = PLAIN[case]
    out = parse_assistant_output(text)
    assert out.tool_calls is None
    assert out.content == text


def test_positional_arguments_named_from_the_tool_schema():
    tools = [{"type": "function",
              "function": {"name": "get_weather", "parameters": {"properties": {"city": {}, "unit": {}}}}}]
    assert calls('[get_weather("Paris", unit="C")]', tools=tools) == [("get_weather", {"city": "Paris", "unit": "C"})]


def test_openai_shape_ids_and_prose():
    out = parse_assistant_output('I will look it up. [get_weather(city="Paris"), get_time()]', id_factory=ids())
    assert out.content == "I will look it up."
    assert out.tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert out.to_message() == {"role": "assistant", "content": "I will look it up.", "tool_calls": out.tool_calls}
    assert parse_assistant_output("Hello<|eot|>").to_message() == {"role": "assistant", "content": "Hello"}


def test_prose_inside_python_tags_is_kept():
    out = parse_assistant_output('Sure.<|python_start|>Checking.<|python_end|>{"name": "f", "parameters": {}}')
    assert out.content == "Sure.\nChecking."
    assert [c["function"]["name"] for c in out.tool_calls] == ["f"]


def test_default_ids_are_random_hex():
    a, b = new_call_id(), new_call_id()
    assert a != b and a.startswith("call_") and len(a) == 29
    int(a[5:], 16)


def test_round_trip_through_the_chat_template_rendering():
    """What the template renders for an assistant tool call parses back to the same call."""
    from llama4.prompt import render_chat

    call = {"id": "x", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "n": [1, -2]}'}}
    rendered = render_chat([{"role": "assistant", "content": "", "tool_calls": [call]}], add_generation_prompt=False)
    reply = rendered.split("<|header_end|>\n\n", 1)[1]
    assert calls(reply) == [("get_weather", {"city": "Paris", "n": [1, -2]})]


@settings(max_examples=300, deadline=None)
@given(hst.text(alphabet=hst.sampled_from(list('[](){}"\',=:; ._-aAz0189\\\nTNF<|>')), max_size=60))
def test_never_raises_on_garbage(text):
    out = parse_assistant_output(text)
    assert out.tool_calls is None or all(c["function"]["name"] for c in out.tool_calls)


def test_never_raises_on_deep_nesting_or_non_strings():
    deep = "[f(x=" + "[" * 5000 + "]" * 5000 + ")]"
    assert parse_assistant_output(deep).content in (None, deep)  # whatever it decides, it returns
    assert parse_assistant_output(None).content is None
    assert parse_tool_calls("") is None
