"""Stand-ins for the model's linears and routed experts with quantized weights (swapped in by
:func:`llama4.quant.quantize_model`), keeping the interfaces of the modules they replace.

This is the reference compute path: a weight is dequantized in the input's dtype when it is used and then
multiplied as the float model multiplies it, so a quantized model's result differs from the float model's
only by the weights' rounding. Faster paths (integer GEMMs, dequantizing inside a kernel) are to be tested
against these.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.model.invariance import row_tiled
from llama4.model.moe import Experts, each_expert_on_its_rows, shared_plus_routed
from llama4.quant.formats import QuantizedTensor, WeightFormat, dequantize, quantize, stack


class QuantizedWeight(nn.Module):
    """A :class:`QuantizedTensor` held as buffers (``codes``, ``scale``, ``zero``), so that ``.to(device)``
    moves it and ``state_dict`` lists it."""

    def __init__(self, tensor: QuantizedTensor):
        super().__init__()
        self.format = tensor.format
        self.register_buffer("codes", tensor.codes)
        self.register_buffer("scale", tensor.scale)
        self.register_buffer("zero", tensor.zero)

    @property
    def tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.format, self.codes, self.scale, self.zero)

    def dequantize(self, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
        """The float weight (or the one at ``index`` of a stack) in ``dtype``."""
        tensor = self.tensor if index is None else self.tensor[index]
        return dequantize(tensor, dtype)


class QuantizedLinear(nn.Module):
    """An nn.Linear whose weight [out, in] is quantized (the bias, if any, stays float).

    Like nn.Linear (and the CPU kernels' PackedLinear) it multiplies whatever rows it is given: its callers
    run it in fixed row tiles for batch invariance, so it has no ``batch_invariant`` setting of its own.
    It has no ``weight`` tensor: nothing in the model reads one from the linears it replaces, and a float
    copy of the weight is what quantizing saves (:meth:`dequantized_weight` builds one on request).
    """

    def __init__(self, linear: nn.Linear, fmt: WeightFormat, scale_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.float_dtype = linear.weight.dtype
        self.qweight = QuantizedWeight(quantize(linear.weight, fmt, scale_dtype))
        self.bias = linear.bias

    @classmethod
    def from_tensor(cls, tensor: QuantizedTensor, bias: torch.Tensor | None = None,
                    float_dtype: torch.dtype = torch.float32) -> QuantizedLinear:
        """A linear from weights already quantized (a checkpoint's codes and scales): ``tensor`` [out, in], an
        optional float ``bias`` [out], and ``float_dtype``, the dtype of the float model it stands in."""
        if len(tensor.shape) != 2:
            raise ValueError(f"a linear's weight is [out, in], got {tuple(tensor.shape)}")
        if bias is not None and tuple(bias.shape) != (tensor.shape[0],):
            raise ValueError(f"bias {tuple(bias.shape)} does not fit a weight {tuple(tensor.shape)} (out, in)")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.out_features, module.in_features = tensor.shape
        module.float_dtype = float_dtype
        module.qweight = QuantizedWeight(tensor)
        module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return module

    @property
    def format(self) -> WeightFormat:
        return self.qweight.format

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.qweight.dequantize(dtype or self.float_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)  # computed in x's dtype, like the weight
        return F.linear(x, self.qweight.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class QuantizedExperts(nn.Module):
    """Experts (same methods and attributes) with each expert's matrices quantized.

    The float experts multiply x @ W (gate_up [E, D, 2I], down [E, I, D]), so an output channel is a
    *column* there: the codes hold the transposes, gate_up [E, 2I, D] and down [E, D, I] (rows = output
    channels, groups along the input), and an expert's product is F.linear(x, W). Only the experts that
    run are dequantized, one at a time.
    """

    groups_in_one_call = False  # grouped() multiplies expert by expert

    def __init__(self, experts: Experts, fmt: WeightFormat, scale_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.batch_invariant = experts.batch_invariant
        self.float_dtype = experts.gate_up.dtype
        # one expert at a time: never a float32 copy of all experts' weights at once
        self.gate_up = QuantizedWeight(stack([quantize(w.t(), fmt, scale_dtype) for w in experts.gate_up]))
        self.down = QuantizedWeight(stack([quantize(w.t(), fmt, scale_dtype) for w in experts.down]))

    @classmethod
    def from_tensors(cls, gate_up: QuantizedTensor, down: QuantizedTensor, float_dtype: torch.dtype = torch.float32,
                     batch_invariant: bool = False) -> QuantizedExperts:
        """Experts from weights already quantized: ``gate_up`` [E, 2I, D] (gate rows, then up rows) and ``down``
        [E, D, I], both [out, in] per expert and in one format; ``float_dtype`` as in QuantizedLinear."""
        if len(gate_up.shape) != 3 or len(down.shape) != 3:
            raise ValueError(f"expert weights are [E, out, in], got gate_up {tuple(gate_up.shape)} and down "
                             f"{tuple(down.shape)}")
        experts, two_hidden, dim = gate_up.shape
        if two_hidden % 2 or tuple(down.shape) != (experts, dim, two_hidden // 2):
            raise ValueError(f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} are not [E, 2I, D] and "
                             "[E, D, I] of one set of experts")
        if gate_up.format != down.format:
            raise ValueError(f"gate_up ({gate_up.format}) and down ({down.format}) must share one format")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.batch_invariant = batch_invariant
        module.float_dtype = float_dtype
        module.gate_up = QuantizedWeight(gate_up)
        module.down = QuantizedWeight(down)
        return module

    @property
    def format(self) -> WeightFormat:
        return self.gate_up.format

    @property
    def num_experts(self) -> int:
        return self.gate_up.codes.shape[0]

    def dequantized_weights(self, e: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's float gate_up [2I, D] and down [D, I] ([out, in], the transposes of Experts')."""
        dtype = dtype or self.float_dtype
        return self.gate_up.dequantize(dtype, e), self.down.dequantize(dtype, e)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Experts.expert: expert e on its tokens x [n, D] -> [n, D] (its weights dequantized once)."""
        gate_up, down = self.dequantized_weights(e, x.dtype)
        return row_tiled(lambda rows: _swiglu(rows, gate_up, down), x, self.batch_invariant)

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return each_expert_on_its_rows(self, x, counts)

    def with_shared(self, shared: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                    scores: torch.Tensor) -> torch.Tensor:
        return shared_plus_routed(self, shared, x, expert_ids, scores)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, format={self.format}"


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)
