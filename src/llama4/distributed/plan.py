"""What each rank holds: the parallel plan and the slice of every parameter that goes with it.

Plan (``world = max(tp, ep)`` ranks in one process group):

- ``tp`` is 1 (attention, shared expert, dense MLP and output head replicated on every rank) or ``world``
  (split over all ranks: attention by heads, SwiGLU by hidden columns, the head by vocabulary rows).
  A ``tp`` between the two would need data-parallel attention groups: not in this increment.
- ``ep`` divides ``world``: the routed experts are split into ``ep`` blocks of ``E / ep`` experts, and each
  expert's hidden dimension into ``world / ep`` pieces (expert tensor parallelism), so every rank holds exactly
  ``1 / world`` of the routed weights whatever the plan.

A shard is described per dimension as ranges concatenated in order (one dimension may have several:
the fused ``gate_up`` keeps its gate and up halves), so the same description slices a loaded tensor or a
safetensors file (``get_slice``) without reading the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from llama4.checkpoint.slices import Layout, layout_shape, read_layout
from llama4.config import TextConfig

__all__ = ["Layout", "ParallelPlan", "PlanError", "layout_shape", "local_experts", "local_kv_heads", "read_layout",
           "shard_layouts", "split"]



class PlanError(ValueError):
    """A parallel plan that does not fit the process group or the model; the message says what would."""


@dataclass(frozen=True)
class ParallelPlan:
    """Tensor-parallel degree ``tp`` and expert-parallel degree ``ep`` over ``max(tp, ep)`` ranks."""

    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"{name} must be a positive integer, got {value!r}")
        world = self.world_size
        if self.tp not in (1, world):
            raise PlanError(f"tp must be 1 or the number of ranks ({world}), got tp={self.tp}, ep={self.ep}; "
                            f"tp smaller than ep (data-parallel attention groups) is not supported yet")
        if world % self.ep:
            raise PlanError(f"ep={self.ep} must divide the number of ranks {world} (tp={self.tp})")

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)

    @property
    def expert_tp(self) -> int:
        """How many pieces each routed expert's hidden dimension is split into (``world / ep``)."""
        return self.world_size // self.ep

    def check(self, config: TextConfig) -> None:
        """Raises PlanError listing every size of ``config`` this plan cannot split evenly."""
        problems = []
        if self.tp > 1:
            tp = self.tp
            if config.num_heads % tp:
                problems.append(f"num_heads {config.num_heads} is not divisible by tp={tp}")
            kv = config.num_kv_heads
            if kv % tp and tp % kv:
                problems.append(f"num_kv_heads {kv} must divide tp={tp} (replicated) or be divisible by it")
            if any(spec.moe for spec in config.layers) and config.intermediate_size % tp:
                problems.append(f"intermediate_size {config.intermediate_size} (shared expert) is not divisible "
                                f"by tp={tp}")
            if not all(spec.moe for spec in config.layers) and config.intermediate_size_mlp % tp:
                problems.append(f"intermediate_size_mlp {config.intermediate_size_mlp} (dense layers) is not "
                                f"divisible by tp={tp}")
            if config.vocab_size % tp:
                problems.append(f"vocab_size {config.vocab_size} is not divisible by tp={tp} (vocabulary-parallel "
                                f"output head)")
        if self.world_size > 1 and any(spec.moe for spec in config.layers):
            if config.num_experts % self.ep:
                problems.append(f"num_experts {config.num_experts} is not divisible by ep={self.ep}")
            if config.intermediate_size % self.expert_tp:
                problems.append(f"intermediate_size {config.intermediate_size} is not divisible by "
                                f"{self.expert_tp} (ranks per expert block = world / ep)")
        if problems:
            raise PlanError(f"plan tp={self.tp}, ep={self.ep} does not fit this model:\n  " + "\n  ".join(problems))


