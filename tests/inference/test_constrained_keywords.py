"""Constrained decoding with numeric bounds, ``multipleOf``, ``pattern``, ``format`` and exact ``oneOf``.

Outputs are checked with the ``jsonschema`` package (draft 2020-12, formats asserted), reading numbers
as decimals so that bounds and multiples are exact; prefixes are checked token by token against oracles
that enumerate the valid texts (small numeric ranges) or use the ``regex`` module's partial matching
(anchored patterns), and against :meth:`JsonConstraint.advance`. The tokenizer is the embedded one
(6144 base tokens, every single byte among them).
"""

from __future__ import annotations

import decimal
import json
import random
from decimal import Decimal

import jsonschema
import pytest
import regex

from llama4.inference.constrained import EXACT_FORMATS, JsonConstraint, SchemaError
from tests.inference.constrained_support import (  # noqa: F401 (fixtures)
    accepts,
    advance_agrees,
    allowed_ids,
    closing_tokens,
    decimals,
    feed,
    one_byte_tokens,
    takes,
    tok,
    walk,
)

FORMATS = ("date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri")


# ---------------------------------------------------------------------------------------------------
# Helpers


def state(tok, schema, prefix: str | bytes) -> JsonConstraint:
    c = JsonConstraint(tok, schema)
    feed(c, tok, prefix)
    return c


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
    # the walks do explore (0.501 and 0.502 are the fine multiples' only values: llguidance writes three digits)
    assert len(seen) > {"enum_filtered": 2, "num_fine_multiple": 1}.get(name, 5), seen


def test_enum_values_are_filtered_by_the_new_keywords(tok):
    outs = {random_walk(tok, WALKS["enum_filtered"], s).text for s in range(40)}
    assert outs == {"5", "12", '"2024-01-01"'}


# ---------------------------------------------------------------------------------------------------
# Oracles: every token at states along walks


def check_tokens(c: JsonConstraint, tok, expected_prefix, expected_complete, every_spelling=True) -> list[int]:
    """restrict() against an oracle (on the bytes so far plus each token) and against advance().

    Every allowed token keeps a valid prefix. Where two or more bytes may come next, every token that
    keeps a valid prefix is allowed; where the grammar forces the next byte, llguidance allows the
    canonical tokenization of the forced bytes, which the oracle must accept. ``expected_prefix`` may
    say None: it cannot tell (such a token must then still agree with advance()). Without
    ``every_spelling`` a text that is complete for the oracle need not be complete for the constraint.
    """
    allowed = set(allowed_ids(c, tok))
    data = bytes(c._bytes)
    eos = set(tok.eos_ids)
    assert c.complete == expected_complete(data) if every_spelling else c.complete <= expected_complete(data), data
    assert (allowed & eos) == (eos if c.complete else set()), data
    known = {t: expected_prefix(data + tok.token_bytes(t)) for t in range(tok.num_base_tokens)}
    valid = {t for t, ok in known.items() if ok}
    assert not {t for t in allowed - eos if known[t] is False}, data
    next_bytes = {b for b in range(256) if expected_prefix(data + bytes([b]))}
    if every_spelling:
        assert next_bytes <= {tok.token_bytes(t)[0] for t in allowed - eos}, data
    if len(next_bytes) > 1 and every_spelling:
        assert {t for t in allowed - eos if known[t] is not None} == valid, data
    advance_agrees(c, tok, allowed)
    return sorted(allowed - eos)


def spellings(value: Decimal, integer: bool, frac_digits: int) -> set[str]:
    """The ways to write ``value`` without an exponent, with up to ``frac_digits`` fraction digits."""
    sign = "-" if value < 0 else ""
    whole, _, frac = format(abs(value), "f").partition(".")
    frac = frac.rstrip("0")
    out = {sign + whole} if not frac else set()
    if value == 0:
        out |= {"0", "-0"}
    if not integer:
        signs = ("", "-") if value == 0 else (sign,)
        out |= {f"{s}{whole}.{frac.ljust(k, '0')}" for s in signs for k in range(max(len(frac), 1), frac_digits + 1)}
    return out


