"""Tensor / expert parallel on CPU over gloo: 2 and 4 ranks spawned with torch.multiprocessing.

Each group size is spawned once (module fixtures; the ranks run every check, tests/distributed/workers.py)
and the tests below judge what the ranks measured: logits within 1e-5 (relative, fp32) of the
single-process model, greedy tokens identical, the collectives of one forward as docs/DISTRIBUTED.md
counts them, and the bytes each rank read from the checkpoint.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.multiprocessing as mp

import llama4
from tests.distributed import workers

PLANS_2 = [(2, 1), (1, 2), (2, 2)]
PLANS_4 = [(4, 2), (1, 4)]


def _spawn(tmp_path_factory, world: int, checkpoints: dict[str, str]) -> list[dict]:
    out = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(workers.run_world, args=(world, str(out / "store"), str(out), checkpoints), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for name in ("a", "b"):
        path = tmp_path_factory.mktemp(f"checkpoint_{name}")
        # "a" in several files (a sharded checkpoint with an index), "b" in one
        llama4.save_model(workers.reference(name), path, max_shard_bytes=40_000 if name == "a" else None)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="module")
def world2(tmp_path_factory, checkpoints) -> list[dict]:
    return _spawn(tmp_path_factory, 2, checkpoints)


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, 4, {})


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("tp,ep", PLANS_2)
def test_two_ranks_logits_and_greedy_tokens_equal_one_process(world2, name, tp, ep):
    for rank, results in enumerate(world2):
        entry = results["plans"][(name, tp, ep)]
        assert entry["rel_err"] <= 1e-5, (rank, entry["rel_err"])
        assert entry["tokens"] == entry["want_tokens"], rank


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("tp,ep", PLANS_4)
def test_four_ranks_logits_equal_one_process(world4, name, tp, ep):
    for rank, results in enumerate(world4):
        assert results["plans"][(name, tp, ep)]["rel_err"] <= 1e-5, rank


def test_each_rank_holds_a_share_of_the_weights(world2, world4):
    for results in (world2, world4):
        for entry in results[0]["plans"].values():
            assert entry["local_params"] < entry["full_params"]
    # tp=2, ep=2: everything but embeddings, norms and routers is halved
    a = world2[0]["plans"][("a", 2, 2)]
    assert a["local_params"] < 0.62 * a["full_params"]


def _expected_collectives(tp: int, ep: int) -> list[tuple[str, int]]:
    """docs/DISTRIBUTED.md: per layer, tp > 1: an all-reduce of [N, D] after attention and one after the FFN;
    tp = 1: one after each MoE FFN only. Per forward with tp > 1: one all-gather of the logits [N, V / tp]."""
    config = workers.config("a").text
    tokens, row = 2 * 5, config.hidden_size * 4  # the counted forward: [2, 5] tokens, fp32
    calls = []
    for spec in config.layers:
        if tp > 1:
            calls.append(("all_reduce", tokens * row))
        if tp > 1 or spec.moe:
            calls.append(("all_reduce", tokens * row))
    if tp > 1:
        calls.append(("all_gather", tokens * config.vocab_size // tp * 4))
    return calls


@pytest.mark.parametrize("tp,ep", PLANS_2)
def test_collectives_per_forward_match_the_documented_count(world2, tp, ep):
    expected = _expected_collectives(tp, ep)
    for results in world2:
        assert results["counts"][(tp, ep)] == expected


def _split_weight(name: str, tp: int) -> bool:
    if ".experts." in name:
        return True
    return tp > 1 and bool(re.search(r"\.(wq|wk|wv|wo|gate|up|down)\.weight$|^text\.output\.weight$", name))


@pytest.mark.parametrize("tp,ep", PLANS_2)
def test_loading_reads_only_the_rank_share(world2, tp, ep):
    """Checkpoint "a" (KV heads split evenly at tp=2): each rank reads the replicated tensors whole and exactly
    1/2 of every split one, through get_slice only (a whole-tensor read fails the load)."""
    reference = workers.reference("a")
    replicated = sum(p.numel() * 4 for n, p in reference.named_parameters() if not _split_weight(n, tp))
    split = sum(p.numel() * 4 for n, p in reference.named_parameters() if _split_weight(n, tp))
    total = replicated + split
    for rank, results in enumerate(world2):
        entry = results["loads"][("a", tp, ep)]
        read = sum(nbytes for _, nbytes in entry["reads"])
        assert entry["rel_err"] <= 1e-5, rank
        assert read == replicated + split // 2 == entry["local_bytes"], (rank, read, replicated, split)
        assert read < total


@pytest.mark.parametrize("tp,ep", PLANS_2)
def test_loading_a_tied_checkpoint_with_replicated_kv_heads(world2, tp, ep):
    for results in world2:
        entry = results["loads"][("b", tp, ep)]
        assert entry["rel_err"] <= 1e-5
        assert sum(nbytes for _, nbytes in entry["reads"]) == entry["local_bytes"]  # nothing read is dropped


def test_a_stalled_rank_ends_the_job_with_an_error(tmp_path):
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):
        mp.spawn(workers.run_stalled, args=(2, str(tmp_path / "store")), nprocs=2)
