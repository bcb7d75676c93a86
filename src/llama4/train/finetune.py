"""``llama4 finetune``: LoRA / QLoRA fine-tuning on chat JSONL, resumable, into a run directory.

The model is loaded unpacked (LoRA refuses CPU-packed weights), optionally quantized (QLoRA: ``--quant``
recipe, the frozen base in llama4.quant's formats), then adapted (llama4.lora.apply_lora). Training is the
project's one loop (:func:`llama4.train.trainer.train`: AdamW, warm-up + cosine lr, clipping, evaluation,
metrics.jsonl, loss.png, pickle-free checkpoints), run on an :class:`AdapterView` of the model whose state is
the adapters alone, so a checkpoint holds the adapters, the optimizer, the step (the lr schedule is a
function of it), the data position and the torch RNG (dropout), never the frozen base.

Run directory::

    recipe.json       every setting (resolved: steps, warm-up, ...), the data files' and pictures' SHA-256,
                      the base model (path, config SHA-256), the code version, torch's version
    metrics.jsonl     train loss / lr / tokens per second, held-out loss (step 0: the base model's)
    loss.png          the curves
    checkpoint/       adapters, optimizer, state.json (what --resume continues from)
    adapter/          the result in PEFT's format (adapter_config.json + adapter_model.safetensors)
    merged/           with --merge: base + update as a plain checkpoint, with the tokenizer
    result.json       steps, final losses, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from llama4.build import load_model, resolve_model_path, save_model
from llama4.dtypes import WEIGHT_DTYPES, torch_dtype
from llama4.lora import (
    KINDS,
    LoraConfig,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_and_unload,
    save_adapter,
)
from llama4.train.finetune_data import (
    RowBatches,
    epochs_to_steps,
    eval_row_batches,
    image_files,
    layout_rows,
    read_chat_jsonl,
    split_eval,
    target_tokens,
)
from llama4.train.recipe import code_version, file_sha256
from llama4.train.trainer import TrainConfig, evaluate, train

RECIPE_FILE = "recipe.json"
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a run depends on besides its data files' contents (recorded in recipe.json). ``None``
    where a value is derived: ``max_steps`` from ``epochs`` (1 if neither is given), ``min_lr`` = lr / 10,
    ``warmup`` = 5 % of the steps, ``eval_every`` = a tenth of the steps; :meth:`resolved` fills them in."""

    data: tuple[str, ...]
    eval_file: str | None = None
    eval_fraction: float | None = None  # default 0.1 when there is no eval_file
    model: str | None = None  # None: the embedded model
    quant: str | None = None
    dtype: str = "fp32"
    seq_len: int = 1024
    pack: bool = False
    batch_size: int = 4
    max_steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    min_lr: float | None = None
    warmup: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("attention",)
    rslora: bool = False
    seed: int = 0
    eval_every: int | None = None
    checkpoint_every: int = 50
    bf16: bool = False
    max_tiles: int = 16
    merge: bool = False
    aux_coef: float = 0.0  # router load balancing: only moves anything with the router among the targets

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", (self.data,) if isinstance(self.data, str) else tuple(self.data))
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if not self.data:
            raise ValueError("no training data: give --data FILE.jsonl (repeatable)")
        if self.eval_file is not None and self.eval_fraction is not None:
            raise ValueError("give either --eval-file or --eval-fraction, not both")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.dtype!r}")
        for name in ("seq_len", "batch_size", "checkpoint_every", "max_tiles"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        self.lora_config()  # rank, alpha, dropout, targets checked by LoraConfig

    def lora_config(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora,
                          targets=self.targets)

    def resolved(self, steps_per_epoch: int) -> "FinetuneSettings":
        """The settings with every derived value filled in (what recipe.json records)."""
        steps = self.max_steps or epochs_to_steps(self.epochs or 1.0, steps_per_epoch)
        return replace(self, max_steps=steps,
                       eval_fraction=self.eval_fraction if self.eval_file or self.eval_fraction else 0.1,
                       min_lr=self.lr / 10 if self.min_lr is None else self.min_lr,
                       warmup=max(1, round(0.05 * steps)) if self.warmup is None else self.warmup,
                       eval_every=max(1, steps // 10) if self.eval_every is None else self.eval_every)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.max_steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           min_lr=self.min_lr, warmup=self.warmup, weight_decay=self.weight_decay,
                           grad_clip=self.grad_clip, eval_every=self.eval_every, eval_batches=1 << 30,
                           checkpoint_every=self.checkpoint_every, log_every=1, seed=self.seed,
                           aux_coef=self.aux_coef, bf16=self.bf16)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, record: dict) -> "FinetuneSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"recipe settings {unknown} are unknown to this version of llama4 finetune")
        return cls(**record)


class AdapterView(nn.Module):
    """An adapted model as the training loop sees it: the same forward, with the adapters as its whole state
    (the loop checkpoints ``state_dict()``; the frozen base is not copied into every checkpoint)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, pixel_values=pixel_values)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dict(lora_state_dict(self.model))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        load_lora_state_dict(self.model, dict(state_dict))


@dataclass
class Prepared:
    """A run's settings (resolved), tokenizer, rows and data record, before any model is loaded."""

    settings: FinetuneSettings
    tok: object
    train_rows: object
    eval_rows: object
    data_record: dict = field(default_factory=dict)


def data_record(settings: FinetuneSettings) -> dict:
    """SHA-256 of every data file and of the pictures they refer to by path."""
    files = list(settings.data) + ([settings.eval_file] if settings.eval_file else [])
    pictures = {str(p): file_sha256(p) for f in files for p in image_files(f)}
    return {"data_sha256": {f: file_sha256(Path(f)) for f in files}, "image_sha256": pictures}


def prepare(settings: FinetuneSettings) -> Prepared:
    """Read and check the data (every error before a model is loaded), split and lay it out in rows."""
    from llama4.prompt import load_tokenizer

    settings = replace(settings, data=tuple(str(Path(f).resolve()) for f in settings.data),
                       eval_file=str(Path(settings.eval_file).resolve()) if settings.eval_file else None,
                       model=str(Path(settings.model).resolve()) if settings.model else None)
    tok = load_tokenizer(resolve_model_path(settings.model))
    examples = [e for f in settings.data for e in read_chat_jsonl(tok, f, settings.max_tiles)]
    if settings.eval_file:
        train_examples, eval_examples = examples, read_chat_jsonl(tok, settings.eval_file, settings.max_tiles)
    else:
        train_examples, eval_examples = split_eval(examples, settings.eval_fraction or 0.1, settings.seed)
    train_rows = layout_rows(train_examples, settings.seq_len, tok.pad_id, settings.pack)
    eval_rows = layout_rows(eval_examples, settings.seq_len, tok.pad_id, settings.pack)
    if len(train_rows) < settings.batch_size:
        raise ValueError(f"{len(train_rows)} training rows cannot fill one batch of --batch-size "
                         f"{settings.batch_size}: lower it or add examples")
    settings = settings.resolved(len(train_rows) // settings.batch_size)
    return Prepared(settings, tok, train_rows, eval_rows, data_record(settings))


def base_record(settings: FinetuneSettings) -> dict:
    path = resolve_model_path(settings.model)
    config = path / "config.json"
    return {"path": str(path.resolve()), "embedded": settings.model is None,
            "config_sha256": file_sha256(config) if config.is_file() else None}


def load_adapted(settings: FinetuneSettings) -> nn.Module:
    """The base model, unpacked, quantized by ``settings.quant`` (QLoRA) and adapted (adapters seeded)."""
    model = load_model(settings.model, dtype=torch_dtype(settings.dtype), pack=False, quant=settings.quant)
    return apply_lora(model, settings.lora_config(), seed=settings.seed)


def _check_same_data(out: Path, recorded: dict, now: dict) -> None:
    for kind in ("data_sha256", "image_sha256"):
        for name, digest in recorded[kind].items():
            if now[kind].get(name) != digest:
                raise ValueError(f"{name} changed since the run in {out} started (SHA-256 {digest[:12]}... "
                                 f"recorded, {str(now[kind].get(name))[:12]}... now): a resumed run must see "
                                 "the same data; start a new run instead")


def finetune(settings: FinetuneSettings | None, out_dir: str | Path, *, resume: bool = False,
             stop_at: int | None = None, on_step=None, on_start=None) -> dict:
    """Run (or with ``resume``, continue) a fine-tuning run in ``out_dir``; returns result.json's dict.

    ``resume``: the settings come from ``out_dir/recipe.json`` (``settings`` must be None) and training
    continues from its checkpoint, bit for bit as the uninterrupted run. ``stop_at``: stop (with a
    checkpoint) after that many steps, as an interruption would. ``on_start(prepared, start_step)`` and
    ``on_step(metrics)`` report progress.
    """
    out = Path(out_dir)
    recipe_path = out / RECIPE_FILE
    if resume:
        if settings is not None:
            raise ValueError("a resumed run takes its settings from its recipe.json; give none")
        if not recipe_path.is_file():
            raise FileNotFoundError(f"{out} is not a finetune run directory (no {RECIPE_FILE}); start a run with "
                                    "--out first")
        recipe = json.loads(recipe_path.read_text())
        prepared = prepare(FinetuneSettings.from_json(recipe["settings"]))
        if prepared.settings != FinetuneSettings.from_json(recipe["settings"]):
            raise ValueError(f"{out}: the data no longer gives the run's rows and steps; start a new run")
        _check_same_data(out, recipe, prepared.data_record)
    else:
        if recipe_path.is_file() or (out / "checkpoint").exists():
            raise ValueError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
        if settings.max_steps is not None and settings.epochs is not None:
            raise ValueError("give either --max-steps or --epochs, not both")
        prepared = prepare(settings)
    settings = prepared.settings
    model = load_adapted(settings)
    pictures = [p for rows in (prepared.train_rows, prepared.eval_rows) for p in rows.pixels if p is not None]
    if pictures and not model.config.multimodal:
        raise ValueError(f"the data holds pictures but the base model {settings.model or 'embedded'} is text-only "
                         "(no vision tower): use a multimodal checkpoint or drop the image parts")
    view = AdapterView(model)
    tc = settings.train_config()
    batches = RowBatches(prepared.train_rows, settings.batch_size, settings.seed)
    held_out = eval_row_batches(prepared.eval_rows, settings.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    if not resume:
        recipe = {"command": "llama4 finetune", "settings": settings.to_json(), "train_config": asdict(tc),
                  "lora": asdict(settings.lora_config()), "base_model": base_record(settings),
                  **prepared.data_record, "rows": {"train": len(prepared.train_rows), "eval": len(prepared.eval_rows),
                                                   "train_target_tokens": target_tokens(prepared.train_rows)},
                  "code_version": code_version(), "torch": torch.__version__}
        recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")
        before = {"step": 0, **evaluate(view, held_out, settings.bf16)}
        (out / "metrics.jsonl").write_text(json.dumps(before) + "\n")
    start = json.loads((out / "checkpoint" / "state.json").read_text())["step"] if resume and (
        out / "checkpoint" / "state.json").is_file() else 0
    if on_start is not None:
        on_start(prepared, start)
    with torch.random.fork_rng(devices=[]):  # dropout's RNG: seeded here, restored from the checkpoint on resume
        torch.manual_seed(settings.seed)
        result = train(view, tc, batches, held_out, out, resume=resume, stop_at=stop_at, on_step=on_step)
    seconds = time.perf_counter() - tic
    if result.step < tc.steps:
        return {"step": result.step, "steps": tc.steps, "finished": False, "adapter": None}
    return _finish(out, model, prepared, result, seconds)


def _finish(out: Path, model: nn.Module, prepared: Prepared, result, seconds: float) -> dict:
    """The adapter (PEFT files), with --merge the merged checkpoint, and result.json."""
    settings = prepared.settings
    # PEFT cannot hold a router adapter (llama4.lora.save_adapter refuses it): those keep our names
    if any(name.endswith(".ffn.router") for name in lora_modules(model)):
        from safetensors.torch import save_file

        (out / "adapter").mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()},
                  str(out / "adapter" / "lora_state.safetensors"))
        (out / "adapter" / "lora_config.json").write_text(json.dumps(asdict(settings.lora_config())) + "\n")
    else:
        save_adapter(model, out / "adapter")
    history = result.eval_history
    record = {"step": result.step, "steps": settings.max_steps, "finished": True, "train_loss": result.train_loss,
              "eval_loss_before": _first_eval(out), "eval_loss": history[-1]["eval_loss"] if history else None,
              "seconds_this_run": round(seconds, 1), "adapter": str(out / "adapter")}
    if settings.merge:
        merged = merge_and_unload(model)
        # a QLoRA base keeps its untargeted weights quantized (their scales stay as quantized)
        dtype = None if settings.quant else _checkpoint_dtype(settings)
        with torch.no_grad():
            save_model(merged.to(dtype) if dtype is not None else merged, out / "merged")
        prepared.tok.save(out / "merged")
        record["merged"] = str(out / "merged")
    (out / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _first_eval(out: Path) -> float | None:
    for line in (out / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line) if line.strip() else {}
        if entry.get("step") == 0 and "eval_loss" in entry:
            return entry["eval_loss"]
    return None


def _checkpoint_dtype(settings: FinetuneSettings) -> torch.dtype | None:
    """The dtype the base checkpoint stores its weights in (the merged checkpoint keeps it), if it says."""
    config = resolve_model_path(settings.model) / "config.json"
    record = json.loads(config.read_text()) if config.is_file() else {}
    name = record.get("torch_dtype") or record.get("dtype") or record.get("text_config", {}).get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) \
        else None


# -- the command line ----------------------------------------------------------------------------------------


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    d = FinetuneSettings(data=("-",))
    p = subparsers.add_parser("finetune", help="LoRA / QLoRA fine-tuning on chat JSONL (loss on assistant turns)",
                              description="LoRA / QLoRA fine-tuning on OpenAI-style chat JSONL (one "
                              '{"messages": [...]} per line); docs/FINETUNING.md.')
    p.add_argument("--data", action="append", help="training chat JSONL file (repeatable)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--eval-file", help="held-out chat JSONL file")
    held.add_argument("--eval-fraction", type=float,
                      help="hold out this fraction of the training examples (seeded; default 0.1)")
    p.add_argument("--out", help="run directory to create (recipe.json, checkpoint/, adapter/, loss.png, ...)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (its settings come from "
                   "RUN_DIR/recipe.json; no other option may be given)")
    p.add_argument("--model", help="base checkpoint directory (default: the embedded model)")
    p.add_argument("--quant", help="QLoRA: quantize the frozen base with this recipe first, e.g. int8, int4-g32, "
                   "experts=int4-g32,attention=int8")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=d.dtype, help="dtype of the base and adapters")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="row length in tokens (an example must fit)")
    p.add_argument("--pack", action="store_true", help="pack whole examples into rows (they then attend to the "
                   "examples before them in their row; default: one example per row)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, help="optimizer steps")
    steps.add_argument("--epochs", type=float, help="passes over the training rows (default 1)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, help="lr at the last step (cosine decay; default lr / 10)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--targets", default=",".join(d.targets),
                   help=f"comma-separated kinds ({', '.join(KINDS)}) or module-name patterns")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default a tenth of them)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--max-tiles", type=int, default=d.max_tiles, help="tiles per picture at most")
    p.add_argument("--merge", action="store_true", help="also write the merged model as a plain checkpoint")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_finetune)
    return p