ENUMERABLE = [  # (schema, its values, the values llguidance 1.9 cannot write): numbers in small ranges
    ({"type": "integer", "minimum": -20, "maximum": 130, "multipleOf": 3}, range(-18, 130, 3), set()),
    ({"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 5}, range(-2, 5), set()),
    ({"type": "integer", "minimum": 10, "maximum": 19}, range(10, 20), set()),
    ({"type": "integer", "minimum": 95, "maximum": 1005, "multipleOf": 100}, range(100, 1001, 100), set()),
    ({"type": "number", "minimum": 0.25, "maximum": 0.5, "multipleOf": 0.125}, ["0.25", "0.375", "0.5"], {"0.5"}),
    ({"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.5}, ["-1", "-0.5", "0", "0.5", "1"], set()),
    ({"type": "number", "exclusiveMinimum": 2, "maximum": 3, "multipleOf": 0.75}, ["2.25", "3"], set()),
]


@pytest.mark.parametrize("k", range(len(ENUMERABLE)))
def test_numbers_allow_only_completable_prefixes_and_nearly_every_value(tok, k):
    """Every allowed token keeps a prefix of a valid number, and every complete number is valid. Not
    every spelling is taken (a multiple of 0.125 has three fraction digits: ``0.250``), and llguidance
    misses a few values (the maximum 0.5 of multiples of 0.125): nothing else may be missed."""
    schema, values, unwritable = ENUMERABLE[k]
    integer = schema["type"] == "integer"
    values = [Decimal(v) for v in values]
    texts = {t.encode() for v in values for t in spellings(v, integer, 40)}  # longer than a walk writes
    prefixes = {t[:i] for t in texts for i in range(len(t) + 1)}
    reached = set()
    for seed in range(12):
        c = JsonConstraint(tok, schema)
        g = random.Random(seed)
        for _ in range(12):
            choices = check_tokens(c, tok, prefixes.__contains__, texts.__contains__, every_spelling=False)
            if not choices:
                break
            c.advance(g.choice(choices))
        if c.complete:
            reached.add(Decimal(c.text))
    writable = {v for v in values if any(accepts(tok, schema, t) for t in spellings(v, integer, 4))}
    assert set(values) - writable <= {Decimal(v) for v in unwritable}, set(values) - writable
    assert len(reached) > 1


ANCHORED = [  # patterns that read the same in ECMA-262 and in the regex module
    ({"type": "string", "pattern": "^[a-z]{3}-[0-9]+$"}, r"[a-z]{3}-[0-9]+"),
    ({"type": "string", "pattern": "^(ab|cd)*e?$"}, r"(ab|cd)*e?"),
    ({"type": "string", "format": "date"}, EXACT_FORMATS["date"]["pattern"][1:-1]),
    ({"type": "string", "format": "uuid"}, r"[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}"),
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


# ---------------------------------------------------------------------------------------------------
# (b) Targeted prefixes: numbers


def test_minimum_10(tok):
    s = {"type": "integer", "minimum": 10}
    assert not takes(tok, s, "", "0") and not takes(tok, s, "", "-")
    assert takes(tok, s, "", "1") and takes(tok, s, "", "9")  # 1x, 9x
    assert not state(tok, s, "1").complete and not state(tok, s, "9").complete
    assert accepts(tok, s, "10") and accepts(tok, s, "99999")
    assert not accepts(tok, s, "9") and not accepts(tok, s, "-10")
    n = {"type": "number", "minimum": 10}
    assert not takes(tok, n, "", "0") and not takes(tok, n, "9", ".")  # 9.x < 10
    assert takes(tok, n, "10", ".") and accepts(tok, n, "10.5")
    assert not takes(tok, n, "1", "e")  # no exponent with bounds


def test_exclusive_maximum_5(tok):
    s = {"type": "integer", "exclusiveMaximum": 5}
    assert not takes(tok, s, "", "5") and takes(tok, s, "", "4")
    assert accepts(tok, s, "4") and accepts(tok, s, "-7000") and not accepts(tok, s, "5")
    assert not takes(tok, s, "4", "0")  # 40
    n = {"type": "number", "exclusiveMaximum": 5}
    assert not takes(tok, n, "", "5")  # 5.x >= 5 and 5x > 5
    assert accepts(tok, n, "4.999") and takes(tok, n, "4", ".")
    inclusive = {"type": "number", "maximum": 5}
    assert takes(tok, inclusive, "", "5") and takes(tok, inclusive, "5", ".")
    assert takes(tok, inclusive, "5.", "0") and not takes(tok, inclusive, "5.", "1")
    assert accepts(tok, inclusive, "5.000")


def test_multiple_of_3(tok):
    s = {"type": "integer", "multipleOf": 3}
    assert takes(tok, s, "", "1") and not state(tok, s, "1").complete  # 12, 15, ...
    assert accepts(tok, s, "12") and accepts(tok, s, "0") and accepts(tok, s, "-9")
    assert not accepts(tok, s, "13")
    # digits are not bounded: any digit keeps a prefix completable, and the value decides completeness
    prefix = "1" * 19
    assert all(takes(tok, s, prefix, d) for d in "0123456789")
    assert {d for d in "0123456789" if state(tok, s, prefix + d).complete} == \
        {d for d in "0123456789" if int(prefix + d) % 3 == 0}
    f = {"type": "number", "multipleOf": 0.25}
    assert accepts(tok, f, "1.75") and not accepts(tok, f, "1.3") and not accepts(tok, f, "1.30")
    assert takes(tok, f, "1.", "2") and not takes(tok, f, "1.", "3")  # 1.25 / 1.3x
    assert not takes(tok, f, "1.2", "4") and takes(tok, f, "1.2", "5")


def test_fraction_prefixes(tok):
    s = {"type": "number", "minimum": 0.5, "maximum": 0.75}
    assert takes(tok, s, "", "0") and not takes(tok, s, "", "-")
    assert not takes(tok, s, "", "1") and takes(tok, s, "0", ".")
    assert not takes(tok, s, "0.", "4") and takes(tok, s, "0.", "5")
    assert takes(tok, s, "0.", "7") and not takes(tok, s, "0.", "8")
    assert takes(tok, s, "0.7", "5") and not takes(tok, s, "0.7", "6")
    assert not state(tok, s, "0").complete and not state(tok, s, "0.").complete
    positive = {"type": "number", "exclusiveMinimum": 0}
    assert not takes(tok, positive, "", "-") and takes(tok, positive, "", "0")
    assert not state(tok, positive, "0.0").complete
    zeros = "0." + "0" * 19
    assert takes(tok, positive, zeros, "0") and takes(tok, positive, zeros, "1")
    assert not state(tok, positive, zeros).complete
    assert accepts(tok, positive, zeros + "1")
    zero = {"type": "number", "minimum": 0, "maximum": 0}
    assert accepts(tok, zero, "0") and not accepts(tok, zero, "0.1") and not accepts(tok, zero, "-1")


def test_large_and_small_bounds(tok):
    huge = {"type": "integer", "minimum": 1e15}
    assert takes(tok, huge, "", "1") and not state(tok, huge, "9" * 15).complete
    assert accepts(tok, huge, "1" + "0" * 15)
    tiny = {"type": "number", "exclusiveMinimum": 0, "maximum": 1e-19}
    assert accepts(tok, tiny, "0." + "0" * 18 + "1") and accepts(tok, tiny, "0." + "0" * 19 + "5")
    assert not takes(tok, tiny, "0." + "0" * 18, "2")
    # llguidance cannot write ranges of floats with bounds this far out: a schema error, not a wrong number
    with pytest.raises(SchemaError, match="Failed to generate regex for float range"):
        JsonConstraint(tok, {"type": "number", "minimum": 1e19})


def test_draft4_exclusive_flags(tok):
    s = {"type": "number", "minimum": 1, "exclusiveMinimum": True, "maximum": 2, "exclusiveMaximum": False}
    assert not accepts(tok, s, "1") and accepts(tok, s, "1.5") and accepts(tok, s, "2")
    assert not accepts(tok, s, "1.0")
    both = {"type": "integer", "minimum": 1, "exclusiveMinimum": 3}  # the stricter bound wins
    assert not accepts(tok, both, "3") and accepts(tok, both, "4")
    both = {"type": "integer", "minimum": 5, "exclusiveMinimum": 3}
    assert not accepts(tok, both, "4") and accepts(tok, both, "5")


def test_unbounded_numbers_keep_exponents(tok):
    assert accepts(tok, {"type": "number"}, "1e5")
    assert not accepts(tok, {"type": "number", "minimum": 0}, "1e5")
    assert accepts(tok, {"type": "number", "minimum": 0}, "100000")


def test_numbers_inside_structures(tok):
    s = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 3}, "maxItems": 3}
    assert accepts(tok, s, "[1, 2, 3]") and not accepts(tok, s, "[1, 4]")
    assert not takes(tok, s, "[1", "0") and takes(tok, s, "[1", ",")
    assert not takes(tok, s, "[", "0")
    o = {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.5}}, "required": ["n"]}
    assert accepts(tok, o, '{"n": 2.5}') and not accepts(tok, o, '{"n": 2.4}')
    assert not takes(tok, o, '{"n": 2.', "4") and takes(tok, o, '{"n": 2.5', "}")
    assert takes(tok, o, '{"n": 2', "}")  # 2 is a multiple of 0.5


# ---------------------------------------------------------------------------------------------------
# (b) Targeted prefixes: patterns


def test_anchored_pattern(tok):
    s = {"type": "string", "pattern": "^[a-z]{3}-[0-9]+$"}
    assert accepts(tok, s, '"abc-1"') and accepts(tok, s, '"xyz-0042"')
    assert not takes(tok, s, '"ab', "-") and not takes(tok, s, '"abc-', '"')
    assert not takes(tok, s, '"abc', "d") and not takes(tok, s, '"', "A")
    assert takes(tok, s, '"abc-1', "2") and takes(tok, s, '"abc-1', '"')
    assert not accepts(tok, s, '"abc-1x"')


def test_patterns_search_anywhere_unless_anchored(tok):
    s = {"type": "string", "pattern": "ab"}
    assert accepts(tok, s, '"xxaby"') and accepts(tok, s, '"ab"')
    assert not takes(tok, s, '"xa', '"') and takes(tok, s, '"xa', "b")
    start = {"type": "string", "pattern": "^a"}
    assert not takes(tok, start, '"', "b") and accepts(tok, start, '"abc"')
    end = {"type": "string", "pattern": "a$"}
    assert takes(tok, end, '"ab', "a") and not takes(tok, end, '"ab', '"')
    assert accepts(tok, end, '"ba"')
    either = {"type": "string", "pattern": "^x|y$"}
    assert accepts(tok, either, '"x1"') and accepts(tok, either, '"1y"')
    assert not accepts(tok, either, '"1x"')


def test_pattern_with_lengths(tok):
    s = {"type": "string", "pattern": "z", "minLength": 2, "maxLength": 4}
    assert accepts(tok, s, '"az"') and not accepts(tok, s, '"z"')
    assert not takes(tok, s, '"abc', "d")  # no room left for the z
    assert takes(tok, s, '"abc', "z") and not takes(tok, s, '"abcz', "z")
    fixed = {"type": "string", "pattern": "^(ab)+$", "maxLength": 5}
    assert accepts(tok, fixed, '"abab"') and not takes(tok, fixed, '"abab', "a")
    odd = {"type": "string", "pattern": "^(ab)+$", "minLength": 3, "maxLength": 3}
    with pytest.raises(SchemaError, match="Unsatisfiable schema: Regex is empty"):
        JsonConstraint(tok, odd)


def test_pattern_sees_characters_not_bytes_or_escapes(tok):
    s = {"type": "string", "pattern": "^[é€]+$"}
    e_acute, euro, e_grave = "é".encode(), "€".encode(), "è".encode()
    assert takes(tok, s, '"', e_acute[:1]) and takes(tok, s, b'"' + e_acute[:1], e_acute[1:])
    assert not takes(tok, s, b'"' + e_acute[:1], e_grave[1:])  # same lead byte, other character
    assert takes(tok, s, b'"' + euro[:2], euro[2:]) and not takes(tok, s, '"', b"\xf0")
    assert accepts(tok, s, '"é€é"')
    assert not takes(tok, s, '"', "\\")  # a \u escape is only for control characters
    escaped = {"type": "string", "pattern": '^\\n"$'}  # the pattern sees the characters the escapes write
    assert accepts(tok, escaped, '"\\n\\""') and accepts(tok, escaped, '"\\u000a\\""')
    assert not takes(tok, escaped, '"', "a") and not takes(tok, escaped, '"\\', "t")
    astral = {"type": "string", "pattern": "^[😀-😂]{2}$"}
    assert accepts(tok, astral, '"😀😂"') and not accepts(tok, astral, '"😀😃"')


def test_pattern_classes(tok):
    """ECMA-262 where llguidance reads it so: ``\\d`` and ``\\w`` are ASCII; ``.`` is any character but
    a newline (ECMA-262 also excludes ``\\r``) and ``\\s`` is Unicode's White_Space (ECMA-262 also has
    U+FEFF)."""
    digits = {"type": "string", "pattern": "^\\d+$"}  # ASCII digits only, unlike Python's \d
    assert accepts(tok, digits, '"123"') and not accepts(tok, digits, '"١٢"')
    dot = {"type": "string", "pattern": "^.$"}
    assert accepts(tok, dot, '"x"') and not accepts(tok, dot, '"\\n"') and accepts(tok, dot, '"\\t"')
    space = {"type": "string", "pattern": "^\\s$"}
    assert accepts(tok, space, '"\u00a0"') and accepts(tok, space, '"\\t"') and not accepts(tok, space, '"x"')
    word = {"type": "string", "pattern": "^\\w+$"}
    assert accepts(tok, word, '"a_1"') and not accepts(tok, word, '"é"')
    quantified = {"type": "string", "pattern": "^a{2,3}?b{2}(?:c|d)*[^x-z]$"}
    assert accepts(tok, quantified, '"aaabbcdw"') and not accepts(tok, quantified, '"abbw"')
    assert not accepts(tok, quantified, '"aabbz"')
    named = {"type": "string", "pattern": "^(?<year>\\d{4})-\\x41\\p{Lu}$"}
    assert accepts(tok, named, '"2024-AÉ"') and not accepts(tok, named, '"2024-Aé"')


@pytest.mark.parametrize("pattern, message", [
    ("(?=a)", "look-around"), ("(?<!a)b", "look-around"), ("(a)\\1", "backreferences"), ("\\bword", "WordUnicode"),
    ("+a", "repetition operator missing expression"), ("(ab", "unclosed group"), ("ab)", "unopened group"),
    ("[z-a]", "invalid character class range"), ("[ab", "unclosed character class"),
    ("a{3,2}", "invalid repetition count range"), ("\\e", "unrecognized escape sequence"),
    ("\\x4", "incomplete escape sequence"), ("^*", "lookarounds not supported"), ("a^b", "lookarounds not supported"),
])
def test_bad_patterns_are_schema_errors(tok, pattern, message):
    with pytest.raises(SchemaError, match=message):
        JsonConstraint(tok, {"type": "object", "properties": {"p": {"type": "string", "pattern": pattern}}})


def test_patterns_agree_with_the_regex_module():
    """ECMA-262 and the regex module read these the same (with \\Z for $): random strings decide alike,
    written through the constraint (the pattern of a top-level string)."""
    import llama4

    tok = llama4.load_tokenizer()
    pats = ["a+", "^[a-c]{2}-[0-9]+$", "^(ab|cd)*$", "x|^y", "a$|^b", "^$", "[^abc]", "^\\d{2,4}$",
            "(?:a|b)c{1,3}?$", "^[\\w.-]+@[a-c]+\\.(com|org)$", "a{2}", "^(a|)+$", "[-a]b", "^[a\\-c]$"]
    alphabet = "abcdxy019-.@é _"
    g = random.Random(0)
    for p in pats:
        ours = regex.compile(p.replace("$", "\\Z"))
        schema = {"type": "string", "pattern": p}
        for _ in range(150):
            s = "".join(g.choice(alphabet) for _ in range(g.randint(0, 7)))
            assert accepts(tok, schema, json.dumps(s, ensure_ascii=False)) == (ours.search(s) is not None), (p, s)


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
    # llguidance writes no IPv6 address with an IPv4 tail (::ffff:192.0.2.1): valid, but never generated
    "ipv6": (["::", "::1", "2001:db8::8a2e:370:7334", "1:2:3:4:5:6:7:8", "1::", "1:2:3:4:5:6::8", "fe80::1:2:3:4",
              "ABCD:ef01::"],
             ["1:2:3:4:5:6:7:8:9", ":::", "1::2::3", "12345::", "::ffff:256.0.0.1", "1:2:3:4:5:6:7", ":1:2::",
              "fe80::1%eth0", "1:2:3:4:5:6:7:1.2.3.4", "::1.2.3"]),
    "uuid": (["123e4567-e89b-12d3-a456-426614174000", "00000000-0000-0000-0000-000000000000",
              "ABCDEF01-2345-6789-abcd-ef0123456789"],
             ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400",
              "g23e4567-e89b-12d3-a456-426614174000", "{123e4567-e89b-12d3-a456-426614174000}"]),
    "uri": (["http://example.com", "https://user:pw@example.com:8080/a/b;c?q=1&r=%20#frag", "urn:isbn:0451450523"],
            ["", "example.com", "/relative", "1http://x", "http://exa mple.com", "http://x/%zz"]),
}


