"""Tensor and expert parallelism over torch.distributed, applied to a finished model from outside (module
swaps; model/ never imports torch.distributed). docs/DISTRIBUTED.md describes the plans and their traffic.

    plan = ParallelPlan(tp=2, ep=2)
    model = load_sharded(path, plan)                 # each rank reads only its slices
    model = shard_model(random_model(config), plan)  # or split a model every rank already holds
"""

from llama4.distributed.plan import ParallelPlan, PlanError
from llama4.distributed.shard import load_sharded, shard_model

__all__ = ["ParallelPlan", "PlanError", "load_sharded", "shard_model"]
