"""Tool calls streamed as the model writes them: the name first, then the arguments member by member.

OpenAI's stream gives a call's ``id``, ``type`` and ``function.name`` in its first delta and then
pieces of ``function.arguments`` that the client concatenates. :class:`ToolCallStream` is fed the
reply text as it grows and returns such deltas for every format the parser reads (JSON objects,
pythonic calls, ``<function=NAME>`` tags; see :mod:`llama4.prompt.tool_parsing`):

* it closes the text's open brackets at the last member boundary (just before the last comma outside
  strings, or just after the last opening bracket) and parses that view with the same parser as the
  finished reply, so partial calls are read exactly as whole ones are;
* a call's name goes out as soon as a view parses to it; an argument goes out once a view holds the
  argument after it (the view's last argument may be a nested value cut short) or the call is closed,
  as ``{"key": value`` / ``, "key": value``, and ``}`` closes the call: the pieces concatenate to the
  ``json.dumps`` of the arguments, the string the non-streamed reply carries.

A view whose parse leaves prose in front of the calls (e.g. a call-like string inside an argument) is
not trusted. :meth:`finish` reconciles what was streamed with the parse of the whole reply: the rest
of each call goes out; if the whole reply turns out not to be the calls streamed so far (the model
broke off), the deltas sent stand and the reply's text comes back as content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llama4.prompt import parse_assistant_output
from llama4.prompt.tool_parsing import MISMATCH, new_call_id, scan_structure
from llama4.serve.schemas import FunctionCall, ToolCall

_TAG_OPEN, _TAG_CLOSE = "<function=", "</function>"


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


def _calls(text: str, tools) -> list[tuple[str, dict]] | None:
    """The calls ``text`` parses to when it is nothing but calls, else None."""
    parsed = parse_assistant_output(text, tools=tools, id_factory=lambda: "")
    if not parsed.tool_calls or parsed.content:
        return None
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


def partial_calls(text: str, tools) -> list[tuple[str, dict]] | None:
    """The calls of a reply cut short inside them (e.g. by max_tokens): each with the arguments complete
    before the cut; None when the text up to its last member boundary is not calls."""
    view = closed_view(text)
    return _calls(view, tools) if view else None


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

    @property
    def started(self) -> bool:
        """Whether some delta went out (the reply is being streamed as tool calls)."""
        return bool(self.calls)

    def feed(self, text: str) -> list[ToolCall]:
        """Deltas for what ``text`` (the whole reply so far) adds to what was streamed."""
        whole = _calls(text, self.tools)
        if whole is not None:
            return self._advance(whole, complete=len(whole))
        view = closed_view(text)
        seen = _calls(view, self.tools) if view else None
        return self._advance(seen, complete=len(seen) - 1) if seen else []

    def finish(self, text: str, cut_short: bool = False) -> tuple[list[ToolCall], str | None]:
        """At the end of the reply: (the remaining deltas, None), or ([], the text as content) when the
        reply is not the calls streamed so far. ``cut_short`` (the token budget ran out): a reply that
        stops inside calls ends them with the arguments written so far."""
        whole = _calls(text, self.tools)
        if whole is None and cut_short:
            whole = partial_calls(text, self.tools)
        if whole is None or not self._extends(whole):
            return [], text
        return self._advance(whole, complete=len(whole)), None

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
            if k == len(self.calls):
                self.calls.append(_Streamed(name))
                deltas.append(ToolCall(index=k, id=new_call_id(), function=FunctionCall(name=name, arguments="")))
            sent = self.calls[k]
            if sent.closed:
                continue
            items = list(args.items())
            final = items if k < complete else items[:-1]  # the last argument of an open call may grow
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
