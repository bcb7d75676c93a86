"""Constrained decoding with tuple validation, ``format: uri`` / ``uri-reference`` and merged ``allOf``.

The decoder is compared with the ``jsonschema`` package (formats asserted; draft 2020-12, or draft 7 for
``items`` as a list, draft 4 for boolean exclusive bounds) on every candidate of small families of
values written in the decoder's output form: it must accept exactly the valid ones. Random walks
must end in valid documents. The URI grammars are compared with ``rfc3986_validator`` (what jsonschema
checks ``uri`` with here) on random strings, both ways. The tokenizer is the embedded one (every
single byte is a token).
"""

from __future__ import annotations

import decimal
import itertools
import json
import random
from decimal import Decimal

import jsonschema
import pytest

from llama4.inference.constrained import FORMATS, JsonConstraint, SchemaError
from llama4.inference.regex_dfa import compile_search
from tests.inference.constrained_support import (  # noqa: F401 (fixtures)
    allowed_ids, byte_ids, closing_tokens, decimals, one_byte_tokens, tok, walk)


# ---------------------------------------------------------------------------------------------------
# Helpers


def accepted(start: JsonConstraint, byte_ids, text: str) -> bool:
    """``text``, fed byte by byte to a copy of ``start``, is allowed throughout and complete."""
    c = start.copy()
    try:
        for b in text.encode():
            c.advance(byte_ids[b])
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


def assert_exact(tok, byte_ids, schema, values, draft=jsonschema.Draft202012Validator) -> tuple[int, int]:
    """The decoder accepts exactly the candidates jsonschema finds valid; returns (valid, invalid) counts."""
    start = JsonConstraint(tok, schema)
    v = validator(schema, draft)
    seen = [0, 0]
    for value in values:
        for text in texts(value):
            want = valid(v, text)
            assert accepted(start, byte_ids, text) == want, (text, want)
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
def test_prefix_items_accept_exactly_the_valid_arrays(tok, byte_ids, name):
    pool = ITEM_POOL + [[1], [1, 2], [True]] if name == "nested" else ITEM_POOL
    assert_exact(tok, byte_ids, TUPLES_2020[name], arrays(3, pool))


@pytest.mark.parametrize("name", list(TUPLES_DRAFT7))
def test_items_lists_accept_exactly_the_valid_arrays(tok, byte_ids, name):
    assert_exact(tok, byte_ids, TUPLES_DRAFT7[name], arrays(3), draft=jsonschema.Draft7Validator)


def test_tuple_positions_in_targeted_prefixes(tok, byte_ids):
    s = TUPLES_2020["rest_null_bounded"]
    start = JsonConstraint(tok, s)
    assert accepted(start, byte_ids, "[1]") and accepted(start, byte_ids, '[1, "x", null]')
    assert not accepted(start, byte_ids, "[]")  # minItems 1
    assert not accepted(start, byte_ids, '[1, "x", null, null]')  # maxItems 3
    c = start.copy()
    for b in b"[1, ":
        c.advance(byte_ids[b])
    allowed = set(allowed_ids(c, tok))
    assert byte_ids[ord('"')] in allowed and byte_ids[ord("n")] not in allowed and byte_ids[ord("2")] not in allowed
    for b in b'"x", ':
        c.advance(byte_ids[b])
    allowed = set(allowed_ids(c, tok))
    assert byte_ids[ord("n")] in allowed and byte_ids[ord('"')] not in allowed
    closed = JsonConstraint(tok, TUPLES_2020["closed"])
    c = closed.copy()
    for b in b'[1, "x"':
        c.advance(byte_ids[b])
    allowed = set(allowed_ids(c, tok))
    assert byte_ids[ord("]")] in allowed and byte_ids[ord(",")] not in allowed  # items: false


@pytest.mark.parametrize("name", ["closed", "rest_null_bounded", "open_rest", "nested"])
def test_tuple_random_walks_validate(tok, name):
    assert_walks_valid(tok, TUPLES_2020[name], least=2 if name == "closed" else 3)


def test_draft7_tuple_random_walks_validate(tok):
    assert_walks_valid(tok, TUPLES_DRAFT7["rest_integer"], draft=jsonschema.Draft7Validator)


def test_additional_items_beside_a_single_items_schema_has_no_effect(tok, byte_ids):
    """As drafts 4 to 2019-09 say (2020-12 does not know the keyword): nothing to enforce."""
    s = {"type": "array", "items": {"type": "integer"}, "additionalItems": False}
    assert_exact(tok, byte_ids, s, arrays(2), draft=jsonschema.Draft7Validator)
    assert accepted(JsonConstraint(tok, s), byte_ids, "[1, 2, 3]")


