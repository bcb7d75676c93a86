"""Random transformers Llama 4 models used as the numerical oracle (test extra only)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the test extra) is the parity oracle")

SCOUT_LIKE = dict(
    vocab_size=211, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=16, num_experts_per_tok=1,
    interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=8, attn_temperature_tuning=True,
    floor_scale=4, attn_scale=0.1, rms_norm_eps=1e-5, max_position_embeddings=4096,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 1.0, "original_max_position_embeddings": 64},
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
MAVERICK_LIKE = dict(
    SCOUT_LIKE, num_local_experts=8, interleave_moe_layer_step=2, use_qk_norm=False, num_hidden_layers=8,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, floor_scale=5, attention_chunk_size=6,
)
TOP2_ONE_KV = dict(
    SCOUT_LIKE, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=1, head_dim=24,
    attention_chunk_size=7, floor_scale=3,
    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
)
CONFIGS = {"scout_like": SCOUT_LIKE, "maverick_like": MAVERICK_LIKE, "top2_one_kv": TOP2_ONE_KV}


def hf_causal_lm(config: dict, seed: int = 0, attn: str = "eager"):
    """A Llama4ForCausalLM with random weights, including non-trivial norm weights."""
    torch.manual_seed(seed)
    cfg = transformers.Llama4TextConfig(**config)
    cfg._attn_implementation = attn
    model = transformers.Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "experts" in name or "router" in name:
                p.normal_(0.0, 0.08)
    return model
