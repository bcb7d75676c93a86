"""config.json <-> ModelConfig translation, both ways, against transformers 5.23's own config classes.

No numerics here, so every comparison is exact.
"""

from __future__ import annotations

import copy
import json

import pytest

from llama4.checkpoint.hf_config import (
    model_config_from_hf,
    model_config_to_hf,
    text_config_from_hf,
    vision_config_from_hf,
)
from llama4.config import ConfigError, ModelConfig
from llama4.presets import LLAMA4_VISION, MAVERICK, SCOUT

transformers = pytest.importorskip("transformers")

# Fields of Llama4TextConfig that change what the model computes.
TEXT_NUMERIC_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "num_local_experts",
    "num_experts_per_tok", "moe_layers", "use_qk_norm", "attention_chunk_size", "attn_temperature_tuning",
    "floor_scale", "attn_scale", "tie_word_embeddings", "attention_bias", "layer_types",
)
VISION_NUMERIC_FIELDS = (
    "hidden_size", "hidden_act", "num_hidden_layers", "num_attention_heads", "num_channels", "intermediate_size",
    "vision_output_dim", "image_size", "patch_size", "norm_eps", "pixel_shuffle_ratio", "projector_input_dim",
    "projector_output_dim", "multi_modal_projector_bias",
)

SMALL_TEXT = dict(
    vocab_size=211, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
    interleave_moe_layer_step=2, use_qk_norm=False, attention_chunk_size=8, attn_temperature_tuning=True,
    floor_scale=4, attn_scale=0.2, rms_norm_eps=1e-6, max_position_embeddings=4096,
    rope_parameters={"rope_type": "llama3", "rope_theta": 250000.0, "factor": 16.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0,
)
SMALL_VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7, pixel_shuffle_ratio=0.5,
    intermediate_size=128, vision_output_dim=48, projector_input_dim=48, projector_output_dim=48,
)


def _norm_rope(cfg) -> dict:
    """rope_parameters of a transformers config, floats normalised."""
    rp = dict(cfg.rope_parameters)
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in rp.items()}


def assert_text_equal(a, b):
    for f in TEXT_NUMERIC_FIELDS:
        assert getattr(a, f) == getattr(b, f), f
    n = a.num_hidden_layers
    assert list(a.no_rope_layers)[:n] == list(b.no_rope_layers)[:n]
    assert _norm_rope(a) == _norm_rope(b)


# ----------------------------------------------------------------------------------------------------
# transformers 5.23 dicts -> ours -> back
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {},  # 5.23 defaults (Scout-sized, no rope scaling)
    SMALL_TEXT,
    dict(SMALL_TEXT, use_qk_norm=True, interleave_moe_layer_step=1, tie_word_embeddings=True,
         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
], ids=["defaults", "small_llama3", "tied_default_rope"])
def test_text_config_round_trip_through_transformers(fields):
    hf = transformers.Llama4TextConfig(**fields)
    ours = model_config_from_hf(hf.to_dict())
    assert not ours.multimodal
    t = ours.text
    assert t.num_layers == hf.num_hidden_layers and t.num_kv_heads == hf.num_key_value_heads
    assert t.moe_layers == tuple(hf.moe_layers)
    assert t.no_rope_layers == tuple(hf.no_rope_layers[:hf.num_hidden_layers])
    assert t.chunked_layers == tuple(x == "chunked_attention" for x in hf.layer_types)
    assert t.rope_theta == hf.rope_parameters["rope_theta"]
    back = model_config_to_hf(ours)
    assert back["architectures"] == ["Llama4ForCausalLM"]
    json.dumps(back)  # serialisable as config.json
    hf_back = transformers.Llama4TextConfig.from_dict(back)  # strict 5.23 validation accepts it
    assert_text_equal(hf_back, hf)
    assert model_config_from_hf(back) == ours  # and reads back to the same config


