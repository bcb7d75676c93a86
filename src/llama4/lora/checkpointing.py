"""Gradient checkpointing for training, applied from outside (the model files do not change).

:func:`enable_gradient_checkpointing` makes each decoder layer of the text model run under
``torch.utils.checkpoint`` (non-reentrant) when autograd records and there is no cache: the forward keeps only
each layer's input, and the backward runs the layer again to rebuild what its gradient needs. Activation
memory then grows with the number of layers by one hidden state [B, T, D] each, instead of every
intermediate of every layer (attention projections, norms, the SwiGLU's 2I-wide products, the adapters'
inputs).

Nothing is swapped: the layer's ``forward`` is replaced on the instance, so parameter and buffer names (and
``state_dict``, adapters, saving) are unchanged, and :func:`disable_gradient_checkpointing` removes it.
The recomputation draws the same random numbers (the RNG state is saved and restored, so LoRA's dropout masks
replay) and routes every token to the same experts. Passes with a cache (generation) and passes without
autograd run the layer as it is. Forward hooks inside a layer (e.g. train.objectives.RouterCapture's) fire again
in the recomputation: read what they captured before ``backward``, and clear it per step.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from llama4.model.transformer import DecoderLayer, text_decoder


def _checkpointed_forward(self: DecoderLayer, h: torch.Tensor, tables, cache) -> torch.Tensor:
    if cache is None and torch.is_grad_enabled():
        return checkpoint(DecoderLayer.forward, self, h, tables, cache, use_reentrant=False)
    return DecoderLayer.forward(self, h, tables, cache)


def _layers(model: nn.Module) -> nn.ModuleList:
    text, _ = text_decoder(model, "gradient checkpointing")
    if not all(type(layer) is DecoderLayer for layer in text.layers):
        kinds = sorted({type(layer).__name__ for layer in text.layers})
        raise TypeError(f"gradient checkpointing wraps the model's DecoderLayers, got {', '.join(kinds)}")
    return text.layers


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Run every decoder layer of ``model`` (a Llama4Model or TextModel) under non-reentrant activation
    checkpointing in passes that record autograd without a cache. In place; returns the model. Idempotent."""
    for layer in _layers(model):
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    return model


def disable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_gradient_checkpointing` (nothing to undo is fine)."""
    for layer in _layers(model):
        layer.__dict__.pop("forward", None)
    return model


def gradient_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable_gradient_checkpointing` is on for every decoder layer of ``model``."""
    return all(getattr(layer.__dict__.get("forward"), "__func__", None) is _checkpointed_forward
               for layer in _layers(model))
