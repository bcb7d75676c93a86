"""Quantizing a sharded model: each rank quantizes its part of every weight to exactly the codes and scales that
:func:`llama4.quant.quantize_model` gives those elements of the whole model, so that
``quantize_sharded(load_sharded(path, plan), recipe, plan)`` computes what ``quantize_model(load_model(path),
recipe)`` does, split over the ranks.

What makes a part's codes the whole weight's. Scales run along a weight's inputs (one per output row, or per
group of inputs), so a part holding whole rows (the column-split linears, the experts of a rank's block) is
quantized as it is. A part holding some of each row's columns (the row-parallel attention output and MLP down
projections, the shared expert's down, the experts' down under expert tensor parallelism) needs:

- groups (int4, NF4): parts that hold whole groups; a plan that would split one is refused;
- int8 per channel: the whole row's largest magnitude, all-gathered from the ranks holding the rest of the row
  (one collective per such weight, ``row_max_over``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from llama4.distributed.modules import QuantizedParallelLinear, RowParallelLinear, VocabParallelHead, row_max_over
from llama4.distributed.plan import Layout, ParallelPlan, PlanError, shard_layouts
from llama4.distributed.shard import full_shapes, group_rank
from llama4.model.moe import Experts
from llama4.model.transformer import Llama4Model
from llama4.quant.formats import QuantizedTensor, WeightFormat, quantize, stack
from llama4.quant.modules import QuantizedExperts, QuantizedLinear, QuantizedWeight
from llama4.quant.recipe import QuantRecipe, quantizable_modules


def quantize_sharded(model: Llama4Model, recipe: QuantRecipe | str, plan: ParallelPlan,
                     group: dist.ProcessGroup | None = None) -> Llama4Model:
    """Quantize this rank's part of a sharded float model (``load_sharded`` / ``shard_model`` under ``plan`` over
    ``group``) in place, with ``recipe`` as :func:`llama4.quant.quantize_model` takes it. Every rank of the group
    calls it together (the int8 rows split over ranks gather their maxima). Returns the model."""
    if isinstance(recipe, str):
        recipe = QuantRecipe.parse(recipe)
    rank = group_rank(plan, group)
    if any(isinstance(m, (QuantizedWeight, QuantizedParallelLinear)) for m in model.modules()):
        raise ValueError("the model is already quantized: quantize a float model")
    if recipe.head is not None and model.config.text.tie_word_embeddings:
        raise ValueError("the output head is tied to the embeddings (tie_word_embeddings), and embeddings "
                         "quantization is not supported yet: leave head unset for this model")
    with torch.device("meta"):
        full = full_shapes(Llama4Model(model.config), plan)  # the whole model's shapes, tied head as shard.py has it
    layouts = shard_layouts(full, model.config.text, plan, rank)
    chosen = [(t, recipe.format_for(t.kind)) for t in quantizable_modules(model) if recipe.format_for(t.kind)]
    for target, fmt in chosen:  # every check before the first change: a refused recipe leaves the model as it was
        _check(target.name, getattr(target.parent, target.attribute), fmt, layouts)
    row_max = row_max_over(plan, rank, group)
    for target, fmt in chosen:
        child = getattr(target.parent, target.attribute)
        if isinstance(child, Experts):
            replacement: nn.Module = _experts(target.name, child, fmt, recipe.scale_dtype, layouts, full, row_max)
        else:
            name = f"{target.name}.weight"
            amax = _row_max(name, child.weight, fmt, layouts.get(name), full.get(name), row_max)
            linear = QuantizedLinear.from_tensor(quantize(child.weight, fmt, recipe.scale_dtype, amax), None,
                                                 child.weight.dtype)
            is_parallel = isinstance(child, (RowParallelLinear, VocabParallelHead))
            replacement = QuantizedParallelLinear(linear, child) if is_parallel else linear
        setattr(target.parent, target.attribute, replacement)
    model.quant_recipe = recipe
    return model


def _split_columns(layout: Layout | None, full: tuple[int, ...] | None) -> bool:
    """Whether a part holds only some of its rows' inputs (dim 1: a linear's [out, in], the experts' down [E, I, D])."""
    return layout is not None and full is not None and layout[1] != ((0, full[1]),)


def _check(name: str, child: nn.Module, fmt: WeightFormat, layouts: dict[str, Layout | None]) -> None:
    if isinstance(child, Experts):
        in_dims = {f"{name}.gate_up": child.gate_up.shape[1], f"{name}.down": child.down.shape[1]}
    elif isinstance(child, (nn.Linear, RowParallelLinear, VocabParallelHead)) and child.weight.dim() == 2:
        in_dims = {f"{name}.weight": child.weight.shape[1]}
    else:
        raise TypeError(f"{name}: expected a float linear or experts module of a sharded model, got "
                        f"{type(child).__name__}")
    for param, in_features in in_dims.items():
        if fmt.group is not None and in_features % fmt.group:
            split = " (this rank's part)" if layouts.get(param) is not None else ""
            raise PlanError(f"{param}: {fmt} needs whole groups of {fmt.group} inputs, the weight has "
                            f"{in_features}{split}: a plan with fewer ranks splitting it, or a smaller group / int8")


def _row_max(param: str, weight: torch.Tensor, fmt: WeightFormat, layout: Layout | None,
             full: tuple[int, ...] | None, row_max) -> torch.Tensor | None:
    """A linear's whole rows' largest magnitudes where it holds some of their columns in int8 per channel."""
    if fmt.group is not None or fmt.bits != 8 or not _split_columns(layout, full):
        return None
    return row_max(param, weight.detach().float().abs().amax(1))


def _experts(name: str, experts: Experts, fmt: WeightFormat, scale_dtype: torch.dtype,
             layouts: dict[str, Layout | None], full: dict[str, tuple[int, ...]], row_max) -> QuantizedExperts:
    """The rank's experts quantized one at a time ([out, in] = the transposes); down's rows take their whole maxima
    when the expert hidden dimension is split (gate_up [E, D, 2I] always holds whole rows of its transpose)."""
    down_name = f"{name}.down"
    amax = None
    if fmt.group is None and fmt.bits == 8 and _split_columns(layouts.get(down_name), full.get(down_name)):
        amax = row_max(down_name, experts.down.detach().float().abs().amax(1))  # [E, D]
    gate_up = stack([quantize(w.t(), fmt, scale_dtype) for w in experts.gate_up])
    down: list[QuantizedTensor] = [quantize(w.t(), fmt, scale_dtype, None if amax is None else amax[e])
                                   for e, w in enumerate(experts.down)]
    return QuantizedExperts.from_tensors(gate_up, stack(down), experts.gate_up.dtype, experts.batch_invariant)
