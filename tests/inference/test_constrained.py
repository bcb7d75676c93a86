"""JSON-constrained decoding against an independent prefix checker and a JSON-schema validator.

The checker (``Oracle``) is a backtracking recursive-descent parser over the whole text, written
without llguidance's incremental states; it encodes the output conventions (one optional space after
":" and ",", properties in schema order and then any additional ones, no ``\\u`` escapes but for
control characters). The validator follows JSON Schema semantics for the keywords used here,
independently of how the constraint generates values.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch

from llama4.inference.constrained import JsonConstraint, SchemaError
from llama4.prompt import load_tokenizer, train_tokenizer
from tests.inference.constrained_support import accepts, advance_agrees, feed

# ---------------------------------------------------------------------------------------------------
# Tokenizer trained on JSON with escapes, unicode and numbers, so that quotes, braces and multi-byte
# characters are spread over many tokens (including tokens that end inside a character).


def _corpus() -> list[str]:
    g = random.Random(0)
    words = ["alpha", "beta", "name", "Müller", "naïve", "日本語", "😀ok", "tags", "id", "x", "ÿ", "ü", "€", "🙂"]
    docs = []
    for _ in range(120):
        doc = {g.choice(words): g.choice([g.randint(-999, 99999), g.random() * 100, g.choice(words), None, True,
                                          [g.choice(words), "a\"b\\c\n"], {"k": g.choice(words)}])
               for _ in range(3)}
        docs.append(json.dumps(doc, ensure_ascii=g.random() < 0.3, separators=g.choice([(",", ":"), (", ", ": ")])))
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), 600)


# ---------------------------------------------------------------------------------------------------
# Schemas used by the random walks and the brute-force comparison (all satisfiable, no dead branches).

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer"},
        "email": {"type": ["string", "null"], "maxLength": 6},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age"],
    "description": "ignored", "title": "Person",
}
TREE = {
    "$defs": {"node": {"type": "object",
                       "properties": {"v": {"enum": [1, "two", None, [3]]},
                                      "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
                       "required": ["v"]}},
    "$ref": "#/$defs/node",
}
CHOICES = {
    "type": "array", "minItems": 1, "maxItems": 4,
    "items": {"anyOf": [{"type": "integer"},
                        {"type": "object", "properties": {"k": {"const": "é"}, "n": {"type": "null"}},
                         "required": ["k"]},
                        {"type": "string", "minLength": 2, "maxLength": 4}]},
}
ONE_OF = {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                     "additionalProperties": False},
                    {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"],
                     "additionalProperties": False}]}
FREE_DICT = {"type": "object", "additionalProperties": {"type": "integer"}, "definitions": {}}
NUMBER = {"type": "number"}

WALK_SCHEMAS = {"person": PERSON, "tree": TREE, "choices": CHOICES, "one_of": ONE_OF, "free_dict": FREE_DICT,
                "number": NUMBER, "json_object": None}


# ---------------------------------------------------------------------------------------------------
# Validator (JSON Schema semantics for the supported keywords).


def _resolve(root, ref):
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _is_type(v, t):
    return {"object": isinstance(v, dict), "array": isinstance(v, list), "string": isinstance(v, str),
            "boolean": isinstance(v, bool), "null": v is None,
            "number": isinstance(v, (int, float)) and not isinstance(v, bool),
            "integer": isinstance(v, int) and not isinstance(v, bool)}[t]


def validate(v, s, root) -> bool:
    if s is True or s is None:
        return True
    if s is False:
        return False
    if "$ref" in s and not validate(v, _resolve(root, s["$ref"]), root):
        return False
    if "allOf" in s and not all(validate(v, x, root) for x in s["allOf"]):
        return False
    if "anyOf" in s and not any(validate(v, x, root) for x in s["anyOf"]):
        return False
    if "oneOf" in s and sum(validate(v, x, root) for x in s["oneOf"]) != 1:
        return False
    if "enum" in s and not any(json.dumps(v, sort_keys=True) == json.dumps(e, sort_keys=True) for e in s["enum"]):
        return False
    if "const" in s and json.dumps(v, sort_keys=True) != json.dumps(s["const"], sort_keys=True):
        return False
    if "type" in s:
        types = [s["type"]] if isinstance(s["type"], str) else s["type"]
        if not any(_is_type(v, t) for t in types):
            return False
    if isinstance(v, str) and not (s.get("minLength", 0) <= len(v) <= s.get("maxLength", len(v))):
        return False
    if isinstance(v, list):
        if not s.get("minItems", 0) <= len(v) <= s.get("maxItems", len(v)):
            return False
        if not all(validate(x, s.get("items", True), root) for x in v):
            return False
    if isinstance(v, dict):
        props = s.get("properties", {})
        if any(r not in v for r in s.get("required", [])):
            return False
        for key, x in v.items():
            sub = props[key] if key in props else s.get("additionalProperties", True)
            if not validate(x, sub, root):
                return False
    return True


def test_validator_can_fail():
    assert validate({"name": "abc", "age": 3}, PERSON, PERSON)
    assert not validate({"name": "abc", "age": 3.5}, PERSON, PERSON)
    assert not validate({"name": "abcdefghij", "age": 3}, PERSON, PERSON)
    assert not validate({"v": 1, "kids": [{"v": 2}]}, TREE, TREE)
    assert not validate([{"k": "e"}], CHOICES, CHOICES)
    assert not validate({"a": 1, "b": True}, ONE_OF, ONE_OF) and not validate({"a": 1, "c": 1}, ONE_OF, ONE_OF)


# ---------------------------------------------------------------------------------------------------
# Oracle: is ``data`` a prefix of a document the constraint is meant to allow (or a whole one)?


def _utf8_prefixes() -> set[bytes]:
    """Every proper prefix of a UTF-8 encoded character (the last byte only carries the low 6 bits)."""
    out = set()
    for c in range(0x80, 0x110000, 64):
        if not 0xD800 <= c <= 0xDFFF:
            e = chr(c).encode()
            out.update(e[:n] for n in range(1, len(e)))
    return out


UTF8_PREFIXES = _utf8_prefixes()
PARTIAL = "\ue000"  # stands for a character whose bytes are not all there yet
ALL_TYPES = ["object", "array", "string", "number", "boolean", "null"]
U_ESCAPES = {f"{c:04x}" for c in [*range(0x20), 0x7F]}  # the control characters: only as \\u escapes


class Oracle:
    def __init__(self, schema):
        self.root = schema
        self.top = {"type": "object"} if schema is None else schema

    def valid_prefix(self, data: bytes) -> bool:
        text = self._text(data)
        return text is not None and self._parse(text, prefix=True)

    def complete(self, data: bytes) -> bool:
        text = self._text(data)
        return text is not None and PARTIAL not in text and self._parse(text, prefix=False)

    def _text(self, data: bytes) -> str | None:
        for cut in range(4):
            head, tail = data[: len(data) - cut], data[len(data) - cut:]
            if cut and tail not in UTF8_PREFIXES:
                continue
            try:
                text = head.decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.partial = tail  # literals compare it byte-wise
            return text + (PARTIAL if cut else "")
        return None

    def _parse(self, s: str, prefix: bool) -> bool:
        self.s, self.prefix = s, prefix
        return self.value(0, self.top, lambda j: j == len(s))

    def eof(self, i):
        return i >= len(self.s)

    # each parser: does s[i:] start a value of schema `sch` whose continuation `k` accepts (or run out first)?
    def value(self, i, sch, k):
        if self.eof(i):
            return self.prefix
        if sch is True or sch == {}:
            sch = {"type": ALL_TYPES}
        if "$ref" in sch:
            return self.value(i, _resolve(self.root, sch["$ref"]), k)
        for comb in ("anyOf", "oneOf"):
            if comb in sch:
                return any(self.value(i, alt, k) for alt in sch[comb])
        if "enum" in sch or "const" in sch:
            values = sch.get("enum", [sch.get("const")])
            return any(self.const(i, v, k) for v in values)
        types = sch.get("type", ALL_TYPES)
        types = [types] if isinstance(types, str) else types
        return any(self.typed(i, sch, t, k) for t in types)

    def const(self, i, v, k):
        """The value as ``json.dumps`` writes it, with the optional spaces after ":" and "," of any value."""
        if not isinstance(v, (dict, list)):
            return self.literal(i, json.dumps(v, ensure_ascii=False), k)
        parts = list(v.items()) if isinstance(v, dict) else list(v)
        opening, closing = "{}" if isinstance(v, dict) else "[]"

        def part(j, n):
            if n == len(parts):
                return self.literal(j, closing, k)

            def after(e):
                return part(e, n + 1)

            def member(e):
                if isinstance(v, list):
                    return self.const(e, parts[n], after)
                key, value = parts[n]
                return self.literal(e, json.dumps(key, ensure_ascii=False),
                                    lambda c: self.sep(c, ":", lambda d: self.const(d, value, after)))
            return self.sep(j, ",", member) if n else member(j)

        return self.literal(i, opening, lambda j: part(j, 0))

    def literal(self, i, lit, k):
        rest = self.s[i:i + len(lit)]
        if rest.endswith(PARTIAL) and self.eof(i + len(rest)):
            return self.prefix and lit.encode().startswith(rest[:-1].encode() + self.partial)
        if len(rest) < len(lit):
            return self.prefix and lit.startswith(rest)
        return rest == lit and k(i + len(lit))

    def typed(self, i, sch, t, k):
        if t == "boolean":
            return self.literal(i, "true", k) or self.literal(i, "false", k)
        if t == "null":
            return self.literal(i, "null", k)
        if t in ("number", "integer"):
            return self.number(i, t == "integer", k)
        if t == "string":
            return self.string(i, sch.get("minLength", 0), sch.get("maxLength"), k)
        if t == "array":
            return self.array(i, sch, k)
        return self.obj(i, sch, k)

    def string(self, i, lo, hi, k):
        s = self.s
        if self.eof(i):
            return self.prefix
        if s[i] != '"':
            return False
        j, n = i + 1, 0
        while True:
            if self.eof(j):
                return self.prefix
            c = s[j]
            if c == '"':
                return n >= lo and k(j + 1)
            if hi is not None and n >= hi or c < " " or c == "\x7f" or (c == PARTIAL and j != len(s) - 1):
                return False
            n += 1
            if c != "\\":
                j += 1
                continue
            esc = s[j + 1:j + 2]
            if esc and esc in '"\\bfnrt':
                j += 2
                continue
            if esc != "u" and esc:
                return False
            digits = s[j + 2:j + 6].lower()
            if not any(u.startswith(digits) for u in U_ESCAPES):
                return False
            if len(digits) < 4 or not esc:
                return self.prefix
            j += 6

    def number(self, i, integer, k):
        s = self.s
        j = i + (s[i] == "-")

        def digits(j):
            while not self.eof(j) and s[j] in "0123456789":
                j += 1
            return j

        if self.eof(j):
            return self.prefix
        if s[j] == "0":
            j += 1
        elif s[j] in "123456789":
            j = digits(j)
        else:
            return False
        if not integer and not self.eof(j) and s[j] == ".":
            e = digits(j + 1)
            if e == j + 1:
                return self.prefix and self.eof(e)
            j = e
        if not integer and not self.eof(j) and s[j] in "eE":
            j += 1
            if not self.eof(j) and s[j] in "+-":
                j += 1
            e = digits(j)
            if e == j:
                return self.prefix and self.eof(e)
            j = e
        if self.eof(j) and self.prefix:
            return True
        return k(j)

    def sep(self, i, ch, then):
        """``ch`` then an optional space, then ``then(j)``."""
        if self.eof(i):
            return self.prefix
        if self.s[i] != ch:
            return False
        if not self.eof(i + 1) and self.s[i + 1] == " ":
            return then(i + 2)
        return then(i + 1)

    def array(self, i, sch, k):
        s, items = self.s, sch.get("items", True)
        lo, hi = sch.get("minItems", 0), sch.get("maxItems")
        if s[i] != "[":
            return False

        def after(c):
            def cont(j):
                if self.eof(j):
                    return self.prefix
                if s[j] == "]" and c >= lo:
                    return k(j + 1)
                if s[j] == "," and (hi is None or c < hi):
                    return self.sep(j, ",", lambda e: self.value(e, items, after(c + 1)))
                return False
            return cont

        if self.eof(i + 1):
            return self.prefix
        if s[i + 1] == "]":
            return lo == 0 and k(i + 2)
        return hi != 0 and self.value(i + 1, items, after(1))

    def obj(self, i, sch, k):
        """The listed properties in schema order (optional ones may be left out), then any others."""
        s = self.s
        if s[i] != "{":
            return False
        if "properties" not in sch:
            return self.free_obj(i, sch.get("additionalProperties", True), k)
        names = list(sch["properties"])
        required = set(sch.get("required", []))
        extra = sch.get("additionalProperties", True)

        def closable(start):
            return not any(n in required for n in names[start:])

        def keys(j, start):  # a key among names[start:], up to the first required one, or another key
            for m in range(start, len(names)):
                key = json.dumps(names[m], ensure_ascii=False)
                if self.literal(j, key, lambda e, m=m: self.sep(e, ":", lambda v: self.value(
                        v, sch["properties"][names[m]], after(m)))):
                    return True
                if names[m] in required:
                    return False
            return extra is not False and self.free_member(j, extra, names, free_after)

        def after(m):
            def cont(j):
                if self.eof(j):
                    return self.prefix
                if s[j] == "}" and closable(m + 1):
                    return k(j + 1)
                return s[j] == "," and self.sep(j, ",", lambda e: keys(e, m + 1))
            return cont

        def free_after(j):
            if self.eof(j):
                return self.prefix
            if s[j] == "}":
                return k(j + 1)
            return s[j] == "," and self.sep(j, ",", lambda e: self.free_member(e, extra, names, free_after))

        if self.eof(i + 1):
            return self.prefix
        if s[i + 1] == "}" and closable(0):
            return k(i + 2)
        return keys(i + 1, 0)

    def free_member(self, i, extra, taken, k):
        """``"key": value`` with a key not in ``taken`` and a value of schema ``extra``."""
        def after_key(e):
            if json.loads(self.s[i:e]) in taken:
                return False
            return self.sep(e, ":", lambda v: self.value(v, extra, k))
        return self.string(i, 0, None, after_key)

    def free_obj(self, i, extra, k):
        s = self.s

        def member(j):
            return self.free_member(j, extra, (), after)

        def after(j):
            if self.eof(j):
                return self.prefix
            if s[j] == "}":
                return k(j + 1)
            return s[j] == "," and self.sep(j, ",", member)

        if self.eof(i + 1):
            return self.prefix
        if s[i + 1] == "}":
            return k(i + 2)
        return extra is not False and member(i + 1)


def test_oracle_can_fail():
    o = Oracle(PERSON)
    assert o.valid_prefix(b'{"name": "ab') and o.valid_prefix(b'{"name": "\xc3')
    assert not o.valid_prefix(b'{"age"') and not o.valid_prefix(b'{"name":  ')
    assert not o.valid_prefix(b'{"name": "\xc3"') and not o.valid_prefix(b'{"name": "123456789')
    assert o.complete(b'{"name":"a","age":1}') and not o.complete(b'{"name":"a","age":1')
    assert not Oracle(NUMBER).valid_prefix(b"01") and Oracle(NUMBER).complete(b"-0.5e+12")


# ---------------------------------------------------------------------------------------------------
# Helpers


def allowed_ids(c: JsonConstraint, tok) -> list[int]:
    out = c.restrict(torch.zeros(tok.vocab_size))
    return torch.isfinite(out).nonzero().flatten().tolist()


def random_walk(tok, schema, seed: int, wander: int = 60, max_steps: int = 600) -> JsonConstraint:
    """Pick uniformly among the allowed tokens until end-of-sequence is chosen.

    After ``wander`` steps the walk heads for the end (a uniform walk in a free object can go on for
    thousands of tokens): it takes end-of-sequence when allowed, else a token made of closing
    characters only, else one that opens no container. Every choice is still an allowed token.
    """
    c = JsonConstraint(tok, schema)
    g = random.Random(seed)
    eos = set(tok.eos_ids)
    closing = {t for t in range(tok.num_base_tokens) if set(tok.token_bytes(t)) <= set(b'"]}')}
    flat = {t for t in range(tok.num_base_tokens) if not set(tok.token_bytes(t)) & set(b"[{")}
    for step in range(max_steps):
        allowed = allowed_ids(c, tok)
        if step >= wander:
            allowed = ([t for t in allowed if t in eos] or [t for t in allowed if t in closing]
                       or [t for t in allowed if t in flat] or allowed)
        choice = g.choice(allowed)
        c.advance(choice)
        if choice in eos:
            break
    return c


# ---------------------------------------------------------------------------------------------------
# Generation is always valid


@pytest.mark.parametrize("name", list(WALK_SCHEMAS))
def test_random_walks_end_in_valid_json_matching_the_schema(tok, name):
    schema = WALK_SCHEMAS[name]
    for seed in range(12):
        c = random_walk(tok, schema, seed)
        assert c.ended, f"seed {seed}: no end-of-sequence within the step budget: {c.text!r}"
        value = json.loads(c.text)
        if schema is None:
            assert isinstance(value, dict)
        else:
            assert validate(value, schema, schema), (seed, c.text)


def check_every_token(c: JsonConstraint, tok, oracle: Oracle) -> set[int]:
    """Compare restrict() with the oracle and with advance() for every token; return the allowed ids.

    Every allowed token keeps a valid prefix, and each byte that may come next starts an allowed token.
    Where two or more bytes may come next, every token keeping a valid prefix is allowed; where one
    byte is forced, llguidance may allow only the canonical tokenization of the forced bytes.
    """
    allowed = set(allowed_ids(c, tok))
    data = bytes(c._bytes)
    eos = set(tok.eos_ids)
    complete = oracle.complete(data)
    assert c.complete == complete, data
    assert (eos & allowed) == (eos if complete else set()), data
    assert all(t < tok.num_base_tokens or t in eos for t in allowed)
    valid = {t for t in range(tok.num_base_tokens) if oracle.valid_prefix(data + tok.token_bytes(t))}
    next_bytes = {b for b in range(256) if oracle.valid_prefix(data + bytes([b]))}
    assert allowed - eos <= valid, (data, [tok.token_bytes(t) for t in allowed - eos - valid])
    assert {tok.token_bytes(t)[0] for t in allowed - eos} == next_bytes, data
    if len(next_bytes) > 1:
        assert allowed - eos == valid, (data, [tok.token_bytes(t) for t in valid - allowed])
    advance_agrees(c, tok, allowed)
    return allowed - eos


@pytest.mark.parametrize("name", ["person", "tree", "choices", "one_of", "free_dict", "json_object"])
def test_allowed_tokens_are_exactly_those_keeping_a_valid_prefix(tok, name):
    """At states along random walks, every token is checked against the oracle and against advance()."""
    schema = WALK_SCHEMAS[name]
    oracle = Oracle(schema)
    for seed in range(2):
        c = JsonConstraint(tok, schema)
        g = random.Random(100 + seed)
        for _ in range(24):
            choices = sorted(check_every_token(c, tok, oracle))
            if not choices:
                break
            c.advance(g.choice(choices))


CRAFTED = [  # states a short random walk rarely reaches: escapes, split characters, length limits, numbers
    ("person", ['{"name": "a\\', '{"name": "\\u00', '{"name": "\\u001', '{"name": "\\u007', '{"name": "ab\\n',
                b'{"name": "\xe2\x82', b'{"name": "\xf0', '{"name": "abcdefg', '{"name": "abcdefgh',
                '{"name": "abcdef\\', '{"name": "a", "age": -', '{"name": "a", "age": 12',
                '{"name": "a", "age": 1, "score": 1.5e', '{"name": "a", "age": 1, "score": 0',
                '{"name": "a", "age": 1, "score": 2.25e+1', '{"name": "a", "age": 1, "email": ',
                '{"name": "a", "age": 1, "email": "abcde', '{"name": "a", "age": 1, "tags": ["ab',
                '{"name": "a", "age": 1, "tags": ["a", "b", "c"', '{"name": "a", "age": 1,',
                '{"name": "a", "age": 1, ', '{"name": "a", "age": 1, "x', '{"name": "a", "age": 1, "nam',
                '{"name": "a", "age": 1, "xy": [1, {}], ']),
    ("json_object", ['{"a\\', '{"a": [1, {"b": t', '{"a": "\\u00', '{"a": -0.', '{"a": []', '{"a": {}, "b":']),
    ("choices", ["[", '["a', '[{"k": "', '[{"k": "é", ', '[1, "abcd', "[1, 2, 3"]),
    ("tree", ['{"v": [3', '{"v": 1, "kids": [{"v": "t', '{"v": 1, "kids": [{"v": 1}, {"v": 1}']),
]


@pytest.mark.parametrize("name, prefixes", CRAFTED, ids=[n for n, _ in CRAFTED])
def test_allowed_tokens_in_crafted_states(tok, name, prefixes):
    schema = WALK_SCHEMAS[name]
    for prefix in prefixes:
        c = JsonConstraint(tok, schema)
        feed(c, tok, prefix)
        check_every_token(c, tok, Oracle(schema))


def test_eos_only_when_complete(tok):
    c = JsonConstraint(tok, {"type": "integer"})
    eos = list(tok.eos_ids)
    minus = tok.encode("-")
    assert len(minus) == 1
    assert not set(eos) & set(allowed_ids(c, tok))
    with pytest.raises(ValueError, match="before the JSON is complete"):
        c.advance(eos[0])
    c.advance(minus[0])
    assert not c.complete and not set(eos) & set(allowed_ids(c, tok))
    c.advance(tok.encode("7")[0])
    assert c.complete and set(eos) <= set(allowed_ids(c, tok))
    assert tok.encode("8")[0] in allowed_ids(c, tok)  # -78 is still possible
    c.advance(eos[1])
    assert c.ended and c.text == "-7"
    with pytest.raises(ValueError, match="has ended"):
        c.restrict(torch.zeros(tok.vocab_size))


def test_special_tokens_are_never_allowed(tok):
    specials = set(range(tok.num_base_tokens, tok.vocab_size)) - set(tok.eos_ids)
    for schema in (None, PERSON, NUMBER):
        c = random_walk(tok, schema, seed=3)
        assert c.ended
    c = JsonConstraint(tok, None)
    for t in tok.encode('{"a": 1}'):
        assert not specials & set(allowed_ids(c, tok))
        c.advance(t)
    assert set(allowed_ids(c, tok)) == set(tok.eos_ids)  # only end-of-sequence after the closing brace
    for special in (tok.bos_id, tok.patch_id, tok.header_start_id):
        with pytest.raises(ValueError, match="special token"):
            c.copy().advance(special)
    with pytest.raises(ValueError, match="special token"):
        c.advance(tok.vocab_size + 5)


REAL_TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "data" / "llama4-tokenizer" / "tokenizer.model"


def test_real_vocabulary_allows_end_tokens_only_when_complete_and_no_other_special():
    """Meta's 202,048-token vocabulary: every step of walks through a schema and a free object."""
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"Meta's Llama 4 tokenizer.model not found at {REAL_TOKENIZER} (needs ../shared/data)")
    real = load_tokenizer(REAL_TOKENIZER)
    eos = set(real.eos_ids)
    assert len(eos) == 3 and real.eot_id in eos
    closing = torch.zeros(real.vocab_size, dtype=torch.bool)
    closing[[t for t in range(real.num_base_tokens) if set(real.token_bytes(t)) <= set(b'"]}')]] = True
    eos_ids = torch.tensor(sorted(eos))
    for schema, seed in ((PERSON, 0), (PERSON, 1), (None, 2)):
        c = JsonConstraint(real, schema)
        g = torch.Generator().manual_seed(seed)
        for step in range(400):
            mask = c.allowed_mask(real.vocab_size)
            assert bool(mask[eos_ids].all() if c.complete else not mask[eos_ids].any()), c.text
            specials = mask[real.num_base_tokens:].clone()
            specials[eos_ids - real.num_base_tokens] = False
            assert not specials.any(), c.text
            if step > 40:  # head for the end
                for tier in (mask & torch.isin(torch.arange(real.vocab_size), eos_ids), mask & closing):
                    if tier.any():
                        mask = tier
                        break
            allowed = mask.nonzero().flatten()
            c.advance(int(allowed[torch.randint(len(allowed), (1,), generator=g)]))
            if c.ended:
                break
        assert c.ended, c.text
        value = json.loads(c.text)
        assert isinstance(value, dict) and (schema is None or validate(value, schema, schema)), c.text


