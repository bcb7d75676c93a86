"""``llama4 train``: the argument parser and the run (data -> tokenizer -> model -> :func:`train`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from llama4.build import random_model, save_model
from llama4.checkpoint.hf_config import model_config_from_hf
from llama4.config import ModelConfig
from llama4.presets import preset
from llama4.train.data import BatchIterator, eval_batches, pack, pretraining_texts, text_stream, validation_text
from llama4.train.trainer import TrainConfig, train

DEFAULT_DATA_DIR = "../shared/data"  # the shared data beside this checkout (run from the repository root)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="pretrain a (small) Llama 4 on the bundled corpora")
    p.add_argument("--recipe", choices=["embedded"],
                   help="run a whole recipe (all stages, resumable): 'embedded' rebuilds the shipped default model")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--preset", help="model shape preset (e.g. tiny); vocab/special ids come from the tokenizer")
    shape.add_argument("--config", help="HF config.json for the model shape")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="tokenizer directory (tokenizer.model)")
    tok.add_argument("--vocab", type=int, default=8000, help="base BPE tokens of a tokenizer trained on the data")
    p.add_argument("--data", choices=["tinystories", "tales", "mix"], default="tinystories")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="the shared data folder")
    p.add_argument("--limit", type=int, help="use only the first N training records (smoke runs)")
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, help="default lr / 10")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--aux-coef", type=float, default=d.aux_coef)
    p.add_argument("--out", required=True, help="output directory (checkpoint/, metrics.jsonl, loss.png, model/)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay float32)")
    p.set_defaults(func=run_train)
    return p


def _tokenizer(args, texts: list[str], out: Path):
    from llama4.prompt import load_tokenizer, train_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if (out / "tokenizer" / "tokenizer.model").is_file():  # resume: the same vocabulary
        return load_tokenizer(out / "tokenizer")
    return train_tokenizer(texts, args.vocab, out_dir=out / "tokenizer")


def model_config(args, tok) -> ModelConfig:
    """The model shape from --config or --preset (default tiny), with the tokenizer's vocab and ids."""
    if args.config:
        config = model_config_from_hf(json.loads(Path(args.config).read_text()))
    else:
        config = preset(args.preset or "tiny")
    from dataclasses import replace

    text = replace(config.text, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids,
                   pad_token_id=tok.pad_id)
    return replace(config, text=text, vision=None)


def run_recipe(args) -> Path:
    """Build the embedded model by its recipe (``--recipe embedded``); returns its directory (the command
    line then evaluates it and writes its card: llama4.evaluation.evaluate_and_card)."""
    from tqdm import tqdm

    from llama4.train.recipe import build_embedded

    bar = tqdm(unit="step")

    def on_step(m: dict) -> None:
        bar.n = m["step"]
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}")
        bar.refresh()

    final = build_embedded(args.out, args.data_dir, on_step)
    bar.close()
    return final


def run_train(args) -> int:
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = pretraining_texts(args.data_dir, args.data, seed=args.seed, limit=args.limit)
    tok = _tokenizer(args, texts, out)
    config = model_config(args, tok)
    eos = tok.end_of_text_id
    x, y = pack(text_stream(tok, texts, eos), args.seq_len)
    vx, vy = pack(tok.encode(validation_text(args.data_dir)), args.seq_len)
    names = {f.name for f in fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in names - {"min_lr"} and v is not None},
                     min_lr=args.min_lr if args.min_lr is not None else args.lr / 10)
    model = random_model(config, seed=args.seed)
    print(f"{len(x)} train rows, {len(vx)} validation rows of {args.seq_len} tokens; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    bar = tqdm(total=tc.steps, unit="step")

    def on_step(m: dict) -> None:
        bar.n = m["step"]
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}")

    result = train(model, tc, BatchIterator(x, y, tc.batch_size, seed=tc.seed),
                   eval_batches(vx, vy, tc.batch_size, tc.eval_batches), out, resume=args.resume, on_step=on_step)
    bar.close()
    with torch.no_grad():
        save_model(model, out / "model")
    tok.save(out / "model")
    for i, shares in enumerate(result.expert_shares):
        print(f"MoE layer {i}: expert token shares {shares}")
    if result.eval_history:
        print(f"eval loss {result.eval_history[-1]['eval_loss']:.3f}, ppl {result.eval_history[-1]['eval_ppl']:.1f}")
    return 0
