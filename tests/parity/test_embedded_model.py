"""The shipped embedded model: transformers loads it and computes the same logits (fp32, 1e-5 relative)."""

from __future__ import annotations

import random

import pytest
import torch

import llama4
from llama4.build import EMBEDDED_DIR
from llama4.train.shapes import draw_scene

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "config.json").is_file(), reason="no embedded model shipped")


def test_defaults_load_the_embedded_model():
    model, tok = llama4.load_model(), llama4.load_tokenizer()
    assert model.config.multimodal and model.config.text.vocab_size == tok.vocab_size
    assert model.config.image_token_id == tok.patch_id
    assert sum(f.stat().st_size for f in EMBEDDED_DIR.glob("*.safetensors")) <= 25_000_000


def test_transformers_loads_it_and_agrees():
    ours = llama4.load_model(dtype=torch.float32, pack=False)
    tok = llama4.load_tokenizer()
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(EMBEDDED_DIR, dtype=torch.float32,
                                                                      attn_implementation="eager").eval()
    image, _ = draw_scene(random.Random(0))
    pixels, grid = llama4.preprocess_image(image)
    messages = [{"role": "user", "content": [{"type": "image", "grid": grid},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True)])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels.float()).logits
        got = ours(ids, pixel_values=pixels.float())
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= 1e-5
    assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())
