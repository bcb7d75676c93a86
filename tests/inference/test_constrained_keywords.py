"""Constrained decoding with numeric bounds, ``multipleOf``, ``pattern``, ``format`` and exact ``oneOf``.

Outputs are checked with the ``jsonschema`` package (draft 2020-12, formats asserted), reading numbers
as decimals so that bounds and multiples are exact; prefixes are checked token by token against oracles
that enumerate the valid texts (small numeric ranges) or use the ``regex`` module's partial matching
(anchored patterns), and against :meth:`JsonConstraint.advance`. The tokenizer is the embedded one
(6144 base tokens, every single byte among them).
"""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import json
import random
import uuid
from decimal import Decimal

import jsonschema
import pytest
import regex

from llama4.inference.constrained import FORMATS, MAX_FRAC_DIGITS, MAX_INT_DIGITS, JsonConstraint, SchemaError
from llama4.inference.regex_dfa import compile_search
from tests.inference.constrained_support import (  # noqa: F401 (fixtures)
    allowed_ids, byte_ids, closing_tokens, decimals, one_byte_tokens, tok, walk)


# ---------------------------------------------------------------------------------------------------
# Helpers


def feed(c: JsonConstraint, byte_ids, text: str | bytes) -> None:
    """Advance one single-byte token at a time (ValueError at the first byte refused)."""
    for b in text.encode() if isinstance(text, str) else text:
        c.advance(byte_ids[b])


def state(tok, byte_ids, schema, prefix: str | bytes) -> JsonConstraint:
    c = JsonConstraint(tok, schema)
    feed(c, byte_ids, prefix)
    return c


def takes(tok, byte_ids, schema, prefix: str | bytes, nxt: str | bytes) -> bool:
    """After ``prefix``, restrict() allows the single-byte token of ``nxt`` (one byte)."""
    c = state(tok, byte_ids, schema, prefix)
    b = nxt.encode() if isinstance(nxt, str) else nxt
    assert len(b) == 1
    return byte_ids[b[0]] in allowed_ids(c, tok)


def accepts(tok, byte_ids, schema, text: str | bytes) -> bool:
    """``text``, fed byte by byte, is allowed throughout and complete (end-of-sequence allowed)."""
    c = JsonConstraint(tok, schema)
    try:
        feed(c, byte_ids, text)
    except ValueError:
        return False
    return c.complete and set(tok.eos_ids) <= set(allowed_ids(c, tok))


def random_walk(tok, schema, seed: int, wander: int = 40, max_steps: int = 600) -> JsonConstraint:
    """A walk that ends with: end-of-sequence, else a closing quote, else an "@" (an e-mail address
    cannot end before it, and "}" is content there), else closing characters, else one byte."""
    def endings(tok):
        closing = closing_tokens(tok)
        return [set(tok.eos_ids), {t for t in closing if b'"' in tok.token_bytes(t)}, {tok.encode("@")[0]},
                closing, one_byte_tokens(tok)]
    return walk(tok, schema, seed, endings, wander, max_steps)


def validate(text: str, schema) -> None:
    """jsonschema (draft 2020-12 with formats) on the text read with exact decimals."""
    value = json.loads(text, parse_float=Decimal)
    draft4 = isinstance(schema, dict) and any(isinstance(schema.get(k), bool)
                                              for k in ("exclusiveMinimum", "exclusiveMaximum"))
    cls = jsonschema.Draft4Validator if draft4 else jsonschema.Draft202012Validator
    with decimal.localcontext() as ctx:
        ctx.prec = 200  # 20 + 20 digits and more stay exact
        cls(decimals(schema), format_checker=cls.FORMAT_CHECKER).validate(value)


def test_the_format_checkers_are_installed():
    """Without them jsonschema skips a format silently (they come with jsonschema[format-nongpl])."""
    assert set(FORMATS) <= set(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)
    with pytest.raises(jsonschema.ValidationError):
        validate('"a_b.com"', {"format": "hostname"})
    with pytest.raises(jsonschema.ValidationError):
        validate("0.3", {"multipleOf": 0.2})
    validate("0.3", {"multipleOf": 0.1})  # exact: a float reading would refuse it


# ---------------------------------------------------------------------------------------------------
# (a) Random walks end in valid JSON


ORDER = {"type": "object",
         "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150},
                        "email": {"type": "string", "format": "email", "maxLength": 30},
                        "when": {"type": "string", "format": "date-time"},
                        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,3}$"},
                        "tags": {"type": "array", "items": {"type": "string", "format": "uuid"}, "maxItems": 2}},
         "required": ["age", "email", "when", "score", "code"]}

