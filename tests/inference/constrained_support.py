"""What the JSON-schema constraint tests share: the embedded tokenizer's one-byte tokens, the allowed
token ids of a constraint, writing a text through the constraint, random walks through a schema, and
schemas with exact decimals."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from decimal import Decimal

import pytest
import torch

import llama4
from llama4.inference.constrained import JsonConstraint


@pytest.fixture(scope="module")
def tok():
    return llama4.load_tokenizer()


@pytest.fixture(scope="module")
def byte_ids(tok):
    ids = {tok.token_bytes(i): i for i in range(tok.num_base_tokens)}
    return [ids[bytes([b])] for b in range(256)]


def allowed_ids(c: JsonConstraint, tok) -> list[int]:
    return torch.isfinite(c.restrict(torch.zeros(tok.vocab_size))).nonzero().flatten().tolist()


@functools.lru_cache(maxsize=4)
def ids_by_bytes(tok) -> dict[bytes, int]:
    return {tok.token_bytes(i): i for i in range(tok.num_base_tokens)}


def feed(c: JsonConstraint, tok, text: str | bytes) -> None:
    """Write ``text`` as decoding would: at each step the shortest allowed token that the rest of the
    text starts with (one byte where the tokenization is free; where the grammar forces bytes, the
    first token of their canonical tokenization is the only one allowed). ValueError where none fits."""
    data = text.encode() if isinstance(text, str) else text
    ids = ids_by_bytes(tok)
    longest = max(map(len, ids))
    i = 0
    while i < len(data):
        mask = c.allowed_mask(tok.vocab_size)
        fits = (ids.get(data[i:i + k]) for k in range(1, min(longest, len(data) - i) + 1))
        token = next((t for t in fits if t is not None and mask[t]), None)
        if token is None:
            raise ValueError(f"no allowed token writes {data[i:i + 8]!r} after {data[:i]!r}")
        c.advance(token)
        i += len(tok.token_bytes(token))


def accepts(tok, schema, text: str | bytes) -> bool:
    """``text`` can be written through the constraint and is then complete (end-of-sequence allowed)."""
    c = JsonConstraint(tok, schema)
    try:
        feed(c, tok, text)
    except ValueError:
        return False
    return c.complete and set(tok.eos_ids) <= set(allowed_ids(c, tok))


def takes(tok, schema, prefix: str | bytes, nxt: str | bytes) -> bool:
    """After ``prefix``, the next byte can be ``nxt`` (one byte): some allowed token starts with it."""
    c = JsonConstraint(tok, schema)
    feed(c, tok, prefix)
    b = nxt.encode() if isinstance(nxt, str) else nxt
    assert len(b) == 1
    return any(tok.token_bytes(t).startswith(b) for t in allowed_ids(c, tok) if t < tok.num_base_tokens)


def advance_agrees(c: JsonConstraint, tok, allowed: set[int], refused_sample: int = 64) -> None:
    """advance() takes every allowed base token and refuses (a sample of) the others, on copies of ``c``."""
    base = set(range(tok.num_base_tokens))
    refused = sorted(base - allowed)
    for t in sorted(allowed & base) + random.Random(len(refused)).sample(refused, min(refused_sample, len(refused))):
        trial = c.copy()
        if t in allowed:
            trial.advance(t)
        else:
            with pytest.raises(ValueError, match="does not continue"):
                trial.advance(t)


def decimals(x):
    """The schema with floats as the decimals their JSON text wrote (0.1 is one tenth)."""
    if isinstance(x, float):
        return Decimal(repr(x))
    if isinstance(x, dict):
        return {k: decimals(v) for k, v in x.items()}
    if isinstance(x, list):
        return [decimals(v) for v in x]
    return x


def walk(tok, schema, seed: int, endings: Callable[[object], list[set[int]]], wander: int,
         max_steps: int) -> JsonConstraint:
    """Pick uniformly among the allowed tokens until end-of-sequence; after ``wander`` steps take from
    the first tier of ``endings(tok)`` that has an allowed token (ways to finish the value)."""
    c = JsonConstraint(tok, schema)
    g = random.Random(seed)
    eos = set(tok.eos_ids)
    tiers = endings(tok)
    for step in range(max_steps):
        allowed = allowed_ids(c, tok)
        assert allowed, f"seed {seed}: dead end after {c.text!r}"  # every allowed prefix must be completable
        if step >= wander:
            allowed = next((chosen for tier in tiers if (chosen := [t for t in allowed if t in tier])), allowed)
        choice = g.choice(allowed)
        c.advance(choice)
        if choice in eos:
            break
    return c


def closing_tokens(tok) -> set[int]:
    return {t for t in range(tok.num_base_tokens) if set(tok.token_bytes(t)) <= set(b'"]}')}


def one_byte_tokens(tok) -> set[int]:
    return {t for t in range(tok.num_base_tokens) if len(tok.token_bytes(t)) == 1}
