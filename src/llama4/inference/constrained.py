"""Constrained decoding of JSON: OpenAI ``response_format`` ``json_object`` and ``json_schema``.

At every step :meth:`JsonConstraint.restrict` sets to -inf the logit of every token that would stop the
output being a prefix of a JSON document matching the schema, and allows end-of-sequence only once
the document is complete; :meth:`JsonConstraint.advance` feeds the chosen token. Greedy decoding then
picks the most likely allowed token, and sampling samples among the allowed tokens only.

Design
------
* The schema is compiled into a small graph of nodes (object with fixed properties, free object,
  array, string, number, literal set) joined by *values*, which are sets of alternatives (anyOf,
  oneOf, type lists, ``$ref`` all become alternatives).
* A byte-level pushdown recogniser runs over that graph. A recogniser state is a tuple of stacks; a
  stack is an immutable linked list ``(frame, parent)`` of tuples, so branching (several
  alternatives still alive) and trying a token are free of copies: stepping returns new stacks.
  Parent frames are stored already in their "after the child" phase, so finishing a child is a pop.
* Per tokenizer (cached) the vocabulary's token byte strings are kept sorted with their common
  prefix lengths, which is a trie in flat form: a walk re-uses the state reached for the shared prefix
  and, at the first invalid byte, skips the whole block of tokens sharing that prefix (one bisect).
* Most steps are spent inside strings, where nearly every token is allowed. For those the index holds,
  per UTF-8 decoder state, a mask of the tokens that are plain string content throughout (and their
  character counts, for ``maxLength``), so they are allowed with one tensor operation; only the few
  tokens holding a quote or backslash are walked, from that byte on.
* Strings with a DFA (``pattern``, ``format``) use instead, per DFA state (and UTF-8 state), the plain
  tokens the DFA lets through grouped by the state and character count they end in, computed once by a
  walk and kept in a bounded cache shared by the constraints on the same DFA; each step decides the
  groups (a length check each) and allows their tokens with one indexing. Tokens holding a quote or
  backslash are walked from the string's state.

Output form
-----------
Whitespace is allowed only as one optional space after ``:`` and after ``,`` (``{"a": 1, "b": 2}`` and
``{"a":1,"b":2}`` both pass), so that a small model cannot loop on whitespace. Numbers have at most
20 integer digits, 20 fraction digits and a 2-digit exponent; ``integer`` has no fraction or exponent,
and neither has a number with bounds or ``multipleOf`` (no exponent: ``1e3`` is written ``1000``).
Strings are valid UTF-8; ``\\u`` escapes of UTF-16 surrogates are refused (write the character).

Schema subset
-------------
``type`` (one name or a list), ``properties``, ``required``, ``additionalProperties``, ``items``,
``prefixItems``, ``additionalItems``, ``enum``, ``const``, ``minItems``/``maxItems``,
``minLength``/``maxLength`` (characters; an escape is one character), ``pattern``, ``format``,
``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, ``multipleOf``, ``anyOf``,
``oneOf`` (exact, for alternatives it can tell apart; see below), ``allOf`` (merged where that is
exact; see below), ``$ref`` to ``#...`` pointers in the same document (``$defs``, ``definitions``,
recursion allowed). ``description``, ``title``, ``default``, ``examples``, ``$schema``, ``$id``,
``$comment``, ``deprecated``, ``readOnly`` and ``writeOnly`` are ignored; any other keyword raises
:class:`SchemaError` naming it.

* With ``properties``, properties are generated in the schema's order, optional ones may be left out,
  and no other property is ever generated (as if ``additionalProperties`` were false, whatever it
  says: the output is valid either way). ``required`` names must be in ``properties``.
* Without ``properties`` an object has free keys; the values follow ``additionalProperties`` (any
  value when absent or true, none when false: only ``{}``). ``required`` without ``properties``
  becomes required properties with the ``additionalProperties`` schema.
* Tuples: item i follows ``prefixItems[i]`` and the items after them ``items`` (draft 2020-12), or
  item i follows ``items[i]`` when ``items`` is a list and the items after them ``additionalItems``
  (drafts 4 to 2019-09; beside a single ``items`` schema ``additionalItems`` has no effect, as those
  drafts say). A rest schema ``false`` ends the array after the prefix; ``minItems``/``maxItems``
  hold as well, and an array stops before the first position that nothing can fill. ``prefixItems``
  with ``additionalItems`` or with a list ``items`` (two drafts mixed) is an error.
* ``enum`` / ``const`` values are written as ``json.dumps(value, ensure_ascii=False)`` writes them with
  ``", "`` and ``": "`` separators; values that do not have the schema's ``type`` (or break its
  length, pattern, format or numeric bounds) are dropped. Object values beside ``properties``/
  ``required``/``additionalProperties``, and array values beside ``items``/``prefixItems``/
  ``additionalItems``, are an error (those keywords are not checked on the values).
* A schema without ``type`` takes the types its keywords imply (``properties`` -> object, ``items``
  -> array, ``minLength``/``pattern``/``format`` -> string, ``minimum``/``multipleOf`` -> number, ...),
  or any value if none does.
* Numbers: ``minimum``/``maximum`` and ``exclusiveMinimum``/``exclusiveMaximum`` (a number, as in
  draft 6 and later, or draft 4's ``true`` beside ``minimum``/``maximum``) and ``multipleOf`` (any
  positive number; exact decimal arithmetic: ``0.1`` is one tenth) hold while the number is written:
  a digit, ``-`` or ``.`` is allowed only if the prefix can still be completed, within the digit
  limits, to a value in range that is a multiple. A prefix's completions are a union of intervals
  (``1`` -> [1, 2) or [10, 20) or [100, 200) ...; ``1.2`` -> [1.2, 1.3)) on the grid of 20 fraction
  digits (of 1 for ``integer``); each interval is tested for a multiple of lcm(grid, ``multipleOf``)
  inside the bounds, in integers. ``minimum`` above ``maximum`` is an error. (The value is exact as
  written; a client that reads numbers as doubles may round a long fraction onto a bound.)
* Strings: ``pattern`` is an ECMA-262 regular expression (:mod:`llama4.inference.regex_dfa` says
  which subset) that, as JSON Schema says, is *not* anchored: the string must contain a match
  (``^``/``$`` anchor it). It is compiled to a DFA over characters, which runs on the characters of
  the string as their UTF-8 bytes or escapes complete; a byte that starts or continues a character
  is allowed only if some character it can still become keeps the DFA able to accept within the
  length bounds (lengths to acceptance are precomputed per DFA state), so every prefix stays
  completable. ``format`` is one of date-time, time, date, duration, email, hostname, ipv4, ipv6,
  uuid, uri and uri-reference, each a whole-string regular expression for a safe subset of the format
  (RFC 3339 dates and times with ``T``/``Z`` upper case, real calendar days including leap years, no
  leap second, at most 9 fraction digits; e-mail as a dot-atom at a host name; host names of at most
  253 characters; IPv6 in every RFC 4291 form without zone; URIs and URI references by the RFC 3986
  grammar, ASCII only, percent-encoding for anything else, an ``IPvFuture`` host's "v" lower case).
  ``pattern`` and ``format`` together must both match (the product DFA).
* ``oneOf`` is exact: a value must match exactly one alternative. The value being generated follows one
  alternative, so this holds when no value an alternative generates can validate against another.
  That is proved per pair at compile time (types, ``const``/``enum`` values checked against the other
  schema, a required property the other lacks or refuses, a required property whose values cannot
  match the other's, disjoint lengths, item counts or numeric ranges, patterns with no common
  string; the other's ``format`` counts through a loose pattern that every valid value matches);
  where it cannot be proved :class:`SchemaError` says which alternatives may overlap (use ``anyOf``
  when several may match).
* ``allOf`` (with the schema's other keywords, and through nested ``allOf`` and ``$ref``) is merged
  into one schema, keyword by keyword: ``type`` lists intersected (``integer`` within ``number``),
  ``enum``/``const`` values intersected, the largest ``minimum``/``exclusiveMinimum``/``minLength``/
  ``minItems`` and the smallest maxima (draft 4's boolean exclusive bounds read as numbers), the least
  common multiple of the ``multipleOf``s, every ``pattern`` matching, ``required`` united. A property's
  schema is all of what each subschema says of it (its ``properties`` entry, else its
  ``additionalProperties``), itself merged when two differ, and properties are written in the order
  the subschemas first name them; ``prefixItems``/``items`` likewise per position. A required
  property that a subschema refuses, two different ``format``s, and ``anyOf``/``oneOf`` inside the
  merged subschemas are errors; subschemas with no type or value in common admit nothing (pruned, as
  below).
* Alternatives that admit no finite value (``false``, a required property that recurses forever, a
  pattern or numeric range nothing satisfies) are pruned, so every allowed prefix can still be
  completed; a schema admitting nothing is an error, naming the first such reason.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import operator
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from decimal import Decimal
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

import torch

from llama4.inference.regex_dfa import DFA, RegexError, compile_search
from llama4.prompt.tokenizer import Tokenizer

MAX_INT_DIGITS = 20
MAX_FRAC_DIGITS = 20
MAX_EXP_DIGITS = 2

IGNORED_KEYWORDS = frozenset({"description", "title", "default", "examples", "$schema", "$id", "$comment",
                              "deprecated", "readOnly", "writeOnly"})
NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
SUPPORTED_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "items", "prefixItems",
                                "additionalItems", "enum", "const", "minItems", "maxItems", "minLength", "maxLength",
                                "pattern", "format", *NUMBER_KEYWORDS, "anyOf", "oneOf", "allOf", "$ref", "$defs",
                                "definitions"})
TYPE_NAMES = ("object", "array", "string", "number", "integer", "boolean", "null")
_IMPLIED_TYPE = {"properties": "object", "required": "object", "additionalProperties": "object",
                 "items": "array", "prefixItems": "array", "additionalItems": "array", "minItems": "array",
                 "maxItems": "array",
                 "minLength": "string", "maxLength": "string", "pattern": "string", "format": "string",
                 **{k: "number" for k in NUMBER_KEYWORDS}}

# ``format`` values as whole-string ECMA-262 patterns, each a safe subset of the format (see the docstring).
_YEAR = r"(?:\d{3}[1-9]|\d{2}[1-9]\d|\d[1-9]\d{2}|[1-9]\d{3})"  # 0001..9999
_LEAP_YEAR = r"(?:\d{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
         rf"|02-(?:0[1-9]|1\d|2[0-8]))|{_LEAP_YEAR}-02-29)")
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,9})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_DUR_TIME = r"T(?:\d+H(?:\d+M(?:\d+S)?)?|\d+M(?:\d+S)?|\d+S)"
_DURATION = rf"P(?:\d+W|(?:\d+Y(?:\d+M(?:\d+D)?)?|\d+M(?:\d+D)?|\d+D)(?:{_DUR_TIME})?|{_DUR_TIME})"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"{_LABEL}(?:\.{_LABEL})*"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"


def _ipv6() -> str:
    """RFC 4291 / RFC 3986 ``IPv6address``: eight groups, "::" for a run of zero groups, or an IPv4 tail."""
    h16, ls32 = "[0-9A-Fa-f]{1,4}", rf"(?:[0-9A-Fa-f]{{1,4}}:[0-9A-Fa-f]{{1,4}}|{_IPV4})"
    forms = [rf"(?:{h16}:){{6}}{ls32}", rf"::(?:{h16}:){{5}}{ls32}"]
    for before in range(0, 7):  # at most `before` groups before "::" (as [ *n( h16 ":" ) h16 ])
        head = f"(?:(?:{h16}:){{0,{before}}}{h16})?" if before else f"(?:{h16})?"
        after = 4 - before
        if after > 0:
            tail = rf"(?:{h16}:){{{after}}}{ls32}" if after > 1 else rf"{h16}:{ls32}"
        else:
            tail = {0: ls32, -1: h16, -2: ""}[after]
        forms.append(rf"{head}::{tail}")
    return "(?:" + "|".join(forms) + ")"


def _uri() -> tuple[str, str]:
    """RFC 3986 ``URI`` and ``URI-reference`` (appendix A), ASCII only, ``IPvFuture``'s "v" lower case.

    ``IPv4address`` is left out of ``host``: every such string is a ``reg-name`` too.
    """
    unreserved, sub_delims, pct = r"A-Za-z0-9\-._~", r"!$&'()*+,;=", r"%[0-9A-Fa-f]{2}"
    pchar = rf"(?:[{unreserved}{sub_delims}:@]|{pct})"
    segment = rf"(?:/{pchar}*)*"
    query = rf"(?:[{unreserved}{sub_delims}:@/?]|{pct})*"
    user_info = rf"(?:[{unreserved}{sub_delims}:]|{pct})*"
    reg_name = rf"(?:[{unreserved}{sub_delims}]|{pct})*"
    ip_future = rf"v[0-9A-Fa-f]+\.[{unreserved}{sub_delims}:]+"
    authority = rf"(?:{user_info}@)?(?:\[(?:{_ipv6()}|{ip_future})\]|{reg_name})(?::[0-9]*)?"
    absolute = rf"/(?:{pchar}+{segment})?"
    tail = rf"(?:\?{query})?(?:#{query})?"
    uri = rf"[A-Za-z][A-Za-z0-9+.\-]*:(?://{authority}{segment}|{absolute}|{pchar}+{segment}|){tail}"
    no_scheme = rf"(?:[{unreserved}{sub_delims}@]|{pct})+{segment}"
    relative = rf"(?://{authority}{segment}|{absolute}|{no_scheme}|){tail}"
    return uri, rf"(?:{uri}|{relative})"


_URI, _URI_REFERENCE = _uri()
FORMATS = {
    "date-time": rf"^{_DATE}T{_TIME}$",
    "time": rf"^{_TIME}$",
    "date": rf"^{_DATE}$",
    "duration": rf"^{_DURATION}$",
    "email": rf"^{_ATOM}(?:\.{_ATOM})*@{_HOSTNAME}$",
    "hostname": rf"^{_HOSTNAME}$",
    "ipv4": rf"^{_IPV4}$",
    "ipv6": rf"^{_ipv6()}$",
    "uuid": r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$",
    "uri": rf"^{_URI}$",
    "uri-reference": rf"^{_URI_REFERENCE}$",
}
_FORMAT_MAX_LENGTH = {"hostname": 253}
# Patterns (searched) that every valid value of a format matches, however loosely a validator reads it:
# what exact oneOf may rely on about *another* alternative's format.
_FORMAT_SUPERSETS = {
    "date-time": r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2})?(?:[.,]\d+)?(?:[Zz]|[+-]\d{2}:?\d{2})?$",
    "time": r"^\d{2}:\d{2}(?::\d{2})?(?:[.,]\d+)?(?:[Zz]|[+-]\d{2}:?\d{2})?$",
    "date": r"^\d{4}-\d{2}-\d{2}$",
    "duration": r"^P",
    "email": r"@",
    "hostname": r"^[A-Za-z0-9_.-]+$",
    "ipv4": r"^[0-9.]+$",
    "ipv6": r"^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%.*)?$",
    "uuid": r"[0-9A-Fa-f]{8}",
    "uri": r"^[A-Za-z][A-Za-z0-9+.-]*:",
}


class SchemaError(ValueError):
    """The JSON schema uses a keyword or value that constrained decoding does not support."""


# ---------------------------------------------------------------------------------------------------
# UTF-8: state 0 is "between characters"; states 1..7 wait for continuation bytes. _U8[u][b] is the
# state after byte b (255: invalid). Surrogates, overlong forms and code points > U+10FFFF are invalid.

_BAD = 255
_CONT_RANGE = {1: (0x80, 0xBF, 0), 2: (0x80, 0xBF, 1), 3: (0x80, 0xBF, 2), 4: (0xA0, 0xBF, 1),
               5: (0x80, 0x9F, 1), 6: (0x90, 0xBF, 2), 7: (0x80, 0x8F, 2)}


def _utf8_table() -> list[bytes]:
    lead = [_BAD] * 256
    for b in range(0x80):
        lead[b] = 0
    for b in range(0xC2, 0xE0):
        lead[b] = 1
    for b in range(0xE1, 0xF0):
        lead[b] = 2
    lead[0xE0], lead[0xED] = 4, 5
    for b in range(0xF1, 0xF4):
        lead[b] = 3
    lead[0xF0], lead[0xF4] = 6, 7
    table = [bytes(lead)]
    for u in range(1, 8):
        lo, hi, nxt = _CONT_RANGE[u]
        table.append(bytes(nxt if lo <= b <= hi else _BAD for b in range(256)))
    return table


_U8 = _utf8_table()
_SPECIAL_ASCII = re.compile(rb'["\\\x00-\x1f]')
_SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")


def _scan_plain(t: bytes, u: int) -> tuple[int, int] | None:
    """Scan ``t`` as string content from UTF-8 state ``u``.

    Returns ``(len(t), chars)`` when all of it is plain content (no quote, backslash or control byte;
    valid UTF-8 so far), ``(pos, chars)`` when a quote or backslash at ``pos`` ends the plain part
    between characters, and None when the token can never continue a string from this state.
    ``chars`` counts the characters started in the plain part.
    """
    if u == 0 and t.isascii():
        m = _SPECIAL_ASCII.search(t)
        if m is None:
            return len(t), len(t)
        pos = m.start()
        return None if t[pos] < 0x20 else (pos, pos)
    chars = 0
    for pos, b in enumerate(t):
        if u == 0:
            if b == 0x22 or b == 0x5C:
                return pos, chars
            if b < 0x20:
                return None
            chars += 1
        u = _U8[u][b]
        if u == _BAD:
            return None
    return len(t), chars


# ---------------------------------------------------------------------------------------------------
# Schema graph. Nodes are compared by identity (frames hold them).


class _Value:
    """A set of alternatives; ``first[b]`` are the alternatives a value starting with byte b can be."""

    __slots__ = ("alts", "first", "path")

    def __init__(self, path: str) -> None:
        self.alts: list[Any] = []
        self.first: list[tuple] = []
        self.path = path


class _Object:
    """An object with fixed properties, written in schema order; optional ones may be skipped."""

    __slots__ = ("props", "key_next", "key_prop", "key_root", "closable_after", "closable_empty")

    def __init__(self, props: list[tuple[str, _Value, bool]]) -> None:
        self.props = props

    def build(self) -> None:
        """Key tries: from property i on, the keys that may come next (up to the first required one)."""
        n = len(self.props)
        self.key_next: list[dict[int, int]] = []
        self.key_prop: list[int] = []
        self.key_root: list[int] = []
        for i in range(n + 1):
            root = self._new_node()
            self.key_root.append(root)
            for j in range(i, n):
                node = root
                for b in json.dumps(self.props[j][0], ensure_ascii=False).encode():
                    node = self.key_next[node].get(b) if b in self.key_next[node] else self._link(node, b)
                self.key_prop[node] = j
                if self.props[j][2]:
                    break
        required = [r for _, _, r in self.props]
        self.closable_after = [not any(required[j + 1:]) for j in range(n)]
        self.closable_empty = not any(required)

    def _new_node(self) -> int:
        self.key_next.append({})
        self.key_prop.append(-1)
        return len(self.key_next) - 1

    def _link(self, node: int, b: int) -> int:
        child = self._new_node()
        self.key_next[node][b] = child
        return child


class _FreeObject:
    """An object with any keys; values follow ``value`` (None: no members, only ``{}``)."""

    __slots__ = ("value",)

    def __init__(self, value: _Value | None) -> None:
        self.value = value


class _Array:
    """An array whose item i follows ``prefix[i]`` (tuple validation), and ``items`` after the prefix."""

    __slots__ = ("prefix", "items", "min_items", "max_items", "cap")

    def __init__(self, items: _Value, min_items: int, max_items: int | None, prefix: Iterable[_Value] = ()) -> None:
        self.items, self.min_items, self.max_items = items, min_items, max_items
        self.prefix = list(prefix)

    def item(self, i: int) -> _Value:
        return self.prefix[i] if i < len(self.prefix) else self.items

    def build(self) -> None:
        # counts are kept up to cap: exact while they decide the bounds or a prefix position
        self.cap = self.max_items if self.max_items is not None else max(self.min_items, len(self.prefix))


class _String:
    """A string with length bounds and, for ``pattern``/``format``, a DFA over its characters."""

    __slots__ = ("min_len", "max_len", "cap", "tracked", "dfa", "empty", "_fine")

    def __init__(self, min_len: int = 0, max_len: int | None = None, dfa: DFA | None = None) -> None:
        self.min_len, self.max_len = min_len, max_len
        self.cap = max_len if max_len is not None else min_len
        self.tracked = max_len is not None or min_len > 0
        self.dfa = dfa
        self.empty: str | None = None  # why no string fits (the node is pruned)
        self._fine: dict[tuple[int, int], bool] = {}

    def fine(self, d: int, count: int) -> bool:
        """From DFA state ``d`` after ``count`` characters (capped at ``cap``) the string can still be
        completed to one the DFA accepts, within the length bounds."""
        if not self.tracked:
            return True  # every DFA state can reach acceptance
        key = (d, count)
        ok = self._fine.get(key)
        if ok is None:
            lo = max(self.min_len - count, 0)
            hi = None if self.max_len is None else self.max_len - count
            ok = (hi is None or hi >= lo) and self.dfa.has_length(d, lo, hi)
            self._fine[key] = ok
        return ok

    def any_fine(self, d: int, lo: int, hi: int, count: int) -> bool:
        """Some character in ``[lo, hi]`` leads from ``d`` to a state that is :meth:`fine` at ``count``."""
        return any(self.fine(t, count) for t in self.dfa.targets(d, lo, hi))

    def matches(self, value: str) -> bool:
        return (self.empty is None and self.min_len <= len(value) and (self.max_len is None or len(value) <= self.max_len)
                and (self.dfa is None or self.dfa.matches(value)))


_NUM_PREFIX = re.compile(rb"(-?)(?:(0|[1-9][0-9]*)(?:(\.)([0-9]*))?)?")


class _NumRange:
    """Bounds and ``multipleOf`` of a number, decided on prefixes of its text (no exponent).

    Values are handled as integers in units of ``1/scale`` (``scale`` clears the denominators of the
    grid of writable values, 10^-MAX_FRAC_DIGITS or 1 for integers, of the bounds and of the multiple).
    """

    def __init__(self, integer: bool, lo: Fraction | None, lo_ex: bool, hi: Fraction | None, hi_ex: bool,
                 multiple: Fraction | None) -> None:
        self.integer = integer
        self.bounds = (lo, lo_ex, hi, hi_ex, multiple)
        unit = 10 ** (0 if integer else MAX_FRAC_DIGITS)
        scale = unit
        for x in (lo, hi, multiple):
            if x is not None:
                scale = math.lcm(scale, x.denominator)
        self.scale = scale
        self.grid = scale // unit  # spacing of the writable values
        self.step = self.grid if multiple is None else math.lcm(self.grid, int(multiple * scale))
        self.lo = None if lo is None else int(lo * scale) + lo_ex  # inclusive, in units
        self.hi = None if hi is None else int(hi * scale) - hi_ex
        self._memo: dict[bytes, bool] = {}

    def _hit(self, a: int, b: int) -> bool:
        """Some multiple of ``step`` in ``[a, b]`` lies within the bounds."""
        if self.lo is not None and self.lo > a:
            a = self.lo
        if self.hi is not None and self.hi < b:
            b = self.hi
        if a > b:
            return False
        return -(-a // self.step) * self.step <= b

    def completable(self, text: bytes) -> bool:
        """``text`` is a prefix of a number in range (within the digit limits)."""
        ok = self._memo.get(text)
        if ok is None:
            ok = self._completable(text)
            if len(self._memo) > 100_000:
                self._memo.clear()
            self._memo[text] = ok
        return ok

    def _completable(self, text: bytes) -> bool:
        m = _NUM_PREFIX.fullmatch(text)
        if m is None:
            return False
        neg, ip, dot, fp = m.groups()
        scale, grid = self.scale, self.grid
        if not text:  # either sign
            return self._completable(b"-") or self._completable(b"0") or any(
                self._completable(bytes((b,))) for b in b"123456789")
        if ip is None:  # "-": any magnitude
            spans: Iterable[tuple[int, int]] = [(0, 10 ** MAX_INT_DIGITS * scale - grid)]
        elif dot is None:
            if len(ip) > MAX_INT_DIGITS:
                return False
            n = int(ip)
            if n == 0:
                spans = [(0, scale - grid)]  # 0 or 0.xxx
            else:  # n, n.xxx, then each further integer digit: [n * 10^r, (n + 1) * 10^r)
                spans = ((n * 10 ** r * scale, (n + 1) * 10 ** r * scale - grid)
                         for r in range(MAX_INT_DIGITS - len(ip) + 1))
        else:
            if self.integer or len(fp) > MAX_FRAC_DIGITS:
                return False
            width = scale // 10 ** len(fp)
            base = int(ip) * scale + (int(fp) * width if fp else 0)
            spans = [(base, base + width - grid)]
        for a, b in spans:
            if neg:
                if self.lo is not None and -a < self.lo:
                    break  # the spans only grow in magnitude
                if self._hit(-b, -a):
                    return True
            else:
                if self.hi is not None and a > self.hi:
                    break
                if self._hit(a, b):
                    return True
        return False

    def accepts(self, text: bytes) -> bool:
        """``text`` is a whole number in range."""
        m = _NUM_PREFIX.fullmatch(text)
        if m is None:
            return False
        neg, ip, dot, fp = m.groups()
        if ip is None or (dot is not None and not fp) or len(ip) > MAX_INT_DIGITS:
            return False
        if dot is not None and (self.integer or len(fp) > MAX_FRAC_DIGITS):
            return False
        x = int(ip) * self.scale + (int(fp) * self.scale // 10 ** len(fp) if fp else 0)
        x = -x if neg else x
        return ((self.lo is None or x >= self.lo) and (self.hi is None or x <= self.hi)
                and x % self.step == 0)

    def contains(self, value: Fraction) -> bool:
        """The exact value is in range and a multiple (for enum/const values, written as they are)."""
        lo, lo_ex, hi, hi_ex, multiple = self.bounds
        return ((lo is None or value > lo or (value == lo and not lo_ex))
                and (hi is None or value < hi or (value == hi and not hi_ex))
                and (multiple is None or (value / multiple).denominator == 1))


class _Number:
    __slots__ = ("integer", "range", "first", "empty")

    def __init__(self, integer: bool, rng: _NumRange | None = None) -> None:
        self.integer = integer
        self.range = rng
        self.empty: str | None = None
        self.first = bytes(b for b in b"-0123456789" if rng is None or rng.completable(bytes((b,))))


class _Literal:
    """A finite set of serialised values (enum, const, true/false/null) as a byte trie."""

    __slots__ = ("literals", "next", "end")

    def __init__(self, literals: Iterable[bytes]) -> None:
        self.literals = list(dict.fromkeys(literals))
        self.next: list[dict[int, int]] = [{}]
        self.end: list[bool] = [False]
        for lit in self.literals:
            node = 0
            for b in lit:
                if b not in self.next[node]:
                    self.next.append({})
                    self.end.append(False)
                    self.next[node][b] = len(self.next) - 1
                node = self.next[node][b]
            self.end[node] = True


def _first_bytes(node: Any) -> Iterable[int]:
    if isinstance(node, (_Object, _FreeObject)):
        return b"{"
    if isinstance(node, _Array):
        return b"["
    if isinstance(node, _String):
        return b'"'
    if isinstance(node, _Number):
        return node.first
    return node.next[0].keys()


def _fraction_lcm(a: Fraction, b: Fraction) -> Fraction:
    """The least positive rational that is a whole multiple of both ``a`` and ``b`` (both positive)."""
    return Fraction(math.lcm(a.numerator, b.numerator), math.gcd(a.denominator, b.denominator))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fraction(value: int | float) -> Fraction:
    return Fraction(Decimal(repr(value))) if isinstance(value, float) else Fraction(value)


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values as JSON Schema has it (1 == 1.0, but true != 1)."""
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_json_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _has_type(value: Any, name: str) -> bool:
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return name == "number" or isinstance(value, int) or value.is_integer()