WALKS = {
    "int_minimum": {"type": "integer", "minimum": 10},
    "int_range_multiple": {"type": "integer", "minimum": -20, "maximum": 130, "multipleOf": 3},
    "int_exclusive": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 5},
    "int_negative": {"type": "integer", "maximum": -100},
    "int_huge_minimum": {"type": "integer", "minimum": 1e15},
    "int_multiple_only": {"type": "integer", "multipleOf": 7},
    "num_range": {"type": "number", "minimum": -1.5, "maximum": 2.25},
    "num_exclusive": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "num_multiple": {"type": "number", "multipleOf": 0.25, "minimum": -3, "maximum": 3},
    "num_fine_multiple": {"type": "number", "multipleOf": 0.001, "exclusiveMinimum": 0.5, "maximum": 0.502},
    "num_draft4": {"type": "number", "minimum": 1, "exclusiveMinimum": True, "maximum": 2, "exclusiveMaximum": True},
    "num_implied": {"minimum": 2, "multipleOf": 1.5},
    "pattern_anchored": {"type": "string", "pattern": "^[a-z]{3}-[0-9]+$"},
    "pattern_search": {"type": "string", "pattern": "ab|c[0-9]", "maxLength": 8},
    "pattern_unicode": {"type": "string", "pattern": "^[é€😀]+x?$", "minLength": 2, "maxLength": 4},
    "pattern_escapes": {"type": "string", "pattern": '^[\\n\\t"\\\\/a]{1,4}$'},
    "pattern_and_format": {"type": "string", "format": "date", "pattern": "^2024-"},
    "hostname_short": {"type": "string", "format": "hostname", "maxLength": 12},
    **{f"format_{name}": {"type": "string", "format": name} for name in FORMATS},
    "one_of_discriminated": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer", "minimum": 0}},
         "required": ["kind", "x"]},
        {"type": "object", "properties": {"kind": {"const": "b"}, "y": {"type": "string", "format": "uuid"}},
         "required": ["kind", "y"]}]},
    "one_of_types": {"oneOf": [{"type": "integer", "maximum": 0}, {"type": "string", "pattern": "^x"},
                               {"type": "null"}]},
    "one_of_ranges": {"oneOf": [{"type": "number", "maximum": 0}, {"type": "number", "exclusiveMinimum": 0}]},
    "enum_filtered": {"enum": [1, 5, 12, "abc", "2024-01-01", "x"], "minimum": 3, "format": "date"},
    "order": ORDER,
}


@pytest.mark.parametrize("name", list(WALKS))
def test_random_walks_validate(tok, name):
    schema = WALKS[name]
    seen = set()
    for seed in range(16):
        c = random_walk(tok, schema, seed)
        assert c.ended, f"seed {seed}: no end-of-sequence within the step budget: {c.text!r}"
        validate(c.text, schema)
        seen.add(c.text)
    assert len(seen) > (2 if name == "enum_filtered" else 5), seen  # the walks do explore


def test_enum_values_are_filtered_by_the_new_keywords(tok):
    outs = {random_walk(tok, WALKS["enum_filtered"], s).text for s in range(40)}
    assert outs == {"5", "12", '"2024-01-01"'}


# ---------------------------------------------------------------------------------------------------
# Exact oracles: every token at states along walks


def number_texts(values, integer: bool) -> set[str]:
    """Every way the recogniser may write the given exact values (no exponent, at most 20 fraction digits)."""
    out = set()
    for v in map(Decimal, values):
        sign = "-" if v < 0 else ""
        digits = format(abs(v), "f")
        whole, _, frac = digits.partition(".")
        frac = frac.rstrip("0")
        if v == 0:
            out.update({"0", "-0"} if integer else {"0", "-0"} | {s + "0." + "0" * k for s in ("", "-")
                                                                for k in range(1, MAX_FRAC_DIGITS + 1)})
            continue
        if not frac:
            out.add(sign + whole)
        if not integer:
            for k in range(max(len(frac), 1), MAX_FRAC_DIGITS + 1):
                out.add(f"{sign}{whole}.{frac.ljust(k, '0')}")
    return out


