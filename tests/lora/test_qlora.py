"""QLoRA beyond the reference forward: what autograd keeps of a quantized base (never its dequantized weight),
frozen_linear's gradients, NF4 bases, and gradient checkpointing (equal gradients, less activation memory)."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llama4
from llama4.config import ModelConfig
from llama4.lora import LoraConfig, LoraExperts, LoraLinear, apply_lora, load_lora_state_dict, lora_state_dict
from llama4.lora.checkpointing import (
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    gradient_checkpointing_enabled,
)
from llama4.lora.frozen import frozen_linear
from llama4.presets import text_config
from llama4.quant import QuantizedLinear, quantize_model
from llama4.quant.modules import QuantizedWeight
from tests.lora.helpers import dequantized_float_copy, ids, lora_config_model, randomize_adapters, rel_err

ALL = ("attention", "shared", "mlp", "experts", "router")


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def _adapter_grads(model: nn.Module, tokens: torch.Tensor, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)  # dropout's masks
    loss = _loss(model, tokens)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


class SavedTensors:
    """Every tensor autograd saves for the backward while active."""

    def __init__(self):
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.saved.append(tensor)
        return tensor

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def holds(self, weight: torch.Tensor) -> bool:
        """Whether a saved tensor has ``weight``'s values (as saved, or transposed)."""
        return any(t.shape == w.shape and torch.equal(t.to(w.dtype), w) for t in self.saved
                   for w in (weight, weight.t()))


def _dequantized_weights(model: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
    weights = []
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            tensor = module.tensor
            weights += [module.dequantize(dtype, e) for e in range(tensor.codes.shape[0])] \
                if tensor.codes.dim() == 3 else [module.dequantize(dtype)]
    return weights


@pytest.mark.parametrize("transposed", [False, True])
def test_frozen_linear_gives_autograd_gradients_and_builds_the_weight_again(transposed):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, dtype=torch.float64, generator=g)  # [out, in]
    stored = weight.t().contiguous() if transposed else weight
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    builds = []

    def build(dtype):
        builds.append(dtype)
        return stored.to(dtype)

    y = frozen_linear(x, build, transposed, bias)
    assert builds == [torch.float64]
    upstream = torch.randn(3, 4, 6, dtype=torch.float64, generator=g)
    grad_x, grad_bias = torch.autograd.grad(y, (x, bias), upstream)
    assert builds == [torch.float64, torch.float64]  # built again in the backward, not saved
    x_ref, bias_ref = x.detach().requires_grad_(), bias.detach().requires_grad_()
    y_ref = x_ref @ weight.T + bias_ref
    ref_x, ref_bias = torch.autograd.grad(y_ref, (x_ref, bias_ref), upstream)
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad_x, ref_x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad_bias, ref_bias, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no autograd: the plain product, built once
        assert torch.allclose(frozen_linear(x, build, transposed, bias), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", ["nf4-g32", "int4-g32", "int8"])
def test_a_quantized_base_saves_no_dequantized_weight_for_backward(fmt):
    model = quantize_model(lora_config_model(top_k=2), fmt)
    apply_lora(model, LoraConfig(rank=4, dropout=0.1, targets=ALL))
    randomize_adapters(model)
    model.train()
    dequantized = _dequantized_weights(model, torch.float32)
    assert len(dequantized) == 4 + 3 + 4 + 3 + 2 * 4  # layer 0: q k v o + MLP; layer 1: q k v o + shared + experts
    with SavedTensors() as autograd_saved:
        loss = _loss(model, ids())
    assert autograd_saved.saved and not any(autograd_saved.holds(w) for w in dequantized)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
    # the check sees a saved weight where there is one: a quantized linear alone, with autograd's own product
    linear = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    with SavedTensors() as plain:
        linear(torch.randn(3, linear.in_features, requires_grad=True))
    assert plain.holds(linear.dequantized_weight(torch.float32))


def test_nf4_qlora_gradients_equal_lora_on_the_dequantized_float_base():
    float_model = lora_config_model(top_k=2)
    quantized = quantize_model(copy.deepcopy(float_model), "nf4-g32")
    reference = dequantized_float_copy(quantized, float_model)
    config = LoraConfig(rank=4, alpha=8, dropout=0.1, targets=ALL)
    apply_lora(quantized, config)
    apply_lora(reference, config)
    assert isinstance(quantized.text.layers[1].ffn.experts, LoraExperts)
    assert isinstance(quantized.text.layers[0].attn.qkv.wq, LoraLinear)
    randomize_adapters(quantized)
    load_lora_state_dict(reference, lora_state_dict(quantized))
    quantized.train()
    reference.train()
    tokens = ids()
    loss, grads = _adapter_grads(quantized, tokens)
    ref_loss, ref_grads = _adapter_grads(reference, tokens)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("fmt", [None, "nf4-g32"])
def test_checkpointing_gives_the_plain_gradients_bit_for_bit_with_dropout(fmt):
    model = lora_config_model(top_k=2)
    if fmt:
        quantize_model(model, fmt)
    apply_lora(model, LoraConfig(rank=4, dropout=0.2, targets=ALL))
    randomize_adapters(model)
    model.train()
    names = list(model.state_dict())
    tokens = ids()
    loss, grads = _adapter_grads(model, tokens)
    _, other_masks = _adapter_grads(model, tokens, seed=6)
    assert any(not torch.equal(grads[n], other_masks[n]) for n in grads)  # dropout is on: masks matter
    assert enable_gradient_checkpointing(model) is model and gradient_checkpointing_enabled(model)
    enable_gradient_checkpointing(model)  # idempotent
    assert list(model.state_dict()) == names
    with SavedTensors() as saved:
        checkpointed_loss, checkpointed = _adapter_grads(model, tokens)
    assert checkpointed_loss == loss
    assert all(torch.equal(checkpointed[n], grads[n]) for n in grads)
    assert len(saved.saved) < 20  # outside the layers only: the head, the norm, the loss
    disable_gradient_checkpointing(model)
    assert not gradient_checkpointing_enabled(model)
    assert all(torch.equal(g, grads[n]) for n, g in _adapter_grads(model, tokens)[1].items())


def test_checkpointing_leaves_inference_and_cached_passes_alone():
    model = lora_config_model()
    apply_lora(model, LoraConfig(rank=2, targets=("attention",)))
    randomize_adapters(model)
    tokens = ids()
    with torch.no_grad():
        plain_logits = model(tokens)
    enable_gradient_checkpointing(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), plain_logits)
    cache = llama4.KVCache(model.config.text)
    assert torch.equal(model(tokens, cache=cache), plain_logits)  # grad on, with a cache: not checkpointed
    with pytest.raises(TypeError, match="gradient checkpointing takes a Llama4Model or TextModel, got Linear"):
        enable_gradient_checkpointing(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="gradient checkpointing takes a Llama4Model"):
        gradient_checkpointing_enabled(nn.Linear(2, 2))


