"""Quantized KV caches (llama4.quant.kv_cache) at long context: logits error, greedy tokens and measured memory
against the bf16 cache.

    python bench/kv_quant.py                              # tiny bench shape, 32,768-token context
    python bench/kv_quant.py --context 8192 --new 32 --threads 1
    python bench/kv_quant.py --shape small --context 4096
    python bench/kv_quant.py --embedded --context 2000 --new 1000   # the shipped model on TinyStories text

The bench shape (../shared/bench/SHAPE.config.json) with random weights (normal(0, 0.02), seed ``--seed``) in bf16,
packed for this CPU as ``llama4.load_model`` packs (so the bf16 cache decodes on the fused C layer where a kernel
runs); ``--embedded``: the shipped model in bf16 (packed by load_model) and held-out TinyStories text. A prompt of
``--context - --new`` tokens (random ids, or the text) is prefilled (2,048-token pieces) once per format; then:

* ``bf16 (layers)``: greedy for ``--new`` tokens on the model's torch layers; the reference of every row;
* ``bf16 (C layer)``: the default path, from copies of the same prefilled cache: greedy, and teacher-forced over
  the reference's tokens;
* ``int8`` / ``fp8``: the global layers' cache quantized (one bf16 scale per token and KV head), from their own
  prefill, on the fused C layer where a kernel runs (it reads and writes the quantized entries): greedy, and
  teacher-forced over the reference's tokens.

Columns: the global layers' key/value storage in bytes at the end of the greedy run, read off the cache's tensors
(``KVCache.nbytes``), and its ratio to bf16; the whole cache then; the relative L2 error of the prefill's last
logits and of the teacher-forced decode steps' logits (mean and max over steps) against the reference; top-1
agreement over those steps; how many greedy tokens equal the reference's before the first difference; decode
tokens/s of the greedy run. Random weights give nearly flat logits (near-ties), so the greedy columns are an upper
bound on sensitivity: the ``bf16 (C layer)`` row, which differs from the reference only by summation order, shows
that floor.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama4  # noqa: E402
from common import ROOT, bench_config, cpu_name, markdown_table  # noqa: E402
from llama4.checkpoint.hf_config import text_config_from_hf  # noqa: E402
from llama4.inference.generate import new_cache, prefill  # noqa: E402
from llama4.kernels import cpu as cpu_kernels  # noqa: E402
from llama4.kernels.cpu import KernelOptions  # noqa: E402

PIECE = 2048
DATA = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt.gz"


def build(shape: str, seed: int) -> llama4.Llama4Model:
    text = text_config_from_hf(bench_config(shape))
    model = llama4.random_model(llama4.ModelConfig(text=text), dtype=torch.bfloat16, seed=seed, std=0.02)
    return cpu_kernels.pack(model, KernelOptions.from_environ(os.environ))


def text_prompt(tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of held-out TinyStories text, for the embedded model."""
    with gzip.open(DATA, "rt") as f:
        text = f.read(20 * tokens)
    ids = llama4.load_tokenizer().encode(text, bos=True)[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"{DATA} holds fewer than {tokens} tokens")
    return torch.tensor([ids])


