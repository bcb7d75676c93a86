"""Decode-sized products: every CPU kernel variant this machine runs (llama4.kernels.cpu: AMX, AVX-512 BF16,
AVX-512, AVX2) against oneDNN's packed linear, on the same packed weights.

    python bench/linear.py            # writes its table into docs/PERFORMANCE.md
    python bench/linear.py --no-write

One "pass" multiplies 1, 8 or 16 rows by every weight matrix one decoded token of the `small` bench shape
reads (8 layers x q/k/v, output, shared and one routed expert's gate/up and down, then the 32,000-wide
output head: 208 MB of bf16), each matrix a separate packed weight, as in the model. The two sides take
turns pass by pass (the host's memory bandwidth swings within seconds); the table gives the median and
the range of GB/s over the rounds, and the cost of one call on a small (256 x 256) matrix.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_name, markdown_table, write_section  # noqa: E402
from llama4.kernels.cpu import library as cpu_kernel  # noqa: E402
from llama4.kernels.cpu.packing import PackedWeight  # noqa: E402

LAYER = [(1536, 1024), (1024, 1024), (2048, 1024), (1024, 1024), (2048, 1024), (1024, 1024)]
SHAPES = LAYER * 8 + [(32000, 1024)]


def onednn(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(x, weight.tensor, None, "none", [], "")


def kernel(variant: str):
    loaded = cpu_kernel.load_variant(variant)
    return lambda x, weight: loaded.linear(x, weight.address, weight.shape)


def call_cost(fn, x: torch.Tensor, weight: PackedWeight, calls: int = 3000) -> float:
    for _ in range(100):
        fn(x, weight)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x, weight)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    best = cpu_kernel.load()
    if best is None:
        sys.exit("no CPU kernel runs on this machine: nothing to compare")
    g = torch.Generator().manual_seed(0)
    weights = [PackedWeight((torch.randn(o, i, generator=g) * i ** -0.5).bfloat16(), best) for o, i in SHAPES]
    if any(w.address is None for w in weights):
        sys.exit("oneDNN packed some weights in a layout the kernel does not read")
    nbytes = sum(o * i * 2 for o, i in SHAPES)
    # (where oneDNN cannot pack bf16 - AVX2, AVX-512 without BF16 - the weights are in the kernel's own layout)
    sides = {"oneDNN packed linear": onednn} if all(w.tensor is not None for w in weights) else {}
    for variant in cpu_kernel.candidates("auto", cpu_kernel.cpu_flags()):
        sides[f"kernel {variant}"] = kernel(variant)
    rows_table = []
    for rows in (1, 8, 16):
        x = torch.randn(rows, 1024, generator=g).bfloat16()
        rates = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, fn in sides.items():
                start = time.perf_counter()
                for w in weights:
                    fn(x, w)
                rates[name].append(nbytes / (time.perf_counter() - start) / 1e9)
        for name, r in rates.items():
            rows_table.append([rows, name, f"{statistics.median(r):.1f}", f"{min(r):.1f}-{max(r):.1f}"])
            print(rows_table[-1], flush=True)
    small = PackedWeight(torch.randn(256, 256, generator=g).bfloat16(), best)
    one = torch.randn(1, 256, generator=g).bfloat16()
    costs = {name: call_cost(fn, one, small) for name, fn in sides.items()}
    body = ("## Decode-sized products (`python bench/linear.py`)\n\n" + markdown_table(
        ["rows", "kernel", "GB/s median", "GB/s range"], rows_table) + "\n\n"
        f"One pass: {len(SHAPES)} packed bf16 weights, {nbytes / 1e6:.0f} MB (every matrix one decoded token of "
        f"the `small` shape reads), the sides in turn for {args.rounds} rounds. One call on a 256 x 256 "
        "weight, one row: " + ", ".join(f"{name} {cost * 1e6:.1f} us" for name, cost in costs.items()) +
        f". {args.threads} threads, {cpu_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.")
    print("\n" + body)
    if not args.no_write:
        write_section(ROOT / "docs" / "PERFORMANCE.md", "bench-linear", body)


if __name__ == "__main__":
    main()
