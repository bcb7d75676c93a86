"""Our multimodal model against transformers' Llama4ForConditionalGeneration (fp32, 1e-5 relative).

A tiny random config: vision hidden 32, 2 layers, 2 heads, 28x28 tiles of 7x7 patches (16 patches),
pixel shuffle 0.5 -> 4 image tokens per tile; the text side is SCOUT_LIKE with the image token (200)
inside the 211-token vocabulary. Saved with save_pretrained and loaded with llama4.load_model.
"""

from __future__ import annotations

import pytest
import torch

import llama4
from tests.parity.hf_models import SCOUT_LIKE

transformers = pytest.importorskip("transformers")

IMAGE, BOI, EOI, SEP = 200, 201, 202, 203
TOKENS_PER_TILE = 4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Llama4Config(
        text_config=dict(SCOUT_LIKE),
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
            pixel_shuffle_ratio=0.5, intermediate_size=128, vision_output_dim=48, projector_input_dim=48,
            projector_output_dim=48,
        ),
        image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI,
    )
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    hf = transformers.Llama4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "vision_model" in name or "multi_modal_projector" in name:
                p.normal_(0.0, 0.2)  # large enough that the image features dominate their rows
            elif "experts" in name or "router" in name:
                p.normal_(0.0, 0.08)
    path = tmp_path_factory.mktemp("multimodal")
    hf.save_pretrained(path)
    ours = llama4.load_model(path, dtype=torch.float32)
    assert ours.config.multimodal and ours.config.image_token_id == IMAGE
    return hf, ours


def _prompt(layout: list[list[int]], seed: int) -> torch.Tensor:
    """layout: per batch row, a list of image runs (tiles per image); text tokens around and between."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for images in layout:
        row = torch.randint(3, 199, (3,), generator=g).tolist()
        for tiles in images:
            row.append(BOI)
            for t in range(tiles):
                row += [IMAGE] * TOKENS_PER_TILE
                if t != tiles - 1:
                    row.append(SEP)
            row.append(EOI)
            row += torch.randint(3, 199, (2,), generator=g).tolist()
        rows.append(row)
    width = max(map(len, rows))
    return torch.tensor([r + torch.randint(3, 199, (width - len(r),), generator=g).tolist() for r in rows])


CASES = {
    "one_tile": [[1]],
    "several_tiles": [[5]],  # e.g. a 2x2 grid plus the global tile
    "two_images": [[3, 1]],
    "batch_of_two": [[2], [1, 1]],  # features fill the rows in batch-major order
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_multimodal_logits_match(pair, case):
    hf, ours = pair
    layout = CASES[case]
    ids = _prompt(layout, seed=len(case))
    tiles = sum(sum(images) for images in layout)
    assert int((ids == IMAGE).sum()) == tiles * TOKENS_PER_TILE
    pixels = torch.randn(tiles, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels)
        without_image = ours(ids, pixel_values=torch.zeros_like(pixels))
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-5, case
    # Sanity: the images matter, so the comparison above exercises the vision path.
    assert rel_err(without_image, ref) > 1e-2


def test_multimodal_cached_decode_after_image_prefill(pair):
    """Prefill with the image, then decode text tokens: equals the full forward (fp32 1e-5)."""
    hf, ours = pair
    ids = _prompt([[2]], seed=11)
    extra = torch.randint(3, 199, (1, 12), generator=torch.Generator().manual_seed(12))
    full_ids = torch.cat((ids, extra), dim=1)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        ref = hf(input_ids=full_ids, pixel_values=pixels).logits
        cache = llama4.KVCache(ours.config.text, block_size=4)
        pieces = [ours(ids, cache=cache, pixel_values=pixels)]
        pieces += [ours(extra[:, t:t + 1], cache=cache) for t in range(extra.shape[1])]
    assert rel_err(torch.cat(pieces, dim=1), ref) <= 1e-5


def test_multimodal_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    hf, ours = pair
    llama4.save_model(ours, tmp_path)
    reloaded = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    reloaded.eval()
    ids = _prompt([[1]], seed=21)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits,
                           hf(input_ids=ids, pixel_values=pixels).logits)
