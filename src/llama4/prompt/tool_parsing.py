"""Parse a model's reply into prose plus OpenAI-style tool calls, without ever raising.

Recognised call shapes (any of them may follow prose, sit inside a Markdown code fence or inside
``<|python_start|>...<|python_end|>``, and end with ``<|eot|>`` / ``<|eom|>``):

* pythonic list (Meta's Llama 4 zero-shot format): ``[get_weather(city="Paris"), get_time(tz="CET")]``,
  also without brackets; keyword values are Python or JSON literals (``True``/``true``/``None``/``null``,
  negative numbers, nested lists/dicts); dotted names (``weather.get(...)``) are kept verbatim;
* JSON (the HF chat template's format): ``{"name": ..., "parameters": {...}}``, ``"arguments"`` instead
  of ``"parameters"`` (an object or a JSON string), ``{"type": "function", "name": ..., ...}``,
  ``{"type": "function", "function": {...}}``, a list of these, or several separated by ``;``/newlines;
* Meta's custom tag format: ``<function=NAME>{json arguments}</function>``.

Pythonic calls are read with :mod:`ast` (``ast.parse`` + a literal-only walk), never ``eval``. The
calls must end the reply (apart from whitespace, closing fences and end tokens): a call mentioned in
the middle of an explanation is prose. Anything that does not parse - truncated output, free
variables, positional arguments we cannot name - is returned as plain text.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

_END_MARKERS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")
_PY_START, _PY_END = "<|python_start|>", "<|python_end|>"
_CANDIDATE = re.compile(r"[\[{]|(?<![\w.])[A-Za-z_][\w.]*\s*\(")
_CALL_HEAD = re.compile(r"[A-Za-z_][\w.]*\s*\(")
_JSON_NAME = re.compile(r"[A-Za-z_][\w\-]*(?:\.[A-Za-z_][\w\-]*)*")
_FUNCTION_TAG = re.compile(r"<function=([\w.\-]+)>(.*?)</function>", re.DOTALL)
_OPEN_FENCE_AT_END = re.compile(r"```[\w-]*\s*$")
_SEPARATORS = " \t\r\n;,"
_JSON_WORDS = {"true": True, "false": False, "null": None}


def new_call_id() -> str:
    """A fresh OpenAI-style tool-call id: ``call_`` + 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class AssistantOutput:
    """A parsed reply: ``content`` (prose, or None when empty) and ``tool_calls`` (or None)."""

    content: str | None
    tool_calls: list[dict] | None

    def to_message(self) -> dict:
        """The OpenAI assistant message for this reply."""
        msg: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


class _NotACall(Exception):
    pass


def parse_tool_calls(
    text: str, *, id_factory: Callable[[], str] = new_call_id, tools: Sequence[dict] | None = None
) -> list[dict] | None:
    """OpenAI ``tool_calls`` found at the end of ``text``, or None when it holds no well-formed call.

    Each call is ``{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}``.
    ``tools`` (OpenAI tool schemas) lets positional pythonic arguments be named by schema order.
    """
    return parse_assistant_output(text, id_factory=id_factory, tools=tools).tool_calls


def parse_assistant_output(
    text: str, *, id_factory: Callable[[], str] = new_call_id, tools: Sequence[dict] | None = None
) -> AssistantOutput:
    """Split a reply into prose and tool calls; malformed calls leave the reply as plain text."""
    if not isinstance(text, str):
        return AssistantOutput(None if text is None else str(text), None)
    body = _strip_end_markers(text)
    try:
        found = _find_calls(body, tools)
    except Exception:  # e.g. RecursionError from absurdly nested input: plain text, never an error
        found = None
    if found is None:
        return AssistantOutput(body or None, None)
    prose, calls = found
    tool_calls = [
        {
            "id": id_factory(),
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
        }
        for name, args in calls
    ]
    return AssistantOutput(prose.strip() or None, tool_calls)


def _strip_end_markers(text: str) -> str:
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for marker in _END_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


def _find_calls(body: str, tools) -> tuple[str, list[tuple[str, dict]]] | None:
    tagged = _function_tags(body)
    if tagged is not None:
        return tagged
    if _PY_START in body:
        before, _, inner = body.partition(_PY_START)
        # HF's template writes `<|python_start|>content<|python_end|>{calls}`: drop the tags, keep both.
        inner = inner.replace(_PY_END, "\n")
        found = _scan(inner, tools)
        if found is None:
            return None
        return before.rstrip() + ("\n" + found[0].strip() if found[0].strip() else ""), found[1]
    return _scan(body, tools)


def _function_tags(body: str):
    matches = list(_FUNCTION_TAG.finditer(body))
    if not matches or body[matches[-1].end() :].strip():
        return None
    calls = []
    for m in matches:
        try:
            args = json.loads(m.group(2)) if m.group(2).strip() else {}
        except json.JSONDecodeError:
            return None
        if not isinstance(args, dict):
            return None
        calls.append((m.group(1), args))
    return _FUNCTION_TAG.sub("", body), calls


