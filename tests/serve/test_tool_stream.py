"""Tool calls streamed while they are written: fed a reply one character at a time, the deltas give the
name with the first finished argument, the arguments member by member, and end exactly where the
non-streamed parse of the whole reply does (calls and content), for every case of the peer table.

A chat reply with tools (llama4.serve.app._ChatReply, driven with engine events by hand) streams its prose
as content up to where a call may begin (tool_stream.prose_prefix_length) and ends with the calls, content
and finish_reason of the non-streamed reply, cut by max_tokens or not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from llama4.inference.requests import FinishEvent, TokenEvent
from llama4.prompt import parse_assistant_output
from llama4.serve import translate
from llama4.serve.app import _ChatReply
from llama4.serve.schemas import ChatCompletionRequest
from llama4.serve.tool_stream import ToolCallStream, closed_view, prose_prefix_length
from llama4.serve.translate import Plan
from tests.prompt.test_tool_parsing_peers import PEER_CASES

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}]


def stream(text: str, tools=TOOLS, step: int = 1, cut_short: bool = False):
    """Feed ``text`` in ``step``-character pieces; returns (deltas with the text length at which each
    went out, the final content or None: the text when it is no calls, else the prose around the calls).
    ``cut_short``: the reply ended on the token budget."""
    s, out = ToolCallStream(tools), []
    for end in range(step, len(text) + step, step):
        out += [(min(end, len(text)), d) for d in s.feed(text[:end])]
    deltas, content = s.finish(text, cut_short)
    return out + [(len(text), d) for d in deltas], s.prose if content is None else content


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


def test_the_name_goes_out_with_the_first_finished_argument_and_each_argument_once_the_next_is_written():
    """The name waits for the first argument to be known good (the call may be malformed until then);
    the call's last argument and its closing go out at the end (the character after a call counts)."""
    reply = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3, "unit": "C", "lang": "en"}}'
    deltas, _ = stream(reply)
    at = {(d.function.name or d.function.arguments): n for n, d in deltas}
    assert at["get_weather"] == at['{"city": "Paris"'] <= reply.index('"unit"')  # once the argument after it is
    assert at[', "days": 3'] <= reply.index('"lang"')
    assert [d.function.arguments for _, d in deltas[1:]] == ['{"city": "Paris"', ', "days": 3', ', "unit": "C"',
                                                             ', "lang": "en"}']


def test_a_reply_that_breaks_off_comes_back_as_content():
    reply = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3, "unit": "C'  # cut by max_tokens
    deltas, content = stream(reply)
    assert assembled(deltas)[0]["name"] == "get_weather" and content == reply  # the deltas sent stand
    early = '{"name": "get_weather", "parameters": {"city": "Par'  # before any argument was finished:
    assert stream(early) == ([], early)  # nothing went out, as the non-streamed reply has no call
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


def non_streamed(text: str, tools) -> tuple[list[tuple[str, str]], str | None]:
    """(name, arguments) of each call parse_assistant_output finds, and the content a reply with them
    carries: the parse's prose, or the reply's own text when it holds no call."""
    parsed = parse_assistant_output(text, tools=tools)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls or []]
    return calls, parsed.content if calls else text


@pytest.mark.parametrize("case", list(PEER_CASES))
@pytest.mark.parametrize("step", [1, 3, 8])
def test_streaming_ends_where_the_non_streamed_parse_does(case, step):
    """Fed the reply piece by piece, the stream's calls and content are the parse of the whole reply,
    for every case of the peer table (the malformed ones included)."""
    text, tools = PEER_CASES[case].text, PEER_CASES[case].tools or TOOLS
    deltas, content = stream(text, tools=tools, step=step)
    assert ([(c["name"], c["arguments"]) for c in assembled(deltas)], content) == non_streamed(text, tools)


# A prefix of these streams a good call, then a malformed sibling comes before max_tokens cuts the list:
# with no closing bracket there is no list to keep the good call from (the non-streamed reply is text).
BREAKS_OFF_AFTER_A_CALL = {"free-variable sibling in the middle"}


@pytest.mark.parametrize("case", list(PEER_CASES))
def test_a_reply_cut_by_the_token_budget_streams_to_the_non_streamed_reply(case):
    """Every few prefixes of a case, ended by max_tokens: the stream gives what translate.tool_calls_of
    gives (or, past a malformed sibling, keeps the deltas it sent and returns the text)."""
    text, tools = PEER_CASES[case].text, PEER_CASES[case].tools or TOOLS
    for cut in range(5, len(text), 6):
        deltas, content = stream(text[:cut], tools=tools, step=4, cut_short=True)
        prose, calls = translate.tool_calls_of(text[:cut], tools, cut_short=True)
        expected = [(c.function.name, c.function.arguments) for c in calls or []]
        got = [(c["name"], c["arguments"]) for c in assembled(deltas)]
        if case in BREAKS_OFF_AFTER_A_CALL and (got, content) != (expected, prose):
            assert content == prose == text[:cut] and calls is None, cut
            continue
        assert (got, content) == (expected, prose), cut