def split(n: int, parts: int, i: int) -> tuple[int, int]:
    """Piece ``i`` of ``n`` split evenly into ``parts`` (the plan has checked divisibility)."""
    return i * n // parts, (i + 1) * n // parts


def local_kv_heads(config: TextConfig, plan: ParallelPlan, rank: int) -> tuple[int, int]:
    """(first KV head, count) of a rank. With fewer KV heads than ranks each head is replicated over the
    ``tp / Hkv`` consecutive ranks whose query heads read it (query head h reads KV head h // (H / Hkv))."""
    kv, tp = config.num_kv_heads, plan.tp
    if kv >= tp:
        first, stop = split(kv, tp, rank)
        return first, stop - first
    return rank // (tp // kv), 1


def local_experts(config: TextConfig, plan: ParallelPlan, rank: int) -> tuple[int, int]:
    """(first routed expert, count) of a rank."""
    first, stop = split(config.num_experts, plan.ep, rank // plan.expert_tp)
    return first, stop - first


_LAYER = r"text\.layers\.\d+\."


def _rules(config: TextConfig, plan: ParallelPlan, rank: int) -> list[tuple[re.Pattern, Callable[[tuple], Layout]]]:
    tp, hd = plan.tp, config.head_dim
    heads = tuple(h * hd for h in split(config.num_heads, tp, rank))
    kv_first, kv_count = local_kv_heads(config, plan, rank)
    kv = (kv_first * hd, (kv_first + kv_count) * hd)
    e_first, e_count = local_experts(config, plan, rank)
    experts = ((e_first, e_first + e_count),)
    etp, piece = plan.expert_tp, rank % plan.expert_tp

    def rows(r: tuple[int, int]) -> Callable[[tuple], Layout]:
        return lambda shape: ((r,), ((0, shape[1]),))

    def cols(r: tuple[int, int]) -> Callable[[tuple], Layout]:
        return lambda shape: (((0, shape[0]),), (r,))

    def gate_up(shape: tuple) -> Layout:  # [E, D, 2I]: the gate piece and the matching up piece
        hidden = shape[2] // 2
        lo, hi = split(hidden, etp, piece)
        return experts, ((0, shape[1]),), ((lo, hi), (hidden + lo, hidden + hi))

    def down(shape: tuple) -> Layout:  # [E, I, D]
        return experts, (split(shape[1], etp, piece),), ((0, shape[2]),)

    rules: list[tuple[str, Callable[[tuple], Layout]]] = []
    if tp > 1:
        rules += [
            (_LAYER + r"attn\.qkv\.wq\.weight", rows(heads)),
            (_LAYER + r"attn\.qkv\.w[kv]\.weight", rows(kv)),
            (_LAYER + r"attn\.wo\.weight", cols(heads)),
            (_LAYER + r"ffn\.(shared\.)?(gate|up)\.weight", lambda s: ((split(s[0], tp, rank),), ((0, s[1]),))),
            (_LAYER + r"ffn\.(shared\.)?down\.weight", lambda s: (((0, s[0]),), (split(s[1], tp, rank),))),
            (r"text\.output\.weight", lambda s: ((split(s[0], tp, rank),), ((0, s[1]),))),
        ]
    if plan.world_size > 1:
        rules += [(_LAYER + r"ffn\.experts\.gate_up", gate_up), (_LAYER + r"ffn\.experts\.down", down)]
    return [(re.compile(pattern + r"\Z"), layout) for pattern, layout in rules]


def shard_layouts(names_shapes: dict[str, tuple[int, ...]], config: TextConfig, plan: ParallelPlan, rank: int
                  ) -> dict[str, Layout | None]:
    """Per parameter (our name -> full shape): the rank's layout, or None where the rank holds it whole."""
    rules = _rules(config, plan, rank)
    out = {}
    for name, shape in names_shapes.items():
        out[name] = next((layout(tuple(shape)) for pattern, layout in rules if pattern.match(name)), None)
    return out