@pytest.mark.parametrize("name", list(FORMAT_CASES))
def test_formats_accept_valid_and_refuse_invalid_strings(tok, name):
    schema = {"type": "string", "format": name}
    good, bad = FORMAT_CASES[name]
    for s in good:
        text = json.dumps(s)
        assert accepts(tok, schema, text), s
        validate(text, schema)  # the example really is valid
    for s in bad:
        assert not accepts(tok, schema, json.dumps(s)), s


def test_formats_checked_exactly_here_are_the_exact_patterns(tok):
    """The formats llguidance checks loosely go through EXACT_FORMATS, also nested and beside a pattern."""
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date", "pattern": "^2024-"}},
              "required": ["d"], "$defs": {"t": {"format": "time"}}, "additionalProperties": {"$ref": "#/$defs/t"}}
    assert accepts(tok, schema, '{"d": "2024-02-29", "x": "12:00:00Z"}')
    assert not accepts(tok, schema, '{"d": "2024-02-30"}') and not accepts(tok, schema, '{"d": "2023-01-01"}')
    assert not accepts(tok, schema, '{"d": "2024-02-29", "x": "12:00:60Z"}')
    assert accepts(tok, schema, '{"d": "2024-02-29", "x": 5}')  # a format constrains strings only


# ---------------------------------------------------------------------------------------------------
# oneOf