def _heap_in_use() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc's mallinfo2: arenas + mmapped chunks), None
    elsewhere. torch's CPU tensors are malloc'ed, so this is what tensors alive hold, to a few kB."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(field, ctypes.c_size_t) for field in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                           "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.skipif(_heap_in_use() is None, reason="needs glibc's mallinfo2")
def test_checkpointing_holds_less_activation_memory():
    config = ModelConfig(text=text_config(
        num_layers=4, moe_step=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=128,
        intermediate_size_mlp=256, num_experts=4, vocab_size=64, attention_chunk_size=64, floor_scale=8,
        max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0))
    model = quantize_model(llama4.random_model(config, seed=0), "nf4-g32")
    apply_lora(model, LoraConfig(rank=8, dropout=0.1, targets=("attention", "shared", "mlp", "experts")))
    model.train()
    tokens = torch.randint(3, 64, (4, 129), generator=torch.Generator().manual_seed(0))

    def held_after_forward() -> tuple[int, dict[str, torch.Tensor]]:
        before = _heap_in_use()
        loss = _loss(model, tokens)
        held = _heap_in_use() - before  # what the graph keeps for the backward (and the loss)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return held, grads

    torch.manual_seed(0)
    held_after_forward()  # warm-up: first-call allocations (oneDNN, RNG) out of the measurement
    torch.manual_seed(1)
    plain, grads = held_after_forward()
    enable_gradient_checkpointing(model)
    torch.manual_seed(1)
    checkpointed, checkpointed_grads = held_after_forward()
    hidden_state = 4 * 128 * 128 * 4  # one layer's input, [B, T, D] fp32, kept per layer
    assert plain > 8 * 4 * hidden_state  # without: many intermediates per layer
    assert checkpointed < plain / 3
    assert all(torch.equal(checkpointed_grads[n], grads[n]) for n in grads)