ENUMERABLE = [  # (schema, its values): numbers in small ranges
    ({"type": "integer", "minimum": -20, "maximum": 130, "multipleOf": 3}, range(-18, 130, 3)),
    ({"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 5}, range(-2, 5)),
    ({"type": "integer", "minimum": 10, "maximum": 19}, range(10, 20)),
    ({"type": "integer", "minimum": 95, "maximum": 1005, "multipleOf": 100}, range(100, 1001, 100)),
    ({"type": "number", "minimum": 0.25, "maximum": 0.5, "multipleOf": 0.125}, ["0.25", "0.375", "0.5"]),
    ({"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.5}, ["-1", "-0.5", "0", "0.5", "1"]),
    ({"type": "number", "exclusiveMinimum": 2, "maximum": 3, "multipleOf": 0.75}, ["2.25", "3"]),
]


def check_tokens(c: JsonConstraint, tok, expected_prefix, expected_complete) -> list[int]:
    """restrict() against an oracle (on the bytes so far plus each token) and against advance()."""
    allowed = set(allowed_ids(c, tok))
    data = bytes(c._bytes)
    eos = set(tok.eos_ids)
    assert c.complete == expected_complete(data), data
    assert (allowed & eos) == (eos if expected_complete(data) else set()), data
    for t in range(tok.num_base_tokens):
        piece = tok.token_bytes(t)
        want = expected_prefix(data + piece)
        if want is None:  # the oracle cannot tell: advance() must still agree with restrict()
            want = t in allowed
        assert (t in allowed) == want, (data, piece, want)
        trial = c.copy()
        if want:
            trial.advance(t)
        else:
            with pytest.raises(ValueError, match="does not continue"):
                trial.advance(t)
    return sorted(allowed - eos)


@pytest.mark.parametrize("k", range(len(ENUMERABLE)))
def test_numbers_allow_exactly_the_completable_prefixes(tok, k):
    schema, values = ENUMERABLE[k]
    texts = {t.encode() for t in number_texts(values, schema["type"] == "integer")}
    prefixes = {t[:i] for t in texts for i in range(len(t) + 1)}
    for seed in range(2):
        c = JsonConstraint(tok, schema)
        g = random.Random(seed)
        while True:
            choices = check_tokens(c, tok, lambda d: d in prefixes, lambda d: d in texts)
            if not choices:
                break
            c.advance(g.choice(choices))
        assert bytes(c._bytes) in texts


ANCHORED = [  # patterns that read the same in ECMA-262 and in the regex module
    ({"type": "string", "pattern": "^[a-z]{3}-[0-9]+$"}, r"[a-z]{3}-[0-9]+"),
    ({"type": "string", "pattern": "^(ab|cd)*e?$"}, r"(ab|cd)*e?"),
    ({"type": "string", "format": "ipv4"}, FORMATS["ipv4"][1:-1]),
    ({"type": "string", "format": "date"}, FORMATS["date"][1:-1]),
    ({"type": "string", "format": "uuid"}, FORMATS["uuid"][1:-1]),
]


def string_oracle(core: str):
    """Prefix oracle for a top-level string whose content must fully match ``core``; None for tokens
    the oracle does not model (escapes, characters split across tokens)."""
    compiled = regex.compile(core)

    def prefix(data: bytes):
        if not data.startswith(b'"'):
            return data == b""
        body = data[1:]
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return None
        if "\\" in text or any(ch < " " for ch in text):
            return None
        if '"' in text:
            q = text.index('"')
            return q == len(text) - 1 and compiled.fullmatch(text[:q]) is not None
        return compiled.fullmatch(text, partial=True) is not None

    def complete(data: bytes) -> bool:
        return prefix(data) is True and data.endswith(b'"') and len(data) > 1

    return prefix, complete


@pytest.mark.parametrize("k", range(len(ANCHORED)))
def test_anchored_patterns_allow_exactly_the_completable_prefixes(tok, k):
    schema, core = ANCHORED[k]
    prefix, complete = string_oracle(core)
    for seed in range(2):
        c = JsonConstraint(tok, schema)
        g = random.Random(seed)
        for _ in range(14):
            choices = check_tokens(c, tok, prefix, complete)
            if not choices:
                break
            c.advance(g.choice(choices))


def test_cached_token_groups_agree_with_stepping_in_many_states(tok, monkeypatch):
    """The per-DFA-state token groups (plain tokens) and the walk agree with advance() everywhere, also
    when the cache is so small that it evicts at every step."""
    from llama4.inference import constrained
    monkeypatch.setattr(constrained._VocabIndex, "GROUP_CACHE_TOKENS", 3000)
    schemas = [{"type": "string", "pattern": "z", "maxLength": 9}, {"type": "string", "format": "email"},
               {"type": "string", "pattern": "^[é€😀a-c]{2,5}$"}, {"type": "string", "format": "hostname"}]
    for schema in schemas:
        for seed in range(2):
            c = JsonConstraint(tok, schema)
            g = random.Random(seed)
            for _ in range(8):
                choices = check_tokens(c, tok, lambda d: None, lambda d: c.complete)
                if not choices:
                    break
                c.advance(g.choice(choices))


# ---------------------------------------------------------------------------------------------------
# (b) Targeted prefixes: numbers


def test_minimum_10(tok, byte_ids):
    s = {"type": "integer", "minimum": 10}
    assert not takes(tok, byte_ids, s, "", "0") and not takes(tok, byte_ids, s, "", "-")
    assert takes(tok, byte_ids, s, "", "1") and takes(tok, byte_ids, s, "", "9")  # 1x, 9x
    assert not state(tok, byte_ids, s, "1").complete and not state(tok, byte_ids, s, "9").complete
    assert accepts(tok, byte_ids, s, "10") and accepts(tok, byte_ids, s, "99999")
    assert not accepts(tok, byte_ids, s, "9") and not accepts(tok, byte_ids, s, "-10")
    n = {"type": "number", "minimum": 10}
    assert not takes(tok, byte_ids, n, "", "0") and not takes(tok, byte_ids, n, "9", ".")  # 9.x < 10
    assert takes(tok, byte_ids, n, "10", ".") and accepts(tok, byte_ids, n, "10.5")
    assert not takes(tok, byte_ids, n, "1", "e")  # no exponent with bounds


def test_exclusive_maximum_5(tok, byte_ids):
    s = {"type": "integer", "exclusiveMaximum": 5}
    assert not takes(tok, byte_ids, s, "", "5") and takes(tok, byte_ids, s, "", "4")
    assert accepts(tok, byte_ids, s, "4") and accepts(tok, byte_ids, s, "-7000") and not accepts(tok, byte_ids, s, "5")
    assert not takes(tok, byte_ids, s, "4", "0")  # 40
    n = {"type": "number", "exclusiveMaximum": 5}
    assert not takes(tok, byte_ids, n, "", "5")  # 5.x >= 5 and 5x > 5
    assert accepts(tok, byte_ids, n, "4.999") and takes(tok, byte_ids, n, "4", ".")
    inclusive = {"type": "number", "maximum": 5}
    assert takes(tok, byte_ids, inclusive, "", "5") and takes(tok, byte_ids, inclusive, "5", ".")
    assert takes(tok, byte_ids, inclusive, "5.", "0") and not takes(tok, byte_ids, inclusive, "5.", "1")
    assert accepts(tok, byte_ids, inclusive, "5.000")


def test_multiple_of_3(tok, byte_ids):
    s = {"type": "integer", "multipleOf": 3}
    assert takes(tok, byte_ids, s, "", "1") and not state(tok, byte_ids, s, "1").complete  # 12, 15, ...
    assert accepts(tok, byte_ids, s, "12") and accepts(tok, byte_ids, s, "0") and accepts(tok, byte_ids, s, "-9")
    assert not accepts(tok, byte_ids, s, "13")
    # after 19 digits, the 20th must make a multiple: 1111111111111111111x -> only x in {0, 3, 6, 9}... of them
    prefix = "1" * (MAX_INT_DIGITS - 1)
    ok = {d for d in "0123456789" if takes(tok, byte_ids, s, prefix, d)}
    assert ok == {d for d in "0123456789" if int(prefix + d) % 3 == 0}
    f = {"type": "number", "multipleOf": 0.25}
    assert accepts(tok, byte_ids, f, "1.75") and not accepts(tok, byte_ids, f, "1.3")
    assert takes(tok, byte_ids, f, "1.", "2") and not takes(tok, byte_ids, f, "1.", "3")  # 1.25 / 1.3x
    assert not takes(tok, byte_ids, f, "1.2", "4") and takes(tok, byte_ids, f, "1.2", "5")


def test_fraction_prefixes(tok, byte_ids):
    s = {"type": "number", "minimum": 0.5, "maximum": 0.75}
    assert takes(tok, byte_ids, s, "", "0") and not takes(tok, byte_ids, s, "", "-")
    assert not takes(tok, byte_ids, s, "", "1") and takes(tok, byte_ids, s, "0", ".")
    assert not takes(tok, byte_ids, s, "0.", "4") and takes(tok, byte_ids, s, "0.", "5")
    assert takes(tok, byte_ids, s, "0.", "7") and not takes(tok, byte_ids, s, "0.", "8")
    assert takes(tok, byte_ids, s, "0.7", "5") and not takes(tok, byte_ids, s, "0.7", "6")
    assert not state(tok, byte_ids, s, "0").complete and not state(tok, byte_ids, s, "0.").complete
    positive = {"type": "number", "exclusiveMinimum": 0}
    assert not takes(tok, byte_ids, positive, "", "-") and takes(tok, byte_ids, positive, "", "0")
    assert not state(tok, byte_ids, positive, "0.0").complete
    zeros = "0." + "0" * (MAX_FRAC_DIGITS - 1)
    assert not takes(tok, byte_ids, positive, zeros, "0") and takes(tok, byte_ids, positive, zeros, "1")
    assert accepts(tok, byte_ids, positive, zeros + "1")
    negative_zero = {"type": "number", "minimum": 0, "maximum": 0}
    assert accepts(tok, byte_ids, negative_zero, "-0") and accepts(tok, byte_ids, negative_zero, "0.00")
    assert not takes(tok, byte_ids, negative_zero, "-0.", "1")


def test_digit_limits_hold_with_bounds(tok, byte_ids):
    big = {"type": "number", "minimum": 1e19}
    assert accepts(tok, byte_ids, big, "1" + "0" * 19) and not takes(tok, byte_ids, big, "1" + "0" * 19, "0")
    assert not takes(tok, byte_ids, big, "", "0") and takes(tok, byte_ids, big, "", "9")
    assert not accepts(tok, byte_ids, big, "9" * 19)  # 19 digits are below 1e19
    huge = {"type": "integer", "minimum": 1e15}
    assert takes(tok, byte_ids, huge, "", "1") and not state(tok, byte_ids, huge, "9" * 15).complete
    assert accepts(tok, byte_ids, huge, "1" + "0" * 15)
    tiny = {"type": "number", "exclusiveMinimum": 0, "maximum": 1e-19}
    assert accepts(tok, byte_ids, tiny, "0." + "0" * 18 + "1") and accepts(tok, byte_ids, tiny, "0." + "0" * 19 + "5")
    assert not takes(tok, byte_ids, tiny, "0." + "0" * 18, "2")


def test_draft4_exclusive_flags(tok, byte_ids):
    s = {"type": "number", "minimum": 1, "exclusiveMinimum": True, "maximum": 2, "exclusiveMaximum": False}
    assert not accepts(tok, byte_ids, s, "1") and accepts(tok, byte_ids, s, "1.5") and accepts(tok, byte_ids, s, "2")
    assert not accepts(tok, byte_ids, s, "1.0")
    both = {"type": "integer", "minimum": 1, "exclusiveMinimum": 3}  # the stricter bound wins
    assert not accepts(tok, byte_ids, both, "3") and accepts(tok, byte_ids, both, "4")
    both = {"type": "integer", "minimum": 5, "exclusiveMinimum": 3}
    assert not accepts(tok, byte_ids, both, "4") and accepts(tok, byte_ids, both, "5")


def test_unbounded_numbers_keep_exponents(tok, byte_ids):
    assert accepts(tok, byte_ids, {"type": "number"}, "1e5")
    assert not accepts(tok, byte_ids, {"type": "number", "minimum": 0}, "1e5")
    assert accepts(tok, byte_ids, {"type": "number", "minimum": 0}, "100000")


def test_numbers_inside_structures(tok, byte_ids):
    s = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 3}, "maxItems": 3}
    assert accepts(tok, byte_ids, s, "[1, 2, 3]") and not accepts(tok, byte_ids, s, "[1, 4]")
    assert not takes(tok, byte_ids, s, "[1", "0") and takes(tok, byte_ids, s, "[1", ",")
    assert not takes(tok, byte_ids, s, "[", "0")
    o = {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.5}}, "required": ["n"]}
    assert accepts(tok, byte_ids, o, '{"n": 2.5}') and not accepts(tok, byte_ids, o, '{"n": 2.4}')
    assert not takes(tok, byte_ids, o, '{"n": 2.', "4") and takes(tok, byte_ids, o, '{"n": 2.5', "}")
    assert takes(tok, byte_ids, o, '{"n": 2.50', "0") and not takes(tok, byte_ids, o, '{"n": 2.50', "1")
    assert takes(tok, byte_ids, o, '{"n": 2', "}")  # 2 is a multiple of 0.5


