"""Applying a parallel plan: module swaps on a finished model (shard_model) or on an empty one that each
rank then fills with only its slices of the checkpoint (load_sharded).

Swapped modules keep the parameter names of the ones they replace (``attn.wo.weight``,
``ffn.experts.gate_up``, ``text.output.weight``, ...), so checkpoint/mapping.py names every shard's source.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open

from llama4.checkpoint.io import CheckpointError, locate_tensors, read_config, read_quantization_config
from llama4.checkpoint.mapping import to_hf_name
from llama4.distributed.modules import (
    ParallelMoE,
    QuantizedParallelLinear,
    RowParallelLinear,
    VocabParallelHead,
    row_max_over,
)
from llama4.distributed.plan import (
    Layout,
    ParallelPlan,
    PlanError,
    layout_shape,
    local_experts,
    local_kv_heads,
    read_layout,
    shard_layouts,
)
from llama4.model.invariance import is_batch_invariant, set_batch_invariant
from llama4.model.moe import Experts, MoE, SwiGLU
from llama4.model.transformer import Llama4Model, QKVProjection
from llama4.quant.checkpoint import load_quantized_modules
from llama4.quant.modules import QuantizedLinear

TIED_HEAD, EMBED = "text.output.weight", "text.embed.weight"


def group_rank(plan: ParallelPlan, group: dist.ProcessGroup | None) -> int:
    """This process's rank in ``group`` (None: the default group), after checking the group fits the plan."""
    if not dist.is_available() or not dist.is_initialized():
        raise PlanError("torch.distributed is not initialised: call torch.distributed.init_process_group first "
                        "(torchrun sets the environment it reads)")
    world = dist.get_world_size(group)
    if world != plan.world_size:
        raise PlanError(f"plan tp={plan.tp}, ep={plan.ep} needs {plan.world_size} ranks, the group has {world}")
    return dist.get_rank(group)


def _check_plain(model: Llama4Model) -> None:
    """Only the float model's own modules are split; packed, quantized, LoRA or already sharded ones are not."""
    if model.text.fast_decode is not None:
        raise PlanError("the model is packed for the CPU fast paths: load it with pack=False before sharding")
    for i, layer in enumerate(model.text.layers):
        kinds = [type(layer.attn.qkv), type(getattr(layer.attn.qkv, "wq", None)), type(layer.attn.wo)]
        ffn = layer.ffn
        if isinstance(ffn, MoE):
            kinds += [type(ffn.experts), type(ffn.shared.gate), type(ffn.shared.down)]
        elif isinstance(ffn, SwiGLU):
            kinds += [type(ffn.gate), type(ffn.down)]
        else:
            kinds.append(type(ffn))
        if any(kind not in (QKVProjection, nn.Linear, Experts) for kind in kinds):
            names = sorted({kind.__name__ for kind in kinds} - {"QKVProjection", "Linear", "Experts"})
            raise PlanError(f"layer {i} has {names}: only float models with their own modules can be sharded "
                            f"(not packed, quantized, LoRA or already sharded ones)")