def test_one_of_is_exact(tok):
    s = WALKS["one_of_discriminated"]
    assert accepts(tok, s, '{"kind": "a", "x": 3}')
    assert not accepts(tok, s, '{"kind": "a", "y": "00000000-0000-0000-0000-000000000000"}')
    t = WALKS["one_of_types"]
    assert accepts(tok, t, "-3") and accepts(tok, t, '"xa"') and accepts(tok, t, "null")
    assert not accepts(tok, t, "3")


@pytest.mark.parametrize("schema", [
    {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "array"}]},
    {"oneOf": [{"type": "object", "properties": {"a": {}}, "required": ["a"], "additionalProperties": False},
               {"type": "object", "properties": {"b": {}}, "required": ["b"], "additionalProperties": False}]},
    {"oneOf": [{"type": "object", "properties": {"t": {"enum": ["x", "y"]}, "v": {}}, "required": ["t"]},
               {"type": "object", "properties": {"t": {"const": "z"}, "v": {}}, "required": ["t"]}]},
    {"oneOf": [{"const": True}, {"type": "boolean", "enum": [False]}]},
    {"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}, "n": {"type": "integer"}},
                "required": ["k", "n"]},
               {"type": "object", "properties": {"k": {"const": "b"}, "s": {"type": "string"}},
                "required": ["k", "s"]}]},
    {"$defs": {"Cat": {"type": "object", "title": "Cat", "required": ["pet_type", "meows"],
                       "properties": {"pet_type": {"const": "cat", "type": "string"}, "meows": {"type": "integer"}}},
               "Dog": {"type": "object", "title": "Dog", "required": ["pet_type", "barks"],
                       "properties": {"pet_type": {"const": "dog", "type": "string"}, "barks": {"type": "number"}}}},
     "type": "object", "required": ["pet"],
     "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                            "discriminator": {"propertyName": "pet_type"}}}},  # pydantic's discriminated union
])
def test_one_of_alternatives_told_apart_are_accepted(tok, schema):
    JsonConstraint(tok, schema)
    for seed in range(6):
        c = random_walk(tok, schema, seed)
        assert c.ended
        validate(c.text, schema)


