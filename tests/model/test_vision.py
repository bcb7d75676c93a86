"""Vision tower: pixel shuffle index formula, 2-D RoPE table, patch order, encoder vs transformers.

Tolerances: index/ordering tests are exact (bitwise); the 2-D RoPE table is within 1e-6 of a float64
re-derivation; the whole encoder matches transformers' Llama4VisionModel to 1e-5 relative in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

import llama4
from llama4.checkpoint.hf_config import vision_config_from_hf
from llama4.checkpoint.mapping import from_hf_name
from llama4.config import VisionConfig
from llama4.model.vision import VisionEncoder, pixel_shuffle, vision_rope_angles
from llama4.presets import LLAMA4_VISION, text_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_vision(**kw) -> VisionConfig:
    fields = dict(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128, image_size=28, patch_size=7,
        num_channels=3, norm_eps=1e-5, vision_output_dim=48, pixel_shuffle_ratio=0.5, projector_input_dim=48,
        projector_output_dim=48, multi_modal_projector_bias=False, rope_theta=10000.0,
    )
    fields.update(kw)
    return VisionConfig(**fields)


def rope_cos_sin(config: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision rotary table under test as (cos, sin) [P + 1, head_dim / 2]."""
    cos, sin = vision_rope_angles(config)
    return cos, sin


# ----------------------------------------------------------------------------------------------------
# pixel shuffle
# ----------------------------------------------------------------------------------------------------


