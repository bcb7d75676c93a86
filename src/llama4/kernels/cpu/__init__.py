"""The CPU fast paths of a built model, behind one entry (:func:`pack`): weights packed for oneDNN or the C
kernel (packing.py), decode-sized products on the kernel built for this CPU (library.py, csrc/), and the
layers of a cached pass in C (fused_decode.py). The model's own modules stay the reference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from llama4.kernels.cpu.fused_decode import FusedDecode
from llama4.kernels.cpu.options import KernelOptions
from llama4.kernels.cpu.packing import packing_supported, swap_in, swap_out
from llama4.model.transformer import TextModel

__all__ = ["KernelOptions", "pack", "packed_with", "supported", "unpack", "unpacked"]


def supported(dtype: torch.dtype, device: torch.device | str, options: KernelOptions) -> bool:
    """Whether :func:`pack` speeds up a model of ``dtype`` on ``device`` here."""
    return packing_supported(dtype, device, options.kernel())


def pack(model: nn.Module, options: KernelOptions, fill: bool = True) -> nn.Module:
    """Pack the model's weights in place: from its loaded weights (``fill``), or as empty modules that a
    checkpoint loader fills tensor by tensor (a meta-device model: never a plain and a packed copy at once);
    then give its text decoder the fused decode step where ``options`` allow it and a kernel runs."""
    kernel = options.kernel()
    swap_in(model, kernel, fill, options.huge_pages)
    model.kernel_options = options
    text = getattr(model, "text", model)
    if isinstance(text, TextModel):
        text.fast_decode = FusedDecode(text, kernel) if options.fused_decode and kernel is not None else None
    return model


def packed_with(model: nn.Module) -> KernelOptions | None:
    """The options the model was packed with, or None if it is not packed."""
    return getattr(model, "kernel_options", None)


def unpack(model: nn.Module) -> nn.Module:
    """Plain modules and weights back, in place (the fused step removed)."""
    swap_out(model)
    model.kernel_options = None
    text = getattr(model, "text", model)
    if isinstance(text, TextModel):
        text.fast_decode = None
    return model


@contextlib.contextmanager
def unpacked(model: nn.Module) -> Iterator[nn.Module]:
    """Plain weights inside the block (e.g. to save or inspect them), packed again afterwards."""
    options = packed_with(model)
    if options is not None:
        unpack(model)
    try:
        yield model
    finally:
        if options is not None:
            pack(model, options)
