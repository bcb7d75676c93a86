"""Constrained decoding of JSON: OpenAI ``response_format`` ``json_object`` and ``json_schema``.

At every step :meth:`JsonConstraint.restrict` sets to -inf the logit of every token that would stop the
output being a prefix of a JSON document matching the schema, and allows end-of-sequence only once
the document is complete; :meth:`JsonConstraint.advance` feeds the chosen token. Greedy decoding then
picks the most likely allowed token, and sampling samples among the allowed tokens only.

The schema is compiled, and the token masks are computed, by llguidance (an Earley parser over a lexer
of lazily built regex DFAs, walking the vocabulary as a token trie). What this module adds:

* One llguidance tokenizer per :class:`~llama4.prompt.tokenizer.Tokenizer`, built from its BPE ranks
  once (one to two seconds for the 202,048-token Llama 4 vocabulary) and shared, with a few compiled
  schemas kept ready, by every constraint on that tokenizer.
* Where the grammar forces bytes (the rest of a property name, ``": "`` after it, ...), llguidance
  allows only the first token of their canonical BPE tokenization, so that the model reads keys
  tokenized as in training; :meth:`JsonConstraint.advance` checks a token against that same mask
  (llguidance's own ``validate_tokens`` would let other tokenizations of the bytes through).
* Special tokens: the end-of-sequence ids (``<|end_of_text|>``, ``<|eom|>``, ``<|eot|>``) are allowed
  exactly when the JSON is complete, and no other special token is ever allowed, whatever the library's
  mask says (the mask is cut to the base vocabulary and the end ids set here).
* The output form, which the request cannot change (a top-level ``x-guidance`` key is dropped): no
  whitespace except one optional space after ``:`` and after ``,`` (``{"a": 1, "b": 2}`` and
  ``{"a":1,"b":2}`` both pass), so that a small model cannot loop on whitespace or pad with newlines.
* ``oneOf`` stays exact: llguidance turns it into ``anyOf`` only where it proves that no value can
  match two alternatives (different types; objects told apart by a required ``const``/``enum``
  property, as in pydantic's discriminated unions, or by required properties with
  ``additionalProperties: false``), and refuses it otherwise (lengths, ranges, patterns, formats,
  array items are not compared). Those refusals are :class:`SchemaError`\\ s (use ``anyOf`` when
  several alternatives may match): llguidance's ``coerce_one_of`` is left off, since reading ``oneOf``
  as ``anyOf`` can generate a value that matches two alternatives and so is invalid.
* Two things llguidance gets wrong are made right before it compiles the schema: the formats date,
  date-time, time and hostname, which it checks loosely (February 30th, year 0000, second 60, host
  names over 253 characters), become exact patterns (:data:`EXACT_FORMATS`); and ``prefixItems`` mixed
  with the older drafts' ``additionalItems`` or list ``items``, where it drops the ``prefixItems``, is
  refused.

What is supported is llguidance's JSON Schema (draft 2020-12, the ``$ref``/``$defs``/``definitions`` of
older drafts too): ``type``, ``properties`` (generated in the schema's order; other properties may
follow where ``additionalProperties`` allows them), ``required``, ``additionalProperties``,
``patternProperties`` (disjoint patterns), ``minProperties``/``maxProperties`` (when every listed
property is required), ``items``, ``prefixItems``, ``minItems``/``maxItems``, ``enum``, ``const``,
``minLength``/``maxLength``, ``pattern`` (ECMA-style regex, not anchored unless it says so; no
look-around or backreferences), ``format`` (date-time, time, date, duration, email, hostname, ipv4,
ipv6, uuid, uri), ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, ``multipleOf``,
``anyOf``, ``allOf``, exact ``oneOf`` (above), local ``$ref`` (recursion allowed). Annotations and
unknown keywords are ignored, as the specification says; keywords that constrain values but are not
implemented (``not``, ``uniqueItems``, ``if``/``then``/``else``, ``dependentRequired``, ...), unknown
formats, remote ``$ref``, bad patterns and unsatisfiable schemas raise :class:`SchemaError` with
llguidance's message. Strings may use the named escapes (``\\n``, ``\\"``, ...) and ``\\u`` for control
characters; any other character is written as itself (UTF-8).
"""

