"""LoRA wrappers: a frozen base module plus a trainable low-rank update, keeping the base's interface.

* :class:`LoraLinear` wraps an nn.Linear (the attention projections, the shared expert / dense MLP, the
  router, the vision projector) or a :class:`~llama4.quant.QuantizedLinear` (QLoRA):
  ``base(x) + scaling * lora_B(lora_A(dropout(x)))``, with PEFT's layout (lora_A.weight [r, in],
  lora_B.weight [out, r]).
* :class:`LoraExperts` wraps the routed experts (:class:`~llama4.model.moe.Experts` or
  :class:`~llama4.quant.QuantizedExperts`) with one low-rank pair per expert on the fused tensors, in their
  x @ W layout: expert e's gate_up is ``W_gate_up[e] + scaling * gate_up_A[e] @ gate_up_B[e]`` (A [E, D, r],
  B [E, r, 2I]), its down ``W_down[e] + scaling * down_A[e] @ down_B[e]`` (A [E, I, r], B [E, r, D]). It
  implements the Experts interface (expert, grouped, with_shared), so the MoE's routing sends each token
  through its own expert's adapter; a quantized base dequantizes one expert at a time, as it does alone.

Merging adds the update into a float base and keeps the unmerged tensors, so that unmerging restores
them bit for bit (subtracting the update back would not: float addition does not round-trip).

A frozen base multiplies through :func:`~llama4.lora.frozen.frozen_linear`: for the input's gradient its weight is
built again in the backward (a quantized base is dequantized again) instead of being saved, so that training never
holds a dequantized float copy of a quantized weight from the forward to the backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.lora.frozen import WeightFn, frozen_linear
from llama4.model.invariance import row_tiled
from llama4.model.moe import Experts, each_expert_on_its_rows, shared_plus_routed
from llama4.quant.modules import QuantizedExperts, QuantizedLinear

EXPERT_TENSORS = ("gate_up", "down")


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p else nn.Identity()


def _quantized_base_error(what: str) -> ValueError:
    return ValueError(f"{what} has a quantized base (QLoRA): it cannot merge in place; merge_and_unload(model) "
                      "merges it into a float copy of the dequantized weight instead")


class LoraLinear(nn.Module):
    """A linear (float or quantized) plus ``scaling * B A`` on the dropped-out input.

    The update is computed in the adapters' dtype and added in the base output's dtype. It runs in fixed
    row tiles with batch invariance (the router's callers do not tile it; the projections' callers do, and
    then it is a single tile).
    """

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float, dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise TypeError(f"LoraLinear wraps nn.Linear or QuantizedLinear, got {type(base).__name__}")
        self.base = base
        self.batch_invariant = False
        self.scaling = scaling
        self.merged = False
        self.dropout = _dropout(dropout)
        device = base.weight.device if isinstance(base, nn.Linear) else base.qweight.codes.device
        dtype = dtype or (base.weight.dtype if isinstance(base, nn.Linear) else base.float_dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():  # PEFT's initialisation: A as nn.Linear's default (kaiming, a=sqrt(5)), B zero
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)
        self._unmerged: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B @ A`` [out, in] in the adapters' dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight
        return self.scaling * self.lora_B(self.lora_A(self.dropout(x).to(a.dtype)))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The base's product; a quantized base or a frozen plain nn.Linear through frozen_linear (the router and
        a trainable base as they compute themselves)."""
        base = self.base
        if isinstance(base, QuantizedLinear):
            return frozen_linear(x, base.qweight.dequantize, bias=base.bias)
        if type(base) is nn.Linear and not base.weight.requires_grad:
            weight = base.weight
            return frozen_linear(x, weight.to, bias=base.bias)
        return base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        out = self._base(x)
        return out + row_tiled(self._update, x, self.batch_invariant).to(out.dtype)

    def merge(self) -> None:
        if isinstance(self.base, QuantizedLinear):
            raise _quantized_base_error("this LoraLinear")
        if self.merged:
            return
        weight = self.base.weight
        self._unmerged = weight.data
        with torch.no_grad():
            weight.data = (weight.data + self.delta_weight().to(weight.dtype)).to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.data = self._unmerged
        self._unmerged = None
        self.merged = False

    def merged_module(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The base with the update added for good: the float base itself (merged in place, no copy), or for a
        quantized base a new nn.Linear holding its dequantized weight plus the update (in ``dtype``, default the
        dtype of the float model it stands in)."""
        if isinstance(self.base, QuantizedLinear):
            dtype = dtype or self.base.float_dtype
            weight = self.base.dequantized_weight(torch.float32) + self.delta_weight().float()
            linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                               device=weight.device, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if self.base.bias is not None:
                    linear.bias.copy_(self.base.bias)
            linear.requires_grad_(False)
            return linear
        if not self.merged:
            self.merge()
        self._unmerged = None
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


class LoraExperts(nn.Module):
    """Routed experts (float or quantized) with a low-rank pair per expert on gate_up and/or down (see the
    module docstring for the layout). Same methods and attributes as Experts."""

    groups_in_one_call = False  # grouped() multiplies expert by expert

    def __init__(self, base: nn.Module, tensors: tuple[str, ...], rank: int, scaling: float, dropout: float,
                 dtype: torch.dtype | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, (Experts, QuantizedExperts)):
            raise TypeError(f"LoraExperts wraps Experts or QuantizedExperts, got {type(base).__name__}")
        unknown = set(tensors) - set(EXPERT_TENSORS)
        if not tensors or unknown:
            raise ValueError(f"expert tensors to adapt: a non-empty subset of {EXPERT_TENSORS}, got {tensors!r}")
        self.base = base
        self.batch_invariant = base.batch_invariant
        self.scaling = scaling
        self.merged = False
        self.dropout = _dropout(dropout)
        if isinstance(base, Experts):
            experts, dim, two_hidden = base.gate_up.shape
            device, dtype = base.gate_up.device, dtype or base.gate_up.dtype
        else:
            experts, two_hidden, dim = base.gate_up.tensor.shape
            device, dtype = base.gate_up.codes.device, dtype or base.float_dtype
        shapes = {"gate_up": (dim, two_hidden), "down": (two_hidden // 2, dim)}  # (in, out) of x @ W
        for name in EXPERT_TENSORS:
            a = b = None
            if name in tensors:
                fan_in, fan_out = shapes[name]
                bound = 1 / math.sqrt(fan_in)  # what kaiming_uniform_(a=sqrt(5)) gives each expert's A
                a = nn.Parameter(torch.empty(experts, fan_in, rank, device=device, dtype=dtype))
                b = nn.Parameter(torch.zeros(experts, rank, fan_out, device=device, dtype=dtype))
                with torch.no_grad():
                    a.uniform_(-bound, bound, generator=generator)
            setattr(self, f"{name}_A", a)
            setattr(self, f"{name}_B", b)
        self._unmerged: dict[str, torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    @property
    def tensors(self) -> tuple[str, ...]:
        """The expert tensors that carry an adapter, in EXPERT_TENSORS order."""
        return tuple(name for name in EXPERT_TENSORS if getattr(self, f"{name}_A") is not None)

    @property
    def rank(self) -> int:
        return getattr(self, f"{self.tensors[0]}_A").shape[-1]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{name}_{side}": getattr(self, f"{name}_{side}") for name in self.tensors for side in "AB"}

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update of ``name`` (gate_up or down) for every expert, [E, in, out] in x @ W layout."""
        return self.scaling * torch.bmm(getattr(self, f"{name}_A"), getattr(self, f"{name}_B"))

    def _base_weights(self, e: int) -> dict[str, tuple[WeightFn, bool]]:
        """How to build expert e's gate_up and down in a dtype, and whether that is the x @ W layout ([in, out],
        float experts) rather than [out, in] (quantized experts, which dequantize this expert only)."""
        if isinstance(self.base, Experts):
            return {name: ((lambda dtype, w=getattr(self.base, name): w[e].to(dtype)), True)
                    for name in EXPERT_TENSORS}
        return {name: ((lambda dtype, w=getattr(self.base, name): w.dequantize(dtype, e)), False)
                for name in EXPERT_TENSORS}

    def _product(self, name: str, e: int, x: torch.Tensor, weight: tuple[WeightFn, bool]) -> torch.Tensor:
        build, transposed = weight
        if transposed and getattr(self.base, name).requires_grad:  # a trainable float base: autograd's own product
            out = x @ build(x.dtype)
        else:
            out = frozen_linear(x, build, transposed)
        a = getattr(self, f"{name}_A")
        if a is None:
            return out
        update = (self.dropout(x).to(a.dtype) @ a[e]) @ getattr(self, f"{name}_B")[e]
        return out + (self.scaling * update).to(out.dtype)

    def _swiglu(self, e: int, x: torch.Tensor, weights: dict[str, tuple[WeightFn, bool]]) -> torch.Tensor:
        gate, up = self._product("gate_up", e, x, weights["gate_up"]).chunk(2, dim=-1)
        return self._product("down", e, F.silu(gate) * up, weights["down"])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Experts.expert: expert e with its adapter on its tokens x [n, D] -> [n, D]. Without autograd the
        weights are built once for every row tile; with it, each product builds its own (and its backward again)."""
        if self.merged:
            return self.base.expert(e, x)
        weights = self._base_weights(e)
        if not torch.is_grad_enabled():
            built = {name: (build(x.dtype), transposed) for name, (build, transposed) in weights.items()}
            weights = {name: ((lambda dtype, w=w: w.to(dtype)), transposed) for name, (w, transposed) in built.items()}
        return row_tiled(lambda rows: self._swiglu(e, rows, weights), x, self.batch_invariant)

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return each_expert_on_its_rows(self, x, counts)

    def with_shared(self, shared: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                    scores: torch.Tensor) -> torch.Tensor:
        return shared_plus_routed(self, shared, x, expert_ids, scores)

    def merge(self) -> None:
        if isinstance(self.base, QuantizedExperts):
            raise _quantized_base_error("this LoraExperts")
        if self.merged:
            return
        for name in self.tensors:
            weight = getattr(self.base, name)
            self._unmerged[name] = weight.data
            with torch.no_grad():
                weight.data = (weight.data + self.delta_weight(name).to(weight.dtype)).to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        for name, original in self._unmerged.items():
            getattr(self.base, name).data = original
        self._unmerged = {}
        self.merged = False

    def merged_module(self, dtype: torch.dtype | None = None) -> nn.Module:
        """As LoraLinear.merged_module: the float base merged in place, or float Experts built from a quantized
        base's dequantized weights (expert by expert) plus the updates."""
        if isinstance(self.base, Experts):
            if not self.merged:
                self.merge()
            self._unmerged = {}
            return self.base
        dtype = dtype or self.base.float_dtype
        experts, two_hidden, dim = self.base.gate_up.tensor.shape
        device = self.base.gate_up.codes.device
        module = Experts(experts, dim, two_hidden // 2).to(device=device, dtype=dtype)
        module.batch_invariant = self.base.batch_invariant
        deltas = {name: self.delta_weight(name).float() for name in self.tensors}
        with torch.no_grad():
            for e in range(experts):
                gate_up, down = (w.t() for w in self.base.dequantized_weights(e, torch.float32))
                for name, weight in (("gate_up", gate_up), ("down", down)):
                    getattr(module, name)[e] = weight + deltas[name][e] if name in deltas else weight
        module.requires_grad_(False)
        return module

    def extra_repr(self) -> str:
        return f"tensors={self.tensors}, rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"
