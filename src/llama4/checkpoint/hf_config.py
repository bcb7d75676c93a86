"""Hugging Face ``config.json`` <-> :class:`~llama4.config.ModelConfig`, both ways, in this one place.

Reads the layouts written by transformers 4.5x (``rope_theta`` + ``rope_scaling``, sub-configs with
every generic field spelled out) and 5.x (``rope_parameters``, ``layer_types``), for
``Llama4ForConditionalGeneration`` (``text_config`` + ``vision_config``) and ``Llama4ForCausalLM``.
Writes the transformers 5.x layout, which both generations of transformers load.

A key that changes the numerics in a way we do not implement is an error naming it; generic
bookkeeping keys (generation defaults, label maps, ...) are ignored.
"""

from __future__ import annotations

from typing import Any

from llama4.config import (
    ConfigError,
    ModelConfig,
    RopeScaling,
    TextConfig,
    VisionConfig,
    default_moe_layers,
    default_no_rope_layers,
)

MULTIMODAL_ARCH = "Llama4ForConditionalGeneration"
TEXT_ARCH = "Llama4ForCausalLM"
SUPPORTED_ARCHITECTURES = (MULTIMODAL_ARCH, TEXT_ARCH)

# Keys that carry no numerics for inference: transformers' generic PretrainedConfig fields (4.x wrote
# them into every sub-config), training-only knobs, and legacy Llama 4 keys.
_IGNORED_KEYS = frozenset(
    """
    _name_or_path _attn_implementation_autoset add_cross_attention architectures bad_words_ids
    begin_suppress_tokens chunk_size_feed_forward cross_attention_hidden_size decoder_start_token_id
    diversity_penalty do_sample dtype early_stopping encoder_no_repeat_ngram_size
    exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id id2label
    is_decoder is_encoder_decoder label2id length_penalty max_length min_length model_type
    no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_attentions
    output_hidden_states output_scores prefix problem_type pruned_heads remove_invalid_values
    repetition_penalty return_dict return_dict_in_generate sep_token_id suppress_tokens task_specific_params
    temperature tf_legacy_loss tie_encoder_decoder tokenizer_class top_k top_p torch_dtype torchscript
    transformers_version typical_p use_bfloat16 use_cache initializer_range attention_dropout
    output_router_logits router_aux_loss_coef router_jitter_noise for_llm_compressor cache_implementation
    projector_dropout vision_feature_select_strategy vision_feature_layer hidden_act
    interleave_moe_layer_step no_rope_layer_interval attention_bias multi_modal_projector_bias
    rope_theta rope_scaling rope_parameters layer_types pad_token_id bos_token_id eos_token_id
    """.split()
)

_TEXT_DEFAULTS: dict[str, Any] = {  # transformers 5.23 Llama4TextConfig defaults
    "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "num_experts_per_tok": 1,
    "num_local_experts": 16, "interleave_moe_layer_step": 1, "use_qk_norm": True,
    "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "attn_temperature_tuning": True,
    "floor_scale": 8192, "attn_scale": 0.1, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": None,
}
_VISION_DEFAULTS: dict[str, Any] = {  # transformers 5.23 Llama4VisionConfig defaults (not the checkpoint's)
    "hidden_size": 768, "num_hidden_layers": 34, "num_attention_heads": 16, "num_channels": 3,
    "intermediate_size": 5632, "vision_output_dim": 7680, "image_size": 448, "patch_size": 14,
    "norm_eps": 1e-5, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096,
    "projector_output_dim": 4096, "multi_modal_projector_bias": False,
}
_TOP_KEYS = frozenset({"text_config", "vision_config", "image_token_index", "image_token_id",
                       "boi_token_index", "boi_token_id", "eoi_token_index", "eoi_token_id",
                       "tie_word_embeddings"})
_TEXT_KEYS = frozenset(_TEXT_DEFAULTS) | {"moe_layers", "no_rope_layers", "intermediate_size_mlp"}
_VISION_KEYS = frozenset(_VISION_DEFAULTS)


def _check_keys(d: dict, known: frozenset, where: str) -> None:
    unknown = sorted(k for k in d if k not in known and k not in _IGNORED_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unsupported field(s) {unknown}; "
                          "this implementation does not know how to honour them")


