"""A tiny multimodal checkpoint saved to disk and its tokenizer: the model the engine tests and the
serve tests run (session fixtures; a conftest brings them in with ``from ... import``).

The model has random weights, with the output projection biased towards ordinary text (a random
head mostly picks one of the 2,048 special tokens, which would end every reply at once).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import llama4
from llama4.presets import LLAMA4_VISION, text_config

CORPUS = ["Once upon a time there was a little dog named Max. He liked to run and play in the park. "
          'The weather in Paris was sunny, {"city": "Paris", "ok": true}.'] * 20
MODEL_ID = "tiny-llama4"  # the checkpoint directory's name: the name the server built from it answers to


@pytest.fixture(scope="session")
def tok():
    return llama4.train_tokenizer(CORPUS, num_base_tokens=320)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tok):
    text = text_config(num_layers=4, vocab_size=tok.vocab_size, hidden_size=32, num_heads=4, num_kv_heads=2,
                       head_dim=8, intermediate_size=32, num_experts=4, attention_chunk_size=16, floor_scale=8,
                       max_position_embeddings=4096,
                       bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    vision = replace(LLAMA4_VISION, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=128,
                     vision_output_dim=48, projector_input_dim=48, projector_output_dim=48)
    config = llama4.ModelConfig(text=text, vision=vision, image_token_id=tok.patch_id,
                                boi_token_id=tok.image_start_id, eoi_token_id=tok.image_end_id)
    model = llama4.random_model(config, std=0.3, seed=1)
    with torch.no_grad():
        model.text.output.weight[tok.num_base_tokens:] = 0
        model.text.output.weight[:tok.num_base_tokens] *= 10
    path = tmp_path_factory.mktemp("checkpoint") / MODEL_ID
    llama4.save_model(model, path)
    tok.save(path)
    return path


@pytest.fixture(scope="session")
def model(checkpoint):
    return llama4.load_model(checkpoint)
