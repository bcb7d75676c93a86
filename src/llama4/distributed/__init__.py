"""Tensor, expert and context parallelism over torch.distributed, applied to a finished model from outside (module
swaps; model/ never imports torch.distributed). docs/DISTRIBUTED.md describes the plans and their traffic.

    plan = ParallelPlan(tp=2, ep=2)
    model = load_sharded(path, plan)                 # each rank reads only its slices
    model = shard_model(random_model(config), plan)  # or split a model every rank already holds
    model = quantize_sharded(model, "int4-g32", plan)  # each rank quantizes its part (quantized checkpoints
                                                     # load as they are: load_sharded reads their parts)
    model = context_parallel(model)                  # long prompts split over a context group (distributed.context)
"""

from llama4.distributed.context import ContextParallelCache, ContextPlan, context_mesh, context_parallel
from llama4.distributed.plan import ParallelPlan, PlanError
from llama4.distributed.quantize import quantize_sharded
from llama4.distributed.shard import load_sharded, shard_model

__all__ = ["ContextParallelCache", "ContextPlan", "ParallelPlan", "PlanError", "context_mesh", "context_parallel",
           "load_sharded", "quantize_sharded", "shard_model"]