class _Compiler:
    """JSON schema -> node graph; see the module docstring for the subset."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.memo: dict[int, _Value] = {}
        self.values: list[_Value] = []
        self.one_ofs: list[tuple[str, list, list[_Value]]] = []  # checked once the graph is finished
        self.empty_reasons: list[str] = []
        self.all_of_memo: dict[tuple[int, ...], _Value] = {}  # by the ids of the merged subschemas
        self.made: list[dict] = []  # schemas made while merging: alive, as memo keys hold their ids
        self.any_value = self._new_value("(any value)")
        self.any_value.alts = [_FreeObject(self.any_value), _Array(self.any_value, 0, None), _String(),
                               _Number(False), _Literal([b"true", b"false", b"null"])]

    def _new_value(self, path: str) -> _Value:
        value = _Value(path)
        self.values.append(value)
        return value

    def compile(self) -> _Value:
        top = self.value(self.root, "#")
        self._finish(top)
        self._check_one_ofs()
        return top

    # -- schema dict -> value -----------------------------------------------------------------------

    def value(self, schema: Any, path: str) -> _Value:
        if schema is True:
            return self.any_value
        if schema is False:
            return self._new_value(path)  # no alternatives: pruned, or an error at the top
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object or a boolean, got {type(schema).__name__} at {path}")
        if id(schema) in self.memo:
            return self.memo[id(schema)]
        value = self._new_value(path)
        self.memo[id(schema)] = value  # before the children: recursive $refs come back to it
        value.alts = self._alternatives(schema, path)
        return value

    @staticmethod
    def _keywords(schema: dict) -> list[str]:
        """The keywords of ``schema`` that say something about the value."""
        return [k for k in schema if k not in IGNORED_KEYWORDS and k not in ("$defs", "definitions")]

    def _alternatives(self, schema: dict, path: str) -> list:
        keys = self._keywords(schema)
        for k in keys:
            if k not in SUPPORTED_KEYWORDS:
                raise SchemaError(f"unsupported JSON-schema keyword {k!r} at {path}")
        for k in ("$defs", "definitions"):
            if k in schema and not isinstance(schema[k], dict):
                raise SchemaError(f"{k!r} must be an object at {path}")
        if not keys:
            return [self.any_value]
        for combinator in ("$ref", "allOf", "anyOf", "oneOf"):
            if combinator in schema:
                if combinator == "allOf":
                    return self._all_of(schema, path)
                others = [k for k in keys if k != combinator]
                if others:
                    raise SchemaError(f"{combinator!r} together with {others[0]!r} is not supported at {path}")
                return self._combinator(combinator, schema[combinator], path)
        if "enum" in schema or "const" in schema:
            return [self._literal(schema, path)]
        types = schema.get("type")
        if types is None:
            implied = {_IMPLIED_TYPE[k] for k in keys if k in _IMPLIED_TYPE}
            types = [t for t in TYPE_NAMES if t in implied] or list(TYPE_NAMES)
        types = self._type_list(types, path)
        if "number" in types and "integer" in types:
            types.remove("integer")
        return [self._typed(schema, t, path) for t in types]

    def _combinator(self, keyword: str, arg: Any, path: str) -> list:
        if keyword == "$ref":
            return [self.value(self._resolve(arg, path), str(arg))]
        if not isinstance(arg, list) or not arg:
            raise SchemaError(f"{keyword!r} must be a non-empty list of schemas at {path}")
        values = [self.value(s, f"{path}/{keyword}/{i}") for i, s in enumerate(arg)]
        if keyword == "oneOf" and len(arg) > 1:
            self.one_ofs.append((path, arg, values))
        return values

    # -- allOf: the subschemas merged into one -----------------------------------------------------

    def _all_of(self, schema: dict, path: str) -> list:
        """``schema``'s ``allOf`` and its other keywords, merged into one schema (see the module docstring)."""
        parts: list[tuple[dict, str]] = []
        if not self._flatten(schema, path, path, parts, set(), set()):
            self.empty_reasons.append(f"a subschema of 'allOf' at {path} is false")
            return []
        if not parts:
            return [self.any_value]
        if len(parts) == 1 and "allOf" not in parts[0][0]:
            return [self.value(*parts[0])]
        for s, p in parts:
            for k in ("anyOf", "oneOf"):
                if k in s:
                    raise SchemaError(f"{k!r} at {p} cannot be merged into the 'allOf' at {path}: only subschemas "
                                      "of plain keywords are merged (write the shared keywords into each alternative)")
        key = tuple(sorted(id(s) for s, _ in parts))
        value = self.all_of_memo.get(key)
        if value is None:
            value = self.all_of_memo[key] = self._new_value(path)  # before merging: recursion comes back to it
            merged = self._merge(parts, path)
            value.alts = [] if merged is None else self._alternatives(merged, path)
        return [value]

    def _flatten(self, schema: Any, path: str, owner: str, parts: list[tuple[dict, str]], seen: set[int],
                 open_: set[int]) -> bool:
        """Append to ``parts`` the schemas whose own keywords (all but ``allOf``) ``schema`` is the conjunction
        of, through ``allOf`` and ``$ref``; False if one of them is ``false``. ``open_`` holds the schemas
        being flattened: meeting one again is a conjunction that contains itself, which no validator can
        finish."""
        if schema is True:
            return True
        if schema is False:
            return False
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object or a boolean, got {type(schema).__name__} at {path}")
        if id(schema) in open_:
            raise SchemaError(f"'allOf' at {owner} contains itself through {path}")
        if id(schema) in seen:
            return True
        seen.add(id(schema))
        keys = self._keywords(schema)
        for k in keys:
            if k not in SUPPORTED_KEYWORDS:
                raise SchemaError(f"unsupported JSON-schema keyword {k!r} at {path}")
        if "$ref" in keys:
            others = [k for k in keys if k != "$ref"]
            if others:
                raise SchemaError(f"'$ref' together with {others[0]!r} is not supported at {path}")
        if any(k not in ("$ref", "allOf") for k in keys):
            parts.append((schema, path))  # its keywords besides 'allOf' (which _merge does not read)
        open_.add(id(schema))
        try:
            if "$ref" in keys:
                return self._flatten(self._resolve(schema["$ref"], path), str(schema["$ref"]), owner, parts, seen,
                                     open_)
            if "allOf" in keys:
                subs = schema["allOf"]
                if not isinstance(subs, list) or not subs:
                    raise SchemaError(f"'allOf' must be a non-empty list of schemas at {path}")
                return all(self._flatten(s, f"{path}/allOf/{i}", owner, parts, seen, open_)
                           for i, s in enumerate(subs))
            return True
        finally:
            open_.discard(id(schema))

    def _conjunction(self, schemas: list) -> Any:
        """A schema meaning all of ``schemas``: one of them where the others are true or the same JSON, else
        a new ``allOf`` of them (merged in turn when it is compiled)."""
        kept, seen = [], set()
        for s in schemas:
            if s is False:
                return False
            if s is True or (isinstance(s, dict) and not self._keywords(s)):
                continue
            try:
                key: Any = json.dumps(s, sort_keys=True)
            except (TypeError, ValueError):
                key = id(s)
            if key not in seen:
                seen.add(key)
                kept.append(s)
        if len(kept) < 2:
            return kept[0] if kept else True
        made = {"allOf": kept}
        self.made.append(made)
        return made

    def _merge(self, parts: list[tuple[dict, str]], path: str) -> dict | None:
        """One schema with the keywords of all of ``parts``, the same keyword in several intersected; None
        (with the reason recorded) when no value can match them all."""

        def present(keyword: str) -> list[tuple[Any, str]]:
            return [(s[keyword], p) for s, p in parts if keyword in s]

        out: dict[str, Any] = {}
        type_sets = [set(self._type_list(t, p)) for t, p in present("type")]
        if type_sets:
            types = [t for t in TYPE_NAMES if all(t in ts or (t == "integer" and "number" in ts) for ts in type_sets)]
            if not types:
                self.empty_reasons.append(f"the subschemas of 'allOf' at {path} have no type in common")
                return None
            out["type"] = types
        literal_sets = [[v] for v, _ in present("const")]
        for v, p in present("enum"):
            if not isinstance(v, list) or not v:
                raise SchemaError(f"'enum' must be a non-empty list at {p}")
            literal_sets.append(v)
        if literal_sets:
            values = [v for v in literal_sets[0] if all(any(_json_equal(v, w) for w in other)
                                                        for other in literal_sets[1:])]
            if not values:
                self.empty_reasons.append(f"the 'enum'/'const' values of the subschemas of 'allOf' at {path} have "
                                          "none in common")
                return None
            out["enum"] = values
        self._merge_numbers(parts, out)
        for keyword, pick in (("minLength", max), ("maxLength", min), ("minItems", max), ("maxItems", min)):
            counts = [c for s, p in parts if (c := self._count(s, keyword, p)) is not None]
            if counts:
                out[keyword] = pick(counts)
        patterns = []
        for v, p in present("pattern"):
            if not isinstance(v, str):
                raise SchemaError(f"'pattern' must be a string, got {v!r} at {p}")
            patterns.append(v)
        patterns = list(dict.fromkeys(patterns))
        if patterns:
            out["pattern"] = patterns[0] if len(patterns) == 1 else tuple(patterns)  # all must match
        formats = []
        for v, p in present("format"):
            if v not in FORMATS:
                raise SchemaError(f"unsupported 'format' {v!r} at {p} (supported: {', '.join(FORMATS)})")
            formats.append(v)
        formats = list(dict.fromkeys(formats))
        if len(formats) > 1:
            raise SchemaError(f"'allOf' at {path}: 'format' {formats[0]!r} and 'format' {formats[1]!r} cannot be "
                              "merged (a string has at most one 'format')")
        if formats:
            out["format"] = formats[0]
        if any(k in s for s, _ in parts for k in ("properties", "required", "additionalProperties")):
            self._merge_object(parts, path, out)
        if any(k in s for s, _ in parts for k in ("items", "prefixItems", "additionalItems")):
            forms = [self._tuple(s, p) for s, p in parts]
            prefix = [self._conjunction([f[0][i] if i < len(f[0]) else f[2] for f in forms])
                      for i in range(max(len(f[0]) for f in forms))]
            rest = self._conjunction([f[2] for f in forms])
            if prefix:
                out["prefixItems"] = prefix
            if rest is not True:
                out["items"] = rest
        return out

    def _merge_numbers(self, parts: list[tuple[dict, str]], out: dict) -> None:
        """The largest lower and smallest upper bounds (draft 4's boolean exclusive bounds read as draft 6's
        numbers), and the least common multiple of the ``multipleOf``s, into ``out``."""
        bounds: dict[str, list[tuple[Fraction, Any]]] = {k: [] for k in NUMBER_KEYWORDS}
        for s, p in parts:
            for plain, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
                bound, flag = self._number_value(s, plain, p), s.get(exclusive)
                if isinstance(flag, bool):
                    if flag and bound is None:
                        raise SchemaError(f"{exclusive!r}: true needs {plain!r} (draft 4 form) at {p}")
                    if bound is not None:
                        bounds[exclusive if flag else plain].append((bound, s[plain]))
                else:
                    if bound is not None:
                        bounds[plain].append((bound, s[plain]))
                    if flag is not None:
                        bounds[exclusive].append((self._number_value(s, exclusive, p), flag))
            multiple = self._number_value(s, "multipleOf", p)
            if multiple is not None:
                if multiple <= 0:
                    raise SchemaError(f"'multipleOf' must be a positive number, got {s['multipleOf']!r} at {p}")
                bounds["multipleOf"].append((multiple, s["multipleOf"]))
        for keyword, found in bounds.items():
            if not found:
                continue
            if keyword == "multipleOf":
                lcm = functools.reduce(_fraction_lcm, (m for m, _ in found))
                out[keyword] = next((written for m, written in found if m == lcm), lcm)
            else:
                pick = max if keyword in ("minimum", "exclusiveMinimum") else min
                out[keyword] = pick(found, key=operator.itemgetter(0))[1]

    def _merge_object(self, parts: list[tuple[dict, str]], path: str, out: dict) -> None:
        """Each property's schema is the conjunction of what every part says of it (its ``properties``
        entry, else its ``additionalProperties``); ``required`` is the union."""
        for s, p in parts:
            if not isinstance(s.get("properties", {}), dict):
                raise SchemaError(f"'properties' must be an object at {p}")
            required = s.get("required", [])
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise SchemaError(f"'required' must be a list of property names at {p}")

        def member(s: dict, name: str) -> Any:
            props = s.get("properties", {})
            return props[name] if name in props else s.get("additionalProperties", True)

        names = list(dict.fromkeys(n for s, _ in parts for n in s.get("properties", {})))
        if any("properties" in s for s, _ in parts):
            out["properties"] = {n: self._conjunction([member(s, n) for s, _ in parts]) for n in names}
        extra = self._conjunction([s.get("additionalProperties", True) for s, _ in parts])
        if extra is not True:
            out["additionalProperties"] = extra
        required = list(dict.fromkeys(r for s, _ in parts for r in s.get("required", [])))
        if required:
            out["required"] = required
        for name in required:
            refusing = [p for s, p in parts if member(s, name) is False]
            if refusing:
                asking = next(p for s, p in parts if name in s.get("required", []))
                raise SchemaError(f"'allOf' at {path}: property {name!r}, required at {asking}, is refused at "
                                  f"{refusing[0]} ('additionalProperties': false or a false schema)")

    def _resolve(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"only local '$ref's ('#/...') are supported, got {ref!r} at {path}")
        target = self.root
        pointer = ref[1:]
        if pointer and not pointer.startswith("/"):
            raise SchemaError(f"'$ref' {ref!r} is not a JSON pointer ('#/$defs/name') at {path}")
        for part in pointer.split("/")[1:] if pointer else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise SchemaError(f"'$ref' {ref!r} does not resolve (no {part!r}) at {path}")
        return target

    @staticmethod
    def _type_list(types: Any, path: str) -> list[str]:
        names = [types] if isinstance(types, str) else types
        if not isinstance(names, list) or not names or not all(isinstance(t, str) for t in names):
            raise SchemaError(f"'type' must be a type name or a non-empty list of them, got {types!r} at {path}")
        for t in names:
            if t not in TYPE_NAMES:
                raise SchemaError(f"unknown type {t!r} at {path} (expected one of {', '.join(TYPE_NAMES)})")
        return list(dict.fromkeys(names))

    @staticmethod
    def _count(schema: dict, keyword: str, path: str) -> int | None:
        v = schema.get(keyword)
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SchemaError(f"{keyword!r} must be a non-negative integer, got {v!r} at {path}")
        return v

    def _bounds(self, schema: dict, low: str, high: str, path: str) -> tuple[int, int | None]:
        lo, hi = self._count(schema, low, path) or 0, self._count(schema, high, path)
        if hi is not None and lo > hi:
            raise SchemaError(f"{low!r} ({lo}) is larger than {high!r} ({hi}) at {path}")
        return lo, hi

    # -- numbers and strings -------------------------------------------------------------------------

    @staticmethod
    def _number_value(schema: dict, keyword: str, path: str) -> Fraction | None:
        v = schema.get(keyword)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float, Decimal, Fraction)) or (
                isinstance(v, float) and not math.isfinite(v)):
            raise SchemaError(f"{keyword!r} must be a number, got {v!r} at {path}")
        # a float is the number its JSON text wrote: 0.1 is one tenth, not the nearest double
        return Fraction(Decimal(repr(v))) if isinstance(v, float) else Fraction(v)

    def _number_range(self, schema: dict, integer: bool, path: str) -> _NumRange | None:
        """The schema's numeric bounds and multipleOf (None when it has none)."""
        if not any(k in schema for k in NUMBER_KEYWORDS):
            return None
        sides = []
        for plain, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            bound, ex, name = self._number_value(schema, plain, path), False, plain
            flag = schema.get(exclusive)
            if isinstance(flag, bool):  # draft 4: a flag on minimum / maximum
                if flag and bound is None:
                    raise SchemaError(f"{exclusive!r}: true needs {plain!r} (draft 4 form) at {path}")
                ex = flag
            elif flag is not None:
                other = self._number_value(schema, exclusive, path)
                stricter = bound is None or (other >= bound if plain == "minimum" else other <= bound)
                if stricter:
                    bound, ex, name = other, True, exclusive
            sides.append((bound, ex, name))
        (lo, lo_ex, lo_name), (hi, hi_ex, hi_name) = sides
        if lo is not None and hi is not None:
            if lo > hi:
                raise SchemaError(f"{lo_name!r} ({schema[lo_name]}) is larger than {hi_name!r} ({schema[hi_name]}) "
                                  f"at {path}")
            if lo == hi and (lo_ex or hi_ex):
                raise SchemaError(f"{lo_name!r} and {hi_name!r} ({schema[lo_name]}) leave no number between them "
                                  f"at {path}")
        multiple = self._number_value(schema, "multipleOf", path)
        if multiple is not None and multiple <= 0:
            raise SchemaError(f"'multipleOf' must be a positive number, got {schema['multipleOf']!r} at {path}")
        return _NumRange(integer, lo, lo_ex, hi, hi_ex, multiple)

    def _number(self, schema: dict, integer: bool, path: str) -> _Number:
        node = _Number(integer, self._number_range(schema, integer, path))
        if node.range is not None and not node.range.completable(b""):
            kind = "integer" if integer else "number"
            self._empty(node, f"no {kind} within the bounds is a multiple of 'multipleOf' or can be written with at "
                              f"most {MAX_INT_DIGITS} integer and {MAX_FRAC_DIGITS} fraction digits at {path}")
        return node

    def _string(self, schema: dict, path: str) -> _String:
        lo, hi = self._bounds(schema, "minLength", "maxLength", path)
        dfa: DFA | None = None
        empty = None
        if "pattern" in schema:
            pattern = schema["pattern"]  # a tuple of them (all must match) from a merged allOf
            for one in pattern if isinstance(pattern, tuple) else (pattern,):
                if not isinstance(one, str):
                    raise SchemaError(f"'pattern' must be a string, got {one!r} at {path}")
                try:
                    compile_search(one)
                except RegexError as e:
                    raise SchemaError(f"'pattern' {one!r} is not supported at {path}: {e}") from None
            try:
                dfa = _pattern_dfa(pattern)
            except RegexError as e:
                raise SchemaError(f"'pattern's {pattern!r} together at {path}: {e}") from None
            if dfa is None:
                empty = f"'pattern' {pattern!r} matches no string at {path}"
        if "format" in schema:
            fmt = schema["format"]
            if fmt not in FORMATS:
                raise SchemaError(f"unsupported 'format' {fmt!r} at {path} (supported: {', '.join(FORMATS)})")
            if fmt in _FORMAT_MAX_LENGTH:
                hi = _FORMAT_MAX_LENGTH[fmt] if hi is None else min(hi, _FORMAT_MAX_LENGTH[fmt])
            if empty is None:
                try:
                    dfa = _string_dfa(schema.get("pattern"), fmt)
                except RegexError as e:
                    raise SchemaError(f"'pattern' with 'format' {fmt!r} at {path}: {e}") from None
                if dfa is None:
                    empty = f"no string matches both 'pattern' and 'format' {fmt!r} at {path}"
        node = _String(lo, hi, dfa)
        if empty is None and dfa is not None:
            try:
                fits = node.fine(0, 0)
            except RegexError as e:
                raise SchemaError(f"'pattern'/'format' at {path}: {e}") from None
            if not fits:
                empty = f"no string of {lo} to {'any number of' if hi is None else hi} characters matches at {path}"
        if empty is not None:
            self._empty(node, empty)
        return node

    def _empty(self, node: Any, reason: str) -> None:
        node.empty = reason
        self.empty_reasons.append(reason)

    def _typed(self, schema: dict, t: str, path: str) -> Any:
        if t == "string":
            return self._string(schema, path)
        if t in ("number", "integer"):
            return self._number(schema, t == "integer", path)
        if t == "boolean":
            return _Literal([b"true", b"false"])
        if t == "null":
            return _Literal([b"null"])
        if t == "array":
            return self._array(schema, path)
        return self._object(schema, path)

    @staticmethod
    def _tuple(schema: dict, path: str) -> tuple[list, str, Any, str]:
        """``(prefix schemas, their keyword, schema of the items after them, its keyword)``.

        Draft 2020-12 writes ``prefixItems`` and ``items`` for the rest; drafts 4 to 2019-09 write ``items`` as
        a list and ``additionalItems`` for the rest. ``additionalItems`` beside a single ``items`` schema has
        no effect in any draft, and is ignored.
        """
        items = schema.get("items", True)
        if "prefixItems" in schema:
            prefix = schema["prefixItems"]
            if not isinstance(prefix, list) or not prefix:
                raise SchemaError(f"'prefixItems' must be a non-empty list of schemas at {path}")
            if isinstance(items, list):
                raise SchemaError(f"'items' as a list together with 'prefixItems' at {path}: with 'prefixItems' "
                                  "(draft 2020-12), 'items' is the one schema of the items after the prefix")
            if "additionalItems" in schema:
                raise SchemaError(f"'additionalItems' together with 'prefixItems' at {path}: with 'prefixItems' "
                                  "(draft 2020-12), 'items' is the schema of the items after the prefix")
            return prefix, "prefixItems", items, "items"
        if isinstance(items, list):
            return items, "items", schema.get("additionalItems", True), "additionalItems"
        return [], "items", items, "items"

    def _array(self, schema: dict, path: str) -> _Array:
        prefix, prefix_key, rest, rest_key = self._tuple(schema, path)
        lo, hi = self._bounds(schema, "minItems", "maxItems", path)
        if rest is False and lo > len(prefix):
            self.empty_reasons.append(f"'minItems' ({lo}) asks for more than the {len(prefix)} items that "
                                      f"{prefix_key!r} and {rest_key!r}: false allow at {path}")
        values = [self.value(s, f"{path}/{prefix_key}/{i}") for i, s in enumerate(prefix)]
        return _Array(self.value(rest, f"{path}/{rest_key}"), lo, hi, values)

    def _object(self, schema: dict, path: str) -> Any:
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"'required' must be a list of property names at {path}")
        extra = schema.get("additionalProperties", True)
        props = schema.get("properties")
        if props is None:
            if not required:
                return _FreeObject(None if extra is False else self.value(extra, f"{path}/additionalProperties"))
            if extra is False:
                raise SchemaError(f"'required' properties {required} cannot appear: no 'properties' and "
                                  f"additionalProperties false at {path}")
            props = {name: extra for name in required}
        if not isinstance(props, dict):
            raise SchemaError(f"'properties' must be an object at {path}")
        for name in required:
            if name not in props:
                raise SchemaError(f"required property {name!r} is not in 'properties' at {path} "
                                  "(properties not listed are never generated)")
        needed = set(required)
        return _Object([(name, self.value(s, f"{path}/properties/{name}"), name in needed)
                        for name, s in props.items()])

    def _literal(self, schema: dict, path: str) -> _Literal:
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"'enum' must be a non-empty list at {path}")
        else:
            values = []
        if "const" in schema:
            values = [schema["const"]] if "enum" not in schema or self._contains(values, schema["const"]) else []
        if "type" in schema:
            types = self._type_list(schema["type"], path)
            values = [v for v in values if any(_has_type(v, t) for t in types)]
        lo, hi = self._bounds(schema, "minLength", "maxLength", path)
        values = [v for v in values if not isinstance(v, str) or (lo <= len(v) and (hi is None or len(v) <= hi))]
        lo, hi = self._bounds(schema, "minItems", "maxItems", path)
        values = [v for v in values if not isinstance(v, list) or (lo <= len(v) and (hi is None or len(v) <= hi))]
        if any(isinstance(v, str) for v in values) and ("pattern" in schema or "format" in schema):
            string = self._string(schema, path)
            values = [v for v in values if not isinstance(v, str) or string.matches(v)]
        rng = self._number_range(schema, False, path)
        if rng is not None:
            values = [v for v in values if not _is_number(v) or rng.contains(_fraction(v))]
        if not values:
            raise SchemaError(f"no value of 'enum'/'const' satisfies the rest of the schema at {path}")
        for kind, name, keywords in ((dict, "object", ("properties", "required", "additionalProperties")),
                                     (list, "array", ("items", "prefixItems", "additionalItems"))):
            beside = [k for k in keywords if k in schema]  # not checked on the values: refused, not ignored
            if beside and any(isinstance(v, kind) for v in values):
                raise SchemaError(f"'enum'/'const' with {name} values together with {beside[0]!r} is not supported "
                                  f"at {path}")
        out = []
        for v in values:
            try:
                out.append(json.dumps(v, ensure_ascii=False, allow_nan=False, separators=(", ", ": ")).encode())
            except (TypeError, ValueError) as e:
                raise SchemaError(f"'enum'/'const' value {v!r} is not JSON ({e}) at {path}") from None
        return _Literal(out)

    @staticmethod
    def _contains(values: list, v: Any) -> bool:
        key = json.dumps(v, sort_keys=True)
        return any(json.dumps(x, sort_keys=True) == key for x in values)

    # -- exact oneOf ---------------------------------------------------------------------------------

    def _check_one_ofs(self) -> None:
        """Each oneOf alternative's values must never validate against another alternative."""
        check = _Exclusion(self)
        for path, schemas, values in self.one_ofs:
            for i, value in enumerate(values):
                for j, other in enumerate(schemas):
                    if i != j and value.alts and not check.value(value, other):
                        raise SchemaError(
                            f"'oneOf' at {path}: a value of alternative {i} may also match alternative {j}, and a "
                            "value must match exactly one; exact 'oneOf' is supported for alternatives told apart by "
                            "type, const/enum, a required property (or its value), length, item count, numeric range "
                            "or pattern. Use 'anyOf' if a value may match several")

    # -- flatten, prune, index -----------------------------------------------------------------------

    def _flat(self, value: _Value, visiting: set[int]) -> list:
        visiting.add(id(value))
        out = []
        for alt in value.alts:
            if isinstance(alt, _Value):
                if id(alt) not in visiting:  # a cycle of bare references adds nothing
                    out.extend(self._flat(alt, visiting))
            else:
                out.append(alt)
        visiting.discard(id(value))
        return list({id(a): a for a in out}.values())

    def _finish(self, top: _Value) -> None:
        flat = {id(v): self._flat(v, set()) for v in self.values}
        for v in self.values:
            v.alts = flat[id(v)]
        nodes = {id(a): a for v in self.values for a in v.alts}
        # Which nodes admit a finite value: a least fixed point.
        ground: set[int] = {i for i, a in nodes.items() if isinstance(a, (_String, _Number, _Literal, _FreeObject))
                            and getattr(a, "empty", None) is None}

        def value_ok(v: _Value) -> bool:
            return any(id(a) in ground for a in v.alts)

        changed = True
        while changed:
            changed = False
            for i, a in nodes.items():
                if i in ground:
                    continue
                if (isinstance(a, _Array) and all(value_ok(a.item(k))
                                                  for k in range(min(a.min_items, len(a.prefix) + 1)))) or (
                        isinstance(a, _Object) and all(value_ok(v) for _, v, r in a.props if r)):
                    ground.add(i)
                    changed = True
        if not value_ok(top):
            why = f": {self.empty_reasons[0]}" if self.empty_reasons else ""
            raise SchemaError(f"the schema admits no (finite) JSON value{why}")
        for v in self.values:
            v.alts = [a for a in v.alts if id(a) in ground]
            first: list[list] = [[] for _ in range(256)]
            for a in v.alts:
                for b in _first_bytes(a):
                    first[b].append(a)
            v.first = [tuple(x) for x in first]
        for a in nodes.values():
            if isinstance(a, _Object):
                a.props = [p for p in a.props if p[2] or value_ok(p[1])]
                a.build()
            elif isinstance(a, _Array):
                # the items stop before the first position nothing can fill
                stop = next((k for k in range(len(a.prefix) + 1) if not value_ok(a.item(k))), None)
                if stop is not None and (a.max_items is None or stop < a.max_items):
                    a.max_items = stop
                a.build()


