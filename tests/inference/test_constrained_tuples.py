"""Constrained decoding with tuple validation, ``format: uri`` and ``allOf``.

The decoder is compared with the ``jsonschema`` package (formats asserted; draft 2020-12, or draft 7 for
``items`` as a list, draft 4 for boolean exclusive bounds) on every candidate of small families of
values written in the decoder's output form: it must accept exactly the valid ones (a number in at
least one of its spellings). Random walks must end in valid documents. ``format: uri`` is compared
with ``rfc3986_validator`` (what jsonschema checks ``uri`` with here) on random strings. The tokenizer
is the embedded one (every single byte is a token).
"""

from __future__ import annotations

import decimal
import itertools
import json
import random
from decimal import Decimal

import jsonschema
import pytest

from llama4.inference.constrained import JsonConstraint, SchemaError
from tests.inference.constrained_support import (  # noqa: F401 (fixtures)
    allowed_ids,
    closing_tokens,
    decimals,
    feed,
    one_byte_tokens,
    takes,
    tok,
    walk,
)

# ---------------------------------------------------------------------------------------------------
# Helpers


def accepted(start: JsonConstraint, tok, text: str) -> bool:
    """``text``, written through a copy of ``start``, is allowed throughout and complete."""
    c = start.copy()
    try:
        feed(c, tok, text)
    except ValueError:
        return False
    return c.complete


def validator(schema, draft=jsonschema.Draft202012Validator):
    return draft(decimals(schema), format_checker=draft.FORMAT_CHECKER)


def valid(v, text: str) -> bool:
    with decimal.localcontext() as ctx:
        ctx.prec = 200
        return v.is_valid(json.loads(text, parse_float=Decimal))


def texts(value) -> list[str]:
    """The value in the decoder's output form, with and without the optional spaces."""
    return list(dict.fromkeys(json.dumps(value, ensure_ascii=False, separators=sep)
                              for sep in ((", ", ": "), (",", ":"))))


def number_spellings(value) -> list[str]:
    """A number with 0 to 3 fraction digits (llguidance writes a multiple of 0.25 with two: ``2.50``)."""
    exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    out = [str(value)] if exact != exact.to_integral() else [str(int(exact))]
    return out + [f"{exact:.{k}f}" for k in (1, 2, 3) if Decimal(f"{exact:.{k}f}") == exact]


def assert_exact(tok, schema, values, draft=jsonschema.Draft202012Validator) -> tuple[int, int]:
    """The decoder accepts exactly the candidates jsonschema finds valid (each text of a value, or for a
    number one of its spellings); returns (valid, invalid) counts."""
    start = JsonConstraint(tok, schema)
    v = validator(schema, draft)
    seen = [0, 0]
    for value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            spelled = number_spellings(value)
            want = valid(v, spelled[0])
            taken = [t for t in spelled if accepted(start, tok, t)]
            assert bool(taken) == want, (spelled, want)
            assert all(valid(v, t) for t in taken)
            seen[not want] += 1
            continue
        for text in texts(value):
            want = valid(v, text)
            assert accepted(start, tok, text) == want, (text, want)
            seen[not want] += 1
    assert seen[0] and seen[1], seen  # the family holds both kinds
    return seen[0], seen[1]


def random_walk(tok, schema, seed: int, wander: int = 30, max_steps: int = 400) -> JsonConstraint:
    """A walk that ends with: end-of-sequence, else closing characters, else ":" (a URI's scheme ends
    with it), else one byte."""
    return walk(tok, schema, seed, lambda tok: [set(tok.eos_ids), closing_tokens(tok), {tok.encode(":")[0]},
                                                one_byte_tokens(tok)], wander, max_steps)


def assert_walks_valid(tok, schema, seeds: int = 8, draft=jsonschema.Draft202012Validator, least: int = 3) -> set:
    v = validator(schema, draft)
    outs = set()
    for seed in range(seeds):
        c = random_walk(tok, schema, seed)
        assert c.ended, (seed, c.text)
        assert valid(v, c.text), c.text
        outs.add(c.text)
    assert len(outs) >= least, outs
    return outs


ITEM_POOL = [1, -2, 2.5, "a", "", None, True, [], {}]


