"""OpenAI's Responses API (/v1/responses) through the official client against a live server with the tiny model.

Its replies are random text, so these tests check shapes and plumbing: the client's own types parse every
response and event, greedy replies are reproducible and equal the chat route's, tools, formats and budgets
come through, and what the server cannot honour is refused naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Literal

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from llama4.inference.engine import EngineConfig
from llama4.inference.requests import FinishEvent, TokenEvent
from llama4.serve import translate
from llama4.serve.app import create_app
from llama4.serve.limits import ServeLimits
from llama4.serve.request_reader import RequestReader
from llama4.serve.responses import ResponseReply, add_responses_routes, chat_messages, chat_request
from llama4.serve.responses_schemas import ResponsesRequest
from tests.prompt.test_tool_parsing_peers import FORECAST_TOOLS, PEER_CASES
from tests.serve.conftest import MODEL_ID, LiveServer, png

ASK = "What is the weather in Paris?"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                           "celsius": {"type": "boolean"}},
                          "required": ["city", "celsius"]}}
TIME = {"type": "function", "name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"]}}
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"]}
JSON_FORMAT = {"format": {"type": "json_schema", "name": "weather", "schema": SCHEMA, "strict": True}}
EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def live(model, tok):
    """The app as create_engine_app builds it, with the Responses routes (unless the app has them already)."""
    limits = ServeLimits()
    app = create_app(model, tok, model_id=MODEL_ID, limits=limits,
                     engine_config=EngineConfig(max_batch=4, prefill_chunk=64))
    if not any(getattr(route, "path", None) == "/v1/responses" for route in app.routes):
        reader = RequestReader([MODEL_ID], None, limits.max_body_bytes)
        add_responses_routes(app, app.state.engine, tok, MODEL_ID, reader, limits, None)
    server = LiveServer(app)
    yield server
    server.close()


@pytest.fixture
def client(live):
    return live.client()


def create(client, **kwargs):
    kwargs.setdefault("input", ASK)
    kwargs.setdefault("max_output_tokens", 16)
    kwargs.setdefault("temperature", 0)
    return client.responses.create(model=MODEL_ID, **kwargs)


def raw(live, **body) -> httpx.Response:
    body = {"model": MODEL_ID, "input": ASK, "max_output_tokens": 16, "temperature": 0} | body
    return httpx.post(live.url + "/v1/responses", json=body, timeout=60)


def strict(body: dict) -> Response:
    """The body parsed by the client's Response type with validation (the client itself parses leniently)."""
    return Response.model_validate(body)


def same_output(a: Response, b: Response) -> None:
    """Two responses give the same output and usage (ids, times and prefix-cache hits aside)."""
    def shape(r):
        return [(i.type, i.status, getattr(i, "name", None), getattr(i, "arguments", None),
                 [c.text for c in i.content] if i.type == "message" else None) for i in r.output]

    def counts(r):
        return r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens
    assert shape(a) == shape(b) and a.status == b.status
    assert counts(a) == counts(b) and a.incomplete_details == b.incomplete_details


def chat_text(client, messages, **kwargs) -> tuple[str, int]:
    kwargs = {"temperature": 0, "max_tokens": 16} | kwargs
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)
    return reply.choices[0].message.content, reply.usage.prompt_tokens


# -- plain text ----------------------------------------------------------------------------------------


def test_create_with_a_string(live, client, tok):
    reply = strict(raw(live, metadata={"run": "7"}, user="u1", store=True).json())
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.model == MODEL_ID
    (message,) = reply.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    (part,) = message.content
    assert part.type == "output_text" and part.text and reply.output_text == part.text
    prompt = tok.apply_chat_template([{"role": "user", "content": ASK}], add_generation_prompt=True)
    usage = reply.usage
    assert usage.input_tokens == len(prompt) and usage.output_tokens == 16 and usage.total_tokens == len(prompt) + 16
    assert usage.output_tokens_details.reasoning_tokens == 0 and usage.input_tokens_details.cached_tokens >= 0
    assert reply.metadata == {"run": "7"} and reply.user == "u1" and reply.temperature == 0 and reply.top_p == 1
    assert reply.model_extra["store"] is False, "nothing is stored, and the response says so"
    assert reply.tools == [] and reply.tool_choice == "auto" and reply.text.format.type == "text"
    again = create(client)
    assert again.output_text == reply.output_text, "greedy replies differ"


