"""Token events that reach the HTTP side together leave as one chunk per choice (llama4.serve.app._coalesced)."""

from __future__ import annotations

from llama4.inference.requests import FinishEvent, TokenEvent
from llama4.serve.app import _coalesced


def _shape(batch, plain=lambda i: True):
    return _coalesced(batch, lambda i, e: [(i, "own", e.reason if isinstance(e, FinishEvent) else e.text)],
                      lambda i, run: [(i, "run", "".join(e.text for e in run))], plain)


def test_pending_tokens_of_a_choice_become_one_chunk_and_keep_their_order():
    batch = [(0, TokenEvent("a", 1)), (1, TokenEvent("x", 2)), (0, TokenEvent("b", 3)), (0, FinishEvent("stop")),
             (1, TokenEvent("y", 4))]
    assert _shape(batch) == [(0, "run", "ab"), (0, "own", "stop"), (1, "run", "xy")]


def test_a_single_token_is_its_own_chunk_and_held_choices_go_event_by_event():
    assert _shape([(0, TokenEvent("a", 1))]) == [(0, "run", "a")]
    batch = [(0, TokenEvent("{", 1)), (0, TokenEvent('"', 2)), (1, TokenEvent("p", 3)), (1, TokenEvent("q", 4))]
    assert _shape(batch, plain=lambda i: i == 1) == [(0, "own", "{"), (0, "own", '"'), (1, "run", "pq")]
