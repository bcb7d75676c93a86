"""The one assembly line: config -> model on the meta device -> weights (loaded or random).

Building on the meta device costs no memory; weights are then materialised tensor by tensor in the
target dtype and device, so loading a checkpoint needs about one copy of the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from llama4.checkpoint.io import (
    CheckpointError,
    load_weights,
    read_config,
    read_quantization_config,
    save_checkpoint,
)
from llama4.config import ModelConfig
from llama4.kernels import cpu as cpu_kernels
from llama4.kernels.cpu import KernelOptions
from llama4.model.transformer import Llama4Model
from llama4.quant.checkpoint import is_quantized, load_quantized, save_quantized
from llama4.quant.recipe import QuantRecipe, quantize_model

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_NAME = "llama4-tiny"  # what the shipped model calls itself (its card, its answers, the server)
# the fast paths a load uses unless told otherwise
# (the CLI reads them from the environment)
DEFAULT_KERNELS = KernelOptions()


def build_meta(config: ModelConfig) -> Llama4Model:
    """The model structure with every parameter on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return Llama4Model(config)


def random_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0, std: float = 0.02) -> Llama4Model:
    """A model with random weights (normal(0, std) matrices, unit norms), reproducible from ``seed``."""
    model = build_meta(config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if name.endswith("norm.weight") or name.endswith("norm_pre.weight") or name.endswith("norm_post.weight"):
            value = torch.ones(param.shape)
        elif name.endswith(".bias"):
            value = torch.zeros(param.shape)
        else:
            value = torch.randn(param.shape, generator=generator) * std
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(value.to(device=device, dtype=dtype),
                                                                          requires_grad=False)
    return model.to(device).eval()


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is not None:
        return Path(path)
    if (EMBEDDED_DIR / "config.json").is_file():
        return EMBEDDED_DIR
    raise CheckpointError("no model path given and this installation has no embedded model; "
                          "pass a checkpoint directory")


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", pack: bool | None = None,
               progress: Callable[[int, int], None] | None = None,
               kernels: KernelOptions | None = None, quant: QuantRecipe | str | None = None) -> Llama4Model:
    """Load a Hugging Face Llama 4 checkpoint directory (safetensors) for inference.

    Returns the model in eval mode with gradients off. ``pack`` (default: wherever supported, i.e. on
    CPU in fp32/bf16) reorders the decoder's weights for the CPU fast paths (``kernels``: which may run,
    default ``DEFAULT_KERNELS``); pass ``False`` for a model to train or to modify in place.
    ``progress(done, total)`` is called per tensor loaded.

    Quantized checkpoints (compressed-tensors int4 / int8 / FP8, Meta's fbgemm_fp8; see docs/QUANTIZATION.md)
    load into llama4.quant's modules straight from their codes; FP8 weights become int8 per channel.
    ``quant`` (a QuantRecipe or its string, e.g. ``"int4-g32"``) quantizes a float checkpoint as it loads:
    the float model is loaded, then quantized module by module.
    """
    path = resolve_model_path(path)
    config = read_config(path)
    stored = read_quantization_config(path)
    recipe = QuantRecipe.parse(quant) if isinstance(quant, str) else quant
    if stored is not None and recipe is not None:
        raise CheckpointError(f"{path} is already quantized ({stored.get('quant_method')}): load it without "
                              f"quant=, or quantize its float original")
    model = build_meta(config)
    kernels = kernels or DEFAULT_KERNELS
    packing = pack or (pack is None and cpu_kernels.supported(dtype, device, kernels))
    if stored is None and recipe is None:
        shapes = {name: p.shape for name, p in model.named_parameters()}
        if packing:
            cpu_kernels.pack(model, kernels, fill=False)  # each weight is packed as it is read
        load_weights(model, path, dtype, device, progress, shapes)
        return model.to(device).eval()
    if stored is not None:
        load_quantized(model, path, stored, dtype, device, progress)
    else:
        load_weights(model, path, dtype, device, progress)
        quantize_model(model, recipe)
    model = model.to(device).eval()
    if packing:
        cpu_kernels.pack(model, kernels, fill=True)  # the quantized modules exist: pack swaps what it packs
    return model


def save_model(model: Llama4Model, path: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Save in the Hugging Face layout (config.json + safetensors) that transformers loads unchanged; a quantized
    model in the compressed-tensors layout (transformers loads it with the compressed-tensors package)."""
    with cpu_kernels.unpacked(model):
        save = save_quantized if is_quantized(model) else save_checkpoint
        if max_shard_bytes is None:
            save(model, path)
        else:
            save(model, path, max_shard_bytes=max_shard_bytes)