def _scan(text: str, tools) -> tuple[str, list[tuple[str, dict]]] | None:
    """The first position from which the rest of ``text`` is one or more call groups."""
    for m in _CANDIDATE.finditer(text):
        found = _call_sequence(text, m.start(), tools)
        if found is None:
            continue
        calls, end = found
        if text[end:].strip(_SEPARATORS + "`"):
            continue
        prose = _OPEN_FENCE_AT_END.sub("", text[: m.start()])
        return prose, calls
    return None


def _call_sequence(text: str, pos: int, tools):
    """Consecutive call groups from ``pos`` separated by whitespace, ``;`` or ``,``."""
    calls: list[tuple[str, dict]] = []
    end = pos
    while pos < len(text):
        group = _call_group(text, pos, tools)
        if group is None:
            break
        found, end = group
        calls.extend(found)
        pos = end
        while pos < len(text) and text[pos] in _SEPARATORS:
            pos += 1
    return (calls, end) if calls else None


def _call_group(text: str, pos: int, tools):
    """Calls in the bracketed span (or single pythonic call) starting at ``pos``, and its end."""
    if text[pos] in "[{":
        end = _match_bracket(text, pos)
    elif _CALL_HEAD.match(text, pos):
        end = _match_bracket(text, text.index("(", pos))
    else:
        return None
    if end is None:
        return None
    try:
        return _calls_from_span(text[pos:end], tools), end
    except (_NotACall, SyntaxError, ValueError, TypeError):
        return None


_CLOSERS = {"[": "]", "{": "}", "(": ")"}
MISMATCH = "!"


def scan_structure(text: str, start: int = 0) -> Iterator[tuple[int, str, list[str]]]:
    """``(index, character, stack)`` for each bracket and comma of ``text[start:]`` outside quotes
    (quotes and backslash escapes respected); ``stack`` is the closers still open after it (the live
    list). A closer that does not match ends the scan with the character ``MISMATCH``."""
    stack: list[str] = []
    quote = None
    i = start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in _CLOSERS:
            stack.append(_CLOSERS[ch])
            yield i, ch, stack
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                yield i, MISMATCH, stack
                return
            yield i, ch, stack
        elif ch == ",":
            yield i, ch, stack
        i += 1


def _match_bracket(text: str, start: int) -> int | None:
    """Index just past the bracket closing ``text[start]``; None when it does not close (truncated)."""
    for i, ch, stack in scan_structure(text, start):
        if ch == MISMATCH:
            return None
        if ch in ")]}" and not stack:
            return i + 1
    return None


def _calls_from_span(span: str, tools) -> list[tuple[str, dict]]:
    if span[0] in "[{":
        try:
            value = json.loads(span)
        except json.JSONDecodeError:
            value = None
        else:
            return _calls_from_json(value)
    tree = ast.parse(span.strip(), mode="eval").body
    if isinstance(tree, ast.Call):
        return [_call_from_ast(tree, tools)]
    if isinstance(tree, (ast.List, ast.Tuple)) and tree.elts and all(isinstance(e, ast.Call) for e in tree.elts):
        return [_call_from_ast(e, tools) for e in tree.elts]
    # JSON-like calls written with Python literals ({'name': 'f', 'parameters': {'x': True}}).
    return _calls_from_json(_literal(tree))


def _calls_from_json(value) -> list[tuple[str, dict]]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _NotACall
    return [_call_from_json(item) for item in items]


def _call_from_json(obj) -> tuple[str, dict]:
    if not isinstance(obj, dict):
        raise _NotACall
    if obj.get("type") == "function" and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not _JSON_NAME.fullmatch(name):
        raise _NotACall
    if not set(obj) <= {"name", "parameters", "arguments", "type", "id"} or obj.get("type", "function") != "function":
        raise _NotACall  # an ordinary JSON object that happens to have a "name" field
    args = obj.get("parameters", obj.get("arguments"))
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _NotACall
    return name, args


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _call_from_ast(node: ast.Call, tools) -> tuple[str, dict]:
    name = _dotted_name(node.func)
    if name is None:
        raise _NotACall
    args: dict = {}
    if node.args:
        params = _parameter_names(tools, name)
        if params is None or len(node.args) > len(params):
            raise _NotACall  # positional arguments we cannot name
        for param, value in zip(params, node.args):
            args[param] = _literal(value)
    for kw in node.keywords:
        if kw.arg is None:
            raise _NotACall  # **kwargs
        args[kw.arg] = _literal(kw.value)
    return name, args


def _parameter_names(tools, name: str) -> list[str] | None:
    for tool in tools or ():
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return list(props)
    return None


def _literal(node: ast.expr):
    """A JSON-compatible value from a literal-only expression; anything else is not a call."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, bool, int, float))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        keys = [_literal(k) for k in node.keys]
        if all(isinstance(k, str) for k in keys):
            return {k: _literal(v) for k, v in zip(keys, node.values)}
    if isinstance(node, ast.Name) and node.id in _JSON_WORDS:
        return _JSON_WORDS[node.id]
    raise _NotACall