def arrays(max_len: int, pool=ITEM_POOL):
    for n in range(max_len + 1):
        yield from (list(t) for t in itertools.product(pool, repeat=n))


# ---------------------------------------------------------------------------------------------------
# Tuples


TUPLES_2020 = {
    "closed": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
    "rest_null_bounded": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                          "items": {"type": "null"}, "minItems": 1, "maxItems": 3},
    "open_rest": {"prefixItems": [{"type": "number", "minimum": 0}, {"const": "a"}]},
    "false_position": {"type": "array", "prefixItems": [{"type": "integer"}, False]},
    "long_prefix_short_max": {"type": "array", "prefixItems": [{}, {"type": "string"}, {"type": "null"}],
                              "maxItems": 2, "minItems": 2},
    "nested": {"type": "array", "prefixItems": [{"type": "array", "prefixItems": [{"type": "integer"}],
                                                 "items": False}], "items": {"type": "boolean"}},
}
TUPLES_DRAFT7 = {
    "closed": {"type": "array", "items": [{"type": "string"}, {"type": "integer"}], "additionalItems": False},
    "rest_integer": {"items": [{"type": "boolean"}], "additionalItems": {"type": "integer"}, "minItems": 2},
    "open_rest": {"type": "array", "items": [{"type": "null"}, {"type": ["string", "integer"]}]},
    "empty_list": {"type": "array", "items": [], "additionalItems": False},
}


@pytest.mark.parametrize("name", list(TUPLES_2020))
def test_prefix_items_accept_exactly_the_valid_arrays(tok, name):
    pool = ITEM_POOL + [[1], [1, 2], [True]] if name == "nested" else ITEM_POOL
    assert_exact(tok, TUPLES_2020[name], arrays(3, pool))


@pytest.mark.parametrize("name", list(TUPLES_DRAFT7))
def test_items_lists_accept_exactly_the_valid_arrays(tok, name):
    assert_exact(tok, TUPLES_DRAFT7[name], arrays(3), draft=jsonschema.Draft7Validator)


def test_tuple_positions_in_targeted_prefixes(tok):
    s = TUPLES_2020["rest_null_bounded"]
    start = JsonConstraint(tok, s)
    assert accepted(start, tok, "[1]") and accepted(start, tok, '[1, "x", null]')
    assert not accepted(start, tok, "[]")  # minItems 1
    assert not accepted(start, tok, '[1, "x", null, null]')  # maxItems 3
    assert takes(tok, s, "[1, ", '"') and not takes(tok, s, "[1, ", "n") and not takes(tok, s, "[1, ", "2")
    assert takes(tok, s, '[1, "x", ', "n") and not takes(tok, s, '[1, "x", ', '"')
    closed = TUPLES_2020["closed"]
    assert takes(tok, closed, '[1, "x"', "]") and not takes(tok, closed, '[1, "x"', ",")  # items: false


@pytest.mark.parametrize("name", ["closed", "rest_null_bounded", "open_rest", "nested"])
def test_tuple_random_walks_validate(tok, name):
    assert_walks_valid(tok, TUPLES_2020[name], least=2 if name == "closed" else 3)


def test_draft7_tuple_random_walks_validate(tok):
    assert_walks_valid(tok, TUPLES_DRAFT7["rest_integer"], draft=jsonschema.Draft7Validator)


def test_additional_items_beside_a_single_items_schema_has_no_effect(tok):
    """As drafts 4 to 2019-09 say (2020-12 does not know the keyword): nothing to enforce."""
    s = {"type": "array", "items": {"type": "integer"}, "additionalItems": False}
    assert_exact(tok, s, arrays(2), draft=jsonschema.Draft7Validator)
    assert accepted(JsonConstraint(tok, s), tok, "[1, 2, 3]")