# ---------------------------------------------------------------------------------------------------
# (b) Targeted prefixes: patterns


def test_anchored_pattern(tok, byte_ids):
    s = {"type": "string", "pattern": "^[a-z]{3}-[0-9]+$"}
    assert accepts(tok, byte_ids, s, '"abc-1"') and accepts(tok, byte_ids, s, '"xyz-0042"')
    assert not takes(tok, byte_ids, s, '"ab', "-") and not takes(tok, byte_ids, s, '"abc-', '"')
    assert not takes(tok, byte_ids, s, '"abc', "d") and not takes(tok, byte_ids, s, '"', "A")
    assert takes(tok, byte_ids, s, '"abc-1', "2") and takes(tok, byte_ids, s, '"abc-1', '"')
    assert not accepts(tok, byte_ids, s, '"abc-1x"')


def test_patterns_search_anywhere_unless_anchored(tok, byte_ids):
    s = {"type": "string", "pattern": "ab"}
    assert accepts(tok, byte_ids, s, '"xxaby"') and accepts(tok, byte_ids, s, '"ab"')
    assert not takes(tok, byte_ids, s, '"xa', '"') and takes(tok, byte_ids, s, '"xa', "b")
    start = {"type": "string", "pattern": "^a"}
    assert not takes(tok, byte_ids, start, '"', "b") and accepts(tok, byte_ids, start, '"abc"')
    end = {"type": "string", "pattern": "a$"}
    assert takes(tok, byte_ids, end, '"ab', "a") and not takes(tok, byte_ids, end, '"ab', '"')
    assert accepts(tok, byte_ids, end, '"ba"')
    either = {"type": "string", "pattern": "^x|y$"}
    assert accepts(tok, byte_ids, either, '"x1"') and accepts(tok, byte_ids, either, '"1y"')
    assert not accepts(tok, byte_ids, either, '"1x"')


