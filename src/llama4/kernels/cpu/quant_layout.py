"""Quantized weights (llama4.quant's QuantizedTensor) in the C kernel's blocked layouts (csrc/weights.h), and back.

The kernel streams one block column (64 outputs) front to back. int8 codes are regrouped into blocks of 64
outputs x 32 inputs with the outputs innermost: a vector load takes consecutive outputs of one input. int4 codes
go into the cells the integer products read (csrc/quant_linear.c): per 8 outputs and 32 inputs, 128 bytes in
which a 32-bit lane holds one output's codes of 4 consecutive inputs (low nibbles) and of the 4 inputs 16
further on (high nibbles). The scales and zero points are regrouped per block column ([O/64][groups][64]), in
their own dtype (float32 or bf16 scales, uint8 zeros): no value changes, so :meth:`KernelQuantized.to_tensor`
gives the exact tensor back (unpacking, saving).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from llama4.kernels.cpu.library import IN_BLOCK, INT4, INT8, OUT_BLOCK, WeightDescriptor
from llama4.quant.formats import QuantizedTensor, WeightFormat, pack_int4, unpack_int4


def kernel_reads(tensor: QuantizedTensor) -> bool:
    """Whether the kernel takes this quantized weight: integer codes (not nf4, which stays on the reference path),
    one [O, I] matrix, I a whole number of 32-input blocks."""
    return (tensor.format.is_integer and tensor.codes.dim() == 2 and tensor.shape[1] % IN_BLOCK == 0
            and tensor.codes.device.type == "cpu")


def _blocks(plain: torch.Tensor, inner: int) -> torch.Tensor:
    """[O, I'] -> [O/64, I'/inner, inner, 64] (outputs zero-padded to a multiple of 64), contiguous."""
    return _padded(plain).view(-1, OUT_BLOCK, plain.shape[1] // inner, inner).permute(0, 2, 3, 1).contiguous()


def _unblocks(blocked: torch.Tensor, out_features: int) -> torch.Tensor:
    return blocked.permute(0, 3, 1, 2).reshape(-1, blocked.shape[1] * blocked.shape[2])[:out_features].contiguous()


def _padded(plain: torch.Tensor) -> torch.Tensor:
    padded = plain.new_zeros(-(-plain.shape[0] // OUT_BLOCK) * OUT_BLOCK, plain.shape[1])
    padded[:plain.shape[0]] = plain
    return padded


def _int4_cells(packed: torch.Tensor) -> torch.Tensor:
    """int4 bytes [O, I/2] -> [O/64, 8 columns, I/32 blocks, 4 loads k, 8 outputs j, 4 bytes t]: byte t of
    output j in load k holds the codes of inputs 4k + t (low nibble) and 16 + 4k + t (high) of the block."""
    codes = _padded(unpack_int4(packed))
    out_blocks, in_blocks = codes.shape[0] // OUT_BLOCK, codes.shape[1] // IN_BLOCK
    split = codes.view(out_blocks, 8, 8, in_blocks, 2, 4, 4)  # ob, column, j, block, half, k, t
    cells = split[:, :, :, :, 0] | (split[:, :, :, :, 1] << 4)  # ob, column, j, block, k, t
    return cells.permute(0, 1, 3, 4, 2, 5).contiguous()


def _from_int4_cells(cells: torch.Tensor, out_features: int) -> torch.Tensor:
    split = cells.permute(0, 1, 4, 2, 3, 5)  # ob, column, j, block, k, t
    codes = torch.stack((split & 15, split >> 4), dim=4)  # ob, column, j, block, half, k, t
    return pack_int4(codes.reshape(-1, cells.shape[2] * IN_BLOCK)[:out_features].contiguous())


def _per_output(plain: torch.Tensor) -> torch.Tensor:
    """scale or zero [O, G] -> [O/64, G, 64] (outputs zero-padded), contiguous."""
    return _blocks(plain, plain.shape[1])[:, 0].contiguous()


def _from_per_output(blocked: torch.Tensor, out_features: int) -> torch.Tensor:
    return blocked.permute(0, 2, 1).reshape(-1, blocked.shape[1])[:out_features].contiguous()


class KernelQuantized:
    """One quantized [O, I] weight in the kernel's layout, and the descriptor (``address``) a product takes."""

    __slots__ = ("format", "shape", "codes", "scale", "zero", "descriptor", "address")

    def __init__(self, tensor: QuantizedTensor, place: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``place``: where the layout's tensors go (e.g. huge_pages.place; default: where torch puts them)."""
        if not kernel_reads(tensor):
            raise ValueError(f"the CPU kernel takes [out, in] quantized weights with in a multiple of {IN_BLOCK}, "
                             f"got {tuple(tensor.shape)}")
        self.format: WeightFormat = tensor.format
        self.shape = tensor.shape
        int8 = tensor.format.bits == 8
        place = place or (lambda t: t)
        self.codes = place(_blocks(tensor.codes, IN_BLOCK) if int8 else _int4_cells(tensor.codes))
        self.scale = place(_per_output(tensor.scale))
        self.zero = None if tensor.zero is None else place(_per_output(tensor.zero))
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
        int8 = self.format.bits == 8
        codes = _unblocks(self.codes, out_features) if int8 else _from_int4_cells(self.codes, out_features)
        return QuantizedTensor(self.format, codes,
                               _from_per_output(self.scale, out_features), zero)