@functools.lru_cache(maxsize=256)
def _pattern_dfa(pattern: str | tuple[str, ...]) -> DFA | None:
    """The DFA of ``pattern``, or of all of a tuple of patterns matching; cached, as compile_search is."""
    if isinstance(pattern, str):
        return compile_search(pattern)
    dfa = compile_search(pattern[0])
    for other in pattern[1:]:
        if dfa is None:
            break
        more = compile_search(other)
        dfa = None if more is None else dfa.intersect(more)
    return dfa


@functools.lru_cache(maxsize=256)
def _string_dfa(pattern: str | tuple[str, ...] | None, fmt: str) -> DFA | None:
    """The DFA of ``format`` ``fmt`` and (if given) ``pattern`` both matching; cached, as compile_search is."""
    dfa = compile_search(FORMATS[fmt])
    if pattern is None:
        return dfa
    other = _pattern_dfa(pattern)
    return None if other is None else other.intersect(dfa)


class _Exclusion:
    """Proofs that no value a compiled node generates is valid against a schema (JSON Schema semantics).

    Conservative: False means "could not prove it". The generated side is exact (the node graph says
    what the recogniser writes); the schema side is read with its full meaning, ``format`` as an
    assertion but through a loose pattern every valid value matches (``_FORMAT_SUPERSETS``), so that a
    validator's stricter or looser reading of a format cannot make two alternatives match.
    """

    def __init__(self, compiler: _Compiler) -> None:
        self.compiler = compiler
        self.busy: set[tuple[int, int]] = set()

    def value(self, value: _Value, schema: Any) -> bool:
        return all(self.node(a, schema) for a in value.alts)

    def node(self, a: Any, schema: Any) -> bool:
        if schema is False:
            return True
        if not isinstance(schema, dict):
            return False
        key = (id(a), id(schema))
        if key in self.busy:
            return False  # a recursion: assume they may overlap
        self.busy.add(key)
        try:
            return self._node(a, schema)
        finally:
            self.busy.discard(key)

    def _resolve(self, ref: Any) -> Any:
        try:
            return self.compiler._resolve(ref, "#")
        except SchemaError:
            return True

    def _node(self, a: Any, y: dict) -> bool:
        if "$ref" in y and self.node(a, self._resolve(y["$ref"])):
            return True
        if any(self.node(a, s) for s in y.get("allOf", [])):
            return True
        for k in ("anyOf", "oneOf"):
            if isinstance(y.get(k), list) and y[k] and all(self.node(a, s) for s in y[k]):
                return True
        if isinstance(a, _Literal):
            return not any(self.may_validate(json.loads(lit), y, 0) for lit in a.literals)
        kind = ("object" if isinstance(a, (_Object, _FreeObject)) else "array" if isinstance(a, _Array)
                else "string" if isinstance(a, _String) else "number")
        types = y.get("type")
        if types is not None:
            names = {types} if isinstance(types, str) else set(types)
            if not (kind in names or (kind == "number" and "integer" in names)):
                return True
        if "enum" in y or "const" in y:
            values = list(y.get("enum", [])) + ([y["const"]] if "const" in y else [])
            if not any(self._may_generate(a, v) for v in values):
                return True
        if kind == "object":
            return self._object(a, y)
        if kind == "array":
            return self._array(a, y)
        if kind == "string":
            return self._string(a, y)
        return self._number(a, y)

    @staticmethod
    def _may_generate(a: Any, v: Any) -> bool:
        if isinstance(a, (_Object, _FreeObject)):
            return isinstance(v, dict)
        if isinstance(a, _Array):
            return isinstance(v, list)
        if isinstance(a, _String):
            return isinstance(v, str) and a.matches(v)
        if not _is_number(v) or (a.integer and not float(v).is_integer()):
            return False
        return a.range is None or a.range.contains(_fraction(v))

    def _object(self, a: Any, y: dict) -> bool:
        required = y.get("required", [])
        if isinstance(a, _FreeObject):
            return a.value is None and bool(required)  # only {} is generated
        names = {name: value for name, value, _ in a.props}
        if any(r not in names for r in required):
            return True
        props = y.get("properties", {})
        for name, value, needed in a.props:
            if needed:
                sub = props[name] if name in props else y.get("additionalProperties", True)
                if sub is False or self.value(value, sub):
                    return True
        return False

    @staticmethod
    def _count(y: dict, keyword: str) -> int | None:
        v = y.get(keyword)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def _array(self, a: _Array, y: dict) -> bool:
        lo, hi = self._count(y, "minItems") or 0, self._count(y, "maxItems")
        if (a.max_items is not None and lo > a.max_items) or (hi is not None and a.min_items > hi):
            return True
        y_prefix = y.get("prefixItems", y.get("items"))
        positions = max(len(a.prefix), len(y_prefix) if isinstance(y_prefix, list) else 0) + 1
        return any(self.value(a.item(i), self._item_schema(y, i)) for i in range(min(a.min_items, positions)))

    @staticmethod
    def _item_schema(y: dict, i: int) -> Any:
        """The schema ``y`` gives item ``i`` of an array (true where its keywords are ambiguous)."""
        prefix, items = y.get("prefixItems"), y.get("items", True)
        if isinstance(prefix, list):
            return True if isinstance(items, list) else prefix[i] if i < len(prefix) else items
        if isinstance(items, list):
            return items[i] if i < len(items) else y.get("additionalItems", True)
        return items

    def _string(self, a: _String, y: dict) -> bool:
        lo = max(self._count(y, "minLength") or 0, a.min_len)
        highs = [h for h in (self._count(y, "maxLength"), a.max_len) if h is not None]
        hi = min(highs) if highs else None
        if hi is not None and lo > hi:
            return True
        dfa = a.dfa
        for other in self._string_patterns(y):
            try:
                other_dfa = compile_search(other)
                dfa = other_dfa if dfa is None or other_dfa is None else dfa.intersect(other_dfa)
            except RegexError:
                return False
            if other_dfa is None or dfa is None:
                return True
        try:
            return dfa is not None and not dfa.has_length(0, lo, hi)
        except RegexError:
            return False

    @staticmethod
    def _string_patterns(y: dict) -> list[str]:
        """What ``y`` asks of a string's characters: its pattern, and a loose reading of its format."""
        out = [y["pattern"]] if isinstance(y.get("pattern"), str) else []
        if y.get("format") in _FORMAT_SUPERSETS:
            out.append(_FORMAT_SUPERSETS[y["format"]])
        return out

    def _number(self, a: _Number, y: dict) -> bool:
        try:
            other = self.compiler._number_range(y, False, "#")
        except SchemaError:
            return False
        if other is None or a.range is None:
            return False
        lo1, lo1_ex, hi1, hi1_ex, _ = a.range.bounds
        lo2, lo2_ex, hi2, hi2_ex, _ = other.bounds

        def below(hi: Fraction | None, hi_ex: bool, lo: Fraction | None, lo_ex: bool) -> bool:
            return hi is not None and lo is not None and (hi < lo or (hi == lo and (hi_ex or lo_ex)))

        return below(hi1, hi1_ex, lo2, lo2_ex) or below(hi2, hi2_ex, lo1, lo1_ex)

    def may_validate(self, v: Any, y: Any, depth: int) -> bool:
        """False only if ``v`` is certainly not valid against ``y``."""
        if y is False:
            return False
        if not isinstance(y, dict) or depth > 64:
            return True
        ok = functools.partial(self.may_validate, depth=depth + 1)
        if "$ref" in y and not ok(v, self._resolve(y["$ref"])):
            return False
        if not all(ok(v, s) for s in y.get("allOf", [])):
            return False
        for k in ("anyOf", "oneOf"):
            if isinstance(y.get(k), list) and y[k] and not any(ok(v, s) for s in y[k]):
                return False
        types = y.get("type")
        if types is not None and not any(_has_type(v, t) for t in ([types] if isinstance(types, str) else types)):
            return False
        if "enum" in y and not any(_json_equal(v, e) for e in y["enum"]):
            return False
        if "const" in y and not _json_equal(v, y["const"]):
            return False
        if isinstance(v, str):
            lo, hi = self._count(y, "minLength"), self._count(y, "maxLength")
            if (lo is not None and len(v) < lo) or (hi is not None and len(v) > hi):
                return False
            for pattern in self._string_patterns(y):
                try:
                    dfa = compile_search(pattern)
                except RegexError:
                    return True
                if dfa is None or not dfa.matches(v):
                    return False
        elif _is_number(v):
            try:
                rng = self.compiler._number_range(y, False, "#")
            except SchemaError:
                return True
            return rng is None or rng.contains(_fraction(v))
        elif isinstance(v, list):
            lo, hi = self._count(y, "minItems"), self._count(y, "maxItems")
            if (lo is not None and len(v) < lo) or (hi is not None and len(v) > hi):
                return False
            return all(ok(x, self._item_schema(y, i)) for i, x in enumerate(v))
        elif isinstance(v, dict):
            if any(r not in v for r in y.get("required", [])):
                return False
            props = y.get("properties", {})
            return all(ok(x, props[k] if k in props else y.get("additionalProperties", True)) for k, x in v.items())
        return True


