"""The CPU fast paths the tests use: those the environment names (as the command line reads them), so that
``make test-cpu-paths`` runs the same tests on other CPUs' paths."""

from __future__ import annotations

import dataclasses
import os

import torch

import llama4
from llama4.kernels import cpu as cpu_kernels
from llama4.kernels.cpu import KernelOptions
from llama4.kernels.cpu.packing import packing_supported
from llama4.presets import text_config

KERNELS = KernelOptions.from_environ(os.environ)
KERNEL = KERNELS.kernel()  # the kernel loads use here, or None
BF16_PACKING = packing_supported(torch.bfloat16, "cpu", KERNEL)


FUSED_CHUNK = 8  # the attention chunk of fused_decode_model: its decode tests cross chunk boundaries


def fused_decode_model() -> llama4.Llama4Model:
    """The fused decode layer's test model (fp32, random): RoPE + chunked, NoPE + temperature tuning, MoE and
    dense layers; every width the kernel takes."""
    cfg = text_config(num_layers=4, moe_step=2, vocab_size=211, hidden_size=64, num_heads=4, num_kv_heads=2,
                      head_dim=32, intermediate_size=64, intermediate_size_mlp=96, num_experts=4,
                      attention_chunk_size=FUSED_CHUNK, floor_scale=4)
    return llama4.random_model(llama4.ModelConfig(text=cfg), std=0.15, seed=7)


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