@pytest.mark.parametrize("schema", [
    # alternatives that may overlap
    {"oneOf": [{"type": "integer"}, {"type": "number"}]},
    {"oneOf": [{"type": "string"}, {"type": "string"}]},
    {"oneOf": [{"type": "null"}, {}]},
    {"oneOf": [{"const": 1}, {"const": 1.0}]},
    {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},  # {"a": 1, "b": 1}
    {"oneOf": [{"type": "string", "pattern": "a"}, {"type": "string", "pattern": "b"}]},
    {"oneOf": [{"type": "number", "maximum": 0}, {"type": "number", "minimum": 0}]},
    # disjoint, but llguidance does not prove it (lengths, patterns, ranges, item types, formats)
    {"oneOf": [{"const": 1}, {"const": "1"}, {"enum": [2, 3]}]},
    {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "string", "minLength": 4}]},
    {"oneOf": [{"type": "string", "pattern": "^a"}, {"type": "string", "pattern": "^b"}]},
    {"oneOf": [{"type": "integer", "maximum": 9}, {"type": "integer", "minimum": 10}]},
    {"oneOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1},
               {"type": "array", "items": {"type": "integer"}, "minItems": 1}]},
    {"oneOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "email"}]},
    {"$defs": {"a": {"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
               "b": {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]}},
     "oneOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}]},  # proved inline (above), not through these $refs
])
def test_one_of_alternatives_not_proved_apart_are_schema_errors(tok, schema):
    with pytest.raises(SchemaError, match="oneOf constraints are not supported"):
        JsonConstraint(tok, schema)
    any_of = json.loads(json.dumps(schema).replace('"oneOf"', '"anyOf"'))
    JsonConstraint(tok, any_of)  # the same alternatives are fine as anyOf


