"""The recipe of the embedded default model: its shape, its data stages and how they are run.

``build_embedded(out_dir, data_dir)`` rebuilds the shipped model from the shared data in three steps,
each resumable (an interrupted run continues where it stopped, bit-identically):

1. ``tokenizer``: a 6,144-token BPE trained on the pretraining text, plus Llama 4's 2,048 special slots.
2. ``pretrain``: next-token prediction on TinyStories with 25 % public-domain tales, every third batch
   synthetic-picture questions (joint early-fusion pretraining, as Llama 4 does).
3. ``vision``: a fresh vision tower learns the pictures' facts (shape, colour, count, background)
   through temporary classification heads (:mod:`llama4.train.vision_pretrain`), as Llama 4's
   encoder was pre-trained on its own, with the lr decaying, then (``vision_mean``) at a constant lr
   until the head over the tokens' mean knows shape too; it replaces the tower of step 2.
4. ``instruct``: a mixture of chat turns (small talk, identity, task dialogues, story requests),
   synthetic-image questions and pretraining text (against forgetting); the tower moves at a tenth of
   the language model's learning rate so that it keeps what step 3 taught it.

The result (``<out>/model``) holds the weights, tokenizer and ``recipe.json`` (this recipe, the data files'
SHA-256 and the code version).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from llama4.build import EMBEDDED_NAME, random_model, save_model
from llama4.config import ModelConfig
from llama4.presets import LLAMA4_VISION, text_config
from llama4.train.data import BatchIterator, eval_batches, pack, pretraining_texts, text_stream, validation_text
from llama4.train.trainer import TrainConfig, TrainResult, train
from llama4.train.vision_pretrain import HEADS, ROWS

BASE_VOCAB = 6144  # + 2,048 special slots = 8,192
TALES_SHARE = 0.25
SEED = 0

PRETRAIN = TrainConfig(steps=1200, batch_size=4, seq_len=1024, lr=3e-3, min_lr=3e-4, warmup=100, eval_every=200,
                       eval_batches=16, checkpoint_every=100, seed=SEED, aux_coef=0.01)
VISION = TrainConfig(steps=1200, batch_size=32, seq_len=len(HEADS) * len(ROWS), lr=1e-3, min_lr=1e-4, warmup=20,
                     weight_decay=0.0, eval_every=100, eval_batches=4, checkpoint_every=100, seed=SEED + 2,
                     aux_coef=0.0)
# The pooled head learns shape in the first part; the mean head, which the language model needs, lags
# well behind it while the lr decays, so a second part at a constant lr lets it catch up (both heads'
# final accuracies are in recipe.json, vision_probe_accuracy).
VISION_MEAN = TrainConfig(steps=500, batch_size=32, seq_len=len(HEADS) * len(ROWS), lr=1e-3, min_lr=1e-3, warmup=1,
                          weight_decay=0.0, eval_every=100, eval_batches=4, checkpoint_every=100, seed=SEED + 3,
                          aux_coef=0.0)
INSTRUCT = TrainConfig(steps=1125, batch_size=4, seq_len=1024, lr=1e-3, min_lr=2e-4, warmup=30, eval_every=100,
                       eval_batches=16, checkpoint_every=50, seed=SEED + 1, aux_coef=0.01, vision_lr_scale=0.1)

IMAGE_BATCH, IMAGE_ROW = 16, 256  # picture rows: one picture and its questions, inside one attention chunk
CHAT_BATCH, CHAT_ROW = 16, 256  # chat rows: one chat each, starting at position 0 as at inference
MODEL_NAME = EMBEDDED_NAME
AUTHOR = "the llama4 project"


def embedded_config(tok) -> ModelConfig:
    """Llama 4's structure at ~12 M parameters: 4 layers (3 chunked-RoPE + 1 NoPE global with temperature
    tuning), every layer MoE with 4 routed experts + a shared expert, QK-norm, 256-token attention chunks
    (a 1,024-token training row spans 4; temperature tuning starts past the first chunk), and a 2-layer
    vision tower with the released 336 px / 14 px patch / 0.5 pixel-shuffle layout (144 tokens per tile).

    A picture and its questions fit in one chunk, as they do in Llama 4's 8,192-token chunks: with
    64-token chunks only the one global layer could carry the picture to the answer, and a first build
    stayed near chance on picture questions after 3,000 pictures."""
    text = text_config(
        num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=384,
        intermediate_size_mlp=768, num_experts=4, vocab_size=tok.vocab_size, attention_chunk_size=256,
        floor_scale=256, attn_scale=0.1, rope_theta=10000.0, max_position_embeddings=65536,
        bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id,
    )
    vision = replace(LLAMA4_VISION, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                     vision_output_dim=256, projector_input_dim=256, projector_output_dim=256)
    return ModelConfig(text=text, vision=vision, image_token_id=tok.patch_id, boi_token_id=tok.image_start_id,
                       eoi_token_id=tok.image_end_id)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> str:
    """The git commit of this checkout (with ``+dirty`` if it has uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here.parent.parent.parent,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _tokenizer(out: Path, texts: list[str]):
    from llama4.prompt import load_tokenizer, train_tokenizer

    path = out / "tokenizer"
    if (path / "tokenizer.model").is_file():
        return load_tokenizer(path)
    return train_tokenizer(texts, BASE_VOCAB, out_dir=path)


PRETRAIN_PATTERN = ("text", "text", "image")


def pretrain(out: Path, data_dir: Path, tok, texts: list[str], on_step: Callable | None = None
             ) -> tuple[torch.nn.Module, TrainResult]:
    """Stage 2: next-token prediction on the pretraining text, with every third batch a batch of
    picture questions (early-fusion joint pretraining: the vision tower learns from the start).
    Held-out evaluation is on text only. Resumes from ``<out>/pretrain``."""
    from llama4.train.instruct_data import ImageBatches, Mixture

    tc = PRETRAIN
    x, y = pack(text_stream(tok, texts, tok.end_of_text_id), tc.seq_len)
    vx, vy = pack(tok.encode(validation_text(data_dir)), tc.seq_len)
    sources = {"text": BatchIterator(x, y, tc.batch_size, seed=tc.seed),
               "image": ImageBatches(tok, IMAGE_BATCH, IMAGE_ROW, seed=tc.seed + 100)}
    model = random_model(embedded_config(tok), seed=tc.seed)
    result = train(model, tc, Mixture(sources, PRETRAIN_PATTERN),
                   eval_batches(vx, vy, tc.batch_size, tc.eval_batches), out / "pretrain", resume=True,
                   on_step=on_step)
    return model, result


def vision(out: Path, tok, model: torch.nn.Module, on_step: Callable | None = None) -> dict[str, dict[str, float]]:
    """Stage 3: a fresh vision tower (seeded) learns the pictures' facts through temporary heads, then
    replaces ``model``'s tower. Returns each head's accuracy per fact on held-out pictures. Resumes from
    ``<out>/vision`` and ``<out>/vision_mean``."""
    from llama4.train.vision_pretrain import AttributeBatches, AttributeProbe, attribute_accuracy

    tc = VISION
    config = embedded_config(tok)
    tower = random_model(config, seed=tc.seed).vision.requires_grad_(True)
    probe = AttributeProbe(tower, config.vision.projector_output_dim, seed=tc.seed)
    held_out_pictures = AttributeBatches(tc.batch_size, seed=20_000 + tc.seed)
    held_out = [next(held_out_pictures) for _ in range(tc.eval_batches)]
    train(probe, tc, AttributeBatches(tc.batch_size, seed=tc.seed), held_out, out / "vision", resume=True,
          on_step=on_step)
    tc = VISION_MEAN
    train(probe, tc, AttributeBatches(tc.batch_size, seed=tc.seed), held_out, out / "vision_mean", resume=True,
          on_step=on_step)
    probe.eval()
    accuracy = attribute_accuracy(probe, held_out)
    model.vision = tower
    return accuracy


# A chat row holds one chat, so chat batches carry fewer story tokens than packed ones did: the second
# text batch keeps the stories' share (without it held-out perplexity rose by about a tenth).
INSTRUCT_PATTERN = ("image", "chat", "image", "image", "text", "image", "image", "chat", "text")


def instruct(out: Path, data_dir: Path, tok, texts: list[str], pretrained: torch.nn.Module,
             on_step: Callable | None = None) -> tuple[torch.nn.Module, TrainResult]:
    """Stage 4: chats, picture questions and pretraining text (resumes from ``<out>/instruct``)."""
    from llama4.train.data import chat_example, chat_rows
    from llama4.train.instruct_data import ImageBatches, Mixture, instruct_chats

    tc = INSTRUCT
    examples = [chat_example(tok, c) for c in instruct_chats(data_dir, MODEL_NAME, AUTHOR, tc.seed)]
    chats = chat_rows([ex for ex in examples if len(ex.ids) <= CHAT_ROW + 1], CHAT_ROW, tok.pad_id)
    x, y = pack(text_stream(tok, texts, tok.end_of_text_id), tc.seq_len)
    vx, vy = pack(tok.encode(validation_text(data_dir)), tc.seq_len)
    sources = {"chat": BatchIterator(*chats, CHAT_BATCH, seed=tc.seed),
               "text": BatchIterator(x, y, tc.batch_size, seed=tc.seed + 1),
               "image": ImageBatches(tok, IMAGE_BATCH, IMAGE_ROW, seed=tc.seed)}
    held_out_images = ImageBatches(tok, IMAGE_BATCH, IMAGE_ROW, seed=10_000 + tc.seed)
    held_out = eval_batches(vx, vy, tc.batch_size, tc.eval_batches // 2) + [
        next(held_out_images) for _ in range(tc.eval_batches // 2)]
    model = pretrained  # continued in place (or replaced by the instruct checkpoint when resuming)
    result = train(model, tc, Mixture(sources, INSTRUCT_PATTERN), held_out, out / "instruct", resume=True,
                   on_step=on_step)
    return model, result


def recipe_record(data_dir: Path) -> dict:
    """What ``recipe.json`` records: the stages' settings, the data files' hashes, the code version."""
    files = ["tinystories", "tales", "tinystories_valid", "smalltalk", "sgd"]
    from llama4.train.data import CORPUS_FILES
    from llama4.train.instruct_data import IDENTITY_FILE

    paths = [CORPUS_FILES[f] for f in files] + [IDENTITY_FILE]
    return {
        "command": "llama4 train --recipe embedded --out DIR",
        "base_vocab": BASE_VOCAB, "tales_share": TALES_SHARE, "seed": SEED,
        "stages": {"pretrain": asdict(PRETRAIN), "pretrain_pattern": list(PRETRAIN_PATTERN),
                   "vision": asdict(VISION), "vision_mean": asdict(VISION_MEAN), "instruct": asdict(INSTRUCT),
                   "image_rows": {"batch_size": IMAGE_BATCH, "seq_len": IMAGE_ROW},
                   "chat_rows": {"batch_size": CHAT_BATCH, "seq_len": CHAT_ROW},
                   "instruct_pattern": list(INSTRUCT_PATTERN)},
        "data_sha256": {p: file_sha256(data_dir / p) for p in paths},
        "code_version": code_version(),
        "torch": torch.__version__,
    }


def _stage_seconds(stage_dir: Path, elapsed: float) -> float:
    """Wall time spent in a stage over all its (resumed) runs, kept in ``<stage>/seconds.json``."""
    path = stage_dir / "seconds.json"
    total = (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0) + elapsed
    path.write_text(json.dumps({"seconds": round(total, 1)}) + "\n")
    return total


def _last_expert_shares(metrics: Path) -> list:
    """Per-expert token shares of the last evaluation a stage logged (a resumed, finished stage runs none)."""
    records = ([json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
               if metrics.is_file() else [])
    return next((r["expert_shares"] for r in reversed(records) if "expert_shares" in r), [])


def build_embedded(out_dir: str | Path, data_dir: str | Path, on_step: Callable | None = None) -> Path:
    """Run every stage (resuming finished ones) and write ``<out>/model``: weights, tokenizer, recipe.json."""
    import shutil
    import time

    from llama4.train.card import copy_licenses

    out, data_dir = Path(out_dir), Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    tic = time.perf_counter()
    texts = pretraining_texts(data_dir, "mix", seed=SEED, tales_share=TALES_SHARE)
    tok = _tokenizer(out, texts)
    seconds["tokenizer"] = time.perf_counter() - tic
    tic = time.perf_counter()
    pretrained, _ = pretrain(out, data_dir, tok, texts, on_step)
    seconds["pretrain"] = _stage_seconds(out / "pretrain", time.perf_counter() - tic)
    tic = time.perf_counter()
    vision_accuracy = vision(out, tok, pretrained, on_step)
    seconds["vision"] = _stage_seconds(out / "vision", time.perf_counter() - tic)
    tic = time.perf_counter()
    model, result = instruct(out, data_dir, tok, texts, pretrained, on_step)
    seconds["instruct"] = _stage_seconds(out / "instruct", time.perf_counter() - tic)
    final = out / "model"
    with torch.no_grad():
        save_model(model.to(torch.bfloat16), final)
    tok.save(final)
    for stage in ("pretrain", "vision", "vision_mean", "instruct"):
        if (out / stage / "loss.png").is_file():
            shutil.copyfile(out / stage / "loss.png", final / f"{stage}_loss.png")
    copy_licenses(data_dir, final)
    shares = result.expert_shares or _last_expert_shares(out / "instruct" / "metrics.jsonl")
    record = {**recipe_record(data_dir), "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "expert_shares": shares, "vision_probe_accuracy": vision_accuracy}
    (final / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return final
