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
    unused_share = (text_cfg.num_experts - text_cfg.num_experts_per_tok) / text_cfg.num_experts if text_cfg.num_experts else 0.0
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