# ---------------------------------------------------------------------------------------------------
# Recogniser. Frames are tuples whose first item is the kind; a stack is (frame, parent stack).

_V, _OBJ, _FOBJ, _ARR, _STR, _NUM, _LIT, _DONE, _PSTR, _BNUM = range(10)
# _PSTR: a string with a DFA, (_PSTR, node, u, count, esc, dfa state, acc): acc holds the bits of the character
# being decoded (UTF-8) or the hex digits of a \u escape (esc = _P_HEX + digits so far).
# _BNUM: a number with bounds / multipleOf, (_BNUM, node, text so far).
# object phases: after "{", in a key (x = trie node), before ":" (x = property), after a value (x = property),
# after "," (x = next property, a space allowed)
_O_OPEN, _O_KEY, _O_COLON, _O_AFTER, _O_COMMA = range(5)
# free-object phases: after "{", after ",", after ", ", before ":", after a value
_F_OPEN, _F_COMMA, _F_KEY, _F_COLON, _F_AFTER = range(5)
_A_OPEN, _A_AFTER = range(2)
# string escape states: none, after "\", then the four hex digits of \u (the second restricted after "d")
_E_NONE, _E_BACKSLASH, _E_HEX1, _E_HEX2_NOT_SURROGATE, _E_HEX2, _E_HEX3, _E_HEX4 = range(7)
_N_SIGN, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(8)
_N_COMPLETE = frozenset({_N_ZERO, _N_INT, _N_FRAC, _N_EXP})
_P_HEX = 10
_ESCAPED_CP = {0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09}
_HEX_VALUE = {b: int(chr(b), 16) for b in _HEX}
_LEAD_BITS = {1: 0x1F, 2: 0x0F, 4: 0x0F, 5: 0x0F, 3: 0x07, 6: 0x07, 7: 0x07}  # by the UTF-8 state after the lead
_CONT_LEFT = {1: 1, 2: 2, 3: 3, 4: 2, 5: 2, 6: 3, 7: 3}  # continuation bytes still to come, by UTF-8 state


