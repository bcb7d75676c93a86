"""ParallelPlan validation and the slice of each parameter a rank holds (no processes spawned)."""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.distributed import ParallelPlan, PlanError, shard_model
from llama4.distributed.plan import layout_shape, local_kv_heads, read_layout, shard_layouts
from tests.distributed import workers


@pytest.mark.parametrize("tp,ep,world,expert_tp", [(1, 1, 1, 1), (2, 1, 2, 2), (1, 2, 2, 1), (2, 2, 2, 1),
                                                   (4, 2, 4, 2), (8, 8, 8, 1), (1, 8, 8, 1)])
def test_plan_sizes(tp, ep, world, expert_tp):
    plan = ParallelPlan(tp, ep)
    assert (plan.world_size, plan.expert_tp) == (world, expert_tp)


@pytest.mark.parametrize("tp,ep,message", [
    (0, 1, "tp must be a positive integer"), (2, -1, "ep must be a positive integer"), (2.0, 1, "positive integer"),
    (2, 4, "tp must be 1 or the number of ranks"), (4, 3, "ep=3 must divide"),
])
def test_bad_plans_say_what_is_allowed(tp, ep, message):
    with pytest.raises(PlanError, match=message):
        ParallelPlan(tp, ep)


def test_a_plan_that_does_not_divide_the_model_lists_every_problem():
    config = workers.config("a").text  # 4 heads, 2 KV heads, 4 experts, I 32, dense 48, vocab 96
    ParallelPlan(4, 4).check(config)
    with pytest.raises(PlanError) as error:
        ParallelPlan(3, 3).check(config)
    for part in ("num_heads 4", "num_kv_heads 2", "intermediate_size 32 (shared expert)", "num_experts 4"):
        assert part in str(error.value)
    with pytest.raises(PlanError, match="vocab_size 96 is not divisible by tp=64"):
        ParallelPlan(64).check(config)


def test_kv_heads_are_split_or_replicated_with_their_query_heads():
    config = workers.config("a").text  # 4 query heads, 2 KV heads: query head h reads KV head h // 2
    assert [local_kv_heads(config, ParallelPlan(2), r) for r in range(2)] == [(0, 1), (1, 1)]
    assert [local_kv_heads(config, ParallelPlan(4), r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]


def test_layouts_cover_every_split_tensor_once():
    """Over all ranks of a plan, the shards of every split tensor tile it exactly (KV heads replicated at tp=4)."""
    model = workers.reference("a")
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    for tp, ep in ((2, 1), (2, 2), (1, 2), (4, 2), (4, 4), (1, 4)):
        plan = ParallelPlan(tp, ep)
        layouts = [shard_layouts(shapes, model.config.text, plan, r) for r in range(plan.world_size)]
        for name, shape in shapes.items():
            covered = torch.zeros(shape)
            for rank_layouts in layouts:
                layout = rank_layouts[name]
                if layout is None:
                    covered += 1
                    continue
                piece = read_layout(lambda index: (covered.__setitem__(index, covered[index] + 1), covered[index])[1],
                                    layout)
                assert tuple(piece.shape) == layout_shape(layout)
            replicas = covered.unique().tolist()
            if tp == 4 and (".wk." in name or ".wv." in name):
                assert replicas == [2], name
            elif layouts[0][name] is None:
                assert replicas == [plan.world_size], name
            else:
                assert replicas == [1], (name, tp, ep)


def test_sharding_needs_a_process_group_of_the_plan_size():
    with pytest.raises(PlanError, match="not initialised"):
        shard_model(workers.reference("a"), ParallelPlan(2))


def test_packed_models_are_refused(monkeypatch):
    model = llama4.random_model(workers.config("a"))
    monkeypatch.setattr("llama4.distributed.shard.group_rank", lambda plan, group: 0)
    model.text.fast_decode = lambda h, tables, cache: None
    with pytest.raises(PlanError, match="packed"):
        shard_model(model, ParallelPlan(2))
