"""One training loop for pretraining and fine-tuning, over the same model code as inference.

Per step: forward (bf16 autocast optional) with the MoE router logits captured by hooks, masked
next-token cross-entropy + ``aux_coef`` x router load-balancing loss, backward, grad-norm clipping,
AdamW at the scheduled lr. Every ``eval_every`` steps: held-out loss and perplexity. Every
``checkpoint_every`` steps (and at the end): a pickle-free checkpoint from which ``train(..., resume=True)``
continues bit-identically. Metrics go to ``metrics.jsonl``, the curves to ``loss.png``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from llama4.train.objectives import RouterCapture, lr_at, next_token_loss, param_groups
from llama4.train.plot import plot_curves
from llama4.train.state import load_training_state, save_training_state

Batch = tuple  # (inputs [B, T], targets [B, T]) int64, optionally + pixel_values [tiles, 3, H, W]


def _forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a batch (with its pictures, if it has any) and its targets."""
    inputs, targets, *pixels = batch
    return (model(inputs, pixel_values=pixels[0]) if pixels else model(inputs)), targets


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    aux_coef: float = 0.01  # weight of the router load-balancing loss (0 disables it)
    bf16: bool = False  # bf16 autocast for forward/backward; weights and optimizer stay float32
    vision_lr_scale: float = 1.0  # the vision tower's lr = this x the scheduled lr (0 freezes it in effect)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.vision_lr_scale < 0:
            raise ValueError(f"TrainConfig.vision_lr_scale must be >= 0, got {self.vision_lr_scale}")


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    train_loss: float | None  # cross-entropy of the last step
    eval_history: list[dict] = field(default_factory=list)
    expert_shares: list[list[float]] = field(default_factory=list)  # per MoE layer, since the last report


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def evaluate(model: nn.Module, batches: Sequence[Batch], bf16: bool = False) -> dict:
    """Token-weighted mean cross-entropy over ``batches`` and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), _autocast(bf16):
        for batch in batches:
            loss, n = next_token_loss(*_forward(model, batch))
            total, count = total + float(loss) * n, count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": count}


class _Log:
    """metrics.jsonl (appended; on resume, lines past the resumed step are dropped) + loss.png."""

    def __init__(self, out_dir: Path, start_step: int):
        self.path, self.png = out_dir / "metrics.jsonl", out_dir / "loss.png"
        kept = []
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        curves = {"train loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
                  "eval loss": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]}
        plot_curves(self.png, {k: v for k, v in curves.items() if v}, title="cross-entropy (nats/token)")


def _enable_grads(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters: those the caller left requiring grad, or all if none do (fresh models
    from ``random_model`` / ``load_model`` have grads off)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
    return params


class _ExpertShares:
    """Each MoE layer's per-expert token shares, summed over the steps since the last report."""

    def __init__(self):
        self.sums: list[torch.Tensor] = []
        self.steps = 0

    def add(self, shares: list[torch.Tensor]) -> None:
        self.sums = [s.clone() for s in shares] if not self.sums else [a + s for a, s in zip(self.sums, shares)]
        self.steps += 1

    def mean(self) -> list[list[float]]:
        return [[round(float(x) / self.steps, 4) for x in s] for s in self.sums]

    def take(self) -> list[list[float]]:
        """The mean, starting a new sum."""
        mean = self.mean()
        self.sums, self.steps = [], 0
        return mean


def _resume(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, train_batches,
            config: TrainConfig) -> int:
    """The step the checkpoint in ``out_dir`` was taken at, with the model, optimizer and data position
    restored from it; 0 if there is none."""
    meta = load_training_state(out_dir, model, optimizer)
    if meta is None:
        return 0
    if meta["train_config"]["seed"] != config.seed:
        raise ValueError(f"checkpoint in {out_dir} was trained with seed {meta['train_config']['seed']}, "
                         f"not {config.seed}")
    train_batches.load_state_dict(meta["data"])
    return meta["step"]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                capture: RouterCapture, train_batches, step: int, config: TrainConfig) -> tuple[dict, list]:
    """Optimizer step ``step`` (from 0) on the next batch: its metrics, and the per-expert token shares of
    each MoE layer."""
    tic = time.perf_counter()
    lr = lr_at(step, config.lr, config.min_lr, config.warmup, config.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    batch = next(train_batches)
    capture.clear()
    with capture, _autocast(config.bf16):
        logits, targets = _forward(model, batch)
    ce, _ = next_token_loss(logits, targets)
    aux, shares = capture.aux_loss()
    loss = ce + config.aux_coef * aux if config.aux_coef else ce
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    optimizer.step()
    capture.clear()
    elapsed = time.perf_counter() - tic
    metrics = {"step": step + 1, "loss": float(ce.detach()), "aux": float(aux.detach()), "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": targets.numel() / elapsed}
    return metrics, shares


def _evaluation_report(model: nn.Module, eval_batches: Sequence[Batch], config: TrainConfig, step: int,
                       shares: _ExpertShares, result: TrainResult, log: _Log) -> None:
    """Held-out loss at ``step`` with the expert shares since the last report: into ``result`` and the log."""
    report = {"step": step, **evaluate(model, eval_batches[:config.eval_batches], config.bf16)}
    if shares.sums:
        result.expert_shares = shares.take()
        report["expert_shares"] = result.expert_shares
    result.eval_history.append(report)
    log.write(report)
    log.plot()


def train(model: nn.Module, config: TrainConfig, train_batches, eval_batches: Sequence[Batch],
          out_dir: str | Path, resume: bool = True, stop_at: int | None = None,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` optimizer steps.

    ``train_batches``: an iterator of (inputs, targets) with ``state_dict()`` / ``load_state_dict()``
    (e.g. :class:`llama4.train.data.BatchIterator`); its position is checkpointed. ``eval_batches``: a
    fixed list. ``resume``: continue from ``<out_dir>/checkpoint`` if present. ``stop_at``: stop (with a
    checkpoint) after that many steps, as an interruption would. ``on_step(metrics)`` is called after
    every step (progress display).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = _enable_grads(model)
    groups = param_groups(model, config.weight_decay, config.vision_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=False)
    start = _resume(out_dir, model, optimizer, train_batches, config) if resume else 0
    log = _Log(out_dir, start)
    result = TrainResult(step=start, train_loss=None)
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    shares = _ExpertShares()
    model.train()
    capture = RouterCapture(model)
    for step in range(start, end):
        metrics, step_shares = _train_step(model, optimizer, params, capture, train_batches, step, config)
        done = step + 1
        shares.add(step_shares)
        result.step, result.train_loss = done, metrics["loss"]
        if on_step is not None:
            on_step(metrics)
        if done % config.log_every == 0 or done == end:
            log.write(metrics)
        last = done == end
        if done % config.eval_every == 0 or (last and done == config.steps):
            _evaluation_report(model, eval_batches, config, done, shares, result, log)
        if done % config.checkpoint_every == 0 or last:
            save_training_state(out_dir, model, optimizer, done, train_batches.state_dict(),
                                {"train_config": asdict(config)})
    if shares.sums:
        result.expert_shares = shares.mean()
    if start >= end:
        log.plot()
    model.eval()
    return result