def _rope_from_hf(d: dict, default_theta: float, where: str) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", default_theta))
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", d.get("rope_theta", default_theta)))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported; allowed: 'default', 'llama3'")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: llama3 rope scaling is missing {e.args[0]!r}") from None
    return theta, scaling


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def text_config_from_hf(d: dict) -> TextConfig:
    where = "text_config"
    _check_keys(d, _TEXT_KEYS, where)
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {d['hidden_act']!r} is not supported; Llama 4 uses 'silu'")
    if d.get("attention_bias", False):
        raise ConfigError(f"{where}: attention_bias=true is not supported; Llama 4 attention has no biases")
    nullable = ("pad_token_id", "bos_token_id", "eos_token_id")  # an explicit null means "none", not the default
    g = {**_TEXT_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k in nullable}}
    n = int(g["num_hidden_layers"])
    no_rope = d.get("no_rope_layers") or default_no_rope_layers(n, int(g["no_rope_layer_interval"]))
    if len(no_rope) < n:
        raise ConfigError(f"{where}: no_rope_layers has {len(no_rope)} entries for {n} layers")
    no_rope = tuple(int(v) for v in no_rope[:n])
    layer_types = d.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in no_rope]
    allowed_types = {"chunked_attention", "full_attention"}
    if len(layer_types) < n or any(t not in allowed_types for t in layer_types[:n]):
        raise ConfigError(f"{where}: layer_types must list {n} entries from {sorted(allowed_types)}, got {layer_types}")
    moe = d.get("moe_layers")
    moe = tuple(int(i) for i in moe) if moe is not None else default_moe_layers(n, int(g["interleave_moe_layer_step"]))
    head_dim = g["head_dim"] if g["head_dim"] is not None else g["hidden_size"] // g["num_attention_heads"]
    theta, scaling = _rope_from_hf(d, 500000.0, where)
    tuning = g["attn_temperature_tuning"]
    if not isinstance(tuning, (bool, int)):
        raise ConfigError(f"{where}: attn_temperature_tuning must be a bool (or a truthy int), got {tuning!r}")
    chunk = g["attention_chunk_size"]
    return TextConfig(
        vocab_size=int(g["vocab_size"]), hidden_size=int(g["hidden_size"]), num_layers=n,
        num_heads=int(g["num_attention_heads"]),
        num_kv_heads=int(g["num_key_value_heads"] or g["num_attention_heads"]), head_dim=int(head_dim),
        intermediate_size=int(g["intermediate_size"]), intermediate_size_mlp=int(g["intermediate_size_mlp"]),
        num_experts=int(g["num_local_experts"]), num_experts_per_tok=int(g["num_experts_per_tok"]),
        moe_layers=moe, no_rope_layers=no_rope,
        chunked_layers=tuple(t == "chunked_attention" for t in layer_types[:n]),
        attention_chunk_size=int(chunk) if chunk else 2**62,
        use_qk_norm=bool(g["use_qk_norm"]), attn_temperature_tuning=bool(tuning),
        floor_scale=int(g["floor_scale"]), attn_scale=float(g["attn_scale"]),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(g["rms_norm_eps"]),
        max_position_embeddings=int(g["max_position_embeddings"]),
        tie_word_embeddings=bool(g["tie_word_embeddings"]),
        bos_token_id=g["bos_token_id"], eos_token_ids=_eos_tuple(g["eos_token_id"]),
        pad_token_id=g["pad_token_id"],
    )


def _side(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"vision_config: non-square {name} {value} is not supported")
        value = value[0]
    return int(value)