def test_logits_pass_through_for_allowed_tokens(tok):
    c = JsonConstraint(tok, PERSON)
    for t in tok.encode('{"name": "A'):
        c.advance(t)
    logits = torch.randn(tok.vocab_size, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = c.restrict(logits)
    assert torch.equal(logits, before)  # a new tensor
    allowed = torch.isfinite(out)
    assert torch.equal(out[allowed], logits[allowed])
    assert 0 < int(allowed.sum()) < tok.vocab_size
    best = int(torch.where(allowed, logits, torch.tensor(float("-inf"))).argmax())
    assert int(out.argmax()) == best  # greedy picks the best allowed token
    probs = out.softmax(-1)
    assert float(probs[~allowed].sum()) == 0.0 and abs(float(probs.sum()) - 1) < 1e-5


def test_bad_logits_are_rejected(tok):
    c = JsonConstraint(tok, None)
    with pytest.raises(ValueError, match="1-D float"):
        c.restrict(torch.zeros(2, tok.vocab_size))
    with pytest.raises(ValueError, match="1-D float"):
        c.restrict(torch.zeros(tok.vocab_size, dtype=torch.long))
    with pytest.raises(ValueError, match="entries"):
        c.restrict(torch.zeros(tok.num_base_tokens))
    # a wider model vocabulary is fine: ids past the tokenizer are never allowed
    out = c.restrict(torch.zeros(tok.vocab_size + 7))
    assert not torch.isfinite(out[tok.vocab_size:]).any()


# ---------------------------------------------------------------------------------------------------
# Features


def test_utf8_character_split_across_tokens(tok):
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 2}}, "required": ["s"]}
    c = JsonConstraint(tok, schema)
    feed(c, tok, '{"s": "')
    euro = "€".encode()  # 3 bytes
    feed(c, tok, euro[:1])
    assert c.text == '{"s": "'  # half a character is held back
    allowed = allowed_ids(c, tok)
    assert allowed and all(0x80 <= tok.token_bytes(t)[0] <= 0xBF for t in allowed)
    assert tok.encode('"')[0] not in allowed
    feed(c, tok, euro[1:2])
    feed(c, tok, euro[2:])
    assert c.text == '{"s": "€'
    # the trained vocabulary has tokens that end inside a character, and tokens that finish one
    ids = {tok.token_bytes(i): i for i in range(tok.num_base_tokens)}
    head, tail, other = ids[b"\xf0\x9f"], ids[b"\x99\x82"], ids[b"\xafve"]  # 🙂 = f0 9f 99 82
    c2 = JsonConstraint(tok, None)
    feed(c2, tok, '{"')
    assert head in allowed_ids(c2, tok)
    c2.advance(head)
    assert c2.text == '{"' and tail in allowed_ids(c2, tok) and other not in allowed_ids(c2, tok)
    c2.advance(tail)
    assert c2.text == '{"🙂'
    # maxLength counts characters, not bytes: a third character is refused
    feed(c, tok, "ü")
    assert not any(tok.token_bytes(t)[0] >= 0x80 for t in allowed_ids(c, tok))
    assert accepts(tok, schema, '{"s": "€ü"}') and not accepts(tok, schema, '{"s": "€üa"}')
    assert not accepts(tok, None, b'{"\xed\xa0\x80": 1}')  # a UTF-16 surrogate in UTF-8 is not valid
    assert not accepts(tok, None, b'{"\xc0\xaf": 1}')  # overlong


