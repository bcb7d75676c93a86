"""Parse a model's reply into prose plus OpenAI-style tool calls, without ever raising.

Recognised call shapes (any of them may sit inside a Markdown code fence or inside
``<|python_start|>...<|python_end|>``, and the reply may end with ``<|eot|>`` / ``<|eom|>``):

* pythonic list (Meta's Llama 4 zero-shot format): ``[get_weather(city="Paris"), get_time(tz="CET")]``,
  also without brackets (``get_weather(city="Paris")``, several separated by ``;``); keyword values are
  Python or JSON literals (``True``/``true``/``None``/``null``, negative numbers, nested lists/dicts);
  names are kept verbatim and may be dotted (``weather.get``) or hyphenated like MCP tools
  (``weather-forecast``): the name is read by a regex (``_NAME``), the arguments by :mod:`ast`
  (``ast.parse`` + a literal-only walk, never ``eval``);
* JSON (the HF chat template's format): ``{"name": ..., "parameters": {...}}``, ``"arguments"`` instead
  of ``"parameters"`` (an object or a JSON string), ``{"type": "function", "name": ..., ...}``,
  ``{"type": "function", "function": {...}}``, a list of these, or several separated by ``;``/newlines;
* Meta's custom tag format: ``<function=NAME>{json arguments}</function>``; the closing tag may be
  missing (Meta's own parser reads ``<function=NAME>{...}`` alone).

Where a call counts (a *group* is one list, JSON object, tag or bare call):

* where a call can begin: at the start of the reply or of a line, after the end of a sentence (``.``,
  ``!``, ``?`` or ``:`` and spaces; an abbreviation's ``e.g.`` is no end), right after a code-fence
  opener, or after another group with only ``,``/``;``/whitespace between. ``<|python_start|>`` and
  ``<|python_end|>`` count as line breaks; ``<function=...>`` tags count anywhere. A call mentioned
  inside a sentence (``You could call get_weather(city="Paris") yourself``), in a single-backtick code
  span among words included, is prose;
* a group must parse completely and not go on as an expression: one followed by a closing bracket,
  ``(`` or ``.name`` is prose (``[f(x=1)]]``, ``f(x=1).json()``); prose or another group may be glued
  to it. Whether a group counts thus depends on the text before it and the two characters after it,
  never on what follows them (:mod:`llama4.serve.tool_stream` streams calls on this);
* prose may come before, between and after groups (vLLM's and SGLang's parsers extract calls followed
  by prose too): every group of the reply is returned, in order, and the prose around them, less the
  code fences and separators that framed them, is the content, stripped;
* arguments are always strict JSON: a call whose arguments hold a non-finite number (``1e999``,
  ``NaN``, ``Infinity``) is malformed, as in vLLM, rather than converted (no JSON value stands for
  it, and a clamped or nulled value is one the model did not write); ``json.dumps(arguments,
  allow_nan=False)`` succeeds on every call returned;
* one malformed call in a list does not spoil its siblings (as in vLLM): a list whose members all look
  like calls keeps those that parse, and the text of the others goes to the content. Truncated output,
  free variables, expressions, ``**kwargs`` and positional arguments we cannot name (``tools`` names
  them by schema order) make a call malformed; a reply without a well-formed call is plain text;
* bare calls count by the same rules as lists (Llama 3.2 and Meta's tool utilities emit them); names
  are not checked against ``tools`` (SGLang drops unknown names, vLLM keeps them): a call comes back as
  the model wrote it and the client, which must check the arguments anyway, decides.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

_END_MARKERS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")
_PY_START, _PY_END = "<|python_start|>", "<|python_end|>"
_TAG_OPEN, _TAG_CLOSE = "<function=", "</function>"
_NAME = r"[A-Za-z_]\w*(?:[.-]\w+)*"
_CANDIDATE = re.compile(rf"<function=|[\[{{]|(?<![\w.-]){_NAME}\s*\(")
_CALL_HEAD = re.compile(rf"({_NAME})\s*\(")
_TAG_HEAD = re.compile(r"<function=([\w.\-]+)>\s*")
_JSON_NAME = re.compile(r"[A-Za-z_][\w\-]*(?:\.[A-Za-z_][\w\-]*)*")
_OPEN_FENCE_AT_END = re.compile(r"```[\w-]*\s*$")
_FENCE_OPENER_BEFORE = re.compile(r"```[\w-]*$")
_ABBREVIATION_BEFORE = re.compile(r"(?<![\w.])(?:\w\.){2,}$")
_CLOSING_FENCE_AT_START = re.compile(r"^(\s*)```")
_SEPARATORS = " \t\r\n;,"
_SENTENCE_ENDS = ".!?:"
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


_MALFORMED = (_NotACall, SyntaxError, ValueError, TypeError, RecursionError, MemoryError)
_Call = tuple[str, dict]


@dataclass(frozen=True)
class _Group:
    """One call group found in the reply: the calls it holds, where it ends, and the text of its
    malformed members (kept as prose)."""

    end: int
    calls: list[_Call]
    rejected: str = ""


def parse_tool_calls(
    text: str, *, id_factory: Callable[[], str] = new_call_id, tools: Sequence[dict] | None = None
) -> list[dict] | None:
    """OpenAI ``tool_calls`` found in ``text``, or None when it holds no well-formed call.

    Each call is ``{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}``.
    ``tools`` (OpenAI tool schemas) lets positional pythonic arguments be named by schema order.
    """
    return parse_assistant_output(text, id_factory=id_factory, tools=tools).tool_calls


def parse_assistant_output(
    text: str, *, id_factory: Callable[[], str] = new_call_id, tools: Sequence[dict] | None = None
) -> AssistantOutput:
    """Split a reply into prose and tool calls (see the module docstring for what counts as a call);
    a reply without a well-formed call is plain text, returned as it came (less end tokens)."""
    if not isinstance(text, str):
        return AssistantOutput(None if text is None else str(text), None)
    body = _strip_end_markers(text)
    try:
        found = _scan(body.replace(_PY_START, "\n").replace(_PY_END, "\n"), tools)
    except Exception:  # e.g. RecursionError from absurdly nested input: plain text, never an error
        found = None
    if found is None:
        return AssistantOutput(body or None, None)
    prose, calls = found
    tool_calls = [
        {"id": id_factory(), "type": "function", "function": {"name": name, "arguments": _arguments_json(args)}}
        for name, args in calls
    ]
    return AssistantOutput(prose.strip() or None, tool_calls)


def _arguments_json(args: dict) -> str:
    """Strict JSON (no NaN/Infinity); raises ValueError for arguments that have no such form."""
    return json.dumps(args, ensure_ascii=False, allow_nan=False)


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


def _scan(text: str, tools) -> tuple[str, list[_Call]] | None:
    """Every call group of ``text`` in order, and the prose around them; None when there is none."""
    calls: list[_Call] = []
    prose: list[str] = []
    brackets = _Brackets(text)
    cursor = 0  # start of the text not yet given to prose or a group
    pos = 0
    while (m := _CANDIDATE.search(text, pos)) is not None:
        start = m.start()
        chained = bool(calls) and not text[cursor:start].strip(_SEPARATORS)
        group = None
        if chained or m.group() == _TAG_OPEN or _may_begin_call(text, start):
            group = _group_at(brackets, start, tools)
        if group is None or _continued_as_code(text, group.end):
            pos = start + 1
            continue
        between = "" if chained else text[cursor:start]
        if calls:
            between = _after_group(between)
        prose += [_OPEN_FENCE_AT_END.sub("", between), group.rejected]
        calls.extend(group.calls)
        cursor = pos = group.end
    if not calls:
        return None
    prose.append(_after_group(text[cursor:]))
    return _joined(prose), calls


def _joined(pieces: list[str]) -> str:
    """The prose pieces around the groups, one space or line break kept where a group was cut out."""
    out = ""
    for piece in pieces:
        out += piece.lstrip(" \t") if out[-1:].isspace() else piece
    return out


def _may_begin_call(text: str, start: int) -> bool:
    """Whether ``start`` is where a call may begin: the reply's or a line's start, after a sentence's
    end (not an abbreviation's: ``e.g. f(x=1)`` is inside a sentence), or after a code-fence opener
    (spaces and tabs before it aside)."""
    i = start
    while i > 0 and text[i - 1] in " \t":
        i -= 1
    if i == 0 or text[i - 1] == "\n":
        return True
    if text[i - 1] in _SENTENCE_ENDS:
        return _ABBREVIATION_BEFORE.search(text, max(0, i - 40), i) is None
    return _FENCE_OPENER_BEFORE.search(text, max(0, i - 40), i) is not None


def _continued_as_code(text: str, end: int) -> bool:
    """Whether the group ending at ``end`` goes on as an expression: an unbalanced closer, a call of its
    result, or an attribute (``[f(x=1)]]``, ``f(x=1)(2)``, ``f(x=1).json()``)."""
    follower = text[end:end + 2]
    return follower[:1] in (")", "]", "}", "(") or (follower[:1] == "." and follower[1:].isidentifier())


def _after_group(prose: str) -> str:
    """Prose that follows a group, less the separator or closing code fence that ended the group."""
    prose = _CLOSING_FENCE_AT_START.sub(r"\1", prose, count=1)
    stripped = prose.lstrip(" \t")
    return stripped[1:] if stripped[:1] in (";", ",") else prose


def _group_at(brackets: _Brackets, pos: int, tools) -> _Group | None:
    """The call group starting at ``pos``, or None when none does (malformed, truncated, not calls)."""
    text = brackets.text
    try:
        if text.startswith(_TAG_OPEN, pos):
            return _tag_group(brackets, pos)
        if text[pos] == "[":
            return _list_group(brackets, pos, tools)
        end = brackets.end_of(pos if text[pos] == "{" else text.index("(", pos))
        if end is None:
            return None
        return _Group(end, [_call_from_member(text[pos:end], tools)])
    except _MALFORMED:
        return None


def _tag_group(brackets: _Brackets, pos: int) -> _Group | None:
    """``<function=NAME>{...}</function>``; without ``</function>`` the group ends with the object."""
    text = brackets.text
    head = _TAG_HEAD.match(text, pos)
    if head is None:
        return None
    body = head.end()
    if text.startswith(_TAG_CLOSE, body):
        return _Group(body + len(_TAG_CLOSE), [_checked_call(head.group(1), {})])
    if not text.startswith("{", body):
        return None
    end = brackets.end_of(body)
    if end is None:
        return None
    call = _checked_call(head.group(1), _strict_json(text[body:end]))
    close = len(text[end:]) - len(text[end:].lstrip())
    if text.startswith(_TAG_CLOSE, end + close):
        end += close + len(_TAG_CLOSE)
    return _Group(end, [call])


def _list_group(brackets: _Brackets, pos: int, tools) -> _Group | None:
    """A bracketed list of calls: the members that parse, and the text of those that do not."""
    end = brackets.end_of(pos)
    if end is None:
        return None
    members = _list_members(brackets.text[pos:end])
    if not members or not all(_looks_like_call(member) for member in members):
        return None
    calls, rejected = [], []
    for member in members:
        try:
            calls.append(_call_from_member(member, tools))
        except _MALFORMED:
            rejected.append(member)
    return _Group(end, calls, ", ".join(rejected)) if calls else None


def _list_members(span: str) -> list[str]:
    """The stripped top-level members of the bracketed list ``span`` (a trailing comma allowed)."""
    cuts = [i for i, ch, stack in scan_structure(span) if ch == "," and len(stack) == 1]
    bounds = zip([0, *cuts], [*cuts, len(span) - 1])
    members = [span[a + 1:b].strip() for a, b in bounds]
    if members and not members[-1]:
        members.pop()
    return members


def _looks_like_call(member: str) -> bool:
    """A member written as a call: a ``{...}`` object or ``name(...)`` and nothing after it."""
    if member.startswith("{") and member.endswith("}"):
        return True
    head = _CALL_HEAD.match(member)
    return head is not None and _match_bracket(member, head.end() - 1) == len(member)


_CLOSERS = {"[": "]", "{": "}", "(": ")"}
MISMATCH = "!"


_STRUCTURAL = re.compile(r"[\"'()\[\]{},]")
_QUOTE_OR_ESCAPE = {'"': re.compile(r'["\\]'), "'": re.compile(r"['\\]")}


def scan_structure(text: str, start: int = 0) -> Iterator[tuple[int, str, list[str]]]:
    """``(index, character, stack)`` for each bracket and comma of ``text[start:]`` outside quotes
    (quotes and backslash escapes respected); ``stack`` is the closers still open after it (the live
    list). A closer that does not match ends the scan with the character ``MISMATCH``."""
    stack: list[str] = []
    i = start
    while (m := _STRUCTURAL.search(text, i)) is not None:
        i, ch = m.start(), m.group()
        if ch in "\"'":
            i = _past_quote(text, i)
            continue
        if ch in _CLOSERS:
            stack.append(_CLOSERS[ch])
        elif ch in ")]}" and (not stack or stack.pop() != ch):
            yield i, MISMATCH, stack
            return
        yield i, ch, stack
        i += 1


def _past_quote(text: str, start: int) -> int:
    """Index just past the quote closing the one at ``start`` (backslash escapes skipped), or the end."""
    pattern = _QUOTE_OR_ESCAPE[text[start]]
    i = start + 1
    while (m := pattern.search(text, i)) is not None:
        if m.group() != "\\":
            return m.end()
        i = m.end() + 1
    return len(text)


class _Brackets:
    """Where the brackets of ``text`` close, in few scans: a scan from one opener settles every opener
    it passes outside quotes (a scan from there would read the same), so a reply with thousands of
    candidate openers is not scanned once per opener."""

    def __init__(self, text: str):
        self.text = text
        self.ends: dict[int, int | None] = {}

    def end_of(self, start: int) -> int | None:
        """Index just past the bracket closing ``text[start]``; None when it does not close."""
        if start not in self.ends:
            self._settle_from(start)
        return self.ends[start]

    def _settle_from(self, start: int) -> None:
        still_open: list[int] = []
        for i, ch, _ in scan_structure(self.text, start):
            if ch == MISMATCH:
                break
            if ch in _CLOSERS:
                still_open.append(i)
            elif ch in ")]}":
                self.ends[still_open.pop()] = i + 1
        self.ends.update(dict.fromkeys(still_open))


def _match_bracket(text: str, start: int) -> int | None:
    """Index just past the bracket closing ``text[start]``; None when it does not close (truncated)."""
    for i, ch, stack in scan_structure(text, start):
        if ch == MISMATCH:
            return None
        if ch in ")]}" and not stack:
            return i + 1
    return None


def _call_from_member(src: str, tools) -> _Call:
    """The one call ``src`` (a JSON/Python-literal object or a pythonic ``name(...)``) spells."""
    src = src.strip()
    if src.startswith("{"):
        try:
            value = _strict_json(src)
        except ValueError:
            value = _literal(ast.parse(src, mode="eval").body)  # {'name': 'f', 'parameters': {'x': True}}
        return _call_from_json(value)
    head = _CALL_HEAD.match(src)
    if head is None:
        raise _NotACall
    # The name is read by the regex (it may hold '-'); ast reads the arguments behind a stand-in name.
    tree = ast.parse("_" + src[head.end() - 1:], mode="eval").body
    if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name):
        raise _NotACall
    return _call_from_ast(head.group(1), tree, tools)


def _strict_json(src: str):
    """``json.loads`` that refuses NaN, Infinity and numbers too large for a float."""
    return json.loads(src, parse_constant=_refuse_constant, parse_float=_finite_float)


def _refuse_constant(word: str):
    raise ValueError(f"non-finite number {word}")


def _finite_float(src: str) -> float:
    value = float(src)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {src}")
    return value


def _checked_call(name: str, args) -> _Call:
    """``(name, args)`` when ``args`` is an object with a strict-JSON form, else not a call."""
    if not isinstance(args, dict):
        raise _NotACall
    _arguments_json(args)
    return name, args


def _call_from_json(obj) -> _Call:
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
        args = _strict_json(args) if args.strip() else {}
    return _checked_call(name, {} if args is None else args)


def _call_from_ast(name: str, node: ast.Call, tools) -> _Call:
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
    return _checked_call(name, args)


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
