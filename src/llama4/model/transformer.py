"""The Llama 4 decoder, top to bottom: attention, feed-forward, block, text model, multimodal model.

Every layer is pre-norm: h += attention(rms_norm(h)); h += ffn(rms_norm(h)). Three of every four
layers (RoPE layers) rotate q/k, optionally RMS-normalise them, and attend within their chunk; the
fourth (NoPE layers) has no position embedding, attends to the whole causal prefix and scales its
queries with the log of the sequence index (temperature tuning). Feed-forwards are MoE or dense SwiGLU
per the config's schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.config import LayerSpec, ModelConfig, TextConfig
from llama4.model.cache import Cache
from llama4.model.invariance import row_tiled, set_batch_invariant
from llama4.model.moe import MoE, SwiGLU
from llama4.model.ops import (
    apply_rope,
    batch_invariant_attention,
    reference_attention,
    rms_norm,
    rope_inv_freq,
    rope_table,
    temperature_scale,
)


def check_token_ids(ids: torch.Tensor | Iterable[int], vocab: int, what: str = "token ids") -> None:
    """Raises ValueError naming the first few ids outside [0, vocab) (the one check of every caller)."""
    if isinstance(ids, torch.Tensor):
        if ids.numel() > 64:  # (a few ids, a decode step's, are cheaper checked as a list)
            if int(ids.min()) >= 0 and int(ids.max()) < vocab:
                return
        ids = ids.flatten().tolist()
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{what} must be in [0, {vocab}), got {bad[:5]}")


@dataclass(frozen=True)
class PositionTables:
    """What every layer needs about the positions of one forward, computed once for all layers.

    ``rope`` [B or 1, T, head_dim/2]: RoPE layers' rotations; ``q_scale`` [B, T, 1, 1] float32 or None: NoPE
    layers' query temperature (None when no layer tunes it); ``starts``: row b's first sequence index.
    """

    rope: torch.Tensor
    q_scale: torch.Tensor | None
    starts: list[int]


class IndexedTables:
    """``rope_table`` and ``temperature_scale`` precomputed for indices 0..size-1 and looked up per forward, as
    Meta's reference keeps ``freqs_cis``: a decode step then costs two lookups instead of the formulas' dozen
    small ops. The tables are the formulas applied to an arange (elementwise, so a lookup gives the same values
    as the formula at that index); they grow by doubling up to ``limit`` indices and are rebuilt for another
    device or ``inv_freq`` tensor; indices outside them take the formulas."""

    def __init__(self, floor_scale: float, attn_scale: float, limit: int = 16384):
        self.floor_scale, self.attn_scale, self.limit = floor_scale, attn_scale, limit
        self.size, self.key, self.rope, self.q_scale = 0, None, None, None

    def rotations(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """rope_table(positions, inv_freq) on positions' device."""
        if positions.numel() <= 64:  # (a decode step's: cheaper read as a list than reduced)
            values = positions.flatten().tolist() or [0]
            low, high = min(values), max(values)
        else:
            low, high = (int(v) for v in torch.aminmax(positions))
        if low < 0 or not self._cover(high, inv_freq, positions.device):
            return rope_table(positions, inv_freq.to(positions.device))
        return self.rope[positions]

    def temperatures(self, starts: list[int], t: int, inv_freq: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Query scales [B, T] of sequence indices starts[b] + 0..t-1 (every start >= 0)."""
        index = torch.tensor(starts, device=device)[:, None]
        if t > 1:
            index = index + torch.arange(t, device=device)
        if not self._cover(max(starts) + t - 1, inv_freq, device):
            return temperature_scale(index, self.floor_scale, self.attn_scale)
        return self.q_scale[index]

    def _cover(self, high: int, inv_freq: torch.Tensor, device: torch.device) -> bool:
        """Whether the tables (grown or rebuilt where allowed) hold index ``high`` for ``inv_freq`` on ``device``."""
        same = self.key is not None and self.key[0] is inv_freq and self.key[1] == device
        if same and high < self.size:
            return True
        if high >= self.limit:
            return False
        self.size = max(self.size if same else 0, min(self.limit, max(1024, 2 << high.bit_length())))
        self.key = (inv_freq, device)
        index = torch.arange(self.size, device=device)
        self.rope = rope_table(index, inv_freq.to(device))
        self.q_scale = temperature_scale(index, self.floor_scale, self.attn_scale)
        return True


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
        self.batch_invariant = False
        self.wq = nn.Linear(dim, q_dim, bias=False)
        self.wk = nn.Linear(dim, kv_dim, bias=False)
        self.wv = nn.Linear(dim, kv_dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tiled = self.batch_invariant
        return row_tiled(self.wq, x, tiled), row_tiled(self.wk, x, tiled), row_tiled(self.wv, x, tiled)


class Attention(nn.Module):
    """Self-attention of one layer. ``batch_invariant`` picks the backend: ``reference_attention`` (the
    fastest exact path for each pass) or ``batch_invariant_attention`` (every query as its own decode step
    computes it, see model.invariance); a model with a fast decode step (kernels) bypasses both."""

    def __init__(self, config: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.batch_invariant = False
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.chunk = config.attention_chunk_size
        self.eps = config.rms_norm_eps
        self.qkv = QKVProjection(config.hidden_size, config.num_heads * config.head_dim,
                                 config.num_kv_heads * config.head_dim)
        self.wo = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, tables: PositionTables, cache: Cache | None) -> torch.Tensor:
        """x [B, T, D]; row b holds sequence indices starts[b]..starts[b]+T-1 -> [B, T, D]."""
        b, t, _ = x.shape
        q, k, v = self.heads(x, tables)
        invariant = self.batch_invariant and x.is_cpu
        k_start, valid = tables.starts[0], None
        if cache is not None:
            view = cache.update(self.spec.index, k, v, bucketed=invariant)
            k, v, k_start, valid = view.keys, view.values, view.start, view.valid
        attend = batch_invariant_attention if invariant else reference_attention
        out = attend(q, k, v, tables.starts[0], k_start, valid, self.chunk if self.spec.chunked else None)
        return row_tiled(self.wo, out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), invariant)

    def heads(self, x: torch.Tensor, tables: PositionTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query, key and value heads of x [B, T, D], each [B, heads, T, d]: projected, then RoPE, QK-norm
        and the temperature where this layer applies them."""
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
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


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

    def forward(self, h: torch.Tensor, tables: PositionTables, cache: Cache | None) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), tables, cache)
        return h + self.ffn(self.ffn_norm(h))


