"""Named model shapes: the released Scout and Maverick, Behemoth (announced figures only), bench sizes.

Scout and Maverick follow the published config.json files (reference sheet section 2). Behemoth has
no published config: only "~2T total, 288B active, 16 experts" was announced, so every other figure in
its preset is an ASSUMPTION chosen to land near those totals with the Scout layer pattern.
"""

from __future__ import annotations

from dataclasses import replace

from llama4.config import (
    ConfigError,
    ModelConfig,
    RopeScaling,
    TextConfig,
    VisionConfig,
    default_moe_layers,
    default_no_rope_layers,
)

LLAMA4_VISION = VisionConfig(
    hidden_size=1408, num_layers=34, num_heads=16, intermediate_size=5632, image_size=336, patch_size=14,
    num_channels=3, norm_eps=1e-5, vision_output_dim=4096, pixel_shuffle_ratio=0.5, projector_input_dim=4096,
    projector_output_dim=4096, multi_modal_projector_bias=False, rope_theta=10000.0,
)


def text_config(num_layers: int = 48, moe_step: int = 1, **fields) -> TextConfig:
    """A TextConfig with Scout's values for every field not given; schedules derived as HF does."""
    no_rope = fields.pop("no_rope_layers", default_no_rope_layers(num_layers, 4))
    base = dict(
        vocab_size=202048, hidden_size=5120, num_heads=40, num_kv_heads=8, head_dim=128,
        intermediate_size=8192, intermediate_size_mlp=16384, num_experts=16, num_experts_per_tok=1,
        moe_layers=default_moe_layers(num_layers, moe_step), no_rope_layers=no_rope,
        chunked_layers=tuple(bool(r) for r in no_rope), attention_chunk_size=8192, use_qk_norm=True,
        attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, rope_theta=500000.0,
        rope_scaling=None, rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=200000, eos_token_ids=(200001, 200007, 200008), pad_token_id=200018,
    )
    base.update(fields)
    return TextConfig(num_layers=num_layers, **base)


SCOUT = ModelConfig(
    text=text_config(
        rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=10485760,
    ),
    vision=LLAMA4_VISION,
)

MAVERICK = ModelConfig(
    text=text_config(moe_step=2, num_experts=128, use_qk_norm=False, max_position_embeddings=1048576),
    vision=LLAMA4_VISION,
)

# ASSUMED (not published): width 16384, 128 heads of 128 with 8 KV heads, 104 layers, experts of width
# 22528, Scout's schedule. Only the expert count (16), top-1 routing and the ~2T / ~288B totals are
# Meta's announced figures.
BEHEMOTH = ModelConfig(
    text=text_config(
        num_layers=104, hidden_size=16384, num_heads=128, num_kv_heads=8, head_dim=128,
        intermediate_size=22528, intermediate_size_mlp=45056,
        rope_scaling=SCOUT.text.rope_scaling,
    ),
    vision=LLAMA4_VISION,
)

# The benchmark shapes in shared/bench/ (miniature Scouts, text only).
_BENCH_COMMON = dict(vocab_size=32000, attention_chunk_size=1024, bos_token_id=1, eos_token_ids=(2,),
                     pad_token_id=0)
TINY = ModelConfig(text=text_config(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                                    intermediate_size=256, intermediate_size_mlp=512, **_BENCH_COMMON))
SMALL = ModelConfig(text=text_config(num_layers=8, hidden_size=1024, num_heads=8, num_kv_heads=2, head_dim=128,
                                     intermediate_size=1024, intermediate_size_mlp=2048, **_BENCH_COMMON))

PRESETS: dict[str, ModelConfig] = {
    "scout": SCOUT, "maverick": MAVERICK, "behemoth": BEHEMOTH, "tiny": TINY, "small": SMALL,
}
ASSUMED_PRESETS = frozenset({"behemoth"})


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def text_only(config: ModelConfig) -> ModelConfig:
    return replace(config, vision=None)
