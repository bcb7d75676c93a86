"""Shared pieces of the LoRA tests: a tiny dense + MoE model, adapters made non-zero, the error measure."""

import copy

import torch

import llama4
from llama4.config import ModelConfig
from llama4.lora import lora_state_dict
from llama4.presets import text_config
from llama4.quant import QuantizedExperts, QuantizedLinear


def lora_config_model(top_k: int = 1, seed: int = 0, std: float = 0.1) -> llama4.Llama4Model:
    """A random fp32 model of two layers: a dense MLP layer, then an MoE layer (4 experts + shared); widths are
    multiples of 32 so that int4-g32 takes every matrix."""
    config = ModelConfig(text=text_config(
        num_layers=2, moe_step=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=32,
        intermediate_size_mlp=64, num_experts=4, num_experts_per_tok=top_k, vocab_size=64, attention_chunk_size=8,
        floor_scale=8, max_position_embeddings=64, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0))
    return llama4.random_model(config, seed=seed, std=std)


def randomize_adapters(model, seed: int = 1, std: float = 0.1) -> None:
    """Non-zero A and B everywhere (B starts at zero, which would hide any error in the update)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def ids(batch: int = 2, length: int = 20, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def dequantized_float_copy(quantized, float_model):
    """The float model with every quantized weight replaced by its dequantized value."""
    reference = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear):
                reference.get_submodule(name).weight.copy_(module.dequantized_weight(torch.float32))
            elif isinstance(module, QuantizedExperts):
                experts = reference.get_submodule(name)
                for e in range(module.num_experts):
                    gate_up, down = module.dequantized_weights(e, torch.float32)
                    experts.gate_up[e], experts.down[e] = gate_up.T, down.T
    return reference
