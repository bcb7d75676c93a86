"""The whole embedded recipe end to end at a few steps per stage (the real run takes about an hour)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import llama4
from llama4 import evaluation
from llama4.train import instruct_data, recipe

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")
def test_recipe_builds_a_loadable_model_with_a_card(tmp_path, monkeypatch):
    small = dict(steps=2, batch_size=2, warmup=1, eval_every=2, eval_batches=2, checkpoint_every=1, log_every=1)
    monkeypatch.setattr(recipe, "PRETRAIN", replace(recipe.PRETRAIN, seq_len=256, **small))
    monkeypatch.setattr(recipe, "INSTRUCT", replace(recipe.INSTRUCT, seq_len=256, **small))
    monkeypatch.setattr(recipe, "VISION", replace(recipe.VISION, **small))
    monkeypatch.setattr(recipe, "VISION_MEAN", replace(recipe.VISION_MEAN, **small))
    monkeypatch.setattr(recipe, "IMAGE_BATCH", 2)
    monkeypatch.setattr(recipe, "CHAT_BATCH", 2)
    monkeypatch.setattr(recipe, "BASE_VOCAB", 1024)  # the merges are most of the tokenizer's training time
    every_chat = instruct_data.instruct_chats
    monkeypatch.setattr(instruct_data, "instruct_chats", lambda *a, **k: every_chat(*a, **k)[:64])
    final = recipe.build_embedded(tmp_path / "run", DATA)
    record = json.loads((final / "recipe.json").read_text())
    assert record["stages"]["pretrain"]["steps"] == 2 and len(record["data_sha256"]) == 6
    assert (final / "licenses" / "LICENSE-CC-BY-SA-4.0.txt").is_file()
    assert all((final / f"{stage}_loss.png").is_file() for stage in ("pretrain", "vision", "vision_mean", "instruct"))
    probe = record["vision_probe_accuracy"]
    assert set(probe) == {"pooled", "mean"} and all(
        set(acc) == {"shape", "colour", "count", "background"} for acc in probe.values())
    assert set(record["seconds"]) == {"tokenizer", "pretrain", "vision", "instruct"}
    model = llama4.load_model(final)
    assert model.config.multimodal and model.config.text.vocab_size == 1024 + 2048
    assert next(model.text.parameters()).dtype == torch.float32
    assert {t.dtype for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        final / "model.safetensors").values()} == {torch.bfloat16}
    report = evaluation.evaluate_and_card(final, DATA, pictures=2, max_windows=2)
    card = (final / "README.md").read_text()
    assert f"{report['perplexity']['perplexity']:.2f}" in card and "chance" in card
    assert report["perplexity"]["perplexity"] < report["perplexity"]["unigram_baseline"] * 10
    # an interrupted run resumes: running again trains nothing more and gives the same weights
    again = recipe.build_embedded(tmp_path / "run", DATA)
    assert torch.equal(llama4.load_model(again).text.embed.weight, model.text.embed.weight)