@pytest.mark.parametrize("schema", [
    # disjoint (first items of different types), but llguidance does not prove it for arrays
    {"oneOf": [{"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 1},
               {"type": "array", "prefixItems": [{"type": "string"}], "minItems": 1}]},
    # [1] matches both: the first alternative's item 0 is not told apart by the second's rest 'items'
    {"oneOf": [{"type": "array", "items": {"type": "integer"}, "minItems": 1},
               {"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}}]},
    # [1, "a"] is the const and matches the tuple
    {"oneOf": [{"const": [1, "a"]},
               {"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}}]},
    # [] matches both
    {"oneOf": [{"type": "array", "prefixItems": [{"type": "integer"}]},
               {"type": "array", "items": {"type": "integer"}}]},
])
def test_tuple_alternatives_in_one_of_are_schema_errors(tok, schema):
    with pytest.raises(SchemaError, match="oneOf constraints are not supported"):
        JsonConstraint(tok, schema)


def test_tuples_of_other_types_in_one_of(tok):
    s = {"oneOf": [{"type": "array", "prefixItems": [{"type": "integer"}], "items": False, "minItems": 1},
                   {"type": "string"}, {"type": "null"}]}
    assert_exact(tok, s, [[1], [1, 2], ["a"], [], "a", None, 1])
    assert_walks_valid(tok, s)


def test_tuple_keywords_refused_before_llguidance(tok):
    """An empty ``prefixItems`` constrains nothing, and an ``enum`` beside ``prefixItems`` holds together
    with it."""
    assert_exact(tok, {"type": "array", "prefixItems": []}, [[], [1, "a"], "a"])
    assert_exact(tok, {"type": "array", "prefixItems": [{"type": "integer"}], "enum": [[1], ["a"], 2]},
                 [[1], ["a"], 2, [2], []])


@pytest.mark.parametrize("schema, message", [
    ({"type": "array", "prefixItems": [{}], "additionalItems": False},
     r"'prefixItems' \(draft 2020-12\) together with 'additionalItems' or 'items' as a list "
     r"\(drafts 4 to 2019-09\) at #"),
    ({"type": "array", "prefixItems": [{}], "items": [{}]}, "together with 'additionalItems' or 'items' as a list"),
    ({"type": "array", "prefixItems": {"type": "integer"}}, "prefixItems must be an array"),
    ({"type": "array", "prefixItems": [{}, {}], "items": False, "minItems": 3}, "required item is unsatisfiable"),
    ({"type": "array", "items": [{"type": "integer"}], "additionalItems": False, "minItems": 2},
     "required item is unsatisfiable"),
    ({"type": "array", "prefixItems": [{"type": "array", "uniqueItems": True}]},
     r'Unimplemented keys: \["uniqueItems"\]'),
])
def test_tuple_schema_errors_name_the_problem(tok, schema, message):
    with pytest.raises(SchemaError, match=message):
        JsonConstraint(tok, schema)


def test_a_tuple_in_an_alternative_that_admits_nothing_is_pruned(tok):
    s = {"anyOf": [{"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, {"type": "null"}]}
    start = JsonConstraint(tok, s)
    assert accepted(start, tok, "null") and not accepted(start, tok, "[1, 2]")
    assert not takes(tok, s, "", "[")


# ---------------------------------------------------------------------------------------------------
# format: uri


def test_jsonschema_checks_uri_formats():
    """jsonschema checks uri here (rfc3986-validator, from jsonschema[format-nongpl])."""
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    assert "uri" in checker.checkers
    assert checker.conforms("http://x", "uri") and not checker.conforms("x y", "uri")
    assert not checker.conforms("/a", "uri")


URI_GOOD = ["http://example.com", "https://user:pw@example.com:8080/a/b;c?q=1&r=%20#frag", "mailto:someone@example.org",
            "urn:isbn:0451450523", "file:///etc/hosts", "a:", "x+y-z.1:rest", "http://[::1]/", "http://[2001:db8::7]:80",
            "http://192.168.0.1:/", "foo://:@/?#", "tel:+1-816-555-1212", "http://a/%7Efoo", "s://h/p?q/?#f/?",
            "http://a.b/(x)*!$&'+,;="]
URI_BAD = ["", "example.com", "/relative", "1http://x", "http://exa mple.com", "http://x/%zz", "http://x/%4",
           "http://[::1", "http://[::1]x/", "http://[V1.x]/", "http://[1:2:3]/", "http://x#a#b", "ht tp://x",
           "http://x/é", "http://x/<a>", "a:b\\c", "http://x/{y}", "http://a:b@c@d/", "http://h:8a/", "http://x/^"]


def test_uri_format_accepts_valid_and_refuses_invalid_strings(tok):
    schema = {"type": "string", "format": "uri"}
    start = JsonConstraint(tok, schema)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for s in URI_GOOD:
        assert checker.conforms(s, "uri"), s
        assert accepted(start, tok, json.dumps(s)), s
    for s in URI_BAD:
        assert not checker.conforms(s, "uri"), s
        assert not accepted(start, tok, json.dumps(s, ensure_ascii=False)), s
    with pytest.raises(SchemaError, match="Unknown format: uri-reference"):
        JsonConstraint(tok, {"type": "string", "format": "uri-reference"})


def _fuzz_strings(g: random.Random, n: int):
    """Strings near the grammar: a likely head, then mostly URI characters, now and then one that is not."""
    heads = ["", "http:", "http://", "a+b-c.d:", "//", "/", "?", "#", "x@y:", "http://[", "//[", "1a:", "."]
    alphabet = "aZ09:/?#[]@!$&'()*+,;=%-._~fFv"
    hex_alphabet = "0123456789abcdefABCDEFv:.]"
    outside = " \"<>\\^`{|}é\x7f"
    for _ in range(n):
        head = g.choice(heads)
        chars = hex_alphabet if head.endswith("[") and g.random() < 0.7 else alphabet
        yield head + "".join(g.choice(outside if g.random() < 0.03 else chars) for _ in range(g.randint(0, 14)))


def test_uri_format_agrees_with_rfc3986_validator_on_random_strings(tok):
    """No string the constraint completes is refused by the validator; the other way, llguidance writes
    no ``IPvFuture`` host (``http://[v1.x]``), which is valid but rare: nothing else may be missed."""
    start = JsonConstraint(tok, {"type": "string", "format": "uri"})
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    counts = [0, 0]
    for s in _fuzz_strings(random.Random("uri"), 1500):
        want = checker.conforms(s, "uri")
        got = accepted(start, tok, json.dumps(s, ensure_ascii=False))
        assert got <= want, s
        assert got == want or "[v" in s.lower(), s
        counts[want] += 1
    assert min(counts) > 100, counts


def test_uri_random_walks_validate(tok):
    assert_walks_valid(tok, {"type": "string", "format": "uri"})


def test_uri_with_pattern_and_length(tok):
    s = {"type": "string", "format": "uri", "pattern": "^https://", "maxLength": 20}
    start = JsonConstraint(tok, s)
    assert accepted(start, tok, '"https://a.b/c"') and not accepted(start, tok, '"http://a.b/c"')
    assert not accepted(start, tok, '"https://example.com/abcdef"')  # 26 characters
    assert_walks_valid(tok, s)


def test_uri_in_one_of_is_not_proved_apart(tok):
    with pytest.raises(SchemaError, match="oneOf constraints are not supported"):
        JsonConstraint(tok, {"oneOf": [{"type": "string", "format": "uri"}, {"type": "string", "pattern": "^[a-z]+$"}]})


# ---------------------------------------------------------------------------------------------------
# allOf


VALUE_POOL = [0, 3, -1, 2.5, "x", "", True, None]


def objects(names, pool=VALUE_POOL):
    """Every object with a subset of ``names`` (in that order) and values from ``pool``."""
    for r in range(len(names) + 1):
        for keys in itertools.combinations(names, r):
            for vals in itertools.product(pool, repeat=r):
                yield dict(zip(keys, vals))


BASE = {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}}, "required": ["id"]}

ALL_OF_OBJECTS = {
    "union_of_properties": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}, "b": {}},
                                        "required": ["a"]},
                                       {"properties": {"b": {"type": "string"}, "c": {"type": "boolean"}},
                                        "required": ["b"]}]}, ["a", "b", "c"]),
    "property_schemas_merged": ({"allOf": [{"properties": {"a": {"type": "integer"}, "b": {"type": "number"}},
                                            "additionalProperties": False},
                                           {"properties": {"a": {"minimum": 0}, "b": {"maximum": 2}},
                                            "required": ["a"]}]}, ["a", "b"]),
    "additional_false_refuses": ({"allOf": [{"properties": {"a": {}, "b": {}}},
                                            {"properties": {"a": {"type": "integer"}}, "additionalProperties": False}]},
                                 ["a", "b"]),
    "additional_schema_applies": ({"allOf": [{"type": "object", "properties": {"a": {}, "b": {}}},
                                             {"properties": {"a": {}}, "additionalProperties": {"type": "string"}}]},
                                  ["a", "b"]),
    "siblings_and_allOf": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                            "allOf": [{"required": ["a"]}, {"required": ["b"]}]}, ["a", "b"]),
    "ref_base": ({"$defs": {"base": BASE},
                  "allOf": [{"$ref": "#/$defs/base"},
                            {"properties": {"name": {"maxLength": 1}}, "required": ["name"]}]}, ["id", "name"]),
    "free_objects": ({"allOf": [{"type": "object", "additionalProperties": {"type": "integer"}},
                                {"additionalProperties": {"minimum": 0}, "required": ["k"]}]}, ["k"]),
}


