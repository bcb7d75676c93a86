"""Parameter counts, weight memory and the layer schedule of a model, computed on the meta device."""

from __future__ import annotations

import os
from pathlib import Path

from llama4.build import build_meta
from llama4.checkpoint.io import read_config
from llama4.config import ModelConfig
from llama4.presets import ASSUMED_PRESETS, PRESETS, preset

# Bytes per parameter of the weight formats `info` reports (weights only: no quantisation scales).
WEIGHT_FORMATS = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}


KV_DTYPES = {"bf16": 2, "fp32": 4}


def kv_cache_bytes(config: ModelConfig, context: int, bytes_per_value: int = 2, batch: int = 1,
                   block_size: int = 256) -> dict:
    """KV cache memory of :class:`~llama4.model.cache.KVCache` after decoding ``context`` tokens.

    Global (NoPE) layers hold every token, rounded up to the allocation block; chunked layers hold at
    most one chunk, so their part stops growing at ``attention_chunk_size`` tokens.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    text = config.text
    per_entry = 2 * text.num_kv_heads * text.head_dim * bytes_per_value * batch  # keys and values

    def blocks(n: int) -> int:
        return -(-n // block_size) * block_size

    global_entries = len(text.global_layers) * blocks(context)
    local_entries = len(text.local_layers) * min(blocks(min(context, text.attention_chunk_size)),
                                                 text.attention_chunk_size)
    return {
        "context": context,
        "global_bytes": global_entries * per_entry,
        "local_bytes": local_entries * per_entry,
        "total_bytes": (global_entries + local_entries) * per_entry,
        "bytes_per_token_global": len(text.global_layers) * per_entry,
    }


def resolve_config(name_or_path: str | os.PathLike | ModelConfig) -> tuple[ModelConfig, str]:
    if isinstance(name_or_path, ModelConfig):
        return name_or_path, "config"
    text = str(name_or_path)
    if text.lower() in PRESETS and not Path(text).exists():
        return preset(text), f"preset {text.lower()}"
    return read_config(text), text


def model_info(name_or_path: str | os.PathLike | ModelConfig) -> dict:
    """Counts for a preset name, a checkpoint directory or a config.

    ``active_params`` follows Meta's "17B active" definition: text parameters (embedding and LM head
    included) minus the routed experts a token does not use.
    """
    config, source = resolve_config(name_or_path)
    model = build_meta(config)
    text_cfg = config.text
    counts = {"text": 0, "vision": 0, "projector": 0, "routed_experts": 0, "embedding": 0}
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        counts[part] += p.numel()
        if ".experts." in name:
            counts["routed_experts"] += p.numel()
        if name.startswith("text.embed."):
            counts["embedding"] += p.numel()
    unused_share = ((text_cfg.num_experts - text_cfg.num_experts_per_tok) / text_cfg.num_experts
                    if text_cfg.num_experts else 0.0)
    active = counts["text"] - round(counts["routed_experts"] * unused_share)
    total = counts["text"] + counts["vision"] + counts["projector"]
    return {
        "source": source,
        "assumed": str(name_or_path).lower() in ASSUMED_PRESETS,
        "total_params": total,
        "text_params": counts["text"],
        "vision_params": counts["vision"] + counts["projector"],
        "active_params": active,
        "active_params_with_vision": active + counts["vision"] + counts["projector"],
        "routed_expert_params": counts["routed_experts"],
        "embedding_params": counts["embedding"],
        "weight_bytes": {fmt: int(total * b) for fmt, b in WEIGHT_FORMATS.items()},
        "layers": [
            {"index": s.index, "attention": "chunked" if s.chunked else "global", "rope": s.use_rope,
             "qk_norm": s.qk_norm, "temperature_tuning": s.temperature_tuning, "ffn": "moe" if s.moe else "dense"}
            for s in text_cfg.layers
        ],
        "num_experts": text_cfg.num_experts,
        "experts_per_token": text_cfg.num_experts_per_tok,
        "attention_chunk_size": text_cfg.attention_chunk_size,
        "multimodal": config.multimodal,
    }