def test_pattern_with_lengths(tok, byte_ids):
    s = {"type": "string", "pattern": "z", "minLength": 2, "maxLength": 4}
    assert accepts(tok, byte_ids, s, '"az"') and not accepts(tok, byte_ids, s, '"z"')
    assert not takes(tok, byte_ids, s, '"abc', "d")  # no room left for the z
    assert takes(tok, byte_ids, s, '"abc', "z") and not takes(tok, byte_ids, s, '"abcz', "z")
    fixed = {"type": "string", "pattern": "^(ab)+$", "maxLength": 5}
    assert accepts(tok, byte_ids, fixed, '"abab"') and not takes(tok, byte_ids, fixed, '"abab', "a")
    odd = {"type": "string", "pattern": "^(ab)+$", "minLength": 3, "maxLength": 3}
    with pytest.raises(SchemaError, match="no string of 3 to 3 characters"):
        JsonConstraint(tok, odd)


def test_pattern_sees_characters_not_bytes_or_escapes(tok, byte_ids):
    s = {"type": "string", "pattern": "^[é€]+$"}
    e_acute, euro, e_grave = "é".encode(), "€".encode(), "è".encode()
    assert takes(tok, byte_ids, s, '"', e_acute[:1]) and takes(tok, byte_ids, s, b'"' + e_acute[:1], e_acute[1:])
    assert not takes(tok, byte_ids, s, b'"' + e_acute[:1], e_grave[1:])  # same lead byte, other character
    assert takes(tok, byte_ids, s, b'"' + euro[:2], euro[2:]) and not takes(tok, byte_ids, s, '"', b"\xf0")
    assert accepts(tok, byte_ids, s, '"é€é"') and accepts(tok, byte_ids, s, '"\\u00e9\\u20AC"')
    assert not takes(tok, byte_ids, s, '"\\u00', "f") and takes(tok, byte_ids, s, '"\\u00', "e")
    assert not takes(tok, byte_ids, s, '"\\u', "3")  # \u3xxx is no é or €
    assert takes(tok, byte_ids, s, '"', "\\")  # \u00e9 can still come
    astral = {"type": "string", "pattern": "^\\uD83D\\uDE00$"}  # a surrogate pair is one character: 😀
    assert accepts(tok, byte_ids, astral, '"😀"')
    assert not takes(tok, byte_ids, astral, '"', "\\")  # escapes cannot write it (no surrogate escapes)
    escaped = {"type": "string", "pattern": '^\\n"$'}
    assert accepts(tok, byte_ids, escaped, '"\\n\\""') and accepts(tok, byte_ids, escaped, '"\\u000a\\u0022"')
    assert not takes(tok, byte_ids, escaped, '"', "a") and not takes(tok, byte_ids, escaped, '"\\', "t")


