import pytest
import torch

from llama4.config import ModelConfig
from llama4.presets import text_config


def tiny_config(num_experts: int = 4, top_k: int = 1, vocab: int = 64) -> ModelConfig:
    """2 layers (both MoE), chunk 8 so 16-token rows span two chunks."""
    return ModelConfig(text=text_config(
        num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=32,
        intermediate_size_mlp=64, num_experts=num_experts, num_experts_per_tok=top_k, vocab_size=vocab,
        attention_chunk_size=8, floor_scale=8, max_position_embeddings=64, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=0))


@pytest.fixture
def config() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def rows():
    from llama4.train.data import pack

    stream = torch.randint(3, 64, (1200,), generator=torch.Generator().manual_seed(0)).tolist()
    return pack(stream, 16)
