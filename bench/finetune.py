"""LoRA against QLoRA on a bench shape: peak RSS, step time and the loss curve of each configuration.

    python bench/finetune.py                              # small shape, every config, a markdown table
    python bench/finetune.py --configs bf16,nf4 --checkpointing on --steps 4 --json out.json

Random weights (normal(0, 0.02), llama4.random_model's draw), a bf16 base, LoRA on ``--targets``, AdamW over the
adapters only, the same fixed token batches (cycled) for every configuration. The configurations:

* ``bf16``: LoRA on the bf16 base;
* ``int4-g32``, ``nf4``, or any recipe llama4.quant parses: QLoRA, the recipe's kinds quantized (the head, router,
  norms and embeddings stay bf16);

each without and with gradient checkpointing (llama4.lora.enable_gradient_checkpointing). Every configuration runs
in its own subprocess, so its peak RSS is its own: the base is built parameter by parameter and each quantized
module is quantized as soon as its weights exist, so a QLoRA process never holds the whole bf16 model (its peak is
the quantized model plus training). Peak RSS is the process's high-water mark (VmHWM, which is ru_maxrss without
what Linux carries across exec from the parent). Workers run with glibc's mmap threshold fixed at 1 MiB
(MALLOC_MMAP_THRESHOLD_, unless set): every tensor of 1 MiB or more is then mapped and unmapped on its own, so RSS
follows the tensors alive rather than what glibc's arenas keep of freed temporaries (the per-expert dequantized
weights, 4-8 MB each, would otherwise pile up there: 1.4 GB for int4-g32 where its tensors need well under 1 GB).
Step time: the median step after the first (warm-up). The
"overlap margin" of a configuration is the largest difference of its loss from bf16 LoRA's (the same checkpointing
setting) over the steps: QLoRA's base differs from bf16's by the weights' rounding only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small", help="a preset of llama4.presets (default small)")
    parser.add_argument("--configs", default="bf16,int4-g32,nf4",
                        help="comma-separated: bf16 (LoRA) and quant recipes (QLoRA); items with '=' are not "
                             "allowed here, use ';' between a recipe's items (e.g. experts=nf4;attention=int8)")
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64, help="tokens per row (default 64)")
    parser.add_argument("--batches", type=int, default=2, help="distinct token batches, cycled (default 2)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", default="attention,shared,experts")
    parser.add_argument("--adapter-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq", "batches", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is the warm-up, left out of the median)")
    return args


def build_base(config, recipe, seed: int = 0):
    """random_model(config, bf16, seed)'s weights, with the modules ``recipe`` names quantized one at a time, as
    soon as their weights exist (never the whole bf16 model at once)."""
    import torch

    from llama4.build import build_meta
    from llama4.quant import QuantRecipe
    from llama4.quant.modules import QuantizedExperts, QuantizedLinear
    from llama4.quant.recipe import quantizable_modules

    model = build_meta(config)
    recipe = QuantRecipe.parse(recipe) if isinstance(recipe, str) else recipe
    pending = {}
    if recipe is not None:
        pending = {t.name: t for t in quantizable_modules(model) if recipe.format_for(t.kind) is not None}
    generator = torch.Generator().manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if name.endswith(("norm.weight", "norm_pre.weight", "norm_post.weight")):
            value = torch.ones(param.shape)
        elif name.endswith(".bias"):
            value = torch.zeros(param.shape)
        else:
            value = torch.randn(param.shape, generator=generator) * 0.02
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(value.to(torch.bfloat16),
                                                                                requires_grad=False)
        target = pending.get(module_name)
        if target is not None and not any(p.is_meta for p in getattr(target.parent, target.attribute).parameters()):
            child, fmt = getattr(target.parent, target.attribute), recipe.format_for(target.kind)
            quantized = (QuantizedExperts(child, fmt, recipe.scale_dtype) if target.kind == "experts"
                         else QuantizedLinear(child, fmt, recipe.scale_dtype))
            setattr(target.parent, target.attribute, quantized)
            del pending[module_name], child
    if pending:
        raise RuntimeError(f"modules left unquantized: {sorted(pending)[:3]}")
    if recipe is not None:
        model.quant_recipe = recipe
    return model.to("cpu").eval()


def frozen_head(model) -> None:
    """The output head's product through llama4.lora.frozen.frozen_linear (the same values). It is frozen in every
    configuration, and autograd's own backward of it (g @ W, W [vocab, D]) is torch's slow bf16 layout on CPUs
    without AVX-512 BF16: 20 s a step for 32 tokens of the small shape on the AVX2 host of docs/FINETUNING.md."""
    import torch

    from llama4.lora.frozen import frozen_linear

    class FrozenHead(torch.nn.Module):
        def __init__(self, weight: torch.nn.Parameter):
            super().__init__()
            self.weight = weight

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return frozen_linear(h, self.weight.to)

    model.text.output = FrozenHead(model.text.output.weight)


def run_worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from bench.common import peak_rss_bytes

    from llama4.lora import LoraConfig, apply_lora
    from llama4.presets import preset, text_only

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    config = text_only(preset(spec["shape"]))
    recipe = None if spec["config"] == "bf16" else spec["config"].replace(";", ",")
    start = time.perf_counter()
    model = build_base(config, recipe)
    adapter_dtype = torch.float32 if spec["adapter_dtype"] == "fp32" else torch.bfloat16
    apply_lora(model, LoraConfig(rank=spec["rank"], alpha=spec["alpha"], dropout=spec["dropout"],
                                 targets=tuple(spec["targets"].split(","))), dtype=adapter_dtype, seed=0)
    frozen_head(model)
    if spec["checkpointing"]:
        from llama4.lora.checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model.train()
    setup_s = time.perf_counter() - start
    setup_rss = peak_rss_bytes()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    vocab = config.text.vocab_size
    data = torch.randint(3, vocab, (spec["batches"], spec["batch"], spec["seq"] + 1),
                         generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # dropout masks: the same draws in every configuration
    losses, times = [], []
    for step in range(spec["steps"]):
        tokens = data[step % spec["batches"]]
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {**spec, "losses": losses, "step_s": statistics.median(times[1:]), "first_step_s": times[0],
            "setup_s": setup_s, "setup_peak_rss": setup_rss, "peak_rss": peak_rss_bytes(),
            "trainable": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


def _spawn(spec: dict) -> dict:
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"config {spec['config']} (checkpointing {spec['checkpointing']}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    reference = {r["checkpointing"]: r["losses"] for r in results if r["config"] == "bf16"}
    lines = ["| config | checkpointing | peak RSS (MB) | step (s, median) | first loss | last loss | overlap margin |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ref = reference.get(r["checkpointing"])
        margin = "-" if ref is None or r["config"] == "bf16" else \
            f"{max(abs(a - b) for a, b in zip(r['losses'], ref)):.4f}"
        name = "bf16 LoRA" if r["config"] == "bf16" else f"QLoRA {r['config']}"
        lines.append(f"| {name} | {'on' if r['checkpointing'] else 'off'} | {r['peak_rss'] / 2**20:.0f} | "
                     f"{r['step_s']:.2f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {margin} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    from bench.common import cpu_name

    settings = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    base = {k: getattr(args, k) for k in ("shape", "steps", "batch", "seq", "batches", "rank", "alpha", "dropout",
                                           "targets", "adapter_dtype", "lr", "threads")}
    results = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        for checkpointing in settings:
            result = _spawn({**base, "config": config, "checkpointing": checkpointing})
            losses = " ".join(f"{x:.4f}" for x in result["losses"])
            print(f"{config:>10} checkpointing={'on ' if checkpointing else 'off'} "
                  f"peak {result['peak_rss'] / 2**20:7.0f} MB  step {result['step_s']:6.2f} s  losses {losses}",
                  file=sys.stderr, flush=True)
            results.append(result)
    print(f"shape {args.shape}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, rank {args.rank}, "
          f"targets {args.targets}, adapters {args.adapter_dtype}, {results[0]['threads']} threads, {cpu_name()}\n")
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