def test_string_escapes(tok):
    schema = {"type": "string", "maxLength": 3}
    assert accepts(tok, schema, r'"\n\"\u0001"')  # three characters
    assert not accepts(tok, schema, r'"\n\"\u0001x"')
    # \u only for control characters: anything else is written as itself (no surrogate escapes either)
    assert accepts(tok, schema, r'"\u001F"') and accepts(tok, schema, '"é"')
    assert not accepts(tok, schema, r'"\u00e9"') and not accepts(tok, schema, r'"\ud83d"')
    assert not accepts(tok, schema, r'"\x"') and not accepts(tok, schema, '"a\nb"')
    assert not accepts(tok, schema, r'"\/"')
    assert json.loads(r'"\n\"\u0001"') == '\n"\x01'


def test_enum_and_const(tok):
    schema = {"type": "object",
              "properties": {"c": {"enum": ["red", "green", 7, None, {"a": [1, 2]}]}, "d": {"const": True}},
              "required": ["c", "d"]}
    assert accepts(tok, schema, '{"c": "green", "d": true}')
    assert accepts(tok, schema, '{"c": {"a": [1, 2]}, "d": true}')
    assert accepts(tok, schema, '{"c": null, "d": true}')
    assert not accepts(tok, schema, '{"c": "gre", "d": true}')
    assert not accepts(tok, schema, '{"c": 7, "d": false}')
    assert not accepts(tok, schema, '{"c": 70, "d": true}')
    # the type filters enum values
    assert not accepts(tok, {"type": "string", "enum": ["a", 1]}, "1")
    seen = {json.dumps(json.loads(random_walk(tok, schema, s).text)["c"]) for s in range(40)}
    assert seen == {'"red"', '"green"', "7", "null", '{"a": [1, 2]}'}