def test_multimodal_config_round_trip_through_transformers():
    hf = transformers.Llama4Config(text_config=SMALL_TEXT, vision_config=SMALL_VISION, image_token_index=200,
                                   boi_token_index=201, eoi_token_index=202)
    ours = model_config_from_hf(hf.to_dict())
    assert ours.multimodal
    assert (ours.image_token_id, ours.boi_token_id, ours.eoi_token_id) == (200, 201, 202)
    v = ours.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.image_size, v.patch_size, v.vision_output_dim) == (
        32, 2, 2, 28, 7, 48)
    assert v.tokens_per_tile == 4
    back = model_config_to_hf(ours)
    assert back["architectures"] == ["Llama4ForConditionalGeneration"]
    hf_back = transformers.Llama4Config.from_dict(json.loads(json.dumps(back)))
    assert_text_equal(hf_back.text_config, hf.text_config)
    for f in VISION_NUMERIC_FIELDS:
        assert getattr(hf_back.vision_config, f) == getattr(hf.vision_config, f), f
    assert hf_back.vision_config.rope_parameters["rope_theta"] == hf.vision_config.rope_parameters["rope_theta"]
    assert (hf_back.image_token_index, hf_back.boi_token_index, hf_back.eoi_token_index) == (200, 201, 202)
    assert model_config_from_hf(back) == ours


@pytest.mark.parametrize("name,preset", [("scout", SCOUT), ("maverick", MAVERICK)])
def test_presets_round_trip_through_transformers(name, preset):
    d = model_config_to_hf(preset)
    hf = transformers.Llama4Config.from_dict(json.loads(json.dumps(d)))
    assert model_config_from_hf(hf.to_dict()) == preset, name


def test_token_ids_survive_the_round_trip():
    hf = transformers.Llama4TextConfig(**dict(SMALL_TEXT, bos_token_id=5, eos_token_id=[6, 7], pad_token_id=None))
    t = model_config_from_hf(hf.to_dict()).text
    assert (t.bos_token_id, t.eos_token_ids, t.pad_token_id) == (5, (6, 7), None)
    back = transformers.Llama4TextConfig.from_dict(model_config_to_hf(ModelConfig(text=t)))
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (5, [6, 7], None)


def test_null_bos_and_eos_stay_null():
    hf = transformers.Llama4TextConfig(**dict(SMALL_TEXT, bos_token_id=None, eos_token_id=None))
    d = hf.to_dict()
    assert d["bos_token_id"] is None and d["eos_token_id"] is None
    t = model_config_from_hf(d).text
    assert t.bos_token_id is None and t.eos_token_ids == ()


# ----------------------------------------------------------------------------------------------------
# the transformers 4.5x layout (top-level rope_theta + rope_scaling, legacy keys)
# ----------------------------------------------------------------------------------------------------

# The layout of the published Scout config.json (written by transformers 4.51), with the current
# rope scaling values (factor 16, high 1). moe_layers/no_rope_layers spelled out as published.
SCOUT_4X = {
    "architectures": ["Llama4ForConditionalGeneration"],
    "boi_token_index": 200080, "eoi_token_index": 200081, "image_token_index": 200092, "model_type": "llama4",
    "text_config": {
        "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
        "attn_temperature_tuning": 4, "bos_token_id": 200000, "cache_implementation": "hybrid",
        "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192, "for_llm_compressor": False,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
        "interleave_moe_layer_step": 1, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760, "model_type": "llama4_text", "moe_layers": list(range(48)),
        "no_rope_layers": [1, 1, 1, 0] * 12, "num_attention_heads": 40, "num_experts_per_tok": 1,
        "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16, "output_router_logits": False,
        "pad_token_id": 200018, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "torch_dtype": "bfloat16", "use_cache": True, "use_qk_norm": True, "vocab_size": 202048,
    },
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "vision_config": {
        "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1408, "image_size": 336,
        "initializer_range": 0.02, "intermediate_size": 5632, "model_type": "llama4_vision_model",
        "multi_modal_projector_bias": False, "norm_eps": 1e-05, "num_attention_heads": 16, "num_channels": 3,
        "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_dropout": 0.0,
        "projector_input_dim": 4096, "projector_output_dim": 4096, "rope_theta": 10000,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "vision_output_dim": 4096,
    },
}


