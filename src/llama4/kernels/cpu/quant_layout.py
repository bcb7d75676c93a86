"""Quantized weights (llama4.quant's QuantizedTensor) in the C kernel's blocked layouts (csrc/weights.h), and back.

The kernel streams one block column (64 outputs) front to back, so the codes are regrouped into blocks of
64 outputs x 32 inputs with the outputs innermost: a vector load then takes consecutive outputs of one input
(int8) or of one input pair (int4: our byte of two codes, the even input in the low nibble, as it is). The
scales and zero points are regrouped the same way ([O/64][groups][64]), in their own dtype (float32 or
bf16 scales, uint8 zeros): no value changes, so :meth:`KernelQuantized.to_tensor` gives the exact tensor
back (unpacking, saving).
"""

from __future__ import annotations

import ctypes

import torch

from llama4.kernels.cpu.library import IN_BLOCK, INT4, INT8, OUT_BLOCK, WeightDescriptor
from llama4.quant.formats import QuantizedTensor, WeightFormat


def kernel_reads(tensor: QuantizedTensor) -> bool:
    """Whether the kernel takes this quantized weight: one [O, I] matrix, I a whole number of 32-input blocks."""
    return tensor.codes.dim() == 2 and tensor.shape[1] % IN_BLOCK == 0 and tensor.codes.device.type == "cpu"


def _blocks(plain: torch.Tensor, inner: int) -> torch.Tensor:
    """[O, I'] -> [O/64, I'/inner, inner, 64] (outputs zero-padded to a multiple of 64), contiguous."""
    out_features = plain.shape[0]
    padded = plain.new_zeros(-(-out_features // OUT_BLOCK) * OUT_BLOCK, plain.shape[1])
    padded[:out_features] = plain
    return padded.view(-1, OUT_BLOCK, plain.shape[1] // inner, inner).permute(0, 2, 3, 1).contiguous()


def _unblocks(blocked: torch.Tensor, out_features: int) -> torch.Tensor:
    return blocked.permute(0, 3, 1, 2).reshape(-1, blocked.shape[1] * blocked.shape[2])[:out_features].contiguous()


def _per_output(plain: torch.Tensor) -> torch.Tensor:
    """scale or zero [O, G] -> [O/64, G, 64] (outputs zero-padded), contiguous."""
    return _blocks(plain, plain.shape[1])[:, 0].contiguous()


def _from_per_output(blocked: torch.Tensor, out_features: int) -> torch.Tensor:
    return blocked.permute(0, 2, 1).reshape(-1, blocked.shape[1])[:out_features].contiguous()


class KernelQuantized:
    """One quantized [O, I] weight in the kernel's layout, and the descriptor (``address``) a product takes."""

    __slots__ = ("format", "shape", "codes", "scale", "zero", "descriptor", "address")

    def __init__(self, tensor: QuantizedTensor):
        if not kernel_reads(tensor):
            raise ValueError(f"the CPU kernel takes [out, in] quantized weights with in a multiple of {IN_BLOCK}, "
                             f"got {tuple(tensor.shape)}")
        self.format: WeightFormat = tensor.format
        self.shape = tensor.shape
        int8 = tensor.format.bits == 8
        self.codes = _blocks(tensor.codes, IN_BLOCK if int8 else IN_BLOCK // 2)
        self.scale = _per_output(tensor.scale)
        self.zero = None if tensor.zero is None else _per_output(tensor.zero)
        self.descriptor = WeightDescriptor(
            INT8 if int8 else INT4, 0 if int8 else tensor.format.group, int(self.scale.dtype == torch.bfloat16),
            self.codes.data_ptr(), self.scale.data_ptr(), None if self.zero is None else self.zero.data_ptr())
        self.address = ctypes.addressof(self.descriptor)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def to_tensor(self) -> QuantizedTensor:
        """The QuantizedTensor this was built from (equal values, a copy)."""
        out_features = self.shape[0]
        zero = None if self.zero is None else _from_per_output(self.zero, out_features)
        return QuantizedTensor(self.format, _unblocks(self.codes, out_features),
                               _from_per_output(self.scale, out_features), zero)