def test_max_output_tokens_makes_the_response_incomplete(client):
    reply = create(client, max_output_tokens=5)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 5 and reply.output[0].status == "incomplete"
    longer = create(client, max_output_tokens=12)
    assert longer.output_text.startswith(reply.output_text)


def test_instructions_are_a_system_message_first(client, tok):
    reply = create(client, instructions="You are terse.")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": ASK}]
    assert reply.instructions == "You are terse."
    assert reply.usage.input_tokens == len(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert (reply.output_text, reply.usage.input_tokens) == chat_text(client, messages)


def test_the_same_prompt_gives_the_same_text_as_chat_completions(client):
    for kwargs in ({}, {"max_output_tokens": 30, "top_p": 0.5}):
        reply = create(client, **kwargs)
        chat = {"max_tokens": kwargs["max_output_tokens"], "top_p": kwargs["top_p"]} if kwargs else {}
        text, prompt_tokens = chat_text(client, [{"role": "user", "content": ASK}], **chat)
        assert reply.output_text == text and reply.usage.input_tokens == prompt_tokens


def test_input_items_with_an_image(client):
    url = "data:image/png;base64," + base64.b64encode(png(64, 48, (220, 30, 30))).decode()
    items = [{"role": "developer", "content": "Describe pictures."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                                             {"type": "input_image", "image_url": url}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "A red square."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "And its colour?"}]}]
    reply = create(client, input=items)
    messages = [{"role": "developer", "content": "Describe pictures."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]},
                {"role": "assistant", "content": "A red square."}, {"role": "user", "content": "And its colour?"}]
    assert (reply.output_text, reply.usage.input_tokens) == chat_text(client, messages)
    without = create(client, input=[items[0], {"role": "user", "content": "What is this?"}] + items[2:])
    assert reply.usage.input_tokens > without.usage.input_tokens + 100, "the image took no prompt tokens"


# -- tools ---------------------------------------------------------------------------------------------


def test_a_required_tool_choice_gives_a_function_call(live, client):
    reply = strict(raw(live, tools=[WEATHER, TIME], tool_choice="required", max_output_tokens=60).json())
    assert reply.status == "completed" and reply.incomplete_details is None
    (call,) = reply.output
    assert call.type == "function_call" and call.status == "completed" and call.name in ("get_weather", "get_time")
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    arguments = json.loads(call.arguments)
    if call.name == "get_weather":
        assert arguments["city"] in ("Paris", "Rome") and isinstance(arguments["celsius"], bool)
    else:
        assert arguments["zone"] in ("CET", "UTC")
    assert [t.name for t in reply.tools] == ["get_weather", "get_time"] and reply.tool_choice == "required"


def test_a_named_tool_choice_calls_that_function(client):
    reply = create(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "name": "get_time"},
                   max_output_tokens=60)
    (call,) = reply.output
    assert call.name == "get_time" and json.loads(call.arguments)["zone"] in ("CET", "UTC")
    assert reply.tool_choice.name == "get_time"


def test_tools_are_rendered_unless_tool_choice_is_none(client, tok):
    chat_tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    messages = [{"role": "user", "content": ASK}]
    with_tools = create(client, tools=[WEATHER], max_output_tokens=2)
    without = create(client, tools=[WEATHER], tool_choice="none", max_output_tokens=2)
    assert with_tools.usage.input_tokens == len(tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                        tools=chat_tools))
    assert without.usage.input_tokens == len(tok.apply_chat_template(messages, add_generation_prompt=True))