def test_published_4x_scout_layout_reads_as_the_scout_preset():
    ours = model_config_from_hf(copy.deepcopy(SCOUT_4X))
    assert ours == SCOUT
    assert ours.vision == LLAMA4_VISION
    assert ours.text.rope_scaling.factor == 16.0 and ours.text.rope_theta == 500000.0


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_4x_rope_scaling_with_either_type_key(type_key):
    text = dict(SCOUT_4X["text_config"], num_hidden_layers=4, moe_layers=None, no_rope_layers=None,
                rope_theta=123456.0)
    text["rope_scaling"] = {type_key: "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
    t = text_config_from_hf(text)
    assert t.rope_theta == 123456.0
    assert (t.rope_scaling.factor, t.rope_scaling.low_freq_factor, t.rope_scaling.high_freq_factor,
            t.rope_scaling.original_max_position_embeddings) == (8.0, 1.0, 4.0, 8192)
    assert t.moe_layers == (0, 1, 2, 3) and t.no_rope_layers == (1, 1, 1, 0)


def test_4x_null_rope_scaling_is_unscaled_with_top_level_theta():
    text = dict(SCOUT_4X["text_config"], rope_scaling=None, rope_theta=10000.0)
    t = text_config_from_hf(text)
    assert t.rope_scaling is None and t.rope_theta == 10000.0


def test_attn_temperature_tuning_int_4_is_true_and_written_back_as_a_bool():
    t = text_config_from_hf(dict(SCOUT_4X["text_config"]))
    assert t.attn_temperature_tuning is True
    assert all(spec.temperature_tuning == (not spec.use_rope) for spec in t.layers)
    d = model_config_to_hf(ModelConfig(text=t))
    assert d["attn_temperature_tuning"] is True  # transformers 5.23 (strict) rejects the int 4
    transformers.Llama4TextConfig.from_dict(d)
    with pytest.raises(Exception):
        transformers.Llama4TextConfig(**dict(SMALL_TEXT, attn_temperature_tuning=4))
    off = text_config_from_hf(dict(SCOUT_4X["text_config"], attn_temperature_tuning=0))
    assert off.attn_temperature_tuning is False and not any(s.temperature_tuning for s in off.layers)


# ----------------------------------------------------------------------------------------------------
# layer schedules
# ----------------------------------------------------------------------------------------------------


def test_explicit_lists_override_step_and_interval():
    d = dict(SMALL_TEXT, num_hidden_layers=6, interleave_moe_layer_step=2, no_rope_layer_interval=4,
             moe_layers=[0, 5], no_rope_layers=[1, 0, 1, 1, 0, 1])
    d.pop("rope_parameters")
    t = text_config_from_hf(d)
    assert t.moe_layers == (0, 5)
    assert t.no_rope_layers == (1, 0, 1, 1, 0, 1)
    assert t.chunked_layers == (True, False, True, True, False, True)  # derived from the explicit list
    assert [s.moe for s in t.layers] == [True, False, False, False, False, True]
    assert [s.use_rope for s in t.layers] == [True, False, True, True, False, True]
    # transformers agrees on the same dict
    hf = transformers.Llama4TextConfig(**d)
    assert list(hf.moe_layers) == [0, 5] and hf.layer_types == ["chunked_attention" if c else "full_attention"
                                                                  for c in t.chunked_layers]


def test_step_and_interval_used_when_lists_absent():
    d = dict(SMALL_TEXT, num_hidden_layers=9, interleave_moe_layer_step=3, no_rope_layer_interval=3)
    t = text_config_from_hf(d)
    assert t.moe_layers == (2, 5, 8)
    assert t.no_rope_layers == (1, 1, 0, 1, 1, 0, 1, 1, 0)


def test_empty_no_rope_list_derives_the_default_like_transformers():
    d = dict(SMALL_TEXT, num_hidden_layers=8, no_rope_layers=[])
    t = text_config_from_hf(d)
    assert t.no_rope_layers == tuple(transformers.Llama4TextConfig(**d).no_rope_layers)
    assert t.no_rope_layers == (1, 1, 1, 0, 1, 1, 1, 0)


def test_maverick_schedule():
    hf = transformers.Llama4TextConfig(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                                       max_position_embeddings=1048576, bos_token_id=200000,
                                       eos_token_id=[200001, 200007, 200008], pad_token_id=200018)
    t = model_config_from_hf(hf.to_dict()).text
    assert t.moe_layers == tuple(range(1, 48, 2))
    nope = tuple(i for i in range(48) if not t.no_rope_layers[i])
    assert nope == tuple(range(3, 48, 4))
    assert t.global_layers == nope
    assert all(t.layers[i].moe for i in nope)  # every NoPE layer of Maverick is an MoE layer
    assert not any(s.qk_norm for s in t.layers)
    assert [s.moe for s in t.layers] == [i % 2 == 1 for i in range(48)]
    assert t == MAVERICK.text


def test_scout_schedule_qk_norm_only_on_rope_layers():
    t = SCOUT.text
    assert [s.qk_norm for s in t.layers] == [(i + 1) % 4 != 0 for i in range(48)]
    assert [s.temperature_tuning for s in t.layers] == [(i + 1) % 4 == 0 for i in range(48)]
    assert all(s.moe for s in t.layers)


# ----------------------------------------------------------------------------------------------------
# rejections: each a ConfigError that names the problem
# ----------------------------------------------------------------------------------------------------


def test_unknown_text_field_is_named():
    with pytest.raises(ConfigError, match="sliding_window_magic"):
        text_config_from_hf(dict(SMALL_TEXT, sliding_window_magic=3))


def test_unknown_top_level_and_vision_fields_are_named():
    d = transformers.Llama4Config(text_config=SMALL_TEXT, vision_config=SMALL_VISION).to_dict()
    with pytest.raises(ConfigError, match="mystery_top"):
        model_config_from_hf(dict(d, mystery_top=1))
    d2 = copy.deepcopy(d)
    d2["vision_config"]["use_absolute_position_magic"] = True
    with pytest.raises(ConfigError, match="use_absolute_position_magic"):
        model_config_from_hf(d2)


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
    {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}},
    {"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0}},
])
def test_unsupported_rope_type_is_rejected(rope):
    d = {k: v for k, v in SMALL_TEXT.items() if k != "rope_parameters"}
    d.update(rope)
    with pytest.raises(ConfigError, match="rope_type"):
        text_config_from_hf(d)