# ---------------------------------------------------------------------------------------------------
# Schema errors


@pytest.mark.parametrize("schema, message", [
    ({"type": "integer", "minimum": 5, "maximum": 3}, r"minimum \(5\) is greater than maximum \(3\)"),
    ({"type": "number", "exclusiveMinimum": 2, "maximum": 1.5}, r"exclusiveMinimum \(2\) is greater than maximum"),
    ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1}, "is equal to exclusiveMaximum"),
    ({"type": "number", "minimum": 1, "exclusiveMaximum": 1}, "is equal to exclusiveMaximum"),
    ({"type": "number", "minimum": "3"}, "Expected f64 for 'minimum', got \"3\""),
    ({"type": "number", "maximum": True}, "Expected f64 for 'maximum'"),
    ({"type": "number", "multipleOf": 0}, "invalid multiple of"),
    ({"type": "integer", "minimum": 0.2, "maximum": 0.8}, "contains no integer values"),
    ({"type": "integer", "minimum": 1, "maximum": 5, "multipleOf": 7}, "does not contain a multiple of 7"),
    ({"type": "number", "minimum": 1e25}, "Failed to generate regex for float range"),
    ({"type": "string", "pattern": 3}, "Expected string for 'pattern', got 3"),
    ({"type": "string", "pattern": "a^b"}, "lookarounds not supported"),
    ({"type": "string", "format": "iri"}, "Unknown format: iri"),
    ({"type": "string", "format": "uri-reference"}, "Unknown format: uri-reference"),
    ({"type": "string", "format": "date", "pattern": "^x"}, "Unsatisfiable schema: Regex is empty"),
    ({"type": "string", "format": "date", "maxLength": 9}, "Unsatisfiable schema: Regex is empty"),
    ({"enum": [1, 2], "minimum": 3}, "Unsatisfiable schema"),
    ({"enum": ["a", "b"], "pattern": "c"}, "Unsatisfiable schema"),
])
def test_bad_schemas_name_the_problem(tok, schema, message):
    with pytest.raises(SchemaError, match=message):
        JsonConstraint(tok, schema)


def test_impossible_alternatives_are_pruned_not_errors(tok):
    s = {"anyOf": [{"type": "integer", "minimum": 0.2, "maximum": 0.8}, {"type": "null"}]}
    assert accepts(tok, s, "null") and not takes(tok, s, "", "0")
    t = {"type": ["integer", "string"], "minimum": 0.2, "maximum": 0.8, "pattern": "^x$"}
    assert accepts(tok, t, '"x"') and not takes(tok, t, "", "0")


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