def test_tuples_in_exact_one_of(tok, byte_ids):
    told_apart = {"oneOf": [{"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 1},
                            {"type": "array", "prefixItems": [{"type": "string"}], "minItems": 1},
                            {"type": "array", "items": {"type": "null"}, "minItems": 1}]}
    assert_exact(tok, byte_ids, told_apart, arrays(2))
    assert_walks_valid(tok, told_apart)
    draft7 = {"oneOf": [{"type": "array", "items": [{"type": "integer"}, {"type": "string"}], "minItems": 2},
                        {"type": "array", "items": [{}, {"type": "null"}], "minItems": 2},
                        {"type": "array", "maxItems": 1}]}
    assert_exact(tok, byte_ids, draft7, arrays(2), draft=jsonschema.Draft7Validator)


@pytest.mark.parametrize("schema", [
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
def test_overlapping_tuple_alternatives_are_schema_errors(tok, schema):
    with pytest.raises(SchemaError, match="'oneOf' at #: a value of alternative 0 may also match alternative 1"):
        JsonConstraint(tok, schema)


@pytest.mark.parametrize("schema, message", [
    ({"type": "array", "prefixItems": [{}], "additionalItems": False},
     "'additionalItems' together with 'prefixItems' at #"),
    ({"type": "array", "prefixItems": [{}], "items": [{}]}, "'items' as a list together with 'prefixItems' at #"),
    ({"type": "array", "prefixItems": []}, "'prefixItems' must be a non-empty list of schemas at #"),
    ({"type": "array", "prefixItems": {"type": "integer"}}, "'prefixItems' must be a non-empty list"),
    ({"type": "array", "prefixItems": [{}, {}], "items": False, "minItems": 3},
     r"admits no \(finite\) JSON value: 'minItems' \(3\) asks for more than the 2 items that 'prefixItems' and "
     r"'items': false allow at #"),
    ({"type": "array", "items": [{"type": "integer"}], "additionalItems": False, "minItems": 2},
     r"'minItems' \(2\) asks for more than the 1 items that 'items' and 'additionalItems': false allow"),
    ({"type": "array", "prefixItems": [{"type": "string", "uniqueItems": True}]},
     "unsupported JSON-schema keyword 'uniqueItems' at #/prefixItems/0"),
    ({"type": "array", "prefixItems": [{}], "enum": [[1]]},
     "'enum'/'const' with array values together with 'prefixItems'"),
])
def test_tuple_schema_errors_name_the_problem(tok, schema, message):
    with pytest.raises(SchemaError, match=message):
        JsonConstraint(tok, schema)


def test_a_tuple_in_an_alternative_that_admits_nothing_is_pruned(tok, byte_ids):
    s = {"anyOf": [{"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, {"type": "null"}]}
    start = JsonConstraint(tok, s)
    assert accepted(start, byte_ids, "null") and not accepted(start, byte_ids, "[1, 2]")
    assert byte_ids[ord("[")] not in allowed_ids(start, tok)


# ---------------------------------------------------------------------------------------------------
# format: uri, uri-reference


def test_jsonschema_checks_uri_formats():
    """jsonschema checks uri / uri-reference here (rfc3986-validator, from jsonschema[format-nongpl])."""
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    assert {"uri", "uri-reference"} <= set(checker.checkers)
    assert checker.conforms("http://x", "uri") and not checker.conforms("x y", "uri")
    assert not checker.conforms("/a", "uri") and checker.conforms("/a", "uri-reference")


URI_CASES = {
    "uri": (["http://example.com", "https://user:pw@example.com:8080/a/b;c?q=1&r=%20#frag",
             "mailto:someone@example.org", "urn:isbn:0451450523", "file:///etc/hosts", "a:", "x+y-z.1:rest",
             "http://[::1]/", "http://[2001:db8::7]:80", "http://[v1.fe:x]/", "http://192.168.0.1:/",
             "foo://:@/?#", "tel:+1-816-555-1212", "http://a/%7Efoo", "s://h/p?q/?#f/?", "http://a.b/(x)*!$&'+,;="],
            ["", "example.com", "/relative", "1http://x", "http://exa mple.com", "http://x/%zz", "http://x/%4",
             "http://[::1", "http://[::1]x/", "http://[V1.x]/", "http://[1:2:3]/", "http://x#a#b", "ht tp://x",
             "http://x/é", "http://x/<a>", "a:b\\c", "http://x/{y}", "http://a:b@c@d/", "http://h:8a/", "http://x/^"]),
    "uri-reference": (["", "/relative/path", "relative", "../a/b?c#d", "?q", "#f", "//host/p", "http://example.com",
                       "a@b", "./c:d", "%41", "//[::1]:1"],
                      [":x", "a b", "1a:b", "/x/%g0", "x#a#b", "//h:x/", "\\a", "é", "[::1]", "a[b]", "//a/{b}"]),
}


@pytest.mark.parametrize("name", list(URI_CASES))
def test_uri_formats_accept_valid_and_refuse_invalid_strings(tok, byte_ids, name):
    schema = {"type": "string", "format": name}
    start = JsonConstraint(tok, schema)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    good, bad = URI_CASES[name]
    for s in good:
        assert checker.conforms(s, name), s
        assert accepted(start, byte_ids, json.dumps(s)), s
        c = start.copy()  # fed as the tokenizer splits it, too
        for t in tok.encode(json.dumps(s)):
            assert t in allowed_ids(c, tok), (s, c.text)
            c.advance(t)
        assert c.complete
    for s in bad:
        assert not checker.conforms(s, name), s
        assert not accepted(start, byte_ids, json.dumps(s, ensure_ascii=False)), s


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


@pytest.mark.parametrize("name", ["uri", "uri-reference"])
def test_uri_dfas_agree_with_rfc3986_validator_on_random_strings(name):
    """Both ways: no string the DFA accepts is refused, and none the validator accepts is refused."""
    dfa = compile_search(FORMATS[name])
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    g = random.Random(name)
    counts = [0, 0]
    for s in _fuzz_strings(g, 20000):
        want = checker.conforms(s, name)
        assert dfa.matches(s) == want, (s, want)
        counts[want] += 1
    assert min(counts) > 1000, counts


@pytest.mark.parametrize("name", ["uri", "uri-reference"])
def test_every_string_a_uri_dfa_accepts_is_valid(name):
    """Sample the DFA's language at random, uniformly within each transition's character range."""
    dfa = compile_search(FORMATS[name])
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    g = random.Random(name)
    for _ in range(1500):
        s, d = [], 0
        while not (dfa.accept[d] and (g.random() < 0.15 or not dfa.to[d])) and len(s) < 200:
            i = g.randrange(len(dfa.to[d]))
            s.append(chr(g.randint(dfa.lo[d][i], dfa.hi[d][i])))
            d = dfa.to[d][i]
        text = "".join(s)
        if dfa.accept[d]:
            assert checker.conforms(text, name), text
            assert text.isascii(), text


@pytest.mark.parametrize("name", ["uri", "uri-reference"])
def test_uri_random_walks_validate(tok, name):
    assert_walks_valid(tok, {"type": "string", "format": name})


def test_uri_with_pattern_and_length(tok, byte_ids):
    s = {"type": "string", "format": "uri", "pattern": "^https://", "maxLength": 20}
    start = JsonConstraint(tok, s)
    assert accepted(start, byte_ids, '"https://a.b/c"') and not accepted(start, byte_ids, '"http://a.b/c"')
    assert not accepted(start, byte_ids, '"https://example.com/abcdef"')  # 26 characters
    assert_walks_valid(tok, s)


def test_uri_in_exact_one_of(tok):
    s = {"oneOf": [{"type": "string", "format": "uri"}, {"type": "string", "pattern": "^[a-z]+$"}]}
    JsonConstraint(tok, s)  # a URI has a ':' that no string of letters has
    with pytest.raises(SchemaError, match="alternative 0 may also match alternative 1"):
        JsonConstraint(tok, {"oneOf": [{"type": "string", "format": "uri-reference"},
                                       {"type": "string", "pattern": "^[a-z]+$"}]})


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
def test_all_of_objects_accept_exactly_the_valid_objects(tok, byte_ids, name):
    schema, names = ALL_OF_OBJECTS[name]
    assert_exact(tok, byte_ids, schema, objects(names))


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
def test_all_of_numbers_accept_exactly_the_valid_numbers(tok, byte_ids, name):
    assert_exact(tok, byte_ids, ALL_OF_NUMBERS[name], numbers())


def test_all_of_draft4_exclusive_flags(tok, byte_ids):
    s = {"allOf": [{"type": "number", "minimum": 1, "exclusiveMinimum": True, "multipleOf": 0.5},
                   {"maximum": 3, "exclusiveMaximum": False}, {"maximum": 2.5, "exclusiveMaximum": True}]}
    assert_exact(tok, byte_ids, s, numbers(), draft=jsonschema.Draft4Validator)


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
def test_all_of_strings_accept_exactly_the_valid_strings(tok, byte_ids, name):
    assert_exact(tok, byte_ids, ALL_OF_STRINGS[name], strings())


def test_all_of_format_and_pattern(tok, byte_ids):
    s = {"allOf": [{"type": "string", "format": "date"}, {"pattern": "^2024-"}, {"format": "date", "maxLength": 10}]}
    start = JsonConstraint(tok, s)
    assert accepted(start, byte_ids, '"2024-02-29"') and not accepted(start, byte_ids, '"2023-01-01"')
    assert not accepted(start, byte_ids, '"2024-02-30"')
    assert_walks_valid(tok, s)


def test_all_of_const_and_types(tok, byte_ids):
    s = {"allOf": [{"enum": [1, 2, "x", None, 1.5]}, {"type": ["integer", "null"]}, {"minimum": 2}]}
    assert_exact(tok, byte_ids, s, [1, 2, "x", None, 1.5, 3])
    c = {"allOf": [{"const": 2}, {"enum": [2.0, 3]}]}
    assert_exact(tok, byte_ids, c, [1, 2, 3, "2"])


ALL_OF_ARRAYS = {
    "items_and_prefix": {"allOf": [{"type": "array", "items": {"type": "integer"}},
                                   {"prefixItems": [{"minimum": 0}], "maxItems": 2}]},
    "two_prefixes": {"allOf": [{"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}},
                               {"prefixItems": [{}, {"maxLength": 0}, {"type": "null"}]}]},
    "prefix_and_closed": {"allOf": [{"type": "array", "prefixItems": [{"type": ["integer", "string"]}]},
                                    {"prefixItems": [{"type": "string"}], "items": False}]},
}


@pytest.mark.parametrize("name", list(ALL_OF_ARRAYS))
def test_all_of_arrays_accept_exactly_the_valid_arrays(tok, byte_ids, name):
    assert_exact(tok, byte_ids, ALL_OF_ARRAYS[name], arrays(3, [0, -1, 2.5, "a", "", None]))


def test_all_of_draft7_tuple_and_items(tok, byte_ids):
    s = {"allOf": [{"type": "array", "items": [{"type": "integer"}], "additionalItems": {"type": "boolean"}},
                   {"items": {"minimum": 0}}]}
    assert_exact(tok, byte_ids, s, arrays(3, [0, -1, True, "a", None]), draft=jsonschema.Draft7Validator)


def test_all_of_nested_and_recursive(tok, byte_ids):
    nested = {"allOf": [{"allOf": [{"type": "integer"}, {"minimum": 2}]}, {"maximum": 4}, True, {}]}
    assert_exact(tok, byte_ids, nested, numbers())
    tree = {"$defs": {"base": {"type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]},
                      "node": {"allOf": [{"$ref": "#/$defs/base"},
                                         {"properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                  "maxItems": 2}}}]}},
            "$ref": "#/$defs/node"}
    outs = assert_walks_valid(tok, tree)
    assert any('"kids"' in t for t in outs), outs
    start = JsonConstraint(tok, tree)
    assert accepted(start, byte_ids, '{"v": 1, "kids": [{"v": 2}]}')
    assert not accepted(start, byte_ids, '{"v": 1, "kids": [{"kids": []}]}')
    # two recursive schemas merged: the merged property refers back to the merged pair
    twins = {"$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}, "n": {"type": "integer"}}},
                       "b": {"properties": {"x": {"$ref": "#/$defs/b"}, "n": {"minimum": 0}}}},
             "allOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}]}
    start = JsonConstraint(tok, twins)
    assert accepted(start, byte_ids, '{"x": {"x": {"n": 3}}, "n": 0}')
    assert not accepted(start, byte_ids, '{"x": {"x": {"n": -3}}}')
    assert not accepted(start, byte_ids, '{"x": {"x": {"n": 1.5}}}')
    assert_walks_valid(tok, twins)


def test_a_single_all_of_subschema_may_hold_any_of_or_one_of(tok, byte_ids):
    s = {"allOf": [{"anyOf": [{"type": "string", "maxLength": 1}, {"type": "null"}]}], "$defs": {}, "title": "t"}
    assert_exact(tok, byte_ids, s, ["", "x", "xy", None, 1])
    t = {"allOf": [True, {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, {}]}
    assert_exact(tok, byte_ids, t, [1, True, None, "a"])


def test_all_of_in_exact_one_of_and_any_of(tok, byte_ids):
    s = {"oneOf": [{"allOf": [{"type": "object", "properties": {"k": {"const": "a"}}}, {"required": ["k"]}]},
                   {"type": "null"}]}
    assert_exact(tok, byte_ids, s, [None, {"k": "a"}, {"k": "b"}, {}, 1])
    pruned = {"anyOf": [{"allOf": [{"type": "string"}, {"type": "integer"}]}, {"type": "null"}]}
    start = JsonConstraint(tok, pruned)
    assert accepted(start, byte_ids, "null") and not accepted(start, byte_ids, '"a"')
    assert not accepted(start, byte_ids, "1")


@pytest.mark.parametrize("schema, message", [
    ({"allOf": [{"type": "string", "format": "date"}, {"format": "email"}]},
     "'allOf' at #: 'format' 'date' and 'format' 'email' cannot be merged"),
    ({"allOf": [{"properties": {"p": {"format": "date"}}}, {"properties": {"p": {"format": "ipv4"}}}]},
     "'allOf' at #/properties/p: 'format' 'date' and 'format' 'ipv4' cannot be merged"),
    ({"allOf": [{"anyOf": [{"type": "string"}, {"type": "null"}]}, {"maxLength": 3}]},
     "'anyOf' at #/allOf/0 cannot be merged into the 'allOf' at #"),
    ({"type": "object", "oneOf": [{"required": ["a"]}], "allOf": [{"required": ["b"]}]},
     "'oneOf' at # cannot be merged into the 'allOf' at #"),
    ({"allOf": [{"properties": {"a": {}}, "additionalProperties": False},
                {"properties": {"b": {}}, "required": ["b"]}]},
     "'allOf' at #: property 'b', required at #/allOf/1, is refused at #/allOf/0"),
    ({"allOf": [{"properties": {"a": False}}, {"required": ["a"]}]}, "property 'a', required at #/allOf/1, is refused"),
    ({"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}, {"type": "integer"}]}}, "$ref": "#/$defs/a"},
     "'allOf' at #/\\$defs/a contains itself through #/\\$defs/a"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]},
     r"admits no \(finite\) JSON value: the subschemas of 'allOf' at # have no type in common"),
    ({"allOf": [{"enum": [1, 2]}, {"const": 3}]}, "'enum'/'const' values of the subschemas of 'allOf' at # have none"),
    ({"allOf": [{"type": "integer"}, False]}, "a subschema of 'allOf' at # is false"),
    ({"allOf": [{"minimum": 5}, {"maximum": 3}]}, r"'minimum' \(5\) is larger than 'maximum' \(3\) at #"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1, "exclusiveMaximum": 1}]}, "leave no number between them"),
    ({"allOf": [{"type": "array"}, {"uniqueItems": True}]},
     "unsupported JSON-schema keyword 'uniqueItems' at #/allOf/1"),
    ({"$defs": {"x": {}}, "allOf": [{"$ref": "#/$defs/x", "type": "integer"}, {}]}, "'\\$ref' together with 'type'"),
    ({"allOf": [{"enum": [{"a": 1}]}, {"properties": {"a": {"type": "string"}}}]},
     "'enum'/'const' with object values together with 'properties' is not supported at #"),
    ({"allOf": [{"type": "string"}, {"pattern": "^a"}, {"pattern": "^b"}]}, "matches no string"),
    ({"allOf": [{"multipleOf": 2}, {"multipleOf": -1}]}, "'multipleOf' must be a positive number, got -1 at #/allOf/1"),
    ({"allOf": []}, "'allOf' must be a non-empty list of schemas at #"),
    ({"allOf": [{"type": "string"}, 3]}, "a schema must be an object or a boolean, got int at #/allOf/1"),
    ({"allOf": [{"properties": {"a": {}}}, {"required": ["b"]}]}, "required property 'b' is not in 'properties' at #"),
])
def test_all_of_errors_name_the_problem(tok, schema, message):
    with pytest.raises(SchemaError, match=message):
        JsonConstraint(tok, schema)


def test_enum_object_values_beside_properties_are_refused_in_plain_schemas_too(tok):
    """'properties' is not checked on enum values, so it must not be silently ignored beside them."""
    with pytest.raises(SchemaError, match="'enum'/'const' with object values together with 'required'"):
        JsonConstraint(tok, {"enum": [{"a": 1}, {}], "required": ["b"]})
    JsonConstraint(tok, {"enum": [1, "x"], "properties": {"a": {}}, "items": {}})  # scalar values: nothing to check