def test_a_function_call_round_trip_is_accepted(client, tok):
    first = create(client, tools=[WEATHER], tool_choice="required", max_output_tokens=60)
    (call,) = first.output
    items = [{"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}]
    reply = create(client, input=items, tools=[WEATHER], max_output_tokens=5)
    assert reply.output and reply.usage.output_tokens >= 1
    chat_tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    rendered = [{"role": "user", "content": ASK},
                {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                    "name": call.name, "arguments": call.arguments}}]},
                {"role": "tool", "content": '{"temperature": 21}'}]
    assert reply.usage.input_tokens == len(tok.apply_chat_template(rendered, add_generation_prompt=True,
                                                                   tools=chat_tools))


# -- structured output ---------------------------------------------------------------------------------


def test_a_json_schema_format_gives_json_matching_the_schema(client):
    reply = create(client, text=JSON_FORMAT, max_output_tokens=60)
    value = json.loads(reply.output_text)
    assert reply.status == "completed" and set(value) == {"city", "sunny"}
    assert value["city"] in ("Paris", "Rome") and isinstance(value["sunny"], bool)
    assert reply.text.format.type == "json_schema" and reply.text.format.name == "weather"


def test_the_clients_parse_helper_gets_its_model_back(client):
    class Weather(BaseModel):
        city: Literal["Paris", "Rome"]
        sunny: bool

    reply = client.responses.parse(model=MODEL_ID, input=ASK, text_format=Weather, temperature=0,
                                   max_output_tokens=60)
    assert isinstance(reply.output_parsed, Weather)


# -- streaming -----------------------------------------------------------------------------------------


