"""The CPU fast paths the tests use: those the environment names (as the command line reads them), so that
``make test-cpu-paths`` runs the same tests on other CPUs' paths."""

from __future__ import annotations

import dataclasses
import os

import torch

from llama4.kernels import cpu as cpu_kernels
from llama4.kernels.cpu import KernelOptions
from llama4.kernels.cpu.packing import packing_supported

KERNELS = KernelOptions.from_environ(os.environ)
KERNEL = KERNELS.kernel()  # the kernel loads use here, or None
BF16_PACKING = packing_supported(torch.bfloat16, "cpu", KERNEL)


def pack(model, **changes):
    """``model`` packed in place with the environment's options (``changes``: fields to override)."""
    return cpu_kernels.pack(model, dataclasses.replace(KERNELS, **changes))


def runnable_variants() -> list[str]:
    """The kernel variants this CPU runs (each built if needed), best first."""
    from llama4.kernels.cpu import library

    found = []
    for name in library.candidates("auto", library.cpu_flags()):
        try:
            if library.load_variant(name) is not None:
                found.append(name)
        except (OSError, RuntimeError):
            pass
    return found