def _utf8_span(u: int, acc: int) -> tuple[int, int]:
    """The code points a character can still become in UTF-8 state ``u`` with bits ``acc`` so far."""
    first_lo, first_hi, _ = _CONT_RANGE[u]
    shift = 6 * (_CONT_LEFT[u] - 1)
    return (((acc << 6) | (first_lo & 0x3F)) << shift, ((((acc << 6) | (first_hi & 0x3F)) << shift)
                                                         | ((1 << shift) - 1)))
_KEY_STRING = _String()
_DONE_STACK = ((_DONE,), None)

Stack = tuple
States = tuple  # of stacks


class _Grammar:
    """The compiled schema and the byte-stepping of recogniser states."""

    def __init__(self, schema: Any) -> None:
        compiler = _Compiler(True if schema is None else schema)
        if schema is None:  # json_object: any object
            top = compiler._new_value("#")
            top.alts = [_FreeObject(compiler.any_value)]
            compiler._finish(top)
        else:
            top = compiler.compile()
        self.start: States = (((_V, top, False), _DONE_STACK),)

    def step_all(self, states: States, b: int) -> States:
        out: list = []
        for stack in states:
            self.step(stack, b, out)
        if len(out) > 1:
            return tuple(dict.fromkeys(out))
        return tuple(out)

    def step(self, stack: Stack, b: int, out: list) -> None:
        """Append to ``out`` the stacks that ``stack`` becomes on byte ``b`` (none: b is not allowed)."""
        frame, parent = stack
        kind = frame[0]
        if kind == _STR:
            _, node, u, count, esc = frame
            if esc == _E_NONE:
                if u:
                    u = _U8[u][b]
                    if u != _BAD:
                        out.append(((_STR, node, u, count, 0), parent))
                elif b == 0x22:
                    if count >= node.min_len:
                        out.append(parent)
                elif b >= 0x20 and (node.max_len is None or count < node.max_len):
                    u = _U8[0][b]
                    if u != _BAD:
                        count = count + 1 if count < node.cap else count
                        out.append(((_STR, node, u, count, _E_BACKSLASH if b == 0x5C else _E_NONE), parent))
            elif esc == _E_BACKSLASH:
                if b in _SIMPLE_ESCAPES:
                    out.append(((_STR, node, 0, count, _E_NONE), parent))
                elif b == 0x75:  # u
                    out.append(((_STR, node, 0, count, _E_HEX1), parent))
            elif b in _HEX:
                if esc == _E_HEX1:
                    esc = _E_HEX2_NOT_SURROGATE if b in b"dD" else _E_HEX2
                elif esc == _E_HEX2_NOT_SURROGATE:
                    if b not in b"01234567":
                        return
                    esc = _E_HEX3
                else:
                    esc = _E_NONE if esc == _E_HEX4 else esc + 1
                out.append(((_STR, node, 0, count, esc), parent))
        elif kind == _V:
            if b == 0x20 and frame[2]:
                out.append(((_V, frame[1], False), parent))
                return
            for alt in frame[1].first[b]:
                self._start(alt, b, parent, out)
        elif kind == _OBJ:
            _, node, phase, x = frame
            if phase == _O_AFTER:
                if b == 0x2C:
                    if x + 1 < len(node.props):
                        out.append(((_OBJ, node, _O_COMMA, x + 1), parent))
                elif b == 0x7D and node.closable_after[x]:
                    out.append(parent)
            elif phase == _O_COLON:
                if b == 0x3A:
                    out.append(((_V, node.props[x][1], True), ((_OBJ, node, _O_AFTER, x), parent)))
            else:
                if phase == _O_OPEN:
                    if b == 0x7D and node.closable_empty:
                        out.append(parent)
                        return
                    x = node.key_root[0]
                elif phase == _O_COMMA:
                    if b == 0x20:
                        out.append(((_OBJ, node, _O_KEY, node.key_root[x]), parent))
                        return
                    x = node.key_root[x]
                nxt = node.key_next[x].get(b)
                if nxt is not None:
                    j = node.key_prop[nxt]
                    out.append(((_OBJ, node, _O_KEY, nxt) if j < 0 else (_OBJ, node, _O_COLON, j), parent))
        elif kind == _ARR:
            _, node, phase, count = frame
            if phase == _A_AFTER:
                if b == 0x2C:
                    if node.max_items is None or count < node.max_items:
                        item = node.prefix[count] if count < len(node.prefix) else node.items
                        count = count + 1 if count < node.cap else count
                        out.append(((_V, item, True), ((_ARR, node, _A_AFTER, count), parent)))
                elif b == 0x5D and count >= node.min_items:
                    out.append(parent)
            elif b == 0x5D:
                if node.min_items == 0:
                    out.append(parent)
            elif node.max_items != 0:
                after = ((_ARR, node, _A_AFTER, 1 if node.cap else 0), parent)
                for alt in node.item(0).first[b]:
                    self._start(alt, b, after, out)
        elif kind == _NUM:
            self._number(frame, parent, b, out)
        elif kind == _PSTR:
            self._pattern_string(frame, parent, b, out)
        elif kind == _BNUM:
            rng, text = frame[1].range, frame[2]
            longer = text + bytes((b,))
            if rng.completable(longer):
                out.append(((_BNUM, frame[1], longer), parent))
            elif rng.accepts(text):  # the number ended before b
                self.step(parent, b, out)
        elif kind == _LIT:
            node, t = frame[1], frame[2]
            nxt = node.next[t].get(b)
            if nxt is not None:
                out.append(((_LIT, node, nxt), parent))
            if node.end[t]:
                self.step(parent, b, out)
        elif kind == _FOBJ:
            _, node, phase = frame
            if phase == _F_AFTER:
                if b == 0x2C:
                    out.append(((_FOBJ, node, _F_COMMA), parent))
                elif b == 0x7D:
                    out.append(parent)
            elif phase == _F_COLON:
                if b == 0x3A:
                    out.append(((_V, node.value, True), ((_FOBJ, node, _F_AFTER), parent)))
            elif b == 0x22 and node.value is not None:
                out.append(((_STR, _KEY_STRING, 0, 0, 0), ((_FOBJ, node, _F_COLON), parent)))
            elif phase == _F_OPEN and b == 0x7D:
                out.append(parent)
            elif phase == _F_COMMA and b == 0x20:
                out.append(((_FOBJ, node, _F_KEY), parent))

    def _start(self, alt: Any, b: int, parent: Stack, out: list) -> None:
        """Begin a value of concrete node ``alt`` with its first byte ``b``."""
        if isinstance(alt, _String):
            out.append(((_STR, alt, 0, 0, 0) if alt.dfa is None else (_PSTR, alt, 0, 0, _E_NONE, 0, 0), parent))
        elif isinstance(alt, _Object):
            out.append(((_OBJ, alt, _O_OPEN, 0), parent))
        elif isinstance(alt, _Number):
            if alt.range is not None:  # alt.first holds only the bytes that can start a number in range
                out.append(((_BNUM, alt, bytes((b,))), parent))
                return
            phase = _N_SIGN if b == 0x2D else _N_ZERO if b == 0x30 else _N_INT
            out.append(((_NUM, alt.integer, phase, 1), parent))
        elif isinstance(alt, _Literal):
            out.append(((_LIT, alt, alt.next[0][b]), parent))
        elif isinstance(alt, _Array):
            out.append(((_ARR, alt, _A_OPEN, 0), parent))
        else:
            out.append(((_FOBJ, alt, _F_OPEN), parent))

    @staticmethod
    def _pattern_string(frame: tuple, parent: Stack, b: int, out: list) -> None:
        """A string with a DFA: each byte is allowed only if the DFA can still accept within the lengths."""
        _, node, u, count, esc, d, acc = frame
        dfa = node.dfa
        if esc == _E_NONE:
            if u:  # a continuation byte
                u = _U8[u][b]
                if u == _BAD:
                    return
                acc = (acc << 6) | (b & 0x3F)
                if u == 0:
                    t = dfa.step(d, acc)
                    if t >= 0 and node.fine(t, count):
                        out.append(((_PSTR, node, 0, count, _E_NONE, t, 0), parent))
                elif node.any_fine(d, *_utf8_span(u, acc), count):
                    out.append(((_PSTR, node, u, count, _E_NONE, d, acc), parent))
            elif b == 0x22:
                if dfa.accept[d] and count >= node.min_len:
                    out.append(parent)
            elif b >= 0x20 and (node.max_len is None or count < node.max_len):
                count = count + 1 if count < node.cap else count  # a character starts
                if b < 0x80 and b != 0x5C:
                    t = dfa.step(d, b)
                    if t >= 0 and node.fine(t, count):
                        out.append(((_PSTR, node, 0, count, _E_NONE, t, 0), parent))
                elif b == 0x5C:  # an escape: a simple one or \u can write any character of the BMP
                    if node.any_fine(d, 0, 0xFFFF, count):
                        out.append(((_PSTR, node, 0, count, _E_BACKSLASH, d, 0), parent))
                else:
                    u = _U8[0][b]
                    if u != _BAD:
                        acc = b & _LEAD_BITS[u]
                        if node.any_fine(d, *_utf8_span(u, acc), count):
                            out.append(((_PSTR, node, u, count, _E_NONE, d, acc), parent))
        elif esc == _E_BACKSLASH:
            cp = _ESCAPED_CP.get(b)
            if cp is not None:
                t = dfa.step(d, cp)
                if t >= 0 and node.fine(t, count):
                    out.append(((_PSTR, node, 0, count, _E_NONE, t, 0), parent))
            elif b == 0x75 and node.any_fine(d, 0, 0xFFFF, count):  # \u
                out.append(((_PSTR, node, 0, count, _P_HEX, d, 0), parent))
        elif b in _HEX:  # esc = _P_HEX + hex digits so far
            acc = acc * 16 + _HEX_VALUE[b]
            left = 3 - (esc - _P_HEX)
            if left == 0:
                t = dfa.step(d, acc)  # surrogates are in no DFA range: refused
                if t >= 0 and node.fine(t, count):
                    out.append(((_PSTR, node, 0, count, _E_NONE, t, 0), parent))
            elif node.any_fine(d, acc << (4 * left), (acc << (4 * left)) | ((1 << (4 * left)) - 1), count):
                out.append(((_PSTR, node, 0, count, esc + 1, d, acc), parent))

    def _number(self, frame: tuple, parent: Stack, b: int, out: list) -> None:
        _, integer, phase, n = frame
        digit = b in _DIGITS
        nxt = None
        if phase == _N_SIGN:
            if digit:
                nxt = (_NUM, integer, _N_ZERO if b == 0x30 else _N_INT, 1)
        elif phase == _N_ZERO or phase == _N_INT:
            if digit and phase == _N_INT and n < MAX_INT_DIGITS:
                nxt = (_NUM, integer, _N_INT, n + 1)
            elif not integer and b == 0x2E:
                nxt = (_NUM, integer, _N_DOT, 0)
            elif not integer and b in b"eE":
                nxt = (_NUM, integer, _N_E, 0)
        elif phase == _N_DOT:
            if digit:
                nxt = (_NUM, integer, _N_FRAC, 1)
        elif phase == _N_FRAC:
            if digit and n < MAX_FRAC_DIGITS:
                nxt = (_NUM, integer, _N_FRAC, n + 1)
            elif b in b"eE":
                nxt = (_NUM, integer, _N_E, 0)
        elif phase == _N_E:
            if b in b"+-":
                nxt = (_NUM, integer, _N_ESIGN, 0)
            elif digit:
                nxt = (_NUM, integer, _N_EXP, 1)
        elif phase == _N_ESIGN:
            if digit:
                nxt = (_NUM, integer, _N_EXP, 1)
        elif digit and n < MAX_EXP_DIGITS:  # _N_EXP
            nxt = (_NUM, integer, _N_EXP, n + 1)
        if nxt is not None:
            out.append((nxt, parent))
        elif phase in _N_COMPLETE:  # the number ended before b: b belongs to the parent
            self.step(parent, b, out)

    @staticmethod
    def can_end(stack: Stack) -> bool:
        """The text so far is a whole document (a number or literal may be the last thing in it)."""
        while True:
            frame, parent = stack
            kind = frame[0]
            if kind == _DONE:
                return True
            if not ((kind == _NUM and frame[2] in _N_COMPLETE) or (kind == _LIT and frame[1].end[frame[2]])
                    or (kind == _BNUM and frame[1].range.accepts(frame[2]))):
                return False
            stack = parent