def streamed(live, **body) -> list:
    """The events of a streamed request, each parsed with validation by the client's event union."""
    body = {"model": MODEL_ID, "input": ASK, "max_output_tokens": 16, "temperature": 0, "stream": True} | body
    with httpx.stream("POST", live.url + "/v1/responses", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        blocks = response.read().decode().strip().split("\n\n")
    events = []
    for block in blocks:
        kind, data = block.split("\n")
        event = EVENTS.validate_python(json.loads(data.removeprefix("data: ")))
        assert kind == f"event: {event.type}"
        events.append(event)
    return events


MESSAGE_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
                  "response.output_text.done", "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]


def collapsed(events) -> list[str]:
    """The event types, runs of deltas as one."""
    kinds = [e.type for e in events]
    return [k for j, k in enumerate(kinds) if j == 0 or k != kinds[j - 1] or not k.endswith(".delta")]


def test_a_stream_sends_the_events_in_order_and_ends_as_the_plain_response(live, client):
    events = streamed(live)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert collapsed(events) == ["response.created", "response.in_progress"] + MESSAGE_EVENTS + [
        "response.incomplete"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3, "the text did not arrive in pieces"
    final = events[-1].response
    assert "".join(deltas) == events[-4].text == final.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert final.id == events[0].response.id and final.output[0].id == events[2].item.id
    same_output(final, create(client))
    typed = list(create(client, stream=True))
    assert collapsed(typed) == collapsed(events) and typed[-1].response.output_text == final.output_text


def test_the_clients_stream_helper_gets_the_final_response(client):
    plain = create(client, text=JSON_FORMAT, max_output_tokens=60)
    with client.responses.stream(model=MODEL_ID, input=ASK, text=JSON_FORMAT, temperature=0,
                                 max_output_tokens=60) as stream:
        events = list(stream)
        final = stream.get_final_response()
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == final.output_text == plain.output_text
    same_output(final, plain)


def test_a_streamed_function_call_ends_as_the_plain_one(live, client):
    plain = create(client, tools=[WEATHER, TIME], tool_choice="required", max_output_tokens=60)
    events = streamed(live, tools=[WEATHER, TIME], tool_choice="required", max_output_tokens=60)
    assert collapsed(events) == ["response.created", "response.in_progress"] + CALL_EVENTS + ["response.completed"]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    call = events[-1].response.output[0]
    assert "".join(deltas) == call.arguments == events[-3].arguments and len(deltas) >= 2
    assert events[2].item.name == call.name and events[2].item.call_id == call.call_id
    same_output(events[-1].response, plain)


def test_a_prose_reply_with_tools_still_streams(live, client):
    plain = create(client, tools=[WEATHER], max_output_tokens=30)
    assert [item.type for item in plain.output] == ["message"]
    events = streamed(live, tools=[WEATHER], max_output_tokens=30)
    assert len([e for e in events if e.type == "response.output_text.delta"]) > 3
    same_output(events[-1].response, plain)


def test_a_failure_after_the_stream_began_is_an_error_event(live):
    """A schema llguidance compiles but cannot follow (an array of itself, at least one) fails while
    generating: the stream, already begun, ends with an error event."""
    looping = {"type": "json_schema", "name": "x", "schema": {"type": "array", "items": {"$ref": "#"}, "minItems": 1}}
    response = raw(live, text={"format": looping}, stream=True, max_output_tokens=8)
    if response.status_code == 400:
        pytest.skip("this schema is refused before generation here")
    events = [json.loads(line.removeprefix("data: ")) for line in response.text.split("\n")
              if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "error" in kinds and not {"response.completed", "response.incomplete"} & set(kinds)
    error = EVENTS.validate_python(events[kinds.index("error")])
    assert error.message and error.sequence_number == kinds.index("error")


# -- refusals ------------------------------------------------------------------------------------------


REFUSED = {
    "previous_response_id": {"previous_response_id": "resp_123"},
    "background": {"background": True},
    "include": {"include": ["file_search_call.results"]},
    "reasoning": {"reasoning": {"effort": "high"}},
    "conversation": {"conversation": "conv_123"},
    "prompt": {"prompt": {"id": "pmpt_123"}},
    "truncation": {"truncation": "auto"},
    "top_logprobs": {"top_logprobs": 3},
    "tools[1].type": {"tools": [WEATHER, {"type": "web_search"}]},
    "tool_choice": {"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}},
    "input[0].type": {"input": [{"type": "item_reference", "id": "msg_1"}]},
    "input[1].content[0].type": {"input": [{"role": "user", "content": "hi"},
                                           {"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
    "text.format.schema": {"text": {"format": {"type": "json_schema", "name": "x"}}},
}


@pytest.mark.parametrize("field", list(REFUSED))
@pytest.mark.parametrize("stream", [False, True])
def test_what_cannot_be_honoured_is_refused_naming_the_field(client, field, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, extra_body=REFUSED[field], stream=stream)
    assert caught.value.body["param"] == field
    assert field.split("[")[0].split(".")[0] in caught.value.message


def test_other_tool_types_are_named(client):
    with pytest.raises(openai.BadRequestError, match="'web_search'.*'file_search'"):
        create(client, tools=[{"type": "web_search"}, WEATHER, {"type": "file_search", "vector_store_ids": ["v"]}])


def test_chat_path_errors_name_the_responses_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, input=[{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;"
                                                                                             "base64,AAAA"}]}])
    assert caught.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError, match="not among the tools") as caught:
        create(client, tools=[WEATHER], tool_choice={"type": "function", "name": "nope"})
    assert caught.value.body["param"] == "tool_choice"


def test_what_is_accepted_without_effect(client):
    reply = create(client, store=False, parallel_tool_calls=False, include=["reasoning.encrypted_content"],
                   reasoning={"effort": None}, extra_body={"background": False, "truncation": "disabled"})
    assert reply.parallel_tool_calls is False and reply.output_text


# -- without a server: the mapping, and replies the tiny model would not write -------------------------


def test_function_calls_join_the_assistant_turn_before_them():
    req = ResponsesRequest(input=[
        {"role": "user", "content": "hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "tw"},
                                                                         {"type": "input_text", "text": "o"}]},
        {"type": "function_call", "call_id": "call_3", "name": "f", "arguments": "{}"}],
        instructions="Be brief.")
    assert chat_messages(req) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}], "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": "two"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]


class Replayed:
    """Stands in for :class:`Choices`: one reply's text as token events of ``step`` characters, then its finish."""

    def __init__(self, text: str, reason: str = "stop", step: int = 1):
        self.text, self.reason, self.step = text, reason, step

    async def batches(self):
        for at in range(0, len(self.text), self.step):
            yield [(0, TokenEvent(self.text[at:at + self.step], 0))]
        yield [(0, FinishEvent(self.reason, prompt_tokens=3, completion_tokens=9))]

    async def events(self):
        async for batch in self.batches():
            for item in batch:
                yield item

    def cancel(self):
        pass


