"""The Llama 4 decoder, top to bottom: attention, feed-forward, block, text model, multimodal model.

Every layer is pre-norm: h += attention(rms_norm(h)); h += ffn(rms_norm(h)). Three of every four
layers (RoPE layers) rotate q/k, optionally RMS-normalise them, and attend within their chunk; the
fourth (NoPE layers) has no position embedding, attends to the whole causal prefix and scales its
queries with the log of the sequence index (temperature tuning). Feed-forwards are MoE or dense SwiGLU
per the config's schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.config import LayerSpec, ModelConfig, TextConfig
from llama4.model.cache import KVCache
from llama4.model.moe import MoE, SwiGLU
from llama4.model.ops import (
    apply_rope,
    batch_invariant,
    bucketed_decode_attention,
    causal_attention,
    chunked_causal_attention,
    ragged_decode_attention,
    rowwise_causal_attention,
    rms_norm,
    row_tiled,
    rope_table,
    rope_inv_freq,
    temperature_scale,
)


@dataclass(frozen=True)
class PositionTables:
    """What every layer needs about the positions of one forward, computed once for all layers.

    ``rope`` [B or 1, T, head_dim/2]: RoPE layers' rotations; ``q_scale`` [B, T, 1, 1] float32 or None: NoPE
    layers' query temperature (None when no layer tunes it); ``starts``: row b's first sequence index.
    """

    rope: torch.Tensor
    q_scale: torch.Tensor | None
    starts: list[int]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class QKVProjection(nn.Module):
    """The query, key and value projections of x (three bias-free linears; fused by CPU packing)."""

    def __init__(self, dim: int, q_dim: int, kv_dim: int):
        super().__init__()
        self.wq = nn.Linear(dim, q_dim, bias=False)
        self.wk = nn.Linear(dim, kv_dim, bias=False)
        self.wv = nn.Linear(dim, kv_dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return row_tiled(self.wq, x), row_tiled(self.wk, x), row_tiled(self.wv, x)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.chunk = config.attention_chunk_size
        self.eps = config.rms_norm_eps
        self.qkv = QKVProjection(config.hidden_size, config.num_heads * config.head_dim,
                                 config.num_kv_heads * config.head_dim)
        self.wo = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, tables: PositionTables, cache: KVCache | None) -> torch.Tensor:
        """x [B, T, D]; row b holds sequence indices starts[b]..starts[b]+T-1 -> [B, T, D]."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.spec.use_rope or self.spec.qk_norm:  # per head and position: q and k heads in one pass
            qk = torch.cat((q, k), dim=-1).view(b, t, self.num_heads + self.num_kv_heads, self.head_dim)
            if self.spec.use_rope:
                qk = apply_rope(qk, tables.rope)
            if self.spec.qk_norm:
                qk = rms_norm(qk, None, self.eps)
            q, k = qk.split((self.num_heads, self.num_kv_heads), dim=2)
        else:
            q = q.view(b, t, self.num_heads, self.head_dim)
            k = k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.spec.temperature_tuning:
            q = (q * tables.q_scale).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        k_start, valid = tables.starts[0], None
        if cache is not None:
            k, v, k_start, valid = cache.update(self.spec.index, k, v)
        invariant = batch_invariant() and x.is_cpu
        if valid is not None and invariant:  # one token per row at different lengths, in key buckets
            out = bucketed_decode_attention(q, k, v, valid)
        elif valid is not None:  # each row exactly as its solo step, one call per length
            out = ragged_decode_attention(q, k, v, valid)
        elif invariant:  # each token exactly as its own decode step (bucketed)
            window = self.chunk if self.spec.chunked else None
            out = rowwise_causal_attention(q, k, v, tables.starts[0], k_start, window)
        elif self.spec.chunked:
            out = chunked_causal_attention(q, k, v, tables.starts[0], k_start, self.chunk)
        else:
            out = causal_attention(q, k, v)
        return row_tiled(self.wo, out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, spec: LayerSpec):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, spec)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if spec.moe:
            self.ffn: nn.Module = MoE(config.hidden_size, config.intermediate_size, config.num_experts,
                                      config.num_experts_per_tok)
        else:
            self.ffn = SwiGLU(config.hidden_size, config.intermediate_size_mlp)

    def forward(self, h: torch.Tensor, tables: PositionTables, cache: KVCache | None) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), tables, cache)
        return h + self.ffn(self.ffn_norm(h))