@pytest.mark.parametrize("name", list(ALL_OF_OBJECTS))
def test_all_of_objects_accept_exactly_the_valid_objects(tok, name):
    schema, names = ALL_OF_OBJECTS[name]
    assert_exact(tok, schema, objects(names))


def test_all_of_objects_generate_only_valid_objects(tok):
    for name in ("union_of_properties", "property_schemas_merged", "ref_base", "free_objects"):
        assert_walks_valid(tok, ALL_OF_OBJECTS[name][0])


def numbers():
    for n in range(-12, 26):
        yield n
    yield from (-0.5, 0.5, 1.5, 2.25, 3.0, 6.0, 0.3, 0.75, 1.25, 1.75, 2.5, 12.0, 12.5)


ALL_OF_NUMBERS = {
    "bounds_and_multiples": {"allOf": [{"type": "integer", "minimum": -5, "exclusiveMaximum": 20},
                                       {"type": "number", "maximum": 12, "multipleOf": 3}, {"multipleOf": 2}]},
    "exclusive_beats_inclusive": {"allOf": [{"type": "number", "minimum": 1, "maximum": 3, "multipleOf": 0.5},
                                            {"exclusiveMinimum": 1, "exclusiveMaximum": 3}]},
    "fraction_multiples": {"allOf": [{"type": "number", "multipleOf": 0.1, "minimum": 0, "maximum": 3},
                                     {"multipleOf": 0.25}]},
    "number_and_integer": {"allOf": [{"type": "number", "minimum": 2}, {"type": ["integer", "string"], "maximum": 5}]},
    "the_tightest_bounds": {"allOf": [{"type": "number", "minimum": -3, "maximum": 10, "exclusiveMinimum": -4},
                                      {"minimum": 2, "maximum": 20, "exclusiveMinimum": 1},
                                      {"exclusiveMaximum": 8}, {"exclusiveMaximum": 7.5, "multipleOf": 0.25}]},
}


