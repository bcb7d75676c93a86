"""Frozen descriptions of a Llama 4 checkpoint and its per-layer schedule.

A config says what the checkpoint *is* (shapes, schedules, token ids) and nothing about how it is run:
no batch size, device or parallel degree. Translation from and to Hugging Face ``config.json`` lives in
:mod:`llama4.checkpoint.hf_config`; presets are in :mod:`llama4.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config field that is missing, unknown, inconsistent or not supported."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3-style frequency scaling (Scout uses factor 16, low 1, high 1, original 8192)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.low_freq_factor <= 0 or self.high_freq_factor <= 0:
            raise ConfigError(
                "rope scaling low_freq_factor and high_freq_factor must be > 0, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.high_freq_factor < self.low_freq_factor:
            raise ConfigError(
                f"rope scaling high_freq_factor ({self.high_freq_factor}) must be >= "
                f"low_freq_factor ({self.low_freq_factor})"
            )


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer does, computed once from the config's lists."""

    index: int
    use_rope: bool  # RoPE layer; NoPE layers get no position embedding
    chunked: bool  # chunk-local causal attention; otherwise full causal
    qk_norm: bool  # weightless RMS norm of q and k after RoPE
    temperature_tuning: bool  # query scaling with log of the cache index (NoPE layers)
    moe: bool  # routed experts + shared expert; otherwise dense SwiGLU


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # width of each routed expert and of the shared expert
    intermediate_size_mlp: int  # width of dense (non-MoE) feed-forward layers
    num_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    no_rope_layers: tuple[int, ...]  # 1 = RoPE layer, 0 = NoPE layer (HF's naming)
    chunked_layers: tuple[bool, ...]  # from HF layer_types: True = "chunked_attention"
    attention_chunk_size: int
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: int
    attn_scale: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    layers: tuple[LayerSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()
        layers = tuple(
            LayerSpec(
                index=i,
                use_rope=bool(self.no_rope_layers[i]),
                chunked=self.chunked_layers[i],
                qk_norm=self.use_qk_norm and bool(self.no_rope_layers[i]),
                temperature_tuning=self.attn_temperature_tuning and not self.no_rope_layers[i],
                moe=i in self.moe_layers,
            )
            for i in range(self.num_layers)
        )
        object.__setattr__(self, "layers", layers)

    def _validate(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "attention_chunk_size", "floor_scale",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.moe_layers:
            if self.num_experts < 1:
                raise ConfigError(f"num_local_experts must be >= 1 when there are MoE layers, got {self.num_experts}")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok must be in [1, num_local_experts={self.num_experts}], "
                    f"got {self.num_experts_per_tok}"
                )
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"moe_layers has indices outside [0, {self.num_layers}): {bad}")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise ConfigError(f"moe_layers has duplicate indices: {list(self.moe_layers)}")
        if len(self.no_rope_layers) != self.num_layers or len(self.chunked_layers) != self.num_layers:
            raise ConfigError(
                f"per-layer lists must have num_hidden_layers={self.num_layers} entries, got "
                f"no_rope_layers={len(self.no_rope_layers)}, layer_types={len(self.chunked_layers)}"
            )
        if any(v not in (0, 1) for v in self.no_rope_layers):
            raise ConfigError(f"no_rope_layers entries must be 0 or 1, got {list(self.no_rope_layers)}")

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def global_layers(self) -> tuple[int, ...]:
        """Layers with full (unchunked) attention; their KV cache grows with the context."""
        return tuple(s.index for s in self.layers if not s.chunked)

    @property
    def local_layers(self) -> tuple[int, ...]:
        """Layers with chunk-local attention; their KV cache never exceeds one chunk."""
        return tuple(s.index for s in self.layers if s.chunked)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int
    norm_eps: float
    vision_output_dim: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    multi_modal_projector_bias: bool
    rope_theta: float

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size ({self.hidden_size}) must divide by "
                              f"num_attention_heads ({self.num_heads})")
        side = self.image_size // self.patch_size
        scaled = side * self.pixel_shuffle_ratio
        if scaled != int(scaled) or int(scaled) == 0:
            raise ConfigError(
                f"pixel_shuffle_ratio {self.pixel_shuffle_ratio} does not divide the {side}x{side} patch grid"
            )
        shuffled = self.hidden_size / self.pixel_shuffle_ratio ** 2
        # The released architecture wires these widths together (transformers sizes the adapter's fc1 by
        # intermediate_size and the projector by vision_output_dim); other values cannot be loaded.
        if self.intermediate_size != shuffled:
            raise ConfigError(
                f"vision intermediate_size ({self.intermediate_size}) must equal hidden_size / "
                f"pixel_shuffle_ratio^2 ({shuffled:g}): it is also the adapter's input width"
            )
        if not self.projector_input_dim == self.projector_output_dim == self.vision_output_dim:
            raise ConfigError(
                "vision projector_input_dim, projector_output_dim and vision_output_dim must be equal, got "
                f"{self.projector_input_dim}, {self.projector_output_dim}, {self.vision_output_dim}"
            )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one tile becomes after pixel shuffle (144 for the released models)."""
        side = int(self.patches_per_side * self.pixel_shuffle_ratio)
        return side * side


@dataclass(frozen=True)
class ModelConfig:
    """The whole checkpoint: the text decoder and, for multimodal checkpoints, the vision tower."""

    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int = 200092
    boi_token_id: int = 200080
    eoi_token_id: int = 200081

    @property
    def multimodal(self) -> bool:
        return self.vision is not None


def default_no_rope_layers(num_layers: int, interval: int) -> tuple[int, ...]:
    """HF's default schedule: every ``interval``-th layer (3, 7, 11, ... for 4) is a NoPE layer."""
    if interval <= 0:
        raise ConfigError(f"no_rope_layer_interval must be > 0, got {interval}")
    return tuple(int((i + 1) % interval != 0) for i in range(num_layers))


def default_moe_layers(num_layers: int, step: int) -> tuple[int, ...]:
    """HF's default: MoE on layers step-1, 2*step-1, ... (all layers for step 1, odd layers for step 2)."""
    if step <= 0:
        raise ConfigError(f"interleave_moe_layer_step must be > 0, got {step}")
    return tuple(range(step - 1, num_layers, step))
