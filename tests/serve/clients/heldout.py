"""Local lm-eval tasks made from held-out text, and the same scoring computed in-process.

The multiple-choice task, ``tinystories_next_sentence.jsonl`` beside this file, is built by
:func:`next_sentence_items` from the TinyStories validation head (``shared/data/tinystories/
tinystories_valid_head.txt.gz``; the embedded model trained on the train head only, see
src/llama4/embedded/README.md): for a paragraph that opens a story ("Once upon a time..."), the first
two sentences are the context, its third sentence is the right continuation, and the third sentences of
three other stories are the distractors; the right one's position is drawn at random (fixed seed).
The file is committed so the tests need no data download and no ``shared/`` folder;
tests/serve/test_real_clients.py checks it still equals what the function builds when the data is
there. Its text is an excerpt of TinyStories (Eldan & Li, 2023), CDLA-Sharing-1.0: the license text is
src/llama4/embedded/licenses/LICENSE-CDLA-Sharing-1.0.txt.

Task configs are written as JSON (which YAML reads) at test time, because lm-eval resolves a local
data file's path against the working directory, not against the config.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ITEMS_FILE = HERE / "tinystories_next_sentence.jsonl"
VALID_FILE = HERE.parents[3] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt.gz"

MC_TASK = "llama4_tinystories_next_sentence"
GEN_TASK = "llama4_tinystories_continue"
# four stop strings: lm-eval adds the end-of-turn string, so the completions requests carry five
GEN_UNTIL = ["\n\n", ".", "!", "?"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _story_openings(text: str) -> list[list[str]]:
    """The sentences of each paragraph that opens a story, has no quotations (whose sentence ends are
    ambiguous) and has at least three sentences of 15 to 110 characters."""
    out = []
    for paragraph in text.split("\n\n"):
        paragraph = " ".join(paragraph.split())
        if not paragraph.startswith("Once upon a time") or '"' in paragraph:
            continue
        sentences = _SENTENCE_END.split(paragraph)
        if len(sentences) >= 3 and all(15 <= len(s) <= 110 for s in sentences[:3]):
            out.append(sentences[:3])
    return out


def next_sentence_items(text: str, n: int = 40, seed: int = 0) -> list[dict]:
    """``n`` multiple-choice items ``{"context", "choices", "label"}`` from held-out story text (above)."""
    rng = random.Random(seed)
    stories = _story_openings(text)
    picked = rng.sample(range(len(stories)), n)
    items = []
    for k in picked:
        others = rng.sample([j for j in range(len(stories)) if j != k], 3)
        choices = [stories[j][2] for j in others]
        label = rng.randrange(4)
        choices.insert(label, stories[k][2])
        items.append({"context": " ".join(stories[k][:2]), "choices": choices, "label": label})
    return items


def read_valid_text(path: Path = VALID_FILE) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def items_jsonl(items: Sequence[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def read_items(path: Path = ITEMS_FILE) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_tasks(out: Path, gen_docs: int = 5) -> Path:
    """The two task configs (and the generation task's data: the first ``gen_docs`` contexts) in ``out``,
    for ``lm_eval.tasks.TaskManager(include_path=out)``."""
    out.mkdir(parents=True, exist_ok=True)
    cache = str(out / "hf_datasets_cache")  # datasets' cache for the JSON files, not the user's
    gen_data = out / "continue.jsonl"
    gen_data.write_text(items_jsonl({"context": item["context"]} for item in read_items()[:gen_docs]),
                        encoding="utf-8")
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
    mc = {"task": MC_TASK, "dataset_path": "json", "test_split": "test",
          "dataset_kwargs": {"data_files": {"test": str(ITEMS_FILE)}, "cache_dir": cache},
          "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
          "doc_to_target": "label", "metric_list": metrics, "metadata": {"version": 1.0}}
    gen = {"task": GEN_TASK, "dataset_path": "json", "test_split": "test",
           "dataset_kwargs": {"data_files": {"test": str(gen_data)}, "cache_dir": cache},
           "output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "",
           "generation_kwargs": {"until": GEN_UNTIL, "max_gen_toks": 16, "do_sample": False},
           "metric_list": [{"metric": "bypass"}], "metadata": {"version": 1.0}}
    for config in (mc, gen):
        (out / f"{config['task']}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return out


def lm_eval_pair_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal split (``TemplateLM._encode_pair``) with the server's /tokenize (no BOS): the
    context's trailing spaces move to the continuation; the whole text is encoded once and the
    continuation is what follows the context's own encoding."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, allow_special=True)
    context_ids = tokenizer.encode(context, allow_special=True)
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def continuation_logprobs(model, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> list[float]:
    """Each continuation token's log-probability given everything before it (one fp32 forward pass)."""
    ids = list(context_ids) + list(continuation_ids)
    logits = model(torch.tensor([ids]))[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(context_ids)
    return [logprobs[t - 1, ids[t]].item() for t in range(start, len(ids))]