@pytest.mark.parametrize("name", list(ALL_OF_NUMBERS))
def test_all_of_numbers_accept_exactly_the_valid_numbers(tok, name):
    assert_exact(tok, ALL_OF_NUMBERS[name], numbers())


def test_all_of_draft4_exclusive_flags(tok):
    s = {"allOf": [{"type": "number", "minimum": 1, "exclusiveMinimum": True, "multipleOf": 0.5},
                   {"maximum": 3, "exclusiveMaximum": False}, {"maximum": 2.5, "exclusiveMaximum": True}]}
    assert_exact(tok, s, numbers(), draft=jsonschema.Draft4Validator)


def strings():
    for n in range(6):
        for t in itertools.product("abc", repeat=n):
            yield "".join(t)


ALL_OF_STRINGS = {
    "lengths_and_patterns": {"allOf": [{"type": "string", "minLength": 2}, {"maxLength": 4, "pattern": "^a"},
                                       {"pattern": "b"}, {"minLength": 3}]},
    "same_pattern_twice": {"allOf": [{"pattern": "c$"}, {"pattern": "c$", "maxLength": 3}]},
    "enum_intersection": {"allOf": [{"enum": ["a", "ab", "abc", "cc", 1]}, {"type": "string"},
                                    {"enum": ["ab", "abc", "cc", "ba"]}, {"pattern": "^a"}]},
}