def test_prose_around_calls_comes_back_with_the_calls_from_finish():
    s, sent = ToolCallStream(TOOLS), []
    reply = '[get_weather(city="Oslo", days=2)]\nNow the time:\n[get_time(zone="UTC")]\nDone.'
    for end in range(1, len(reply) + 1):
        sent += s.feed(reply[:end])
    assert [d.function.name for d in sent if d.function.name] == ["get_weather"]  # with its first argument
    deltas, content = s.finish(reply)
    assert content is None and s.prose == "Now the time:\n\nDone."  # None: the reply is calls
    assert [d.function.name for d in deltas if d.function.name] == ["get_time"]  # after prose: at the end
    assert [(c["name"], c["arguments"]) for c in assembled([(0, d) for d in sent + deltas])] == [
        ("get_weather", '{"city": "Oslo", "days": 2}'), ("get_time", '{"zone": "UTC"}')]
    not_calls = ToolCallStream(TOOLS)
    assert not_calls.finish("It is sunny.") == ([], "It is sunny.") and not_calls.prose is None


def test_a_call_malformed_after_its_first_argument_went_out_keeps_what_was_sent():
    """The one case the stream cannot match: the name and first argument went out before a later
    argument turned out malformed. The deltas sent stand; the reply comes back as content."""
    reply = '[get_weather(city="Oslo", days=2, unit=1e999)]'
    deltas, content = stream(reply)
    assert [(c["name"], c["arguments"]) for c in assembled(deltas)] == [("get_weather", '{"city": "Oslo"')]
    assert content == reply and non_streamed(reply, TOOLS) == ([], reply)


GROUPS = ['[get_time(zone="UTC")]', '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}',
          'get_time(zone="x, (y)")', '<function=get_time>{"zone": "CET"}</function>', '<function=get_time>{}',
          '[get_weather(city="Rome", days=1), get_time()]', '```json\n{"name": "get_time", "parameters": {}}\n```',
          '<|python_start|>[get_weather(city="Lima")]<|python_end|>', '[weather-forecast(city="Bern", days=3)]']
PROSE = ["Sure.", "I'll check (quickly), ok?", "Done!", "Here:", "e.g. this", "See `get_time()` for", "{braces}",
         "Ok", "'", "-"]


@settings(max_examples=200, deadline=None)
@given(pieces=hst.lists(hst.tuples(hst.sampled_from(GROUPS + PROSE), hst.sampled_from(["\n", " ", "; ", "", ". "])),
                        min_size=1, max_size=6),
       step=hst.integers(1, 6))
def test_any_mix_of_well_formed_calls_and_prose_streams_to_its_parse(pieces, step):
    """Whatever the mix (groups glued to prose or to each other included), the stream ends where the
    parse of the whole reply does: nothing it sent is taken back."""
    reply = "".join(piece + separator for piece, separator in pieces)
    deltas, content = stream(reply, step=step)
    assert ([(c["name"], c["arguments"]) for c in assembled(deltas)], content) == non_streamed(reply, TOOLS)


@pytest.mark.parametrize("text, verdict", [
    ("weather-forecast(", True), ("weather-forecast ", None), ("well-known facts", False), ("well-known", None),
])
def test_a_hyphenated_name_may_open_a_tool_call(text, verdict):
    assert translate.may_be_tool_call(text) is verdict


@pytest.mark.parametrize("text, prose", [
    ("It is sunny", "It is sunny"),
    ("Sure", ""),  # a name at the start of the reply: Sure( may follow
    ("Sure thing. I will check", "Sure thing. I will check"),
    ("Sure thing. I will check.\n[get_weather(city=", "Sure thing. I will check."),
    ('I will check.\nget_weather(city="Oslo") now', "I will check."),  # a call followed by prose counts
    ("Here:\n```json\n{", "Here:"),  # the fence opener goes with the call
    ("Here: ``", "Here:"),  # perhaps a fence
    ("Checking. <fun", "Checking."),  # perhaps a <function= tag
    ('Checking <function=get_time>{"zone": "UTC"}', "Checking"),  # a tag counts anywhere
    ("Use <b>bold</b> here", "Use <b>bold</b> here"),
    ("Done.<|python_start|>[get_time()]", "Done."),
    ("Done. Weather-forecast", "Done."),  # a hyphenated name still being written
    ("Done. weather-forecast(city", "Done."),
    ("  It is sunny", ""),  # leading whitespace is content only if the reply holds no call
    ("It is sunny.\n", "It is sunny."),  # trailing whitespace: stripped from a reply with calls
    ("You could call get_weather(city=\"Paris\") yourself", "You could call get_weather(city=\"Paris\") yourself"),
    ("e.g. f(x=1) is how", "e.g. f(x=1) is how"),  # after an abbreviation: inside a sentence
    ("Like this:\nrequests.get(url=1).json() works", "Like this:\nrequests.get(url=1).json() works"),  # code
    ("Like this:\nrequests.get(url=1).", "Like this:"),  # .json() or the end of a sentence: cannot tell yet
    ("See:\n[1] the notes", "See:\n[1] the notes"),
    ("See:\n{ open", "See:"),  # an open object at a line start may yet be a call
    ("See:\n[f(x=1)]]", "See:\n[f(x=1)]]"),
])
def test_prose_prefix_length_stops_where_a_call_may_begin(text, prose):
    assert text[:prose_prefix_length(text, TOOLS)] == prose


