"""What the JSON-schema constraint tests share: the embedded tokenizer's one-byte tokens, the allowed
token ids of a constraint, random walks through a schema, and schemas with exact decimals."""

from __future__ import annotations

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
