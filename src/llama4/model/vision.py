"""Vision tower: unfold patch embedding, 2-D RoPE ViT, pixel shuffle and the adapter MLP.

One tile [3, S, S] becomes (S/p)^2 patch tokens plus a class token appended *last*; after the encoder
the class token is dropped and a pixel shuffle folds each 2x2 block of patches into one token
(576 patches -> 144 tokens for the released models). The multimodal projector that maps these to the
text width lives on the top-level model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.config import VisionConfig


def vision_rope_angles(config: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P + 1, head_dim / 2] float32 of the 2-D rotary table; the last row (class token) is 0.

    Pair m < head_dim/4 rotates by (x + 1) * f_m, the rest by (y + 1) * f_(m - head_dim/4), where x, y
    are the patch's column and row and f_j = theta^(-2j / (head_dim / 2)).
    """
    side = config.patches_per_side
    half = config.hidden_size // config.num_heads // 2  # complex pairs per head
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    index = torch.arange(side * side)
    x, y = (index % side + 1).float(), (index // side + 1).float()
    angles = torch.cat((x[:, None] * freqs, y[:, None] * freqs), dim=-1)  # [P, half]
    angles = torch.cat((angles, torch.zeros(1, half)))  # class token: identity rotation
    return torch.cos(angles), torch.sin(angles)


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [N, P + 1, H, d] by cos/sin [P + 1, d/2], in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    real, imag = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((real * c - imag * s, real * s + imag * c), dim=-1).flatten(-2).type_as(x)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, side*side, C] -> [N, (side*r)^2, C / r^2]:
    out[t = i*s' + j, (di*k + dj)*C + c] = in[(i*k + di), (j*k + dj), c] for k = 1/r, as transformers and
    Meta realise it (two reshape-transposes)."""
    n, patches, channels = x.shape
    side = int(patches ** 0.5)
    x = x.reshape(n, side, int(side * ratio), int(channels / ratio))
    x = x.transpose(1, 2).reshape(n, int(side * ratio), int(side * ratio), int(channels / ratio ** 2))
    return x.transpose(1, 2).reshape(n, -1, int(channels / ratio ** 2))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.wq = nn.Linear(config.hidden_size, config.hidden_size)
        self.wk = nn.Linear(config.hidden_size, config.hidden_size)
        self.wv = nn.Linear(config.hidden_size, config.hidden_size)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q = apply_vision_rope(self.wq(x).view(n, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_vision_rope(self.wk(x).view(n, t, self.num_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(n, t, self.num_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # no mask
        return self.wo(out.transpose(1, 2).reshape(n, t, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = VisionAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


class VisionAdapter(nn.Module):
    """GELU after both layers (fc1: shuffled width -> projector_input_dim, fc2: -> projector_output_dim)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        shuffled = int(config.hidden_size / config.pixel_shuffle_ratio ** 2)
        self.fc1 = nn.Linear(shuffled, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_input_dim, config.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        patch_dim = config.num_channels * config.patch_size ** 2
        num_positions = config.patches_per_side ** 2 + 1
        self.patch_embed = nn.Linear(patch_dim, config.hidden_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.pos_embedding = nn.Parameter(torch.empty(num_positions, config.hidden_size))
        self.norm_pre = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_layers))
        self.norm_post = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.adapter = VisionAdapter(config)
        with torch.device("cpu"):
            cos, sin = vision_rope_angles(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C, S, S] -> [N, (S/p)^2, C*p*p], patches row-major, each ordered (channel, row, column)."""
        n, c, s, _ = pixels.shape
        p, g = self.config.patch_size, s // self.config.patch_size
        return pixels.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles [N, C, S, S] -> image tokens [N, tokens_per_tile, projector_output_dim]."""
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [tiles, {', '.join(map(str, expected))}], "
                             f"got {tuple(pixels.shape)}")
        h = self.patch_embed(self.patches(pixels))
        h = torch.cat((h, self.class_embedding.expand(h.shape[0], 1, -1)), dim=1) + self.pos_embedding
        h = self.norm_pre(h)
        cos, sin = self.rope_cos.to(h.device), self.rope_sin.to(h.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm_post(h)[:, :-1]  # drop the class token
        return self.adapter(pixel_shuffle(h, cfg.pixel_shuffle_ratio))