def test_nested_refs_and_recursion(tok):
    assert accepts(tok, TREE, '{"v": 1, "kids": [{"v": "two", "kids": [{"v": [3]}]}, {"v": null}]}')
    assert not accepts(tok, TREE, '{"v": 1, "kids": [{"v": 2}]}')
    assert not accepts(tok, TREE, '{"v": 1, "kids": [{"v": 1}, {"v": 1}, {"v": 1}]}')  # maxItems
    chain = {"definitions": {"a": {"$ref": "#/definitions/b"}, "b": {"type": "array", "items": {"$ref": "#"}}},
             "$ref": "#/definitions/a"}
    assert accepts(tok, chain, "[[], [[]]]") and not accepts(tok, chain, "[1]")


def test_properties_follow_schema_order_and_optional_ones_may_be_skipped(tok):
    assert accepts(tok, PERSON, '{"name": "a", "age": 1}')
    assert accepts(tok, PERSON, '{"name":"a","age":1,"ok":false}')
    assert accepts(tok, PERSON, '{"name": "a", "age": 1, "email": null, "tags": ["x", "yz"], "ok": true}')
    assert not accepts(tok, PERSON, '{"age": 1, "name": "a"}')  # order
    assert not accepts(tok, PERSON, '{"name": "a"}')  # required
    # other properties (additionalProperties is absent, so any value) come after the listed ones
    assert accepts(tok, PERSON, '{"name": "a", "age": 1, "other": [1], "nam": {}}')
    assert accepts(tok, PERSON, '{"name": "a", "age": 1, "ok": true, "other": 1}')
    assert not accepts(tok, PERSON, '{"other": 1, "name": "a", "age": 1}')
    assert not accepts(tok, PERSON, '{"name": "a", "age": 1, "other": 1, "ok": true}')  # listed: in its place
    assert not accepts(tok, PERSON, '{"name": "a", "age": 1, "name": "b"}')  # a listed name is never repeated
    closed = {**PERSON, "additionalProperties": False}
    assert not accepts(tok, closed, '{"name": "a", "age": 1, "other": 1}')
    typed = {**PERSON, "additionalProperties": {"type": "integer"}}
    assert accepts(tok, typed, '{"name": "a", "age": 1, "n": 2}')
    assert not accepts(tok, typed, '{"name": "a", "age": 1, "n": ""}')
    assert not accepts(tok, PERSON, '{"name": "", "age": 1}')  # minLength
    assert not accepts(tok, PERSON, '{"name": "a", "age": 1.5}')  # integer
    assert not accepts(tok, PERSON, '{"name": "a", "age": 1, "tags": ["a", "b", "c", "d"]}')  # maxItems


