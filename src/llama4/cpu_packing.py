"""CPU weight packing: linear and expert weights in oneDNN's blocked layout, applied by module swap.

On CPUs, ``F.linear`` on plain row-major weights reaches about 20-25 GB/s for one-token decode and
~450 GFLOP/s for bf16 prefill here; the same weights reordered once into oneDNN's blocked layout run
the same products at ~55 GB/s and ~900 GFLOP/s (bench/forward.py, bench/generate.py), with identical
bf16 results. Packing replaces modules of a finished model (the model code is unchanged and stays the
reference); :func:`unpacked` restores plain weights, e.g. for saving. The router stays unpacked so that
expert choice is computed exactly as the reference computes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.model.moe import Experts


def packing_supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), probe, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] plain weight -> the same matrix in oneDNN's layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An nn.Linear whose weight lives in oneDNN's blocked layout (the bias, if any, stays plain).

    Built empty from a (possibly meta-device) linear; ``load_tensor`` fills it, so a checkpoint loader
    can pack each weight as it is read and never hold the plain and packed copies of the whole model.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.has_bias = linear.bias is not None
        self.packed: torch.Tensor | None = None
        self.bias = None

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if name == "weight":
            self.packed = _pack(tensor)
        elif name == "bias" and self.has_bias:
            self.bias = nn.Parameter(tensor.detach(), requires_grad=False)
        else:
            raise KeyError(f"PackedLinear has no tensor {name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.bias)

    def unpack(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.has_bias, device="meta")
        linear.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
        if self.has_bias:
            linear.bias = self.bias
        return linear


class PackedExperts(nn.Module):
    """Experts with each expert's gate/up and down matrices packed ([out, in] before packing)."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.num_experts = experts.num_experts
        self.gate_up: list[torch.Tensor] = []  # [2I, D] per expert, packed
        self.down: list[torch.Tensor] = []  # [D, I] per expert, packed

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """``gate_up`` [E, D, 2I] or ``down`` [E, I, D], in the checkpoint's x @ W layout."""
        if name not in ("gate_up", "down"):
            raise KeyError(f"PackedExperts has no tensor {name!r}")
        setattr(self, name, [_pack(tensor[e].t()) for e in range(self.num_experts)])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = _linear(x, self.gate_up[e]).chunk(2, dim=-1)
        return _linear(F.silu(gate) * up, self.down[e])

    def unpack(self) -> Experts:
        first = self.gate_up[0]
        experts = Experts(self.num_experts, first.shape[1], first.shape[0] // 2)
        experts.gate_up = nn.Parameter(torch.stack([w.to_dense().t() for w in self.gate_up]), requires_grad=False)
        experts.down = nn.Parameter(torch.stack([w.to_dense().t() for w in self.down]), requires_grad=False)
        return experts


def _swap_targets(model: nn.Module) -> list[tuple[str, str]]:
    """(parent module name, child name) of every module to pack; names only, so that each plain module
    can be freed as soon as its packed replacement exists."""
    return [(parent, name) for parent, module in model.named_modules() for name, child in module.named_children()
            if (isinstance(child, nn.Linear) and name != "router") or isinstance(child, Experts)]


def _packed_shell(child: nn.Module) -> nn.Module:
    return PackedExperts(child) if isinstance(child, Experts) else PackedLinear(child)


def pack_shells(model: nn.Module) -> nn.Module:
    """Swap in empty packed modules (e.g. on a meta-device model, before a loader fills them)."""
    for parent_name, name in _swap_targets(model):
        parent = model.get_submodule(parent_name)
        setattr(parent, name, _packed_shell(getattr(parent, name)))
    model.packed = True
    return model


def pack_model(model: nn.Module) -> nn.Module:
    """Pack every linear (but the MoE routers) and the expert weights of a loaded model in place."""
    for parent_name, name in _swap_targets(model):
        parent = model.get_submodule(parent_name)
        child = getattr(parent, name)
        shell = _packed_shell(child)
        for tensor_name, tensor in child.named_parameters(recurse=False):
            shell.load_tensor(tensor_name, tensor)
        setattr(parent, name, shell)
        del child
    model.packed = True
    return model


def unpack_model(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (PackedLinear, PackedExperts)):
                setattr(module, name, child.unpack())
    model.packed = False
    return model


@contextlib.contextmanager
def unpacked(model: nn.Module) -> Iterator[nn.Module]:
    """Plain weights inside the block (e.g. to save or inspect them), packed again afterwards."""
    was_packed = getattr(model, "packed", False)
    if was_packed:
        unpack_model(model)
    try:
        yield model
    finally:
        if was_packed:
            pack_model(model)