from __future__ import annotations

import json
import operator
import threading
import weakref
from collections import OrderedDict

import llguidance.numpy
import numpy as np
import torch
from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from llama4.inference.requests import ConstraintError
from llama4.prompt.tokenizer import Tokenizer

# Options that the schema's own "x-guidance" could otherwise set: see the module docstring.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?",
                "coerce_one_of": False, "lenient": False}
ANY_OBJECT = {"type": "object"}

# Formats that llguidance checks loosely (any day 01-31 in any month, year 0000, second 60, host names
# over 253 characters), as exact whole-string patterns for a safe subset: real calendar days, leap
# years included, no leap second, "T"/"Z" upper case, at most 9 fraction digits.
_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001..9999
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)")
_TIME = ("(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?"
         "(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])")
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EXACT_FORMATS = {
    "date": {"pattern": f"^{_DATE}$"},
    "date-time": {"pattern": f"^{_DATE}T{_TIME}$"},
    "time": {"pattern": f"^{_TIME}$"},
    "hostname": {"pattern": f"^{_LABEL}(?:\\.{_LABEL})*$", "maxLength": 253},
}
# Keywords whose value is a subschema, a list of them, or a map to them (what _rewrite walks).
_SUBSCHEMA = frozenset({"additionalProperties", "additionalItems", "items", "contains", "propertyNames", "not",
                        "if", "then", "else", "unevaluatedItems", "unevaluatedProperties"})
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
                             "dependencies"})


class SchemaError(ValueError):
    """The schema is not JSON, not a schema, unsupported by llguidance, or admits no value."""


class _Vocabulary:
    """What the constraints on one tokenizer share: llguidance's tokenizer and the compiled schemas.

    A compiled schema is kept as a matcher in its start state, and each constraint gets a deep copy:
    the copies share the lexer, whose DFA states are built lazily, so a schema used again (a tool's
    parameters, request after request) is neither recompiled nor its lexer rebuilt.
    """

    CACHED_SCHEMAS = 32

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.n_base = tokenizer.num_base_tokens
        self.eos_ids = tuple(tokenizer.eos_ids)
        self.min_logits = max(self.n_base, max(self.eos_ids) + 1)
        self.ll = LLTokenizer.from_tiktoken(encoder=tokenizer.mergeable_ranks, special_tokens=tokenizer.special_tokens,
                                            pattern=tokenizer.pattern, eos_token=list(self.eos_ids),
                                            n_vocab=tokenizer.vocab_size)
        self._matchers: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # the server checks schemas in its threads, the engine builds constraints

    def matcher(self, schema_text: str) -> LLMatcher:
        """A fresh matcher for the schema (JSON text); SchemaError if llguidance refuses it."""
        with self._lock:
            start = self._matchers.get(schema_text)
            if start is not None:
                self._matchers.move_to_end(schema_text)
        if start is None:
            start = _compile(self.ll, schema_text)
            try:  # a schema that recurses with no way out (``{"$ref": "#"}``) compiles, and fails here
                self.bitmask(start.deep_copy())
            except ConstraintError as e:
                raise SchemaError(f"the schema cannot be followed: {e}") from None
            with self._lock:
                self._matchers[schema_text] = start
                while len(self._matchers) > self.CACHED_SCHEMAS:
                    self._matchers.popitem(last=False)
        return start.deep_copy()

    def bitmask(self, matcher: LLMatcher) -> np.ndarray:
        """Int32 [ceil(V / 32)]: llguidance's mask of the tokens the matcher allows now, one bit a token
        (token i is bit i % 32 of word i // 32)."""
        bitmask = np.zeros(llguidance.numpy.get_bitmask_shape(1, self.ll.vocab_size), dtype="<i4")
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask)
        if matcher.is_error():
            raise ConstraintError(f"llguidance stopped: {matcher.get_error()}")
        return bitmask[0]

    def base_mask(self, bitmask: np.ndarray) -> np.ndarray:
        """Bool [n_base]: the base tokens that ``bitmask`` allows. In numpy: a few element-wise torch ops
        on 200k entries would cost more than llguidance's whole mask (thread start-up)."""
        return np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: self.n_base].view(np.bool_)