def test_whitespace_is_bounded_and_numbers_follow_json(tok):
    assert accepts(tok, None, '{"a": [1, 2], "b":{}}')
    for bad in ('{"a":  1}', '{ "a": 1}', '{"a": 1 }', '{"a":\n1}', ' {"a": 1}', '{"a": [1 ,2]}', '{"a": 1}\n'):
        assert not accepts(tok, None, bad), bad
    # a schema's own "x-guidance" options cannot change the output form
    flexible = {"type": "object", "x-guidance": {"whitespace_flexible": True, "lenient": True}}
    assert not accepts(tok, flexible, '{ "a": 1}')
    with pytest.raises(SchemaError, match="uniqueItems"):
        JsonConstraint(tok, {"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}})
    assert accepts(tok, NUMBER, "-" + "9" * 25 + "." + "1" * 25 + "e-" + "9" * 3)
    assert accepts(tok, NUMBER, "-0.5E+12") and accepts(tok, NUMBER, "0")
    assert not accepts(tok, NUMBER, "01") and not accepts(tok, NUMBER, "1.") and not accepts(tok, NUMBER, "+1")
    assert not accepts(tok, NUMBER, ".5") and not accepts(tok, NUMBER, "1e") and not accepts(tok, NUMBER, "NaN")
    assert not accepts(tok, {"type": "integer"}, "1e3") and not accepts(tok, {"type": "integer"}, "1.0")


def test_json_object_mode_needs_an_object(tok):
    assert accepts(tok, None, '{"a": {"b": [true, null, "x", -1.5]}}')
    for bad in ('[1]', '"a"', "1", "{1: 2}"):
        assert not accepts(tok, None, bad)


def test_free_objects_and_arrays(tok):
    assert accepts(tok, FREE_DICT, '{"a": 1, "a": 2}') and not accepts(tok, FREE_DICT, '{"a": "1"}')
    closed = {"type": "object", "additionalProperties": False}
    assert accepts(tok, closed, "{}") and not accepts(tok, closed, '{"a": 1}')
    req = {"type": "object", "required": ["id"], "additionalProperties": {"type": "integer"}}
    assert accepts(tok, req, '{"id": 3}') and not accepts(tok, req, "{}")
    sized = {"type": "array", "minItems": 2, "maxItems": 3}
    assert accepts(tok, sized, '[1, "a"]') and not accepts(tok, sized, "[1]") and not accepts(tok, sized, "[1,2,3,4]")
    assert accepts(tok, {"type": "array", "maxItems": 0}, "[]")


def test_unsatisfiable_branches_are_pruned(tok):
    schema = {"type": "object", "properties": {"never": False, "x": {"type": "integer"}}, "required": ["x"],
              "additionalProperties": False}
    assert accepts(tok, schema, '{"x": 1}') and not accepts(tok, schema, '{"never": 1, "x": 1}')
    c = JsonConstraint(tok, schema)
    feed(c, tok, '{"')
    assert tok.encode("n")[0] not in allowed_ids(c, tok)  # no dead end: "never" cannot start
    empty = {"type": "array", "items": False}
    assert accepts(tok, empty, "[]") and not accepts(tok, empty, "[1]")
    loop = {"type": "object", "properties": {"me": {"$ref": "#"}, "stop": {"type": "null"}}}
    assert accepts(tok, loop, '{"me": {"stop": null}}')
    cyc = {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "$ref": "#/$defs/a"}
    assert accepts(tok, cyc, "null")


def test_copy_is_independent(tok):
    c = JsonConstraint(tok, PERSON)
    feed(c, tok, '{"name": "a')
    d = c.copy()
    feed(d, tok, '", "age": 1}')
    assert d.complete and not c.complete and c.text == '{"name": "a'
    assert c.restrict(torch.zeros(tok.vocab_size)).isfinite().sum() > 10


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "(?=a)"}, "look-around"),
    ({"type": "string", "format": "iri"}, "Unknown format: iri"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, r"minimum \(5\) is greater than maximum \(1\)"),
    ({"type": "array", "uniqueItems": True}, r'Unimplemented keys: \["uniqueItems"\]'),
    ({"type": "object", "properties": {"a": {"type": "number", "not": {}}}}, r'Unimplemented keys: \["not"\]'),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, r'Unimplemented keys: \["if", "then"\]'),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"anyOf": []}, "anyOf is empty"),
    ({"$ref": "http://example.com/s.json"}, "does not fetch resources"),
    ({"$ref": "#/$defs/missing"}, "'/\\$defs/missing' does not exist"),
    ({"type": "date"}, "Invalid type: date"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, r"minLength \(5\) is greater than maxLength \(2\)"),
    ({"type": "array", "minItems": -1}, "'minItems', got -1"),
    ({"enum": []}, "Unsatisfiable schema"),
    ({"type": "string", "enum": [1, 2]}, "incompatible types"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "required property 'a' is unsatisfiable"),
    ({"type": "object", "patternProperties": {"^a": {}, "^ab": {}}}, "not disjoint"),
    ({"type": "object", "minProperties": 1, "properties": {"a": {}}}, "min/maxProperties only supported"),
    (False, "admits no value"),
    ({"properties": {"a": 3}}, "must be an object or boolean"),
    ({"enum": [float("nan")]}, "not JSON"),
    ({"enum": [{1, 2}]}, "not JSON"),
])
def test_schema_errors_name_the_problem(tok, schema, message):
    with pytest.raises(SchemaError, match=message):
        JsonConstraint(tok, schema)