SETTING_ARGS = ("eval_file", "eval_fraction", "model", "quant", "dtype", "seq_len", "pack", "batch_size",
                "max_steps", "epochs", "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "rank", "alpha",
                "dropout", "rslora", "seed", "eval_every", "checkpoint_every", "bf16", "max_tiles", "merge")


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return FinetuneSettings(data=tuple(args.data or ()), targets=targets,
                            **{name: getattr(args, name) for name in SETTING_ARGS})


def _given_with_resume(args: argparse.Namespace, parser_defaults: dict) -> list[str]:
    return [f"--{name.replace('_', '-')}" for name in (*SETTING_ARGS, "data", "targets", "out")
            if getattr(args, name) != parser_defaults.get(name)]


def run_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume:
        defaults = vars(add_finetune_parser(argparse.ArgumentParser().add_subparsers()).parse_args([]))
        given = _given_with_resume(args, defaults)
        if given:
            raise ValueError(f"--resume continues a run with its recorded settings; drop {', '.join(given)}")
        settings, out = None, Path(args.resume)
    else:
        if not args.out:
            raise ValueError("--out RUN_DIR is required (or --resume RUN_DIR to continue a run)")
        settings, out = settings_from_args(args), Path(args.out)
    bar = None

    def on_start(prepared: Prepared, start: int) -> None:
        nonlocal bar
        s = prepared.settings
        if not args.quiet:
            print(f"{len(prepared.train_rows)} train rows ({sum(prepared.train_rows.examples)} examples, "
                  f"{target_tokens(prepared.train_rows):,} target tokens), {len(prepared.eval_rows)} eval rows; "
                  f"{s.max_steps} steps of {s.batch_size}" + (f", resuming at step {start}" if start else ""),
                  file=sys.stderr)
        bar = tqdm(total=s.max_steps, initial=start, unit="step", disable=args.quiet)

    def on_step(m: dict) -> None:
        bar.n = m["step"]
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}")

    record = finetune(settings, out, resume=bool(args.resume), on_start=on_start, on_step=on_step)
    if bar is not None:
        bar.close()
    if not args.quiet:
        before, after = record.get("eval_loss_before"), record.get("eval_loss")
        print(f"adapter written to {record['adapter']}" + (f", merged model to {record['merged']}"
                                                           if "merged" in record else "")
              + (f"; held-out loss {before:.3f} -> {after:.3f}" if before is not None and after is not None
                 else ""), file=sys.stderr)
    return 0