@pytest.mark.parametrize("name", list(ALL_OF_STRINGS))
def test_all_of_strings_accept_exactly_the_valid_strings(tok, name):
    assert_exact(tok, ALL_OF_STRINGS[name], strings())


def test_all_of_format_and_pattern(tok):
    s = {"allOf": [{"type": "string", "format": "date"}, {"pattern": "^2024-"}, {"format": "date", "maxLength": 10}]}
    start = JsonConstraint(tok, s)
    assert accepted(start, tok, '"2024-02-29"') and not accepted(start, tok, '"2023-01-01"')
    assert not accepted(start, tok, '"2024-02-30"')
    assert_walks_valid(tok, s)


def test_all_of_const_and_types(tok):
    s = {"allOf": [{"enum": [1, 2, "x", None, 1.5]}, {"type": ["integer", "null"]}, {"minimum": 2}]}
    assert_exact(tok, s, [1, 2, "x", None, 1.5, 3])
    c = {"allOf": [{"const": 2}, {"enum": [2.0, 3]}]}
    assert_exact(tok, c, [1, 2, 3, "2"])


ALL_OF_ARRAYS = {
    "items_and_prefix": {"allOf": [{"type": "array", "items": {"type": "integer"}},
                                   {"prefixItems": [{"minimum": 0}], "maxItems": 2}]},
    "two_prefixes": {"allOf": [{"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}},
                               {"prefixItems": [{}, {"maxLength": 0}, {"type": "null"}]}]},
    "prefix_and_closed": {"allOf": [{"type": "array", "prefixItems": [{"type": ["integer", "string"]}]},
                                    {"prefixItems": [{"type": "string"}], "items": False}]},
}


@pytest.mark.parametrize("name", list(ALL_OF_ARRAYS))
def test_all_of_arrays_accept_exactly_the_valid_arrays(tok, name):
    assert_exact(tok, ALL_OF_ARRAYS[name], arrays(3, [0, -1, 2.5, "a", "", None]))


def test_all_of_draft7_tuple_and_items(tok):
    s = {"allOf": [{"type": "array", "items": [{"type": "integer"}], "additionalItems": {"type": "boolean"}},
                   {"items": {"minimum": 0}}]}
    assert_exact(tok, s, arrays(3, [0, -1, True, "a", None]), draft=jsonschema.Draft7Validator)


def test_all_of_nested_and_recursive(tok):
    nested = {"allOf": [{"allOf": [{"type": "integer"}, {"minimum": 2}]}, {"maximum": 4}, True, {}]}
    assert_exact(tok, nested, numbers())
    tree = {"$defs": {"base": {"type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]},
                      "node": {"allOf": [{"$ref": "#/$defs/base"},
                                         {"properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                  "maxItems": 2}}}]}},
            "$ref": "#/$defs/node"}
    assert_walks_valid(tok, tree)  # which mostly write other properties than "kids" (any are allowed)
    start = JsonConstraint(tok, tree)
    assert accepted(start, tok, '{"v": 1, "kids": [{"v": 2}]}')
    assert accepted(start, tok, '{"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3}], "other": "x"}')
    assert not accepted(start, tok, '{"v": 1, "kids": [{"v": 2, "kids": [{"v": "3"}]}]}')
    assert not accepted(start, tok, '{"v": 1, "kids": [{"kids": []}]}')
    # two recursive schemas intersected: llguidance does not build the infinite merge (the engine before it did)
    twins = {"$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}, "n": {"type": "integer"}}},
                       "b": {"properties": {"x": {"$ref": "#/$defs/b"}, "n": {"minimum": 0}}}},
             "allOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}]}
    with pytest.raises(SchemaError, match="Schema intersection stack level exceeded"):
        JsonConstraint(tok, twins)


def test_a_single_all_of_subschema_may_hold_any_of_or_one_of(tok):
    s = {"allOf": [{"anyOf": [{"type": "string", "maxLength": 1}, {"type": "null"}]}], "$defs": {}, "title": "t"}
    assert_exact(tok, s, ["", "x", "xy", None, 1])
    t = {"allOf": [True, {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, {}]}
    assert_exact(tok, t, [1, True, None, "a"])


def test_all_of_in_exact_one_of_and_any_of(tok):
    s = {"oneOf": [{"allOf": [{"type": "object", "properties": {"k": {"const": "a"}}}, {"required": ["k"]}]},
                   {"type": "null"}]}
    assert_exact(tok, s, [None, {"k": "a"}, {"k": "b"}, {}, 1])
    pruned = {"anyOf": [{"allOf": [{"type": "string"}, {"type": "integer"}]}, {"type": "null"}]}
    start = JsonConstraint(tok, pruned)
    assert accepted(start, tok, "null") and not accepted(start, tok, '"a"')
    assert not accepted(start, tok, "1")


@pytest.mark.parametrize("schema, message", [
    ({"allOf": [{"type": "string", "format": "date"}, {"format": "email"}]}, "Unsatisfiable schema: Regex is empty"),
    ({"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}, {"type": "integer"}]}}, "$ref": "#/$defs/a"},
     "circular references with sibling keys are not supported"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable schema: incompatible types"),
    ({"allOf": [{"enum": [1, 2]}, {"const": 3}]}, "Unsatisfiable schema"),
    ({"allOf": [{"type": "integer"}, False]}, "Unsatisfiable schema: schema is false"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1, "exclusiveMaximum": 1}]}, "is equal to exclusiveMaximum"),
    ({"allOf": [{"type": "array"}, {"uniqueItems": True}]}, r'Unimplemented keys: \["uniqueItems"\]'),
    ({"allOf": [{"enum": [{"a": 1}]}, {"properties": {"a": {"type": "string"}}}]},
     "required property 'a' is unsatisfiable"),
    ({"allOf": [{"type": "string"}, {"pattern": "^a"}, {"pattern": "^b"}]}, "Unsatisfiable schema: Regex is empty"),
    ({"allOf": [{"type": "string"}, 3]}, "schema must be an object or boolean"),
    ({"type": "array", "allOf": [{"prefixItems": [{}], "additionalItems": False}]},
     "'prefixItems' .* together with 'additionalItems' or 'items' as a list .* at #/allOf/0"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": [{"type": "string"}]},
     "use the keywords of one draft"),
])
def test_all_of_errors_name_the_problem(tok, schema, message):
    with pytest.raises(SchemaError, match=message):
        JsonConstraint(tok, schema)


def test_all_of_cases_refused_before_llguidance(tok):
    """Per the specification, each subschema applies to the values of its own types only."""
    assert_exact(tok, {"allOf": [{"anyOf": [{"type": "string"}, {"type": "null"}]}, {"maxLength": 3}]},
                 ["abc", "abcd", None, 1])
    assert_exact(tok, {"type": "object", "oneOf": [{"required": ["a"]}], "allOf": [{"required": ["b"]}]},
                 [{"a": 1, "b": 2}, {"a": 1}, {"b": 2}])
    refuses_objects = {"allOf": [{"properties": {"a": {}}, "additionalProperties": False},
                                 {"properties": {"b": {}}, "required": ["b"]}]}
    assert_exact(tok, refuses_objects, [{"b": 1}, {"a": 1}, {}, "x", 1])
    assert_exact(tok, {"allOf": [{"minimum": 5}, {"maximum": 3}]}, [4, 5, 3, "x"])
    assert_exact(tok, {"$defs": {"x": {}}, "allOf": [{"$ref": "#/$defs/x", "type": "integer"}, {}]}, [1, 1.5, "a"])


def test_enum_object_values_beside_object_keywords(tok):
    """Both hold (the engine before llguidance refused such schemas: it did not check those keywords)."""
    assert_exact(tok, {"enum": [{"a": 1}, {"b": 2}], "required": ["b"]}, [{"a": 1}, {"b": 2}, {"b": 3}])
    with pytest.raises(SchemaError, match="required property 'b' is unsatisfiable"):
        JsonConstraint(tok, {"enum": [{"a": 1}, {}], "required": ["b"]})
    assert_exact(tok, {"enum": [1, "x"], "properties": {"a": {}}, "items": {}}, [1, "x", 2, {}])