def test_pattern_classes_follow_ecma262(tok, byte_ids):
    digits = {"type": "string", "pattern": "^\\d+$"}  # ASCII digits only, unlike Python's \d
    assert accepts(tok, byte_ids, digits, '"123"') and not accepts(tok, byte_ids, digits, '"١٢"')
    dot = {"type": "string", "pattern": "^.$"}  # not a line terminator
    assert accepts(tok, byte_ids, dot, '"x"') and not accepts(tok, byte_ids, dot, '"\\n"')
    assert not accepts(tok, byte_ids, dot, '"\\r"') and accepts(tok, byte_ids, dot, '"\\t"')
    space = {"type": "string", "pattern": "^\\s$"}
    assert accepts(tok, byte_ids, space, '"\\u00a0"') and accepts(tok, byte_ids, space, '"\\ufeff"')
    word = {"type": "string", "pattern": "^\\w+$"}
    assert accepts(tok, byte_ids, word, '"a_1"') and not accepts(tok, byte_ids, word, '"é"')
    quantified = {"type": "string", "pattern": "^a{2,3}?b{2}(?:c|d)*[^x-z]$"}
    assert accepts(tok, byte_ids, quantified, '"aaabbcdw"') and not accepts(tok, byte_ids, quantified, '"abbw"')
    assert not accepts(tok, byte_ids, quantified, '"aabbz"')
    named = {"type": "string", "pattern": "^(?<year>\\d{4})-\\x41\\u{1F600}\\cJ$"}
    assert accepts(tok, byte_ids, named, '"2024-A😀\\n"')


@pytest.mark.parametrize("pattern, message", [
    ("(?=a)", "lookahead"), ("(?<!a)b", "lookbehind"), ("(a)\\1", "backreferences"), ("\\bword", "word-boundary"),
    ("\\p{L}", "property escapes"), ("a**", "nothing to repeat"), ("+a", "nothing to repeat"), ("(ab", "missing"),
    ("ab)", "unbalanced"), ("[z-a]", "out of order"), ("[ab", "unterminated"), ("a{3,2}", "out of order"),
    ("\\e", "unknown escape"), ("\\x4", "two hex digits"), ("a{1001}", "repetition count"), ("\\", "end of the pattern"),
    ("^*", "quantifier after an anchor"),
])
def test_bad_patterns_are_schema_errors(tok, pattern, message):
    with pytest.raises(SchemaError, match=f"'pattern' .* is not supported at #/properties/p: .*{message}"):
        JsonConstraint(tok, {"type": "object", "properties": {"p": {"type": "string", "pattern": pattern}}})


def test_regex_dfa_agrees_with_the_regex_module():
    """ECMA-262 and the regex module read these the same (with \\Z for $): random strings decide alike."""
    pats = ["a+", "^[a-c]{2}-[0-9]+$", "^(ab|cd)*$", "x|^y", "a$|^b", "^$", "[^abc]", "^\\d{2,4}$",
            "(?:a|b)c{1,3}?$", "^.$", "^[\\w.-]+@[a-c]+\\.(com|org)$", "a{2}", "^(a|)+$", "[-a]b", "^[a\\-c]$"]
    alphabet = "abcdxy019-.@é\n _"
    g = random.Random(0)
    for p in pats:
        dfa = compile_search(p)
        ours = regex.compile(p.replace("$", "\\Z"))
        for _ in range(1500):
            s = "".join(g.choice(alphabet) for _ in range(g.randint(0, 7)))
            assert (dfa is not None and dfa.matches(s)) == (ours.search(s) is not None), (p, s)
    assert compile_search("a^b") is None and compile_search("[]") is None and compile_search("$a") is None


# ---------------------------------------------------------------------------------------------------
# (b) Formats: known-valid and known-invalid strings, token by token


FORMAT_CASES = {
    "date-time": (["2024-02-29T12:00:00Z", "1999-12-31T23:59:59.123+05:30", "0001-01-01T00:00:00-00:00"],
                  ["2023-02-29T12:00:00Z", "2024-01-01 12:00:00Z", "2024-01-01T12:00:00", "2024-01-01T24:00:00Z",
                   "2024-01-01T12:00:00+0100", "2024-01-01t12:00:00z", "0000-01-01T00:00:00Z"]),
    "time": (["00:00:00Z", "23:59:59.999999999-12:00", "12:34:56+14:00"],
             ["24:00:00Z", "12:00:00", "12:60:00Z", "12:00:60Z", "1:00:00Z", "12:00:00.Z"]),
    "date": (["2024-02-29", "2000-02-29", "1999-04-30", "2023-12-31"],
             ["2023-02-29", "1900-02-29", "2023-04-31", "2023-13-01", "2023-00-10", "23-01-01", "2023-1-01"]),
    "duration": (["P1Y2M3DT4H5M6S", "P1W", "PT36H", "P3D", "PT0S", "P1M", "PT1M"],
                 ["P", "PT", "P1D2H", "1Y", "P1.5Y", "P1Y1W", "PT1H2S3M"]),
    "email": (["a@b", "first.last@example.com", "x+tag@sub.domain-1.org", "o'hara@x.io"],
              ["@example.com", "a@", "a..b@x.com", ".a@x.com", "a@-x.com", "a b@x.com", "a@x..com", "a@b@c"]),
    "hostname": (["example.com", "a-b.c", "localhost", "x" * 63 + ".com", "1.2.3"],
                 ["-a.com", "a-.com", "a_b.com", "a..b", "x" * 64 + ".com", ".a", "a.", ("a" * 50 + ".") * 5 + "abcd"]),
    "ipv4": (["192.168.0.1", "0.0.0.0", "255.255.255.255"],
             ["256.1.1.1", "01.2.3.4", "1.2.3", "1.2.3.4.5", "1.2.3.", " 1.2.3.4"]),
    "ipv6": (["::", "::1", "2001:db8::8a2e:370:7334", "::ffff:192.0.2.1", "1:2:3:4:5:6:7:8", "1::", "1:2:3:4:5:6::8",
              "fe80::1:2:3:4", "64:ff9b::1.2.3.4", "1:2:3:4:5:6:1.2.3.4", "ABCD:ef01::"],
             ["1:2:3:4:5:6:7:8:9", ":::", "1::2::3", "12345::", "::ffff:256.0.0.1", "1:2:3:4:5:6:7", ":1:2::",
              "fe80::1%eth0", "1:2:3:4:5:6:7:1.2.3.4", "::1.2.3"]),
    "uuid": (["123e4567-e89b-12d3-a456-426614174000", "00000000-0000-0000-0000-000000000000", "ABCDEF01-2345-6789-abcd-ef0123456789"],
             ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400", "g23e4567-e89b-12d3-a456-426614174000",
              "{123e4567-e89b-12d3-a456-426614174000}"]),
}