def _shuffle_by_formula(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sheet §6.5 generalised: out[n, i2*s' + j2, (di*k + dj)*C + c] = G[n, k*i2 + di, k*j2 + dj, c], k = 1/r."""
    n, patches, c = x.shape
    side = math.isqrt(patches)
    k = round(1 / ratio)
    s2 = side // k
    grid = x.reshape(n, side, side, c)
    out = torch.empty(n, s2 * s2, k * k * c, dtype=x.dtype)
    for i2 in range(s2):
        for j2 in range(s2):
            for di in range(k):
                for dj in range(k):
                    off = (di * k + dj) * c
                    out[:, i2 * s2 + j2, off:off + c] = grid[:, k * i2 + di, k * j2 + dj]
    return out


@pytest.mark.parametrize("side,channels,ratio", [(4, 3, 0.5), (6, 5, 0.5), (24, 8, 0.5), (8, 2, 0.25)])
def test_pixel_shuffle_matches_index_formula(side, channels, ratio):
    x = torch.arange(2 * side * side * channels, dtype=torch.float32).reshape(2, side * side, channels)
    got = pixel_shuffle(x, ratio)
    assert torch.equal(got, _shuffle_by_formula(x, ratio))  # exact: a pure permutation


def test_pixel_shuffle_sheet_example_released_sizes():
    """24x24 grid of 1408 channels -> 144 tokens of 5632; spot-check the sheet's formula on a few entries."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 576, 1408, generator=g)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (1, 144, 5632)
    grid = x.reshape(1, 24, 24, 1408)
    for i2, j2, di, dj, c in [(0, 0, 0, 0, 0), (0, 0, 1, 0, 5), (3, 7, 0, 1, 1407), (11, 11, 1, 1, 700)]:
        assert out[0, i2 * 12 + j2, di * 2816 + dj * 1408 + c] == grid[0, 2 * i2 + di, 2 * j2 + dj, c]


def test_pixel_shuffle_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_pixel_shuffle

    x = torch.randn(3, 64, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pixel_shuffle(x, 0.5), hf_pixel_shuffle(x, 0.5))


# ----------------------------------------------------------------------------------------------------
# 2-D rotary table
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [tiny_vision(), tiny_vision(hidden_size=48, num_heads=2, intermediate_size=192),
                                 LLAMA4_VISION], ids=["hd16", "hd24", "released"])
def test_vision_rope_table_against_float64(cfg):
    cos, sin = rope_cos_sin(cfg)
    side = cfg.patches_per_side
    half = cfg.hidden_size // cfg.num_heads // 2  # complex pairs per head (44 for the released model)
    n_freq = half // 2
    assert cos.shape == sin.shape == (side * side + 1, half)
    # CLS (last row) is the identity rotation.
    assert torch.equal(cos[-1], torch.ones(half)) and torch.equal(sin[-1], torch.zeros(half))
    f = [cfg.rope_theta ** (-2.0 * j / half) for j in range(n_freq)]
    expected = torch.zeros(side * side, half, dtype=torch.float64)
    for p in range(side * side):
        x, y = p % side, p // side
        for m in range(half):
            expected[p, m] = (x + 1) * f[m] if m < n_freq else (y + 1) * f[m - n_freq]
    # fp32 angles vs float64: |angle| <= side * 1, fp32 error <= ~3e-6 absolute after cos/sin.
    torch.testing.assert_close(cos[:-1].double(), expected.cos(), rtol=0, atol=5e-6)
    torch.testing.assert_close(sin[:-1].double(), expected.sin(), rtol=0, atol=5e-6)


def test_vision_rope_table_matches_transformers_freqs_ci():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    hf_cfg = transformers.Llama4VisionConfig(hidden_size=32, num_attention_heads=2, image_size=28, patch_size=7,
                                             intermediate_size=128, vision_output_dim=48)
    freqs_ci = Llama4VisionRotaryEmbedding._compute_freqs_ci(hf_cfg)[:, 0, :]  # [P + 1, half] complex64
    cos, sin = rope_cos_sin(tiny_vision())
    torch.testing.assert_close(cos, freqs_ci.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, freqs_ci.imag, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# patch order
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,size,patch", [(3, 28, 7), (3, 12, 4), (2, 10, 5)])
def test_patch_order_equals_unfold_then_permute(channels, size, patch):
    # ratio 1 (no shuffle) so that odd patch grids are valid configs; the patch order does not depend on it
    cfg = tiny_vision(image_size=size, patch_size=patch, num_channels=channels, pixel_shuffle_ratio=1.0,
                      intermediate_size=32)
    enc = llama4.build.build_meta(llama4.ModelConfig(text=_tiny_text(), vision=cfg)).vision
    pixels = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(2))
    got = enc.patches(pixels)
    unfold = torch.nn.Unfold(kernel_size=patch, stride=patch)(pixels).permute(0, 2, 1)  # what HF uses
    assert torch.equal(got, unfold)


# ----------------------------------------------------------------------------------------------------
# the whole encoder vs transformers
# ----------------------------------------------------------------------------------------------------


def _tiny_text(**kw):
    fields = dict(vocab_size=211, hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=12, intermediate_size=32,
                  intermediate_size_mlp=64, num_experts=4, attention_chunk_size=8, floor_scale=4,
                  rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    fields.update(kw)
    return text_config(num_layers=2, **fields)


@pytest.fixture(scope="module")
def hf_vision():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Llama4VisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
        intermediate_size=128, vision_output_dim=48, projector_input_dim=48, projector_output_dim=48,
        pixel_shuffle_ratio=0.5,
    )
    cfg._attn_implementation = "eager"
    model = transformers.Llama4VisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def test_vision_encoder_matches_transformers(hf_vision):
    cfg = vision_config_from_hf(hf_vision.config.to_dict())
    ours = VisionEncoder(cfg)
    state = {}
    for name, tensor in hf_vision.state_dict().items():
        mapped = from_hf_name("vision_model." + name, multimodal=True)
        assert mapped is not None and mapped.startswith("vision."), name
        state[mapped.removeprefix("vision.")] = tensor
    ours.load_state_dict(state, strict=True)
    ours.eval()
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf_vision(pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == ref.shape == (3, 4, 48)
    assert rel_err(got, ref) <= 1e-5
    # Tiles are independent: encoding one tile alone gives the same rows (no cross-tile attention).
    with torch.no_grad():
        single = ours(pixels[1:2])
    assert rel_err(single[0], got[1]) <= 1e-6


def test_vision_encoder_rejects_wrong_tile_shape():
    enc = llama4.random_model(llama4.ModelConfig(text=_tiny_text(), vision=tiny_vision())).vision
    with pytest.raises(ValueError, match="pixel_values"):
        enc(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="pixel_values"):
        enc(torch.zeros(3, 28, 28))


# ----------------------------------------------------------------------------------------------------
# image features in the text model: error paths
# ----------------------------------------------------------------------------------------------------


def test_text_only_model_rejects_pixel_values():
    model = llama4.random_model(llama4.ModelConfig(text=_tiny_text()))
    ids = torch.tensor([[1, 5, 200, 200, 200, 200, 7]])
    with pytest.raises(ValueError, match="text-only"):
        model(ids, pixel_values=torch.zeros(1, 3, 28, 28))


@pytest.mark.parametrize("num_image_tokens,tiles", [(3, 1), (5, 1), (4, 2), (0, 1)])
def test_image_token_count_must_match_tiles(num_image_tokens, tiles):
    model = llama4.random_model(llama4.ModelConfig(text=_tiny_text(), vision=tiny_vision(), image_token_id=200))
    ids = torch.tensor([[1] + [200] * num_image_tokens + [7]])
    pixels = torch.randn(tiles, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixel_values=pixels)


def test_image_features_replace_exactly_the_image_tokens():
    model = llama4.random_model(llama4.ModelConfig(text=_tiny_text(), vision=tiny_vision(), image_token_id=200),
                                std=0.2)
    ids = torch.tensor([[1, 9, 200, 200, 200, 200, 7, 8]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = model.embed(ids, pixels)
        plain = model.embed(ids)
        feats = model.projector(model.vision(pixels).flatten(0, 1))
    slots = ids[0] == 200
    assert torch.equal(h[0, ~slots], plain[0, ~slots])
    assert torch.equal(h[0, slots], feats)