def decode(model, cache, first: torch.Tensor, steps: int, forced: list[int] | None = None):
    """Greedy (or teacher-forced over ``forced``) decode from ``first`` (last prefill logits [1, V]): the tokens,
    the logits of every step [steps, V] float32 (step 0: the prefill's) and the decode seconds."""
    logits, tokens = [first.float()], []
    start = time.perf_counter()
    for step in range(steps):
        tokens.append(forced[step] if forced is not None else int(logits[-1].argmax()))
        if step < steps - 1:
            logits.append(model(torch.tensor([[tokens[-1]]]), cache=cache)[:, -1].float())
    return tokens, torch.cat(logits), time.perf_counter() - start


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(args) -> dict:
    model = llama4.load_model(dtype=torch.bfloat16) if args.embedded else build(args.shape, args.seed)
    text = model.config.text
    fused = model.text.fast_decode
    prompt = (text_prompt(args.context - args.new) if args.embedded else
              torch.randint(0, text.vocab_size, (1, args.context - args.new),
                            generator=torch.Generator().manual_seed(args.seed + 1)))
    glob, rows = list(text.global_layers), {}
    with torch.inference_mode():
        for fmt in ("auto", *args.formats):
            model.text.fast_decode = fused
            cache = new_cache(model, fmt)
            start = time.perf_counter()
            last = prefill(model, prompt, cache, chunk=PIECE)
            prefill_s = time.perf_counter() - start
            entry = {"prefill_seconds": prefill_s}
            if fmt == "auto":
                fused_cache, forced_cache = cache.copy_rows([0]), cache.copy_rows([0])
                model.text.fast_decode = None
                tokens, logits, seconds = decode(model, cache, last, args.new)
                entry |= {"global_bytes": cache.nbytes(glob), "total_bytes": cache.nbytes()}  # at the end of the run
                rows["bf16 (layers)"] = entry | {"tokens": tokens, "logits": logits, "decode_seconds": seconds}
                model.text.fast_decode = fused
                tokens, _, seconds = decode(model, fused_cache, last, args.new)
                _, forced, _ = decode(model, forced_cache, last, args.new, rows["bf16 (layers)"]["tokens"])
                rows["bf16 (C layer)"] = entry | {"tokens": tokens, "logits": forced, "decode_seconds": seconds,
                                                  "fused": fused is not None and fused.ready()}
                continue
            forced_cache = cache.copy_rows([0])
            tokens, _, seconds = decode(model, cache, last, args.new)
            entry |= {"global_bytes": cache.nbytes(glob), "total_bytes": cache.nbytes()}
            _, forced, _ = decode(model, forced_cache, last, args.new, rows["bf16 (layers)"]["tokens"])
            rows[fmt] = entry | {"tokens": tokens, "logits": forced, "decode_seconds": seconds}
    ref = rows["bf16 (layers)"]
    out = {"shape": "embedded" if args.embedded else args.shape, "seed": args.seed, "context": args.context,
           "new": args.new, "cpu": cpu_name(),
           "threads": torch.get_num_threads(), "c_layer": rows["bf16 (C layer)"].pop("fused"), "rows": {}}
    for name, row in rows.items():
        err = rel(row["logits"], ref["logits"])
        agree = (row["logits"].argmax(-1) == ref["logits"].argmax(-1)).double().mean()
        out["rows"][name] = {
            "global_bytes": row["global_bytes"], "global_ratio": row["global_bytes"] / ref["global_bytes"],
            "total_bytes": row["total_bytes"], "prefill_logits_err": err[0].item(),
            "decode_logits_err_mean": err[1:].mean().item(), "decode_logits_err_max": err[1:].max().item(),
            "top1_agreement": agree.item(), "greedy_same": same_prefix(row["tokens"], ref["tokens"]),
            "decode_tok_s": (args.new - 1) / row["decode_seconds"], "prefill_tok_s": prompt.shape[1] / row[
                "prefill_seconds"]}
    return out


def table(result: dict) -> str:
    headers = ["KV cache", "global layers' KV (measured)", "vs bf16", "whole cache", "prefill logits err",
               "decode logits err mean / max", "top-1 agree", "greedy = ref", "decode tok/s"]
    body = []
    for name, r in result["rows"].items():
        body.append([name, f"{r['global_bytes'] / 2**20:.2f} MiB", f"{r['global_ratio']:.3f}",
                     f"{r['total_bytes'] / 2**20:.2f} MiB", f"{r['prefill_logits_err']:.1e}",
                     f"{r['decode_logits_err_mean']:.1e} / {r['decode_logits_err_max']:.1e}",
                     f"{100 * r['top1_agreement']:.1f} %", f"{r['greedy_same']} / {result['new']}",
                     f"{r['decode_tok_s']:.1f}"])
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", help="bench shape in ../shared/bench (default: tiny)")
    parser.add_argument("--context", type=int, default=32768, help="prompt + generated tokens (default: 32768)")
    parser.add_argument("--new", type=int, default=64, help="generated tokens, the last of the context (default: 64)")
    parser.add_argument("--formats", default="int8,fp8", help="quantized formats to compare (default: int8,fp8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedded", action="store_true", help="the shipped model on TinyStories text instead")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not 2 <= args.new < args.context:
        parser.error("--new must be at least 2 and below --context")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    weights = "the embedded model on TinyStories text" if args.embedded else \
        f"{result['shape']} shape, random weights (seed {result['seed']})"
    print(f"{weights}, bf16; {result['context']:,}-token "
          f"context: {result['context'] - result['new']:,} prompt tokens + {result['new']} generated; "
          f"{result['cpu']}, {result['threads']} threads; C decode layer {'on' if result['c_layer'] else 'off'}; "
          f"errors against bf16 (layers)\n")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