PARSER_LIMITS = LLParserLimits(max_items_in_row=10_000, verbose_errors=False)
"""llguidance's own bounds on one step's work, as its defaults but for the Earley row size: an object's
optional properties take about four items each in the row after ``{``, and the default of 2,000 fails
objects of 500 (a step at 10,000 items costs some 60 ms); and errors without the grammar's text (a
schema of 60 KB would be quoted whole in the message)."""


def _compile(ll: LLTokenizer, schema_text: str) -> LLMatcher:
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema_text, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise SchemaError(f"not a JSON schema: {e}") from None
    matcher = LLMatcher(ll, grammar, log_level=0, limits=PARSER_LIMITS)
    if matcher.is_error():
        raise SchemaError(matcher.get_error())
    return matcher


def _schema_text(schema: dict | bool | None) -> str:
    """The schema as the JSON text llguidance compiles: None is any object, ``x-guidance`` is dropped."""
    if schema is None:
        schema = ANY_OBJECT
    elif schema is True:
        schema = {}
    elif schema is False:
        raise SchemaError("the schema false admits no value")
    elif isinstance(schema, dict):
        schema = _rewrite({k: v for k, v in schema.items() if k != "x-guidance"})
    else:
        raise SchemaError(f"a schema must be a dict (or None for any JSON object), got {type(schema).__name__}")
    try:
        return json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"the schema is not JSON: {e}") from None