# ---------------------------------------------------------------------------------------------------
# Vocabulary index (once per tokenizer).


class _Sorted:
    """Byte strings in sorted order with token ids and common-prefix lengths: a trie in flat form."""

    __slots__ = ("keys", "ids", "lcp")

    def __init__(self, pairs: list[tuple[bytes, int]]) -> None:
        pairs.sort()
        self.keys = [k for k, _ in pairs]
        self.ids = [i for _, i in pairs]
        self.lcp = [0] * len(pairs)
        for i in range(1, len(pairs)):
            a, b = self.keys[i - 1], self.keys[i]
            n, m = 0, min(len(a), len(b))
            while n < m and a[n] == b[n]:
                n += 1
            self.lcp[i] = n

    def block(self, first: bytes) -> tuple[int, int]:
        """Index range of the keys that start with ``first`` (one byte)."""
        return bisect.bisect_left(self.keys, first), bisect.bisect_left(self.keys, bytes([first[0] + 1]))

    def walk(self, states: States, step_all: Callable[[States, int], States], lo: int = 0,
             hi: int | None = None) -> list[int]:
        """Ids of the keys in ``[lo, hi)`` that the recogniser accepts from ``states``, byte by byte.

        ``path[d]`` is the state after the first d bytes of the current key; the next key re-uses it
        up to their common prefix. When byte d fails, every key sharing the first d+1 bytes is skipped.
        """
        keys, lcp, ids = self.keys, self.lcp, self.ids
        hi = len(keys) if hi is None else hi
        allowed: list[int] = []
        path = [states]
        i = lo
        while i < hi:
            key = keys[i]
            d = min(lcp[i], len(path) - 1) if i > lo else 0
            del path[d + 1:]
            st = path[d]
            n = len(key)
            while d < n:
                st = step_all(st, key[d])
                if not st:
                    break
                d += 1
                path.append(st)
            if d == n:
                allowed.append(ids[i])
                i += 1
            else:
                i = self._skip(key[:d + 1], i + 1, hi)
        return allowed

    def walk_ends(self, start: Any, step: Callable[[Any, int], Any]) -> tuple[list[int], list[Any]]:
        """Like :meth:`walk`, for any stepping (None: refused); also returns each accepted key's end state."""
        keys, lcp, ids = self.keys, self.lcp, self.ids
        allowed: list[int] = []
        ends: list[Any] = []
        path = [start]
        i, hi = 0, len(keys)
        while i < hi:
            key = keys[i]
            d = min(lcp[i], len(path) - 1) if i else 0
            del path[d + 1:]
            st = path[d]
            n = len(key)
            while d < n:
                st = step(st, key[d])
                if st is None:
                    break
                d += 1
                path.append(st)
            if d == n:
                allowed.append(ids[i])
                ends.append(st)
                i += 1
            else:
                i = self._skip(key[:d + 1], i + 1, hi)
        return allowed, ends

    def _skip(self, prefix: bytes, lo: int, hi: int) -> int:
        """First index in ``[lo, hi)`` whose key does not start with ``prefix``."""
        stripped = prefix.rstrip(b"\xff")
        if not stripped:
            return hi
        upper = stripped[:-1] + bytes([stripped[-1] + 1])
        return bisect.bisect_left(self.keys, upper, lo, hi)