class TextModel(nn.Module):
    """Token embeddings, decoder layers, final norm and the output projection (LM head)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec) for spec in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        with torch.device("cpu"):  # a small table, exact in float32 even when the model is built on "meta"
            inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.tunes_temperature = any(spec.temperature_tuning for spec in config.layers)
        # An optional specialised implementation of the layers for passes with a cache (decode steps, and
        # prefill pieces where they must compute what decode steps compute), installed from outside the model
        # (cpu_packing); it returns None for inputs it does not take. The layers are its reference.
        self.fast_decode: Callable[[torch.Tensor, PositionTables, KVCache], torch.Tensor | None] | None = None

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                num_logits: int | None = None) -> torch.Tensor:
        """h [B, T, D] input embeddings at RoPE positions [B or 1, T] -> logits [B, T', vocab] float32.

        Row b continues its sequence at ``cache.lengths[b]`` (0 without a cache). ``num_logits`` keeps
        only the last that many positions for the output projection (None: all).
        """
        tables = self.position_tables(h, positions, cache)
        fast = None
        if self.fast_decode is not None and cache is not None:
            fast = self.fast_decode(h, tables, cache)
        if fast is not None:
            h = fast
        else:
            for layer in self.layers:
                h = layer(h, tables, cache)
        if cache is not None:
            cache.advance(h.shape[1])
        if num_logits is not None:
            h = h[:, h.shape[1] - num_logits:]
        h = self.norm(h)
        head = (lambda rows: F.linear(rows, self.embed.weight)) if self.output is None else self.output
        logits = row_tiled(head, h)
        return logits.float()

    def position_tables(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> PositionTables:
        b, t = h.shape[:2]
        starts = cache.starts(b) if cache is not None else [0] * b
        rope = rope_table(positions.to(h.device), self.inv_freq.to(h.device))
        q_scale = None
        if self.tunes_temperature:
            index = torch.tensor(starts, device=h.device)[:, None] + torch.arange(t, device=h.device)
            q_scale = temperature_scale(index, self.config.floor_scale, self.config.attn_scale)[:, :, None, None]
        return PositionTables(rope, q_scale, starts)


class Llama4Model(nn.Module):
    """The whole checkpoint: text decoder and, for multimodal configs, the vision tower + projector."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text = TextModel(config.text)
        self.vision = None
        self.projector = None
        if config.vision is not None:
            from llama4.model.vision import VisionEncoder  # multimodal checkpoints only

            self.vision = VisionEncoder(config.vision)
            self.projector = nn.Linear(config.vision.vision_output_dim, config.text.hidden_size,
                                       bias=config.vision.multi_modal_projector_bias)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, D]; image features replace the image placeholder tokens in order."""
        h = self.text.embed(input_ids)
        if pixel_values is None:
            return h
        if self.vision is None:
            raise ValueError("this checkpoint is text-only (no vision_config): it cannot take pixel_values")
        slots = input_ids == self.config.image_token_id
        features = self.projector(self.vision(pixel_values.to(h.dtype)).flatten(0, 1))  # [tiles * tokens, D]
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(
                f"the prompt has {int(slots.sum())} image tokens (id {self.config.image_token_id}) but the "
                f"{pixel_values.shape[0]} image tile(s) give {features.shape[0]} features"
            )
        return h.masked_scatter(slots[..., None], features.to(h.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                pixel_values: torch.Tensor | None = None, num_logits: int | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] float32 (the last ``num_logits`` positions if given).

        Positions default to the sequence indices (each row's cache length + arange(T)).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        vocab = self.config.text.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}), got min {int(input_ids.min())} max {int(input_ids.max())}")
        if positions is None:
            b, t = input_ids.shape
            starts = cache.starts(b) if cache is not None else [0]
            positions = torch.tensor(starts, device=input_ids.device)[:, None] + torch.arange(t, device=input_ids.device)
        elif positions.dim() == 1:
            positions = positions[None]
        h = self.embed(input_ids, pixel_values)
        return self.text(h, positions, cache, num_logits)
