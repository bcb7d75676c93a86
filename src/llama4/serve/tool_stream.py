"""Tool calls streamed as the model writes them: the name first, then the arguments member by member.

OpenAI's stream gives a call's ``id``, ``type`` and ``function.name`` in its first delta and then
pieces of ``function.arguments`` that the client concatenates. :class:`ToolCallStream` is fed the
reply text as it grows (from where a call may begin, see below) and returns such deltas for every format
the parser reads (JSON objects, pythonic calls, ``<function=NAME>`` tags; see
:mod:`llama4.prompt.tool_parsing`):

* it closes the text's open brackets at the last member boundary (just before the last comma outside
  strings, or just after the last opening bracket) and parses that view with the same parser as the
  finished reply, so partial calls are read exactly as whole ones are;
* an argument goes out once a view holds the argument after it (the view's last argument may be a
  nested value cut short), as ``{"key": value`` / ``, "key": value``; a call is closed with ``}`` once
  another call follows it, or by :meth:`finish` (the characters after a call decide whether it counts:
  ``[f(x=1)]]`` is not a call). The pieces concatenate to the ``json.dumps`` of the arguments, the
  string the non-streamed reply carries;
* a call's name goes out with its first finished argument, not as soon as ``name(`` is written: a call
  whose first argument is malformed (``calc(x=1e999)``, ``f(x=undefined)``) is no call to the parser,
  and is never announced, so its well-formed siblings stream exactly as the non-streamed reply has them.

Only views that are nothing but calls are streamed from: one that also holds prose (in front, e.g. a
call-like string inside an argument, or between or after the calls) waits for :meth:`finish`. Whether
a call group counts depends on no text after it beyond two characters (see the parser's docstring), so
what went out is not contradicted by a well-formed reply. :meth:`finish` reconciles what was streamed with the parse
of the whole reply: the rest of the calls go out, and the prose around them is left in
:attr:`ToolCallStream.prose` for the caller to send as content. If the whole reply
is not the calls streamed so far (the model broke off, or a call turned malformed after its first
argument went out: ``f(a=1, b=2, c=1e999)``), the deltas sent stand and the reply's text comes back as
content. A reply cut by the token budget inside a call ends with the calls up to the cut, that one with the
arguments written before it (:func:`cut_reply`), in both modes.

A reply may hold prose before, between and after its calls. :class:`ToolReplyStream` streams one reply of
a request with tools: the prose as content up to where a call may yet begin (:func:`prose_prefix_length`,
which reads the parser's own position and group rules), and from there on the text is held and fed to a
:class:`ToolCallStream`; :meth:`ToolReplyStream.finish` sends the rest of the content and of the calls.
The content it sends is always a prefix of the non-streamed reply's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from llama4.prompt import parse_assistant_output
from llama4.prompt.tool_parsing import (
    _NAME,
    _TAG_HEAD,
    MISMATCH,
    _Brackets,
    _continued_as_code,
    _group_at,
    _may_begin_call,
    new_call_id,
    scan_structure,
)
from llama4.serve.schemas import FunctionCall, ToolCall

_TAG_OPEN, _TAG_CLOSE = "<function=", "</function>"
_SPECIAL_TOKEN = "<|"
_GROUP_START = re.compile(r"<|[\[{]|(?<![\w.-])[A-Za-z_]")
_NAME_SO_FAR = re.compile(r"[\w.-]*")
_WHOLE_NAME = re.compile(_NAME)
_NAME_BEGUN = re.compile(rf"{_NAME}[.-]?")
_TAG_NAME_SO_FAR = re.compile(r"<function=[\w.\-]*")
_FENCE_LANGUAGE = re.compile(r"[\w-]")


def closed_view(text: str) -> str | None:
    """``text`` cut at its last member boundary with every bracket still open there closed (and an open
    ``<function=...>`` tag ended); None when the brackets do not nest."""
    cut, cut_stack = 0, []
    for i, ch, stack in scan_structure(text):
        if ch == MISMATCH:
            return None
        if ch in "([{":
            cut, cut_stack = i + 1, list(stack)
        elif ch == ",":
            cut, cut_stack = i, list(stack)
    view = text[:cut] + "".join(reversed(cut_stack))
    if view.rfind(_TAG_OPEN) > view.rfind(_TAG_CLOSE):
        view += _TAG_CLOSE
    return view


def _parsed(text: str, tools) -> tuple[list[tuple[str, dict]], str | None] | None:
    """The calls ``text`` holds and its prose (None when none), or None when it holds no call."""
    parsed = parse_assistant_output(text, tools=tools, id_factory=lambda: "")
    if not parsed.tool_calls:
        return None
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls], parsed.content


def _calls(text: str, tools) -> list[tuple[str, dict]] | None:
    """The calls ``text`` parses to when it is nothing but calls, else None."""
    found = _parsed(text, tools)
    return found[0] if found is not None and found[1] is None else None


def cut_reply(text: str, tools) -> tuple[list[tuple[str, dict]], str | None] | None:
    """The calls and prose (None when none) of a reply cut short inside a call (by max_tokens), when that
    call is worth more than text: the calls up to the cut, the last with the arguments complete before
    it, when they go further than those the parse of ``text`` finds; None when they do not (the parse
    stands: the unfinished call is prose there)."""
    partial = _partial_reply(text, tools)
    if partial is None:
        return None
    whole = _parsed(text, tools)
    done = whole[0] if whole is not None else []
    return partial if len(partial[0]) > len(done) and partial[0][:len(done)] == done else None


def _partial_reply(text: str, tools) -> tuple[list[tuple[str, dict]], str | None] | None:
    """The calls of a reply cut inside them and the prose before them: from where a call may begin
    (:func:`prose_prefix_length`) up to its last member boundary the text must be nothing but calls;
    None when it is not."""
    start = prose_prefix_length(text, tools)
    view = closed_view(text[start:])
    calls = _calls(view, tools) if view else None
    return (calls, text[:start] or None) if calls else None


def prose_prefix_length(text: str, tools, start: int = 0) -> int:
    """How many leading characters of ``text``, a reply still being written, are prose whatever follows:
    the content of the whole reply begins with them, whether it turns out to hold calls or not, and no
    call group of it begins among them. ``start``: what this gave for a shorter prefix of ``text`` (it
    looks on from there).

    It stops before the first place where a call group may yet begin (by the parser's rules: a
    ``<function=`` tag anywhere, else a bracket or a name at a call position, whose group is still open
    or parses; a name or tag still being written), before ``<|`` (``<|python_start|>`` reads as a line
    break in a reply with calls and as itself in one without), and before the whitespace and code-fence
    opener in front of that place (a reply with calls drops them when a call follows, and its content is
    stripped). A reply that begins with whitespace gives 0: that whitespace is content only if the reply
    holds no call.
    """
    if text[:1].isspace():
        return 0
    line = text.rfind("\n", 0, start) + 1  # the parser looks back no further for a call position
    held = _special_token_start(text, start)
    written = _Brackets(text[line:held] + ("\n" if held < len(text) else ""))  # as <|python_start|> is read
    for m in _GROUP_START.finditer(written.text, start - line, held - line):
        if _may_open_group(written, m.start(), tools):
            held = line + m.start()
            break
    return max(start, _before_fence_and_spaces(text, held, start))


def _special_token_start(text: str, start: int) -> int:
    """Where the first ``<|`` from ``start`` on is, or may be (a ``<`` at the end); ``len(text)``: nowhere."""
    found = text.find(_SPECIAL_TOKEN, start)
    if found >= 0:
        return found
    return len(text) - 1 if text.endswith("<") and len(text) > start else len(text)


def _may_open_group(written: _Brackets, pos: int, tools) -> bool:
    """Whether a call group of the whole reply may begin at ``pos`` of ``written.text``, a reply that
    may go on: the group there is still open, parses, or has a name still being written."""
    text = written.text
    if text[pos] == "<":
        return _may_open_tag(written, pos)
    if not _may_begin_call(text, pos):
        return False
    if text[pos] in "[{":
        return _may_be_group(written, pos, pos, tools)
    name_end = _NAME_SO_FAR.match(text, pos).end()
    if name_end == len(text):
        return _NAME_BEGUN.fullmatch(text, pos) is not None
    paren = _past_spaces(text, name_end)
    if _WHOLE_NAME.fullmatch(text, pos, name_end) is None:
        return False
    return paren == len(text) or (text[paren] == "(" and _may_be_group(written, pos, paren, tools))


def _may_be_group(written: _Brackets, pos: int, opener: int, tools) -> bool:
    """Whether the group at ``pos``, whose bracket opens at ``opener``, is or may become one that counts:
    still open, or parsed and followed by too few characters to tell whether it goes on as code."""
    text = written.text
    end = _bracket_end(text, opener)
    if end is None:
        return True
    if end < 0 or _group_at(written, pos, tools) is None:
        return False
    follower = text[end:end + 2]
    told = len(follower) == 2 or follower not in ("", ".")
    return not told or not _continued_as_code(text, end)


def _may_open_tag(written: _Brackets, pos: int) -> bool:
    """Whether a ``<function=NAME>`` call may begin at ``pos`` (a tag whose call parsed counts: the two
    characters after it are not looked at)."""
    text = written.text
    rest = text[pos:pos + len(_TAG_OPEN)]
    if rest != _TAG_OPEN:
        return _TAG_OPEN.startswith(rest) and pos + len(rest) == len(text)
    head = _TAG_HEAD.match(text, pos)
    if head is None:
        return _TAG_NAME_SO_FAR.fullmatch(text, pos) is not None
    body = head.end()
    if _TAG_CLOSE.startswith(text[body:body + len(_TAG_CLOSE)]):
        return True
    if text[body] != "{":
        return False
    end = _bracket_end(text, body)
    return end is None or (end > 0 and _group_at(written, pos, None) is not None)


def _bracket_end(text: str, opener: int) -> int | None:
    """Index just past the bracket closing ``text[opener]``; None while it is open; -1 when a closer that
    does not match comes first (it never closes)."""
    for i, ch, stack in scan_structure(text, opener):
        if ch == MISMATCH:
            return -1
        if ch in ")]}" and not stack:
            return i + 1
    return None


def _before_fence_and_spaces(text: str, end: int, floor: int) -> int:
    """``end`` moved back (not below ``floor``) over the whitespace before it and a code-fence opener
    (backticks, a language name) with its whitespace, begun or whole."""
    end = _before_spaces(text, end, floor)
    word = end
    while word > floor and _FENCE_LANGUAGE.fullmatch(text[word - 1]):
        word -= 1
    ticks = word
    while ticks > floor and text[ticks - 1] == "`":
        ticks -= 1
    return _before_spaces(text, ticks, floor) if ticks < word else end


def _before_spaces(text: str, end: int, floor: int) -> int:
    while end > floor and text[end - 1].isspace():
        end -= 1
    return end


def _past_spaces(text: str, start: int) -> int:
    """Index of the first character at or after ``start`` that is not whitespace (``len(text)``: none)."""
    while start < len(text) and text[start].isspace():
        start += 1
    return start


def _member(key: str, value, first: bool) -> str:
    return ("{" if first else ", ") + json.dumps(key, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False)


@dataclass
class _Streamed:
    name: str
    members: list[tuple[str, object]] = field(default_factory=list)
    closed: bool = False


class ToolCallStream:
    """Tool-call deltas for one choice, from the reply text so far (see the module docstring)."""

    def __init__(self, tools: list[dict]):
        self.tools = tools
        self.calls: list[_Streamed] = []
        self.prose: str | None = None  # set by finish: the content of a reply that is calls with prose

    @property
    def started(self) -> bool:
        """Whether some delta went out (the reply is being streamed as tool calls)."""
        return bool(self.calls)

    def feed(self, text: str) -> list[ToolCall]:
        """Deltas for what ``text`` (the reply so far, or its part from where a call may begin) adds to
        what was streamed. The last call stays open until :meth:`finish`: the characters after a call
        decide whether it counts."""
        seen = _calls(text, self.tools)
        if seen is None:
            view = closed_view(text)
            seen = _calls(view, self.tools) if view else None
        return self._advance(seen, complete=len(seen) - 1) if seen else []

    def finish(self, text: str, cut_short: bool = False) -> tuple[list[ToolCall], str | None]:
        """At the end of the reply, ``text`` (the whole of it): (the remaining deltas, None) when the reply
        is calls that extend what was streamed, and then :attr:`prose` is the prose around them (None when
        none); else ([], the reply's text). ``cut_short`` (the token budget ran out): a reply that stops
        inside a call ends with it, with the arguments written so far (:func:`cut_reply`). Calls and prose
        are what ``translate.tool_calls_of`` makes of the whole reply."""
        found = (cut_short and cut_reply(text, self.tools)) or _parsed(text, self.tools)
        if found is None or not self._extends(found[0]):
            return [], text
        calls, self.prose = found
        return self._advance(calls, complete=len(calls)), None

    def _extends(self, calls: list[tuple[str, dict]]) -> bool:
        if len(calls) < len(self.calls):
            return False
        for sent, (name, args) in zip(self.calls, calls):
            if sent.name != name or list(args.items())[:len(sent.members)] != sent.members:
                return False
            if sent.closed and len(args) != len(sent.members):
                return False
        return True

    def _advance(self, calls: list[tuple[str, dict]], complete: int) -> list[ToolCall]:
        """Stream ``calls`` (the first ``complete`` of them closed) past what was already sent."""
        if not self._extends(calls):
            return []  # a view that disagrees with what was sent: wait for more text
        deltas = []
        for k, (name, args) in enumerate(calls):
            items = list(args.items())
            final = items if k < complete else items[:-1]  # the last argument of an open call may grow
            if k == len(self.calls):
                if k >= complete and not final:
                    break  # the name waits for a finished argument: the call may yet be malformed
                self.calls.append(_Streamed(name))
                deltas.append(ToolCall(index=k, id=new_call_id(), function=FunctionCall(name=name, arguments="")))
            sent = self.calls[k]
            if sent.closed:
                continue
            piece = "".join(_member(key, value, first=not sent.members and j == 0)
                            for j, (key, value) in enumerate(final[len(sent.members):]))
            if len(final) > len(sent.members):
                sent.members = list(final)
            if k < complete:
                piece += "}" if sent.members else "{}"
                sent.closed = True
            if piece:
                deltas.append(ToolCall(index=k, type=None, function=FunctionCall(arguments=piece)))
        return deltas


def _may_hold_a_call(text: str) -> bool:
    """Whether ``text`` has what every call is written with (a cheap test: most held text is a word)."""
    return "(" in text or "{" in text or _TAG_OPEN in text


@dataclass
class ReplyEnd:
    """What :meth:`ToolReplyStream.finish` leaves to send: the last tool-call deltas, the rest of the
    content (after what went out), and whether the reply is calls (finish_reason ``tool_calls``)."""

    deltas: list[ToolCall]
    content: str
    is_calls: bool


class ToolReplyStream:
    """One reply of a request with tools, streamed so that it ends as the non-streamed reply does (see the
    module docstring): prose as content while it is certainly prose, calls as deltas."""

    def __init__(self, tools: list[dict]):
        self.tools = tools
        self.calls = ToolCallStream(tools)
        self.sent = 0  # characters of the reply sent as content

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(the content to send, the tool-call deltas) for ``text``, the whole reply so far. Once a call is
        streamed no more content goes out until :meth:`finish`."""
        before = self.sent
        if not self.calls.started:
            self.sent = prose_prefix_length(text, self.tools, self.sent)
        held = text[self.sent:]
        return text[before:self.sent], self.calls.feed(held) if _may_hold_a_call(held) else []

    def finish(self, text: str, cut_short: bool = False) -> ReplyEnd:
        """The rest of ``text``, the whole reply: its calls and content as ``translate.tool_calls_of`` has
        them (``cut_short``: the token budget ran out)."""
        deltas, content = self.calls.finish(text, cut_short)
        whole = (self.calls.prose or "") if content is None else content
        return ReplyEnd(deltas, whole[self.sent:], content is None)