def replay(text: str, tools: list[dict], reason: str = "stop", **body) -> tuple[Response, list]:
    """The non-streamed response to ``text`` and the events of its stream, one character at a time."""
    req = ResponsesRequest.model_validate({"input": "hi", "tools": tools} | body)
    chat = chat_request(req)
    plan = translate.Plan([[1, 2, 3]], tools=chat.tools if chat.tool_choice != "none" else None)

    async def both():
        plain = await ResponseReply(req, chat, plan, MODEL_ID, Replayed(text, reason)).collect()
        blocks = [block async for texts in ResponseReply(req, chat, plan, MODEL_ID, Replayed(text, reason)).stream()
                  for block in texts.strip().split("\n\n") if block]
        return plain, [EVENTS.validate_python(json.loads(block.split("\n")[1].removeprefix("data: ")))
                       for block in blocks]
    plain, events = asyncio.run(both())
    return strict(plain), events


def check_item_order(events) -> None:
    """Each item is added, filled and done before the next is added; the numbers count from 0."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    current, added = None, 0
    for event in events:
        index = getattr(event, "output_index", None)
        if event.type == "response.output_item.added":
            assert current is None and index == added, f"item {index} added while item {current} is open"
            current, added = index, added + 1
        elif index is not None:
            assert index == current, f"{event.type} for item {index} while item {current} is open"
            if event.type == "response.output_item.done":
                current = None
    assert current is None and added == len(events[-1].response.output)


def flat(tools: list[dict]) -> list[dict]:
    return [{"type": "function", **tool["function"]} for tool in tools]


@pytest.mark.parametrize("name", list(PEER_CASES))
def test_replies_with_calls_stream_to_the_non_streamed_response(name):
    """Every tool-parsing peer case: the output items hold the text and calls translate.tool_calls_of finds,
    in the reply's order, and the stream ends with the same items."""
    case = PEER_CASES[name]
    tools = case.tools or FORECAST_TOOLS
    plain, events = replay(case.text, flat(tools))
    check_item_order(events)
    final = events[-1].response
    assert events[-1].type == "response.completed"
    same_output(final, plain)
    content, calls = translate.tool_calls_of(case.text, tools)
    assert plain.output_text == (content or "")
    assert [(i.name, i.arguments) for i in plain.output if i.type == "function_call"] == [
        (c.function.name, c.function.arguments) for c in calls or []]
    deltas = {}
    for event in events:
        if event.type == "response.function_call_arguments.delta":
            deltas[event.output_index] = deltas.get(event.output_index, "") + event.delta
    assert all(final.output[k].arguments == pieces for k, pieces in deltas.items())


TWO_CALLS = '[get_weather(city="Paris", celsius=True), get_time(zone="CET")]'


@pytest.mark.parametrize("body", [{"parallel_tool_calls": False}, {"max_tool_calls": 1}])
def test_calls_past_the_limit_are_dropped(body):
    plain, events = replay(TWO_CALLS, [WEATHER, TIME], **body)
    assert [i.name for i in plain.output] == ["get_weather"]
    same_output(events[-1].response, plain)
    assert max(getattr(e, "output_index", 0) for e in events) == 0
    everything, _ = replay(TWO_CALLS, [WEATHER, TIME])
    assert [i.name for i in everything.output] == ["get_weather", "get_time"]


def test_a_call_cut_by_the_budget_is_the_incomplete_last_item():
    plain, events = replay('[get_weather(city="Paris", celsius=True), get_time(zo', [WEATHER, TIME], "length")
    assert plain.status == "incomplete" and plain.incomplete_details.reason == "max_output_tokens"
    assert [(i.name, i.status) for i in plain.output] == [("get_weather", "completed"), ("get_time", "incomplete")]
    assert events[-1].type == "response.incomplete"
    same_output(events[-1].response, plain)
