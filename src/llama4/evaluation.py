"""``llama4 eval``: how good a model is, measured on data it was not trained on.

* Perplexity on held-out text (by default the TinyStories validation head), cut into windows of
  ``window`` tokens, beside a unigram baseline fitted on the training text with the same tokenizer.
* Picture questions on freshly drawn synthetic pictures (:mod:`llama4.train.shapes`, a seed stream the
  training never used): the colour and the shape, each asked alone, greedy answer, scored as right
  when it names the true word and no other candidate. Chance level is printed beside it.
* A few unedited greedy samples.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llama4.inference.generate import Request, generate_tokens
from llama4.model.transformer import Llama4Model
from llama4.train.data import pack
from llama4.train.objectives import next_token_loss
from llama4.train.shapes import COLOURS, SHAPES, draw_scene, words_in

EVAL_SEED_PREFIX = "eval"  # training pictures are drawn from "images:<seed>:<batch>": disjoint streams


def perplexity(model: Llama4Model, ids: Sequence[int], window: int = 1024, batch_size: int = 4,
               max_windows: int | None = None) -> dict:
    """Token-weighted perplexity of ``ids`` over consecutive windows of ``window`` tokens."""
    inputs, targets = pack(ids, window)
    if max_windows is not None:
        inputs, targets = inputs[:max_windows], targets[:max_windows]
    total, count = 0.0, 0
    with torch.inference_mode():
        for at in range(0, len(inputs), batch_size):
            loss, n = next_token_loss(model(inputs[at:at + batch_size]), targets[at:at + batch_size])
            total, count = total + float(loss) * n, count + n
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}


def unigram_perplexity(train_ids: Sequence[int], eval_ids: Sequence[int], vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train_ids`` (the baseline)."""
    counts = Counter(train_ids)
    total = len(train_ids) + vocab_size
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in eval_ids[1:]) / max(len(eval_ids) - 1, 1)
    return math.exp(nll)


def _answers(model: Llama4Model, tok, prompts: list[tuple[list[int], torch.Tensor]], max_new_tokens: int,
             batch_size: int) -> list[str]:
    out: list[str] = []
    for at in range(0, len(prompts), batch_size):
        requests = [Request(ids, pixels) for ids, pixels in prompts[at:at + batch_size]]
        tokens: list[list[int]] = [[] for _ in requests]
        for event in generate_tokens(model, requests, max_new_tokens):
            if event.stopped_by is None:
                tokens[event.row].append(event.choice.token)
        out += [tok.decode(t) for t in tokens]
    return out


def picture_questions(model: Llama4Model, tok, count: int = 500, seed: int = 0, batch_size: int = 25,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Colour and shape accuracy on ``count`` fresh pictures (each question asked in its own chat)."""
    from llama4.prompt import preprocess_image

    results = {"colour": [], "shape": []}
    examples = []
    for i in range(count):
        image, scene = draw_scene(random.Random(f"{EVAL_SEED_PREFIX}:{seed}:{i}"))
        pixels, grid = preprocess_image(image)
        for kind, question in (("colour", "What colour is the shape?"), ("shape", "What shape is it?")):
            messages = [{"role": "user", "content": [{"type": "image", "grid": grid},
                                                     {"type": "text", "text": question}]}]
            truth = scene.colour if kind == "colour" else scene.shape
            examples.append((kind, truth, tok.apply_chat_template(messages, add_generation_prompt=True), pixels))
    done = 0
    for at in range(0, len(examples), batch_size):
        part = examples[at:at + batch_size]
        replies = _answers(model, tok, [(ids, pixels) for _, _, ids, pixels in part], 12, batch_size)
        for (kind, truth, _, _), reply in zip(part, replies):
            named = words_in(reply, COLOURS if kind == "colour" else SHAPES)
            results[kind].append({"truth": truth, "reply": reply, "right": named == {truth}})
        done += len(part)
        if progress is not None:
            progress(done, len(examples))
    return {
        kind: {"accuracy": sum(r["right"] for r in rows) / max(len(rows), 1), "questions": len(rows),
               "chance": 1 / (len(COLOURS) if kind == "colour" else len(SHAPES)),
               "examples": rows[:5]}
        for kind, rows in results.items()
    }


SAMPLE_PROMPTS = (
    ("story", "Once upon a time, there was a little"),
    ("chat", "Who are you?"),
    ("chat", "Tell me a story about a dog."),
    ("chat", "Hi! How are you today?"),
)


def samples(model: Llama4Model, tok, max_new_tokens: int = 96) -> list[dict]:
    """Unedited greedy outputs for a story opening and a few chat turns, with tokens/s."""
    out = []
    for kind, text in SAMPLE_PROMPTS:
        if kind == "story":
            ids = [tok.bos_id] + tok.encode(text)
        else:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        tic = time.perf_counter()
        reply = _answers(model, tok, [(ids, None)], max_new_tokens, 1)[0]
        seconds = time.perf_counter() - tic
        out.append({"kind": kind, "prompt": text, "output": reply,
                    "tokens_per_s": len(tok.encode(reply)) / max(seconds, 1e-9)})
    return out


def evaluate_model(model: Llama4Model, tok, data_dir, pictures: int = 500, window: int = 1024,
                   max_windows: int | None = None, with_samples: bool = True, seed: int = 0) -> dict:
    """The full report of ``llama4 eval``: held-out perplexity with its unigram baseline, picture
    questions (multimodal models, ``pictures`` > 0) and samples."""
    from pathlib import Path

    from llama4.train.data import CORPUS_FILES, read_records, validation_text

    data_dir = Path(data_dir)
    held_out = tok.encode(validation_text(data_dir))
    report: dict = {"perplexity": perplexity(model, held_out, window=window, max_windows=max_windows)}
    train_ids = [t for text in read_records(data_dir / CORPUS_FILES["tinystories"]) for t in tok.encode(text)]
    report["perplexity"]["unigram_baseline"] = unigram_perplexity(train_ids, held_out, tok.vocab_size)
    if pictures and model.config.multimodal:
        report["pictures"] = picture_questions(model, tok, pictures, seed=seed)
    if with_samples:
        report["samples"] = samples(model, tok)
    return report


def evaluate_and_card(model_dir: str | Path, data_dir: str | Path, pictures: int = 500,
                      max_windows: int | None = None) -> dict:
    """Run the ``llama4 eval`` measurements on a built model and write its ``eval.json`` and ``README.md``."""
    from llama4.build import load_model
    from llama4.prompt import load_tokenizer
    from llama4.train.card import write_model_card

    model_dir = Path(model_dir)
    model = load_model(model_dir, dtype=torch.bfloat16)
    report = evaluate_model(model, load_tokenizer(model_dir), data_dir, pictures=pictures,
                            max_windows=max_windows)
    write_model_card(model_dir, report)
    return report