def replies_with_calls_and_prose():
    return hst.lists(hst.tuples(hst.sampled_from(GROUPS + PROSE + ["  ", "\n", "``", "<fun", "<|python_end|>"]),
                                hst.sampled_from(["\n", " ", "; ", "", ". ", ":\n"])), min_size=1, max_size=6).map(
        lambda pieces: "".join(piece + separator for piece, separator in pieces))


@settings(max_examples=200, deadline=None)
@given(reply=replies_with_calls_and_prose())
def test_what_prose_prefix_length_releases_begins_the_content_of_every_continuation(reply):
    """For each prefix of a reply, the prose it gives never shrinks and begins the content of the whole
    reply, and of the prefix cut by the token budget (a call in it never is among that prose)."""
    content_of_reply = translate.tool_calls_of(reply, TOOLS)[0] or ""
    length = 0
    for end in range(len(reply) + 1):
        text = reply[:end]
        length = prose_prefix_length(text, TOOLS, length)
        assert length == prose_prefix_length(text, TOOLS) and length <= end
        assert content_of_reply.startswith(text[:length]), text
        assert (translate.tool_calls_of(text, TOOLS, cut_short=True)[0] or "").startswith(text[:length]), text


FORECAST = {"type": "function", "function": {"name": "weather-forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
REPLY_TABLE = {
    "prose only": "It is sunny in Paris today. Enjoy the walk!",
    "prose beginning with whitespace": "  It is sunny.",
    "calls only": '[get_weather(city="Paris", days=2), get_time(zone="CET")]',
    "prose then calls": 'Let me check that for you.\n[get_weather(city="Paris", days=2)]',
    "calls then prose": '[get_time(zone="UTC")]\nI asked for the time in UTC.',
    "prose, calls, prose, calls": 'First the weather:\n[get_weather(city="Oslo")]\nNow the time.\n'
                                  '{"name": "get_time", "parameters": {"zone": "CET"}}',
    "malformed sibling": 'Checking.\n[get_weather(city="Rome", days=1e999), get_time(zone="UTC")]',
    "hyphenated name": 'Sure: weather-forecast(city="Bern", days=3)',
    "python tags then prose": '<|python_start|>[get_weather(city="Lima")]<|python_end|>That is the call.',
    "prose then python tags": 'Let me look.<|python_start|>[get_time(zone="UTC")]<|python_end|>',
    "fenced call with prose": 'Here you go:\n```json\n{"name": "get_time", "parameters": {}}\n```\nDone.',
    "tag inside a sentence": 'Checking now <function=get_time>{"zone": "CET"}</function> and done.',
    "a call mentioned in a sentence": 'You could call get_weather(city="Paris") yourself.',
    "code, not a call": 'Like this:\nrequests.get(url="x").json() returns it.',
}


TOKEN_TEXTS: list[str] = []  # the text of each token id made by token(): what the stand-in tokenizer decodes


def token(text: str, logprob: float = -0.5) -> TokenEvent:
    TOKEN_TEXTS.append(text)
    return TokenEvent(text, len(TOKEN_TEXTS) - 1, logprob)


def chat_reply(tools, logprobs: bool = False) -> _ChatReply:
    """A chat reply of one choice, driven by hand with engine events (no engine, no model)."""
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=tools, logprobs=logprobs)
    tokenizer = SimpleNamespace(decode=lambda ids: TOKEN_TEXTS[ids[0]], token_bytes=lambda t: TOKEN_TEXTS[t].encode())
    return _ChatReply(req, Plan([[1]], tools=tools), tokenizer, "m", SimpleNamespace(handles=[None]))


def streamed_reply(text: str, tools, step: int, reason: str = "stop", logprobs: bool = False):
    """Drive a chat reply with ``text`` in ``step``-character tokens then a finish; returns (content, calls as
    (name, arguments), finish_reason, the tokens logprobs went out for). Checks on the way that the content
    sent is always a prefix of the non-streamed content."""
    reply = chat_reply(tools, logprobs)
    expected, _ = translate.tool_calls_of(text, tools, reason == "length")
    content, deltas, finish, logged = "", [], None, []
    events = [token(text[k:k + step]) for k in range(0, len(text), step)]
    for event in events + [FinishEvent(reason)]:
        for chunk in reply._chunks_of(0, event):
            (choice,) = chunk.choices
            content += choice.delta.content or ""
            assert (expected or "").startswith(content), (content, expected)
            deltas += [(0, d) for d in choice.delta.tool_calls or []]
            finish = choice.finish_reason or finish
            logged += [e.token for e in choice.logprobs.content] if choice.logprobs else []
    calls = [(c["name"], c["arguments"]) for c in assembled(deltas)]
    return content or None, calls, finish, logged


def non_streamed_reply(text: str, tools, reason: str = "stop"):
    """translate.tool_calls_of on the whole text, with the finish_reason _ChatReply.collect gives (an empty
    content is None, as a stream has it)."""
    content, calls = translate.tool_calls_of(text, tools, reason == "length")
    finish = "length" if reason == "length" else "tool_calls" if calls else "stop"
    return content or None, [(c.function.name, c.function.arguments) for c in calls or []], finish


@pytest.mark.parametrize("case", list(REPLY_TABLE))
@pytest.mark.parametrize("step", [1, 4, 9])
def test_a_streamed_chat_reply_ends_as_the_non_streamed_reply(case, step):
    text, tools = REPLY_TABLE[case], TOOLS + [FORECAST]
    content, calls, finish, _ = streamed_reply(text, tools, step)
    assert (content, calls, finish) == non_streamed_reply(text, tools)


def test_the_reply_table_holds_what_its_names_say():
    tools = TOOLS + [FORECAST]
    shapes = {case: non_streamed_reply(text, tools) for case, text in REPLY_TABLE.items()}
    assert [case for case, (content, calls, _) in shapes.items() if not calls] == [
        "prose only", "prose beginning with whitespace", "a call mentioned in a sentence", "code, not a call"]
    assert all(content for case, (content, _, _) in shapes.items() if case != "calls only")
    assert shapes["hyphenated name"][1] == [("weather-forecast", '{"city": "Bern", "days": 3}')]
    assert shapes["malformed sibling"][1] == [("get_time", '{"zone": "UTC"}')]


def test_prose_streams_before_a_call_and_the_calls_while_they_are_written():
    text = 'Let me check that for you.\n[get_weather(city="Paris", days=2), get_time(zone="CET")]'
    reply, content, names = chat_reply(TOOLS), [], {}
    for k in range(len(text)):
        for chunk in reply._chunks_of(0, token(text[k])):
            delta = chunk.choices[0].delta
            if delta.content:
                content.append((k, delta.content))
            names.update((call.function.name, k) for call in delta.tool_calls or [] if call.function.name)
    assert "".join(piece for _, piece in content) == "Let me check that for you."
    assert content[0][0] < text.index("check")  # the prose went out as it came, word by word
    assert names["get_weather"] < text.index("get_time")  # the first call went out while the list was written


@settings(max_examples=200, deadline=None)
@given(reply=replies_with_calls_and_prose(), step=hst.integers(1, 6), data=hst.data())
def test_any_streamed_chat_reply_ends_as_the_non_streamed_reply(reply, step, data):
    """Any mix of calls and prose, ended by a stop or cut anywhere by max_tokens."""
    assert streamed_reply(reply, TOOLS, step)[:3] == non_streamed_reply(reply, TOOLS)
    cut = reply[:data.draw(hst.integers(0, len(reply)))]
    assert streamed_reply(cut, TOOLS, step, "length")[:3] == non_streamed_reply(cut, TOOLS, "length")


@pytest.mark.parametrize("case", list(REPLY_TABLE))
def test_a_chat_reply_cut_by_the_token_budget_streams_to_the_non_streamed_reply(case):
    """Every prefix of the table's replies, ended by max_tokens (finish_reason "length")."""
    text, tools = REPLY_TABLE[case], TOOLS + [FORECAST]
    for cut in range(1, len(text)):
        cut_text = text[:cut]
        assert streamed_reply(cut_text, tools, 3, "length")[:3] == non_streamed_reply(cut_text, tools, "length"), cut


@pytest.mark.parametrize("case", ["prose only", "prose then calls", "calls then prose", "calls only"])
def test_each_tokens_logprobs_go_out_once_with_the_content(case):
    """Logprobs ride with content chunks: the tokens of the prose sent early with it, the others with the
    rest of the content at the end (none for a reply that is only calls, as before)."""
    text = REPLY_TABLE[case]
    *_, logged = streamed_reply(text, TOOLS, 3, logprobs=True)
    assert logged == ([] if case == "calls only" else [text[k:k + 3] for k in range(0, len(text), 3)])