class _PlainSet:
    """For one starting string state: tokens that are plain string content throughout (a mask and
    their character counts), and the others that reach a quote/backslash between characters, as
    suffixes from that byte grouped by the characters before it."""

    def __init__(self, n: int, items: Iterable[tuple[int, bytes]], u: int) -> None:
        full_ids: list[int] = []
        full_chars: list[int] = []
        full_tokens: list[tuple[bytes, int]] = []
        special: list[tuple[bytes, int]] = []
        by_k: dict[int, list[tuple[bytes, int]]] = {}
        for tid, t in items:
            r = _scan_plain(t, u)
            if r is None:
                continue
            pos, chars = r
            if pos == len(t):
                full_ids.append(tid)
                full_chars.append(chars)
                full_tokens.append((t, tid))
            else:
                by_k.setdefault(chars, []).append((t[pos:], tid))
                special.append((t, tid))
        # for strings with a DFA: the plain tokens, and the others whole
        self.full_sorted = _Sorted(full_tokens)
        self.special = _Sorted(special)
        self.full = torch.zeros(n, dtype=torch.bool)
        self.chars = torch.zeros(n, dtype=torch.int16)
        if full_ids:
            idx = torch.tensor(full_ids, dtype=torch.long)
            self.full[idx] = True
            self.chars[idx] = torch.tensor(full_chars, dtype=torch.int16)
        self.by_k = {k: _Sorted(v) for k, v in sorted(by_k.items())}
        self.all = _Sorted([p for v in by_k.values() for p in v])