def vision_config_from_hf(d: dict) -> VisionConfig:
    _check_keys(d, _VISION_KEYS, "vision_config")
    if d.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"vision_config: hidden_act {d['hidden_act']!r} is not supported; allowed: 'gelu'")
    g = {**_VISION_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    theta, scaling = _rope_from_hf(d, 10000.0, "vision_config")
    if scaling is not None:
        raise ConfigError("vision_config: rope scaling is not supported for the vision encoder")
    return VisionConfig(
        hidden_size=int(g["hidden_size"]), num_layers=int(g["num_hidden_layers"]),
        num_heads=int(g["num_attention_heads"]), intermediate_size=int(g["intermediate_size"]),
        image_size=_side(g["image_size"], "image_size"), patch_size=_side(g["patch_size"], "patch_size"),
        num_channels=int(g["num_channels"]), norm_eps=float(g["norm_eps"]),
        vision_output_dim=int(g["vision_output_dim"]), pixel_shuffle_ratio=float(g["pixel_shuffle_ratio"]),
        projector_input_dim=int(g["projector_input_dim"]), projector_output_dim=int(g["projector_output_dim"]),
        multi_modal_projector_bias=bool(g["multi_modal_projector_bias"]), rope_theta=theta,
    )


def model_config_from_hf(d: dict) -> ModelConfig:
    """Translate a parsed ``config.json`` into a :class:`ModelConfig`; errors name the offending field."""
    if not isinstance(d, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    archs = d.get("architectures") or []
    unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unknown:
        raise ConfigError(f"unknown architecture {unknown} in config.json; supported: {list(SUPPORTED_ARCHITECTURES)}")
    model_type = d.get("model_type")
    if model_type not in (None, "llama4", "llama4_text"):
        raise ConfigError(f"model_type {model_type!r} is not a Llama 4 model; expected 'llama4' or 'llama4_text'")
    if "quantization_config" in d:
        raise ConfigError("quantization_config: pre-quantized checkpoints are not supported yet; use a bf16 checkpoint")
    is_multimodal = "text_config" in d or model_type == "llama4" or MULTIMODAL_ARCH in archs
    if not is_multimodal:
        return ModelConfig(text=text_config_from_hf(d))
    _check_keys(d, _TOP_KEYS, "config.json")
    text = dict(d.get("text_config") or {})
    if "tie_word_embeddings" in d and "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = d["tie_word_embeddings"]
    vision = d.get("vision_config")
    return ModelConfig(
        text=text_config_from_hf(text),
        vision=vision_config_from_hf(vision) if vision is not None else None,
        image_token_id=int(d.get("image_token_index", d.get("image_token_id", 200092))),
        boi_token_id=int(d.get("boi_token_index", d.get("boi_token_id", 200080))),
        eoi_token_id=int(d.get("eoi_token_index", d.get("eoi_token_id", 200081))),
    )


def text_config_to_hf(t: TextConfig) -> dict:
    rope: dict[str, Any] = {"rope_theta": t.rope_theta, "rope_type": "default"}
    if t.rope_scaling is not None:
        s = t.rope_scaling
        rope = {"rope_theta": t.rope_theta, "rope_type": "llama3", "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    eos: Any = list(t.eos_token_ids) if len(t.eos_token_ids) != 1 else t.eos_token_ids[0]
    return {
        "model_type": "llama4_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "intermediate_size_mlp": t.intermediate_size_mlp,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim, "hidden_act": "silu",
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id, "eos_token_id": eos or None,
        "tie_word_embeddings": t.tie_word_embeddings, "attention_bias": False,
        "num_experts_per_tok": t.num_experts_per_tok, "num_local_experts": t.num_experts,
        "moe_layers": list(t.moe_layers), "use_qk_norm": t.use_qk_norm,
        "no_rope_layers": list(t.no_rope_layers), "rope_parameters": rope,
        "layer_types": ["chunked_attention" if c else "full_attention" for c in t.chunked_layers],
        "attention_chunk_size": t.attention_chunk_size,
        "attn_temperature_tuning": t.attn_temperature_tuning, "floor_scale": t.floor_scale,
        "attn_scale": t.attn_scale,
    }


def vision_config_to_hf(v: VisionConfig) -> dict:
    return {
        "model_type": "llama4_vision_model", "hidden_size": v.hidden_size, "hidden_act": "gelu",
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "num_channels": v.num_channels,
        "intermediate_size": v.intermediate_size, "vision_output_dim": v.vision_output_dim,
        "image_size": v.image_size, "patch_size": v.patch_size, "norm_eps": v.norm_eps,
        "pixel_shuffle_ratio": v.pixel_shuffle_ratio, "projector_input_dim": v.projector_input_dim,
        "projector_output_dim": v.projector_output_dim,
        "multi_modal_projector_bias": v.multi_modal_projector_bias,
        "rope_parameters": {"rope_theta": v.rope_theta, "rope_type": "default"},
    }


def model_config_to_hf(c: ModelConfig, dtype: str = "bfloat16") -> dict:
    """The ``config.json`` transformers writes for this checkpoint (5.x layout)."""
    text = text_config_to_hf(c.text)
    if c.vision is None:
        return {"architectures": [TEXT_ARCH], **text, "dtype": dtype}
    return {
        "architectures": [MULTIMODAL_ARCH], "model_type": "llama4",
        "text_config": text, "vision_config": vision_config_to_hf(c.vision),
        "image_token_index": c.image_token_id, "boi_token_index": c.boi_token_id,
        "eoi_token_index": c.eoi_token_id, "tie_word_embeddings": c.text.tie_word_embeddings, "dtype": dtype,
    }