def _rewrite(schema, path: str = "#"):
    """The schema with every subschema passed through :func:`_rewrite_node`, innermost first."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        where = _pointer(path, key)
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            value = {k: _rewrite(v, _pointer(where, k)) for k, v in value.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            value = [_rewrite(v, _pointer(where, i)) for i, v in enumerate(value)]
        elif key in _SUBSCHEMA:
            value = _rewrite(value, where)
        out[key] = value
    return _rewrite_node(out, path)


def _pointer(path: str, key) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _rewrite_node(node: dict, path: str) -> dict:
    """What llguidance gets wrong, made right here: a ``format`` of :data:`EXACT_FORMATS` becomes its
    exact pattern (in the subschema's ``allOf``, as a ``pattern`` or ``maxLength`` may sit beside it;
    like ``format``, it constrains strings only), and draft 2020-12's ``prefixItems`` mixed with the
    older drafts' ``additionalItems`` or list ``items`` is refused (llguidance then lets the older
    keywords win, and drops the ``prefixItems`` constraints)."""
    if "prefixItems" in node and ("additionalItems" in node or isinstance(node.get("items"), list)):
        raise SchemaError(f"'prefixItems' (draft 2020-12) together with 'additionalItems' or 'items' as a list "
                          f"(drafts 4 to 2019-09) at {path}: use the keywords of one draft")
    fmt, all_of = node.get("format"), node.get("allOf", [])
    if isinstance(fmt, str) and fmt in EXACT_FORMATS and isinstance(all_of, list):
        node = {k: v for k, v in node.items() if k != "format"}
        node["allOf"] = [*all_of, EXACT_FORMATS[fmt]]
    return node


_VOCABULARIES: "weakref.WeakKeyDictionary[Tokenizer, _Vocabulary]" = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer: Tokenizer) -> _Vocabulary:
    vocab = _VOCABULARIES.get(tokenizer)
    if vocab is None:
        vocab = _VOCABULARIES[tokenizer] = _Vocabulary(tokenizer)
    return vocab


class JsonConstraint:
    """Token-level constraint: the output is a JSON object (``schema=None``) or matches ``schema``.

    Args:
        tokenizer: the model's :class:`~llama4.prompt.tokenizer.Tokenizer`; llguidance's view of its
            vocabulary is built on first use and cached.
        schema: a JSON-schema dict or boolean (what the module docstring lists), or None for any object.

    Raises:
        SchemaError: the schema is not supported (llguidance's message says why) or admits no value.
    """

    def __init__(self, tokenizer: Tokenizer, schema: dict | bool | None = None) -> None:
        text = _schema_text(schema)
        self.schema = schema
        self._tokenizer = tokenizer
        self._vocab = _vocabulary(tokenizer)
        self._matcher = self._vocab.matcher(text)
        self._bitmask: np.ndarray | None = None  # of the current step, once computed
        self._bytes = bytearray()
        self._ended = False

    @property
    def complete(self) -> bool:
        """The text so far is a complete JSON value matching the schema."""
        return self._matcher.is_accepting()

    @property
    def text(self) -> str:
        """The text generated so far (a character split across tokens shows once it is whole)."""
        return self._bytes.decode("utf-8", errors="ignore")

    @property
    def ended(self) -> bool:
        """An end-of-sequence token has been fed."""
        return self._ended

    def copy(self) -> "JsonConstraint":
        """An independent constraint in the same state."""
        other = object.__new__(JsonConstraint)
        other.__dict__.update(self.__dict__)
        other._matcher = self._matcher.deep_copy()
        other._bytes = bytearray(self._bytes)
        return other

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]: the tokens :meth:`restrict` leaves finite."""
        return torch.from_numpy(self._mask(vocab_size))

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits`` [V] with every token that is not allowed now set to -inf."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 1 or not logits.is_floating_point():
            raise ValueError(f"restrict() takes a 1-D float tensor of logits, got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        refused = torch.from_numpy(~self._mask(logits.shape[0])).to(logits.device)
        return logits.masked_fill(refused, float("-inf"))

    def advance(self, token_id: int) -> None:
        """Feed the chosen token; ValueError if :meth:`restrict` would not have allowed it."""
        self._check_open()
        token_id = operator.index(token_id)
        vocab = self._vocab
        if token_id in vocab.eos_ids:
            if not self.complete:
                raise ValueError(f"end-of-sequence token {token_id} before the JSON is complete: {self.text!r}")
            self._ended = True
            return
        if not 0 <= token_id < vocab.n_base:
            raise ValueError(f"token {token_id} is a special token or outside the vocabulary; not allowed in JSON")
        piece = self._tokenizer.token_bytes(token_id)
        # the mask, not validate_tokens(): where bytes are forced, only their canonical token is allowed
        if not (int(self._step_bitmask()[token_id >> 5]) >> (token_id & 31)) & 1:
            raise ValueError(f"token {token_id} ({piece!r}) does not continue {self.text!r} as JSON "
                             "matching the schema")
        if not self._matcher.consume_token(token_id):
            raise ConstraintError(f"llguidance refused token {token_id} that its mask allowed: "
                               f"{self._matcher.get_error()}")
        self._bitmask = None
        self._bytes += piece

    def _mask(self, vocab_size: int) -> np.ndarray:
        self._check_open()
        vocab = self._vocab
        if vocab_size < vocab.min_logits:
            raise ValueError(f"logits have {vocab_size} entries, but the tokenizer has {vocab.n_base} base tokens and "
                             f"end-of-sequence ids up to {max(vocab.eos_ids)}")
        mask = np.zeros(vocab_size, dtype=np.bool_)
        mask[: vocab.n_base] = vocab.base_mask(self._step_bitmask())
        if self.complete:
            mask[list(vocab.eos_ids)] = True
        return mask

    def _step_bitmask(self) -> np.ndarray:
        if self._bitmask is None:
            self._bitmask = self._vocab.bitmask(self._matcher)
        return self._bitmask

    def _check_open(self) -> None:
        if self._ended:
            raise ValueError("the JSON constraint has ended (an end-of-sequence token was fed)")