@pytest.mark.parametrize("name", list(FORMAT_CASES))
def test_formats_accept_valid_and_refuse_invalid_strings(tok, byte_ids, name):
    schema = {"type": "string", "format": name}
    good, bad = FORMAT_CASES[name]
    for s in good:
        text = json.dumps(s)
        assert accepts(tok, byte_ids, schema, text), s
        validate(text, schema)  # the example really is valid
        # fed as the tokenizer splits it, too
        c = JsonConstraint(tok, schema)
        for t in tok.encode(text):
            assert t in allowed_ids(c, tok), (s, c.text)
            c.advance(t)
        assert c.complete
    for s in bad:
        assert not accepts(tok, byte_ids, schema, json.dumps(s)), s


def _independent_check(name: str, s: str) -> bool:
    """The standard library's reading of the format (stricter checks where one exists)."""
    if name == "date":
        return datetime.date.fromisoformat(s) is not None
    if name == "date-time":
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")) is not None
    if name == "time":
        return datetime.time.fromisoformat(s.replace("Z", "+00:00")) is not None
    if name in ("ipv4", "ipv6"):
        return ipaddress.ip_address(s).version == int(name[-1])
    if name == "uuid":
        return str(uuid.UUID(s)) == s.lower()
    if name == "hostname":
        return len(s) <= 253 and all(0 < len(label) <= 63 for label in s.split("."))
    if name == "email":
        local, _, host = s.rpartition("@")
        return bool(local) and _independent_check("hostname", host)
    return True


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_string_a_format_dfa_accepts_is_valid(name):
    """Sample the format's DFA at random: jsonschema's checker and the standard library agree."""
    dfa = compile_search(FORMATS[name])
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    g = random.Random(name)
    for _ in range(300):
        s, d = [], 0
        while not (dfa.accept[d] and (g.random() < 0.3 or not dfa.to[d])) and len(s) < 300:
            i = g.randrange(len(dfa.to[d]))
            cp = g.randint(dfa.lo[d][i], min(dfa.hi[d][i], dfa.lo[d][i] + 3))
            s.append(chr(cp))
            d = dfa.to[d][i]
        text = "".join(s)
        assert dfa.accept[d], text
        if name == "hostname" and len(text) > 253:
            continue  # the 253-character limit is the string's maxLength, not the DFA's
        assert checker.conforms(text, name), (name, text)
        assert _independent_check(name, text), (name, text)


# ---------------------------------------------------------------------------------------------------
# oneOf


def test_one_of_is_exact(tok, byte_ids):
    s = WALKS["one_of_discriminated"]
    assert accepts(tok, byte_ids, s, '{"kind": "a", "x": 3}')
    assert not accepts(tok, byte_ids, s, '{"kind": "a", "y": "00000000-0000-0000-0000-000000000000"}')
    t = WALKS["one_of_types"]
    assert accepts(tok, byte_ids, t, "-3") and accepts(tok, byte_ids, t, '"xa"') and accepts(tok, byte_ids, t, "null")
    assert not accepts(tok, byte_ids, t, "3")


@pytest.mark.parametrize("schema", [
    {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "array"}]},
    {"oneOf": [{"const": 1}, {"const": "1"}, {"enum": [2, 3]}]},
    {"oneOf": [{"type": "object", "properties": {"a": {}}, "required": ["a"], "additionalProperties": False},
               {"type": "object", "properties": {"b": {}}, "required": ["b"], "additionalProperties": False}]},
    {"oneOf": [{"type": "object", "properties": {"t": {"enum": ["x", "y"]}, "v": {}}, "required": ["t"]},
               {"type": "object", "properties": {"t": {"const": "z"}, "v": {}}, "required": ["t"]}]},
    {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "string", "minLength": 4}]},
    {"oneOf": [{"type": "string", "pattern": "^a"}, {"type": "string", "pattern": "^b"}]},
    {"oneOf": [{"type": "string", "format": "date"}, {"type": "string", "pattern": "^[a-z]+$"}]},
    {"oneOf": [{"type": "integer", "maximum": 9}, {"type": "integer", "minimum": 10}]},
    {"oneOf": [{"type": "number", "exclusiveMaximum": 0}, {"type": "number", "minimum": 0}]},
    {"oneOf": [{"type": "array", "maxItems": 1}, {"type": "array", "minItems": 2}]},
    {"oneOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1},
               {"type": "array", "items": {"type": "integer"}, "minItems": 1}]},
    {"$defs": {"a": {"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]}},
     "oneOf": [{"$ref": "#/$defs/a"}, {"type": "null"}, {"anyOf": [{"type": "string"}, {"type": "boolean"}]}]},
    {"oneOf": [{"const": True}, {"type": "boolean", "enum": [False]}]},
    {"oneOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "time"},
               {"type": "string", "format": "email"}, {"type": "string", "format": "ipv6"}]},
])
def test_one_of_alternatives_told_apart_are_accepted(tok, schema):
    JsonConstraint(tok, schema)
    for seed in range(6):
        c = random_walk(tok, schema, seed)
        assert c.ended
        validate(c.text, schema)