def _swap_modules(model: Llama4Model, plan: ParallelPlan, rank: int, group: dist.ProcessGroup | None) -> None:
    """Replace the split modules with empty ones (on the meta device) of the rank's shapes."""
    config = model.config.text
    tp, dim, hd = plan.tp, config.hidden_size, config.head_dim
    heads = config.num_heads // tp
    kv_heads = local_kv_heads(config, plan, rank)[1]
    first_expert, num_local = local_experts(config, plan, rank)
    with torch.device("meta"):
        for layer in model.text.layers:
            if tp > 1:
                attn = layer.attn
                attn.qkv = QKVProjection(dim, heads * hd, kv_heads * hd)
                attn.wo = RowParallelLinear(heads * hd, dim, group)
                attn.num_heads, attn.num_kv_heads = heads, kv_heads
            ffn = layer.ffn
            if isinstance(ffn, MoE):
                hidden = config.intermediate_size
                shared = SwiGLU(dim, hidden // tp) if tp > 1 else ffn.shared
                experts = Experts(num_local, dim, hidden // plan.expert_tp)
                layer.ffn = ParallelMoE(ffn.router, experts, shared, ffn.top_k, first_expert, tp > 1, group)
            elif tp > 1:
                hidden = config.intermediate_size_mlp // tp
                ffn.gate = nn.Linear(dim, hidden, bias=False)
                ffn.up = nn.Linear(dim, hidden, bias=False)
                ffn.down = RowParallelLinear(hidden, dim, group)
        if tp > 1:
            model.text.output = VocabParallelHead(config.vocab_size // tp, dim, tp, group)


def _fill(model: Llama4Model, layouts: dict[str, Layout | None],
          read: Callable[[str, tuple[slice, ...]], torch.Tensor]) -> None:
    """Give every parameter still on the meta device its value: ``read(name, index)`` for each piece of its
    layout (the whole tensor where the layout is None)."""
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        layout = layouts[name]
        if layout is None:
            layout = tuple(((0, n),) for n in param.shape)
        value = read_layout(lambda index: read(name, index), layout)
        if tuple(value.shape) != tuple(param.shape) or layout_shape(layout) != tuple(param.shape):
            raise PlanError(f"{name}: shard {list(value.shape)} does not match the module's {list(param.shape)}")
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(value, requires_grad=False)


def full_shapes(model: Llama4Model, plan: ParallelPlan) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if model.text.output is None and plan.tp > 1:  # tied: the vocabulary-parallel head slices the embedding
        shapes[TIED_HEAD] = shapes[EMBED]
    return shapes


def shard_model(model: Llama4Model, plan: ParallelPlan, group: dist.ProcessGroup | None = None) -> Llama4Model:
    """Split a loaded float model (``load_model(..., pack=False)`` or ``random_model``) in place for this rank.

    Every rank passes the same model; each keeps its slices and drops the rest. Returns the model, whose
    forward (and so ``generate``) must then be called by every rank of ``group`` with the same inputs.
    """
    rank = group_rank(plan, group)
    plan.check(model.config.text)
    _check_plain(model)
    invariant = is_batch_invariant(model)
    full = dict(model.named_parameters())
    layouts = shard_layouts(full_shapes(model, plan), model.config.text, plan, rank)
    _swap_modules(model, plan, rank, group)

    def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
        source = full[EMBED] if name == TIED_HEAD and name not in full else full[name]
        return source[index].clone()

    _fill(model, layouts, read)
    set_batch_invariant(model, invariant)
    return model


def _load_quantized_parts(model: Llama4Model, path: Path, stored: dict, layouts: dict[str, Layout | None],
                          plan: ParallelPlan, rank: int, group: dist.ProcessGroup | None, dtype: torch.dtype,
                          device: str | torch.device) -> set[str]:
    """The quantized modules of a sharded model from their parts of the checkpoint. The quantized loaders find
    linears (nn.Linear), so each parallel linear stands aside for a plain one of its shape while they run; one
    that comes back quantized becomes a QuantizedParallelLinear, one stored float goes back as it was (its weight
    still to be read). Returns the checkpoint's tensor names handled."""
    parallel = {name: module for name, module in model.named_modules()
                if isinstance(module, (RowParallelLinear, VocabParallelHead))}
    for name, module in parallel.items():
        with torch.device("meta"):
            _set(model, name, nn.Linear(module.in_features, module.out_features, bias=False))
    handled = load_quantized_modules(model, path, stored, dtype, device, layouts=layouts,
                                     full_row_max=row_max_over(plan, rank, group))
    for name, like in parallel.items():
        module = model.get_submodule(name)
        _set(model, name, QuantizedParallelLinear(module, like) if isinstance(module, QuantizedLinear) else like)
    return handled


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, module)


def load_sharded(path: str | os.PathLike, plan: ParallelPlan, group: dist.ProcessGroup | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama4Model:
    """Load this rank's part of a Hugging Face checkpoint: each split tensor is read as the slices the rank holds
    (``safe_open(...).get_slice``), never whole; replicated tensors (embeddings, norms, routers, vision) are read
    whole. The result equals ``shard_model(load_model(path, pack=False), plan, group)``.

    A quantized checkpoint (``quantization_config``: compressed-tensors int4 / int8 / FP8, Meta's fbgemm_fp8; as
    :func:`llama4.load_model` reads them) is read the same way, codes and scales cut to the rank's part
    (llama4.quant.checkpoint), into quantized modules with the plan's collectives. Packed int4 codes and group
    scales are cut on their boundaries: a plan that would split a group of inputs is refused.
    """
    rank = group_rank(plan, group)
    path = Path(path)
    config = read_config(path)
    stored = read_quantization_config(path)
    plan.check(config.text)
    with torch.device("meta"):
        model = Llama4Model(config)
    full = {n: p.shape for n, p in model.named_parameters()}
    layouts = shard_layouts(full_shapes(model, plan), config.text, plan, rank)
    _swap_modules(model, plan, rank, group)
    handled: set[str] = set()
    if stored is not None:
        handled = _load_quantized_parts(model, path, stored, layouts, plan, rank, group, dtype, device)
    unread = {n for n, p in model.named_parameters() if p.is_meta}
    located = locate_tensors(path, {n: shape for n, shape in full.items() if n in unread}, config.multimodal,
                             config.text.tie_word_embeddings, handled)
    with contextlib.ExitStack() as stack:
        handles = {}

        def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
            source = EMBED if name == TIED_HEAD and name not in located else name
            if source not in located:
                raise CheckpointError(f"{path}: no tensor {to_hf_name(source, config.multimodal)}")
            hf_name, file, _ = located[source]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt"))
            piece = handles[file].get_slice(hf_name)[index]
            target = dtype if piece.is_floating_point() else piece.dtype
            return piece.to(device=device, dtype=target, copy=True)  # owned, not a view of the file's map

        _fill(model, layouts, read)
    return model.to(device).eval()
