"""bench/serve_load.py's load driver, run small against the test server: no 5xx, nothing lost or mixed up."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import MODEL_ID

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def serve_load():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling bench/common.py
    try:
        spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["serve_load"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("serve_load", None)
        sys.path.remove(str(BENCH))


def test_concurrent_streams_get_their_solo_replies(server, serve_load):
    chats = serve_load.prompts(6)
    solo = serve_load.run_load(server.url, MODEL_ID, list(enumerate(chats)), 1, 12, 60)
    reference = {o.index: o.text for o in solo.outcomes}
    assert len(reference) == 6 and len(set(reference.values())) > 1
    requests = [(i % 6, chats[i % 6]) for i in range(18)]
    load = serve_load.run_load(server.url, MODEL_ID, requests, 6, 12, 60, reference)
    assert len(load.outcomes) == 18
    assert (load.server_errors, load.lost, load.mismatched) == (0, 0, 0)
    assert all(o.tokens == 12 and o.ttft is not None for o in load.outcomes)
    assert 0 < load.ttft_percentile(0.5) <= load.ttft_percentile(0.99) and load.tokens_per_second > 0


def test_conversations_report_the_second_turns(server, serve_load):
    outcomes = serve_load.converse(server.url, MODEL_ID, serve_load.prompts(2), 6, 60)
    assert [o.index for o in outcomes] == [0, 1]
    assert all(o.status == 200 and o.tokens == 6 and o.prompt_tokens > 20 and o.ttft is not None for o in outcomes)
    assert all(0 <= o.cached < o.prompt_tokens for o in outcomes)


def test_timed_phases_keep_every_client_busy_and_check_each_reply(server, serve_load):
    chats = serve_load.prompts(3)
    solo = serve_load.run_load(server.url, MODEL_ID, list(enumerate(chats)), 1, 6, 60)
    reference = {o.index: o.text for o in solo.outcomes}
    stats = serve_load.run_for(server.url, MODEL_ID, chats, 3, 6, 1.0, reference)
    assert len(stats.outcomes) >= 3 and stats.seconds >= 1.0
    assert (stats.server_errors, stats.lost, stats.mismatched) == (0, 0, 0)
    assert {o.index for o in stats.outcomes} == {0, 1, 2}  # the prompts are cycled through
    wrong = {i: text + " (not the reply)" for i, text in reference.items()}
    assert serve_load.run_for(server.url, MODEL_ID, chats, 1, 6, 0.1, wrong).mismatched >= 1