def test_llama3_scaling_missing_a_factor_is_named():
    d = dict(SMALL_TEXT, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                          "low_freq_factor": 1.0, "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="high_freq_factor"):
        text_config_from_hf(d)


def test_text_hidden_act_gelu_rejected():
    with pytest.raises(ConfigError, match="hidden_act"):
        text_config_from_hf(dict(SMALL_TEXT, hidden_act="gelu"))


def test_attention_bias_rejected():
    with pytest.raises(ConfigError, match="attention_bias"):
        text_config_from_hf(dict(SMALL_TEXT, attention_bias=True))


@pytest.mark.parametrize("archs", [["LlamaForCausalLM"], ["Llama4ForConditionalGeneration", "Llama4Foo"]])
def test_unknown_architecture_rejected(archs):
    d = transformers.Llama4Config(text_config=SMALL_TEXT, vision_config=SMALL_VISION).to_dict()
    d["architectures"] = archs
    with pytest.raises(ConfigError, match="architecture"):
        model_config_from_hf(d)


def test_foreign_model_type_rejected():
    d = dict(transformers.Llama4TextConfig(**SMALL_TEXT).to_dict(), model_type="llama")
    with pytest.raises(ConfigError, match="model_type"):
        model_config_from_hf(d)


def test_quantization_config_rejected():
    d = dict(transformers.Llama4TextConfig(**SMALL_TEXT).to_dict(),
             quantization_config={"quant_method": "fbgemm_fp8"})
    with pytest.raises(ConfigError, match="quantization_config"):
        model_config_from_hf(d)


@pytest.mark.parametrize("change,word", [
    ({"intermediate_size": 96}, "intermediate_size"),  # must be hidden / ratio^2 = 128 (adapter input)
    ({"projector_input_dim": 64}, "projector"),
    ({"vision_output_dim": 64}, "vision_output_dim"),
    ({"image_size": 30}, "image_size"),  # not a multiple of the patch
    ({"num_attention_heads": 3}, "num_attention_heads"),
    ({"pixel_shuffle_ratio": 0.3}, "pixel_shuffle_ratio"),
    ({"hidden_act": "relu"}, "hidden_act"),
])
def test_inconsistent_vision_config_rejected(change, word):
    with pytest.raises(ConfigError, match=word):
        vision_config_from_hf(dict(SMALL_VISION, **change))


@pytest.mark.parametrize("change,word", [
    ({"no_rope_layers": [1, 0, 1]}, "no_rope_layers"),  # shorter than num_hidden_layers
    ({"layer_types": ["chunked_attention"] * 7 + ["sliding_attention"]}, "layer_types"),
    ({"moe_layers": [0, 8]}, "moe_layers"),  # index out of range
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
])
def test_inconsistent_text_config_rejected(change, word):
    with pytest.raises(ConfigError, match=word):
        text_config_from_hf(dict(SMALL_TEXT, **change))


def test_not_a_dict_rejected():
    with pytest.raises(ConfigError, match="JSON object"):
        model_config_from_hf([1, 2, 3])
