"""Images through the whole chat path: preprocessing, token layout, vision tower, early fusion, generation."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import llama4
from llama4.config import VisionConfig
from llama4.inference.text import ChatSession, chat
from llama4.presets import text_config


@pytest.fixture(scope="module")
def tok():
    return llama4.train_tokenizer(["A red square and a blue circle on a white background."] * 20, num_base_tokens=290)


@pytest.fixture(scope="module")
def model(tok):
    text = text_config(num_layers=4, vocab_size=tok.vocab_size, hidden_size=32, num_heads=4, num_kv_heads=2,
                       head_dim=8, intermediate_size=32, num_experts=4, attention_chunk_size=64,
                       bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    vision = VisionConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=128, image_size=336,
                          patch_size=14, num_channels=3, norm_eps=1e-5, vision_output_dim=48,
                          pixel_shuffle_ratio=0.5, projector_input_dim=48, projector_output_dim=48,
                          multi_modal_projector_bias=False, rope_theta=10000.0)
    config = llama4.ModelConfig(text=text, vision=vision, image_token_id=tok.patch_id,
                                boi_token_id=tok.image_start_id, eoi_token_id=tok.image_end_id)
    return llama4.random_model(config, seed=0, std=0.2)


def png(width: int, height: int, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_chat_with_a_multi_tile_image_runs_and_depends_on_the_image(model, tok):
    def reply(colour):
        messages = [{"role": "user", "content": [{"type": "image", "image": png(1000, 300, colour)},
                                                 {"type": "text", "text": "What colour?"}]}]
        return chat(model, tok, messages, max_new_tokens=6, stop_tokens=[])

    red, blue = reply((255, 0, 0)), reply((0, 0, 255))
    # 1000x300 -> 1x3 tiles + global: 2 + 1 + 144 * 4 + 1 * 2 + 1 = 582 image tokens in the prompt
    assert red.prompt_tokens > 582
    assert red.tokens != blue.tokens or red.text != blue.text  # the image reaches the model


def test_prompt_image_tokens_match_the_tiles(model, tok):
    from llama4.inference.text import prepare_messages

    messages = [{"role": "user", "content": [{"type": "image", "image": png(600, 600, (0, 255, 0))},
                                             {"type": "text", "text": "hi"}]}]
    prepared, pixels = prepare_messages(messages)
    ids = tok.apply_chat_template(prepared, add_generation_prompt=True)
    assert ids.count(tok.patch_id) == pixels.shape[0] * 144  # 2x2 grid + global tile = 5 tiles
    assert pixels.shape[0] == 5


def test_session_keeps_images_across_turns(model, tok):
    session = ChatSession(model, tok, max_new_tokens=4)
    "".join(session.send("Look at this.", images=[png(336, 336, (255, 0, 0))]))
    "".join(session.send("And now?"))
    assert len(session.pixels) == 1 and session.history.count(tok.patch_id) == 144