class TextModel(nn.Module):
    """Token embeddings, decoder layers, final norm and the output projection (LM head)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.batch_invariant = False
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec) for spec in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = (None if config.tie_word_embeddings
                       else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        with torch.device("cpu"):  # a small table, exact in float32 even when the model is built on "meta"
            inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.tunes_temperature = any(spec.temperature_tuning for spec in config.layers)
        self.indexed_tables = IndexedTables(config.floor_scale, config.attn_scale)
        # An optional specialised implementation of the layers for passes with a cache (decode steps, and
        # prefill pieces where they must compute what decode steps compute), installed from outside the model
        # (kernels); it returns None for inputs it does not take. The layers are its reference.
        self.fast_decode: Callable[[torch.Tensor, PositionTables, Cache], torch.Tensor | None] | None = None

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: Cache | None = None,
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
        logits = row_tiled(head, h, self.batch_invariant)
        return logits.float()

    def position_tables(self, h: torch.Tensor, positions: torch.Tensor, cache: Cache | None) -> PositionTables:
        b, t = h.shape[:2]
        starts = cache.starts(b) if cache is not None else [0] * b
        rope = self.indexed_tables.rotations(positions.to(h.device), self.inv_freq)
        q_scale = None
        if self.tunes_temperature:
            q_scale = self.indexed_tables.temperatures(starts, t, self.inv_freq, h.device)[:, :, None, None]
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

    def set_batch_invariant(self, enabled: bool) -> None:
        """Products in fixed row tiles and per-query attention (on) or the fastest paths (off, the default):
        with it on, a row's logits equal its solo, unsplit run bit for bit (see model.invariance)."""
        set_batch_invariant(self, enabled)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
                pixel_values: torch.Tensor | None = None, num_logits: int | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] float32 (the last ``num_logits`` positions if given).

        Positions default to the sequence indices (each row's cache length + arange(T)).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        check_token_ids(input_ids, self.config.text.vocab_size)
        if positions is None:
            b, t = input_ids.shape
            starts = cache.starts(b) if cache is not None else [0]
            positions = torch.tensor(starts, device=input_ids.device)[:, None]
            if t > 1:
                positions = positions + torch.arange(t, device=input_ids.device)
        elif positions.dim() == 1:
            positions = positions[None]
        h = self.embed(input_ids, pixel_values)
        return self.text(h, positions, cache, num_logits)


def text_decoder(model: nn.Module, purpose: str) -> tuple[TextModel, str]:
    """The text decoder of a Llama4Model (parameter names under ``text.``) or a bare TextModel (no prefix), for
    transforms applied from outside (quantization, LoRA); anything else is refused, naming ``purpose``."""
    if isinstance(model, Llama4Model):
        return model.text, "text."
    if isinstance(model, TextModel):
        return model, ""
    raise TypeError(f"{purpose} takes a Llama4Model or TextModel, got {type(model).__name__}")

