"""A skill the embedded model lacks, learned with ``llama4 finetune``: where a single shape is in a picture.

    python bench/finetune_skill.py --out /tmp/skill           # data, before, finetune, after: report.json
    python bench/finetune_skill.py --out /tmp/skill --steps 50 --test 40 --windows 4   # a quick look

The embedded model answers colour and shape questions about synthetic pictures (llama4.train.shapes) but not
"Where is the shape?": it names a side, rarely the right one, and never says "in the middle". This script

1. draws single-shape pictures from three disjoint seed streams and writes them as PNG files beside chat JSONL
   files: ``train.jsonl`` (the question and the true answer, "It is at the left." / "It is in the middle."),
   ``val.jsonl`` (held-out loss during training) and ``test.jsonl`` (the accuracy set, never trained on);
2. measures the base model: position accuracy on the test pictures (greedy answer, right when it names the
   true position and no other) and perplexity on the held-out stories (TinyStories validation head,
   ``--windows`` windows of ``--window`` tokens, llama4.evaluation.perplexity);
3. runs ``llama4 finetune`` (LoRA, ``--merge``) in a subprocess, timed;
4. measures the merged model the same way and checks that the stories' perplexity rose by at most
   ``--margin`` (relative; exit status 1 otherwise).

Both models are measured in bf16, as ``llama4 eval`` measures the embedded model.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
POSITIONS = ("left", "right", "top", "bottom", "middle")
QUESTION = "Where is the shape?"


def single_shape(stream: str, index: int):
    """The ``index``-th single-shape picture of a seed stream (pictures of 2-3 shapes are skipped)."""
    from llama4.train.shapes import draw_scene

    attempt = 0
    while True:
        image, scene = draw_scene(random.Random(f"{stream}:{index}:{attempt}"))
        if scene.count == 1:
            return image, scene
        attempt += 1


def answer(position: str) -> str:
    return "It is in the middle." if position == "middle" else f"It is at the {position}."


def write_split(folder: Path, name: str, count: int) -> Path:
    """``count`` pictures of stream ``name`` as PNG files and one chat a line in ``<name>.jsonl``."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        image, scene = single_shape(f"skill-{name}", i)
        image.save(folder / name / f"{i}.png")
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{name}/{i}.png"}},
                                            {"type": "text", "text": QUESTION}]}
        lines.append(json.dumps({"messages": [user, {"role": "assistant", "content": answer(scene.position)}]}))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def position_accuracy(model, tok, test: Path, batch_size: int = 25) -> dict:
    """Greedy answers to the test file's questions (its assistant turns are the truth)."""
    from llama4.evaluation import _answers
    from llama4.prompt import preprocess_image
    from llama4.train.shapes import words_in

    prompts, truths = [], []
    for line in test.read_text().splitlines():
        user, reply = json.loads(line)["messages"]
        pixels, grid = preprocess_image(test.parent / user["content"][0]["image_url"]["url"])
        messages = [{"role": "user", "content": [{"type": "image", "grid": grid}, user["content"][1]]}]
        prompts.append((tok.apply_chat_template(messages, add_generation_prompt=True), pixels))
        truths.append(next(p for p in POSITIONS if p in reply["content"]))
    replies = _answers(model, tok, prompts, 12, batch_size)
    right = [words_in(r, POSITIONS) == {t} for r, t in zip(replies, truths)]
    named = {p: sum(words_in(r, POSITIONS) == {p} for r in replies) for p in POSITIONS}
    return {"accuracy": sum(right) / len(right), "questions": len(right), "chance": 1 / len(POSITIONS),
            "answers_naming": named, "truths": {p: truths.count(p) for p in POSITIONS},
            "examples": [{"truth": t, "reply": r} for t, r in list(zip(truths, replies))[:5]]}


def measure(model_dir: Path | None, test: Path, data_dir: Path, window: int, windows: int) -> dict:
    import llama4
    from llama4.evaluation import perplexity
    from llama4.train.data import validation_text

    model = llama4.load_model(model_dir, dtype=torch.bfloat16)
    tok = llama4.load_tokenizer(model_dir)
    tic = time.perf_counter()
    report = {"position": position_accuracy(model, tok, test),
              "stories": perplexity(model, tok.encode(validation_text(data_dir)), window=window,
                                    max_windows=windows)}
    report["seconds"] = round(time.perf_counter() - tic, 1)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the data, the run and report.json")
    p.add_argument("--train", type=int, default=600, help="training pictures")
    p.add_argument("--val", type=int, default=40, help="pictures for the held-out loss during training")
    p.add_argument("--test", type=int, default=100, help="held-out pictures for the accuracy")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="attention,projector")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 spin-wait on a busy 2-core machine)")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data", help="held-out stories")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--windows", type=int, default=16, help="story windows for the perplexity")
    p.add_argument("--margin", type=float, default=0.05, help="allowed relative rise of the stories' perplexity")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = args.out / "data"
    train, val, test = (write_split(data, name, n) for name, n in
                        (("train", args.train), ("val", args.val), ("test", args.test)))
    before = measure(None, test, args.data_dir, args.window, args.windows)
    print(f"before: position {before['position']['accuracy']:.1%}, stories perplexity "
          f"{before['stories']['perplexity']:.2f}", file=sys.stderr)
    run = args.out / "run"
    command = [sys.executable, "-m", "llama4.cli", "finetune", "--data", str(train), "--eval-file", str(val),
               "--out", str(run), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--rank", str(args.rank), "--alpha", str(args.alpha), "--targets", args.targets,
               "--seq-len", "256", "--merge", "--threads", str(args.threads)]
    tic = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - tic
    after = measure(run / "merged", test, args.data_dir, args.window, args.windows)
    rise = after["stories"]["perplexity"] / before["stories"]["perplexity"] - 1
    report = {"command": " ".join(["llama4"] + command[3:]), "finetune_seconds": round(seconds, 1),
              "threads": args.threads, "before": before, "after": after, "perplexity_rise": rise,
              "margin": args.margin, "within_margin": rise <= args.margin,
              "result": json.loads((run / "result.json").read_text())}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"position accuracy on {after['position']['questions']} held-out pictures: "
          f"{before['position']['accuracy']:.1%} -> {after['position']['accuracy']:.1%} (chance 20 %); stories "
          f"perplexity {before['stories']['perplexity']:.2f} -> {after['stories']['perplexity']:.2f} "
          f"({rise:+.1%}, margin {args.margin:.0%}); finetune {seconds:.0f} s; loss curve {run / 'loss.png'}")
    return 0 if rise <= args.margin else 1


if __name__ == "__main__":
    sys.exit(main())