class _VocabIndex:
    def __init__(self, tokenizer: Tokenizer) -> None:
        n = tokenizer.num_base_tokens
        self.n = n
        self.token_bytes = [tokenizer.token_bytes(i) for i in range(n)]
        self.sorted = _Sorted([(t, i) for i, t in enumerate(self.token_bytes)])
        lo, hi = bisect.bisect_left(self.sorted.keys, b"\x80"), bisect.bisect_left(self.sorted.keys, b"\xc0")
        continuation = [(self.sorted.ids[i], self.sorted.keys[i]) for i in range(lo, hi)]
        self.plain = [_PlainSet(n, enumerate(self.token_bytes), 0)]
        self.plain += [_PlainSet(n, continuation, u) for u in range(1, 8)]
        # After a backslash: a one-byte escape, then plain content (or a quote / backslash).
        escapes = [(i, t[1:]) for i, t in enumerate(self.token_bytes) if t[0] in _SIMPLE_ESCAPES]
        self.after_escape = _PlainSet(n, escapes, 0)
        self.u_block = self.sorted.block(b"u")
        self.eos_ids = tuple(tokenizer.eos_ids)
        self.min_logits = max(n, max(self.eos_ids) + 1)
        # (id(dfa), u, d, acc) -> (dfa, ids, group of each id, groups); least recently used first. An entry
        # holds its DFA, so the id cannot be reused while it is here. At most ~GROUP_CACHE_TOKENS ids in all.
        self.group_cache: OrderedDict[tuple, tuple] = OrderedDict()
        self.group_cache_tokens = 0

    GROUP_CACHE_TOKENS = 20_000_000  # ~120 MB of int32 ids and group numbers

    def plain_groups(self, dfa: DFA, u: int, d: int, acc: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
        """The plain-content tokens that a string with ``dfa`` can take in state (u, d, acc), grouped by
        where they leave it: ``(ids, group of each id, groups)``, a group being (u, d, acc, characters)."""
        key = (id(dfa), u, d, acc)
        cache = self.group_cache
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit[1:]

        def step(state: tuple, b: int) -> tuple | None:
            su, sd, sacc, chars = state
            if su:
                su = _U8[su][b]
                sacc = (sacc << 6) | (b & 0x3F)
                if su == 0:
                    sd = dfa.step(sd, sacc)
                    return None if sd < 0 else (0, sd, 0, chars)
            elif b < 0x80:
                sd = dfa.step(sd, b)
                return None if sd < 0 else (0, sd, 0, chars + 1)
            else:
                su = _U8[0][b]
                sacc = b & _LEAD_BITS[su]
                chars += 1
            return (su, sd, sacc, chars) if dfa.targets(sd, *_utf8_span(su, sacc)) else None

        ids, ends = self.plain[u].full_sorted.walk_ends((u, d, acc, 0), step)
        groups: dict[tuple, int] = {}
        member = [groups.setdefault(e, len(groups)) for e in ends]
        hit = (dfa, torch.tensor(ids, dtype=torch.int32), torch.tensor(member, dtype=torch.int32), list(groups))
        cache[key] = hit
        self.group_cache_tokens += len(ids)
        while self.group_cache_tokens > self.GROUP_CACHE_TOKENS and len(cache) > 1:
            self.group_cache_tokens -= len(cache.popitem(last=False)[1][1])
        return hit[1:]


_INDEXES: "weakref.WeakKeyDictionary[Tokenizer, _VocabIndex]" = weakref.WeakKeyDictionary()


def _vocab_index(tokenizer: Tokenizer) -> _VocabIndex:
    index = _INDEXES.get(tokenizer)
    if index is None:
        index = _INDEXES[tokenizer] = _VocabIndex(tokenizer)
    return index


# ---------------------------------------------------------------------------------------------------


class JsonConstraint:
    """Token-level constraint: the output is a JSON object (``schema=None``) or matches ``schema``.

    Args:
        tokenizer: the model's :class:`~llama4.prompt.tokenizer.Tokenizer`; its vocabulary index is
            built on first use (about a second for the 200k Llama 4 vocabulary) and cached.
        schema: a JSON-schema dict (the subset in the module docstring), or None for any object.

    Raises:
        SchemaError: the schema uses something unsupported or admits no value.
    """

    def __init__(self, tokenizer: Tokenizer, schema: dict | bool | None = None) -> None:
        if schema is not None and not isinstance(schema, (dict, bool)):
            raise SchemaError(f"a schema must be a dict (or None for any JSON object), got {type(schema).__name__}")
        self.schema = schema
        self._grammar = _Grammar(schema)
        self._index = _vocab_index(tokenizer)
        self._states: States = self._grammar.start
        self._bytes = bytearray()
        self._ended = False

    @property
    def complete(self) -> bool:
        """The text so far is a complete JSON value matching the schema."""
        return any(_Grammar.can_end(s) for s in self._states)

    @property
    def text(self) -> str:
        """The text generated so far (a character split across tokens shows once it is whole)."""
        return self._bytes.decode("utf-8", errors="ignore")

    @property
    def ended(self) -> bool:
        """An end-of-sequence token has been fed."""
        return self._ended

    def copy(self) -> "JsonConstraint":
        """An independent constraint in the same state (states are immutable: this is cheap)."""
        other = object.__new__(JsonConstraint)
        other.__dict__.update(self.__dict__)
        other._bytes = bytearray(self._bytes)
        return other

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]: the tokens :meth:`restrict` leaves finite."""
        if self._ended:
            raise ValueError("the JSON constraint has ended (an end-of-sequence token was fed)")
        index = self._index
        if vocab_size < index.min_logits:
            raise ValueError(f"logits have {vocab_size} entries, but the tokenizer has {index.n} base tokens and "
                             f"end-of-sequence ids up to {max(index.eos_ids)}")
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        base = mask[: index.n]
        step_all = self._grammar.step_all
        generic = []
        for stack in self._states:
            frame, parent = stack
            if frame[0] == _STR and frame[4] == _E_NONE:
                self._string_tokens(index.plain[frame[2]], frame[1], frame[3], parent, base)
            elif frame[0] == _PSTR and frame[4] == _E_NONE:
                self._pattern_tokens(stack, base)
            elif frame[0] == _STR and frame[4] == _E_BACKSLASH:
                self._string_tokens(index.after_escape, frame[1], frame[3], parent, base)
                ids = index.sorted.walk((stack,), step_all, *index.u_block)
                base[torch.tensor(ids, dtype=torch.long)] = True
            else:
                generic.append(stack)
        if generic:
            ids = index.sorted.walk(tuple(generic), step_all)
            base[torch.tensor(ids, dtype=torch.long)] = True
        if self.complete:
            mask[list(index.eos_ids)] = True
        return mask

    def _string_tokens(self, plain: _PlainSet, node: _String, count: int, parent: Stack, base: torch.Tensor) -> None:
        """Allow the tokens that continue a string (state ``plain``; ``count`` characters so far)."""
        if node.max_len is None:
            base |= plain.full
        else:
            base |= plain.full & (plain.chars <= node.max_len - count)
        step_all = self._grammar.step_all
        groups = [(0, plain.all)] if not node.tracked else plain.by_k.items()
        for k, suffixes in groups:
            if node.max_len is not None and count + k > node.max_len:
                break  # by_k is sorted by k
            state = ((_STR, node, 0, min(count + k, node.cap), _E_NONE), parent)
            ids = suffixes.walk((state,), step_all)
            if ids:
                base[torch.tensor(ids, dtype=torch.long)] = True

    def _pattern_tokens(self, stack: Stack, base: torch.Tensor) -> None:
        """Allow the tokens that continue a string with a DFA: the plain ones by their cached groups,
        the ones reaching a quote or backslash by a walk."""
        frame, parent = stack
        _, node, u, count, _, d, acc = frame
        ids, member, groups = self._index.plain_groups(node.dfa, u, d, acc)
        ok = []
        for gu, gd, gacc, chars in groups:
            n = count + chars
            if node.max_len is not None and n > node.max_len:
                ok.append(False)
                continue
            n = min(n, node.cap)
            ok.append(node.fine(gd, n) if gu == 0 else node.any_fine(gd, *_utf8_span(gu, gacc), n))
        if any(ok):
            base[ids[torch.tensor(ok)[member]]] = True
        walked = self._index.plain[u].special.walk((stack,), self._grammar.step_all)
        if walked:
            base[torch.tensor(walked, dtype=torch.long)] = True

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits`` [V] with every token that is not allowed now set to -inf."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 1 or not logits.is_floating_point():
            raise ValueError(f"restrict() takes a 1-D float tensor of logits, got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        mask = self.allowed_mask(logits.shape[0]).to(logits.device)
        return logits.masked_fill(~mask, float("-inf"))

    def advance(self, token_id: int) -> None:
        """Feed the chosen token; ValueError if :meth:`restrict` would not have allowed it."""
        if self._ended:
            raise ValueError("the JSON constraint has ended (an end-of-sequence token was fed)")
        token_id = operator.index(token_id)
        index = self._index
        if token_id in index.eos_ids:
            if not self.complete:
                raise ValueError(f"end-of-sequence token {token_id} before the JSON is complete: {self.text!r}")
            self._ended = True
            return
        if not 0 <= token_id < index.n:
            raise ValueError(f"token {token_id} is a special token or outside the vocabulary; not allowed in JSON")
        states = self._states
        piece = index.token_bytes[token_id]
        for b in piece:
            states = self._grammar.step_all(states, b)
            if not states:
                raise ValueError(f"token {token_id} ({piece!r}) does not continue {self.text!r} as JSON "
                                 "matching the schema")
        self._states = states
        self._bytes += piece
