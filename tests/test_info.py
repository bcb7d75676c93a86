"""model_info: parameter counts against the measured figures of the reference sheet (§3), schedules, checkpoints.

All counts are exact integers (measured by instantiating transformers' classes on the meta device).
"""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.presets import text_config

SCOUT = dict(total=108_641_793_536, active=17_172_894_720, text=107_769_861_120, routed=96_636_764_160,
             active_vision=18_044_827_136)
MAVERICK = dict(total=401_583_781_376, active=17_184_691_200, text=400_711_848_960, routed=386_547_056_640,
                active_vision=18_056_623_616)
VISION_AND_PROJECTOR = 850_960_896 + 20_971_520
EMBEDDING = 1_034_485_760


@pytest.mark.parametrize("name,expected", [("scout", SCOUT), ("maverick", MAVERICK), ("Scout", SCOUT)])
def test_released_model_counts(name, expected):
    info = llama4.model_info(name)
    assert info["total_params"] == expected["total"]
    assert info["active_params"] == expected["active"]
    assert info["text_params"] == expected["text"]
    assert info["routed_expert_params"] == expected["routed"]
    assert info["vision_params"] == VISION_AND_PROJECTOR
    assert info["embedding_params"] == EMBEDDING
    assert info["active_params_with_vision"] == expected["active_vision"]
    assert info["weight_bytes"]["bf16"] == 2 * expected["total"]
    assert info["weight_bytes"]["int4"] == expected["total"] // 2
    assert info["multimodal"] is True and info["assumed"] is False


def test_scout_schedule():
    layers = llama4.model_info("scout")["layers"]
    assert len(layers) == 48
    for layer in layers:
        nope = (layer["index"] + 1) % 4 == 0
        assert layer["attention"] == ("global" if nope else "chunked")
        assert layer["rope"] is (not nope)
        assert layer["qk_norm"] is (not nope)
        assert layer["temperature_tuning"] is nope
        assert layer["ffn"] == "moe"


def test_maverick_schedule():
    info = llama4.model_info("maverick")
    assert info["num_experts"] == 128 and info["experts_per_token"] == 1 and info["attention_chunk_size"] == 8192
    for layer in info["layers"]:
        i = layer["index"]
        assert layer["ffn"] == ("moe" if i % 2 else "dense")
        assert layer["attention"] == ("global" if (i + 1) % 4 == 0 else "chunked")
        assert layer["qk_norm"] is False


def test_behemoth_is_flagged_as_assumed():
    info = llama4.model_info("behemoth")
    assert info["assumed"] is True
    # only the announced headline figures are facts: ~2T total, ~288B active, 16 experts
    assert info["num_experts"] == 16
    assert 1.7e12 < info["total_params"] < 2.3e12
    assert 250e9 < info["active_params"] < 320e9


def test_model_info_on_a_checkpoint_directory(tmp_path):
    cfg = llama4.ModelConfig(text=text_config(
        num_layers=4, moe_step=2, vocab_size=50, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
        intermediate_size=12, intermediate_size_mlp=20, num_experts=4, num_experts_per_tok=1,
        attention_chunk_size=4, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0))
    model = llama4.random_model(cfg)
    llama4.save_model(model, tmp_path)
    info = llama4.model_info(tmp_path)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert info["total_params"] == info["text_params"] == total
    assert info["routed_expert_params"] == routed == 2 * 4 * (16 * 24 + 12 * 16)  # 2 MoE layers x 4 experts
    assert info["active_params"] == total - routed * 3 // 4  # 3 of 4 experts unused per token
    assert info["multimodal"] is False and info["vision_params"] == 0
    assert [layer["ffn"] for layer in info["layers"]] == ["dense", "moe", "dense", "moe"]
    assert str(tmp_path) in info["source"]
    assert llama4.model_info(str(tmp_path))["total_params"] == total
    assert llama4.model_info(cfg)["total_params"] == total


def test_model_info_unknown_name_is_an_error():
    with pytest.raises((llama4.ConfigError, llama4.CheckpointError)):
        llama4.model_info("llama5-ultra")


def test_kv_cache_bytes_match_the_cache_after_decoding():
    """The formula equals KVCache.nbytes() after N one-token steps, below, at and past chunk boundaries."""
    from llama4.info import kv_cache_bytes
    from llama4.model.cache import KVCache
    from llama4.presets import text_config

    text = text_config(num_layers=8, vocab_size=50, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                       intermediate_size=16, num_experts=2, attention_chunk_size=8)
    config = llama4.ModelConfig(text=text)
    cache = KVCache(text, block_size=3)
    k = torch.zeros(2, 1, 1, 8, dtype=torch.bfloat16)
    for n in range(1, 30):
        for layer in range(text.num_layers):
            cache.update(layer, k, k)
        cache.advance(1)
        expected = kv_cache_bytes(config, n, bytes_per_value=2, batch=2, block_size=3)["total_bytes"]
        assert cache.nbytes() == expected, n


def test_scout_kv_cache_is_48_kib_per_token_in_bf16():
    from llama4.info import kv_cache_bytes

    kv = kv_cache_bytes(llama4.preset("scout"), 1_000_000, 2)
    assert kv["bytes_per_token_global"] == 48 * 1024  # 12 global layers x 8 KV heads x 128 x k,v x 2 bytes
    assert kv["local_bytes"] == 36 * 8192 * 2 * 8 * 128 * 2  # one chunk per chunked layer, fixed