def test_keywords_beside_others_are_all_applied(tok):
    """Sibling keywords intersect (the engine before llguidance refused these schemas)."""
    s = {"type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}
    assert accepts(tok, s, '{"a": 1}') and accepts(tok, s, '{"b": 1}') and not accepts(tok, s, "{}")
    s = {"type": "object", "properties": {"a": {}}, "required": ["b"]}  # required, not listed: any value
    assert accepts(tok, s, '{"a": 1, "b": [2]}') and accepts(tok, s, '{"b": 2}') and not accepts(tok, s, '{"a": 1}')


def test_pattern_properties_and_property_counts(tok):
    s = {"type": "object", "patternProperties": {"^x_": {"type": "integer"}, "^y_": {"type": "string"}},
         "additionalProperties": False}
    assert accepts(tok, s, '{"x_a": 1, "y_b": "s", "x_c": 2}') and accepts(tok, s, "{}")
    assert not accepts(tok, s, '{"x_a": "s"}') and not accepts(tok, s, '{"z": 1}')
    mixed = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
             "patternProperties": {"^n": {"type": "null"}}, "additionalProperties": {"type": "boolean"}}
    assert accepts(tok, mixed, '{"id": 1, "na": null, "b": true}')
    assert not accepts(tok, mixed, '{"id": 1, "na": true}') and not accepts(tok, mixed, '{"id": 1, "b": null}')
    counted = {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1, "maxProperties": 2}
    assert accepts(tok, counted, '{"a": 1}') and accepts(tok, counted, '{"a": 1, "b": 2}')
    assert not accepts(tok, counted, "{}") and not accepts(tok, counted, '{"a": 1, "b": 2, "c": 3}')
    for seed in range(4):
        for schema in (s, mixed, counted):
            c = random_walk(tok, schema, seed)
            assert c.ended and jsonschema.Draft202012Validator(schema).is_valid(json.loads(c.text)), c.text


def test_schema_error_is_a_value_error(tok):
    assert issubclass(SchemaError, ValueError)
    with pytest.raises(SchemaError, match="must be a dict"):
        JsonConstraint(tok, "not a schema")


def test_annotations_and_unknown_keywords_are_ignored(tok):
    """As the specification says; a keyword constrains only the values of its own type (maxLength: strings)."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "T", "description": "d",
              "x-vendor": {"anything": [1]}, "discriminator": {"propertyName": "a"},
              "properties": {"a": {"default": 1, "examples": [2], "maxLength": 2, "unknownKeyword": True}},
              "required": ["a"]}
    assert accepts(tok, schema, '{"a": "xy"}') and not accepts(tok, schema, '{"a": "xyz"}')
    assert accepts(tok, schema, '{"a": 1}')  # maxLength does not make "a" a string
    assert accepts(tok, {"type": ["integer", "number"]}, "1.5")
    assert accepts(tok, {"allOf": [{"type": "boolean"}]}, "false")