@pytest.mark.parametrize("schema, pair", [
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "alternative 0 may also match alternative 1"),
    ({"oneOf": [{"type": "string"}, {"type": "string"}]}, "alternative 0 may also match alternative 1"),
    ({"oneOf": [{"type": "null"}, {}]}, "alternative 0 may also match alternative 1"),
    ({"oneOf": [{"const": 1}, {"const": 1.0}]}, "alternative 0 may also match alternative 1"),
    ({"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                {"type": "object", "properties": {"b": {"type": "integer"}}}]}, "alternative 0 may also match"),
    ({"oneOf": [{"type": "string", "pattern": "a"}, {"type": "string", "pattern": "b"}]}, "alternative 0 may also match alternative 1"),
    ({"oneOf": [{"type": "number", "maximum": 0}, {"type": "number", "minimum": 0}]},
     "alternative 0 may also match alternative 1"),
])
def test_one_of_alternatives_that_may_overlap_are_schema_errors(tok, schema, pair):
    with pytest.raises(SchemaError, match=f"'oneOf' at #: a value of {pair}.*Use 'anyOf'"):
        JsonConstraint(tok, schema)
    any_of = json.loads(json.dumps(schema).replace('"oneOf"', '"anyOf"'))
    JsonConstraint(tok, any_of)  # the same alternatives are fine as anyOf


# ---------------------------------------------------------------------------------------------------
# Schema errors


@pytest.mark.parametrize("schema, message", [
    ({"type": "integer", "minimum": 5, "maximum": 3}, "'minimum' .5. is larger than 'maximum' .3. at #"),
    ({"type": "number", "exclusiveMinimum": 2, "maximum": 1.5}, "'exclusiveMinimum' .2. is larger than 'maximum'"),
    ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1}, "leave no number between them"),
    ({"type": "number", "minimum": 1, "exclusiveMaximum": 1}, "leave no number between them"),
    ({"type": "number", "minimum": "3"}, "'minimum' must be a number, got '3'"),
    ({"type": "number", "maximum": True}, "'maximum' must be a number"),
    ({"type": "number", "multipleOf": 0}, "'multipleOf' must be a positive number"),
    ({"type": "number", "multipleOf": -2}, "'multipleOf' must be a positive number"),
    ({"type": "number", "exclusiveMinimum": True}, "'exclusiveMinimum': true needs 'minimum'"),
    ({"type": "integer", "minimum": 0.2, "maximum": 0.8}, "admits no .finite. JSON value: no integer within"),
    ({"type": "integer", "minimum": 1, "maximum": 5, "multipleOf": 7}, "no integer within the bounds"),
    ({"type": "number", "minimum": 1e25}, f"at most {MAX_INT_DIGITS} integer"),
    ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1e-21}, "no number within"),
    ({"type": "string", "pattern": 3}, "'pattern' must be a string"),
    ({"type": "string", "pattern": "a^b"}, "'pattern' 'a\\^b' matches no string"),
    ({"type": "string", "format": "iri"}, "unsupported 'format' 'iri' at # .supported: date-time, time"),
    ({"type": "string", "format": "date", "pattern": "^x"}, "no string matches both 'pattern' and 'format' 'date'"),
    ({"type": "string", "format": "date", "maxLength": 9}, "no string of 0 to 9 characters"),
    ({"enum": [1, 2], "minimum": 3}, "no value of 'enum'"),
    ({"enum": ["a", "b"], "pattern": "c"}, "no value of 'enum'"),
])
def test_bad_schemas_name_the_problem(tok, schema, message):
    with pytest.raises(SchemaError, match=message):
        JsonConstraint(tok, schema)


def test_impossible_alternatives_are_pruned_not_errors(tok, byte_ids):
    s = {"anyOf": [{"type": "integer", "minimum": 0.2, "maximum": 0.8}, {"type": "string", "pattern": "a^"},
                   {"type": "null"}]}
    assert accepts(tok, byte_ids, s, "null") and not takes(tok, byte_ids, s, "", "0")
    assert not takes(tok, byte_ids, s, "", '"')
    t = {"type": ["integer", "string"], "minimum": 0.2, "maximum": 0.8, "pattern": "^x$"}
    assert accepts(tok, byte_ids, t, '"x"') and not takes(tok, byte_ids, t, "", "0")


# ---------------------------------------------------------------------------------------------------
# (c) Cost


@pytest.mark.timeout(600)
def test_long_walks_in_pattern_strings_run(tok):
    """A few hundred restrict() calls inside pattern/format strings over the 6144-token vocabulary."""
    for schema in ({"type": "string", "pattern": "q", "maxLength": 2000},
                   {"type": "string", "format": "email", "maxLength": 2000}):
        c = JsonConstraint(tok, schema)
        g = random.Random(0)
        for _ in range(300):
            allowed = [t for t in allowed_ids(c, tok) if t not in tok.eos_ids]
            c.advance(g.choice(allowed))
        assert not c.ended and len(c.text) > 300
