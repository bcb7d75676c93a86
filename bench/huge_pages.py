"""Weights on transparent huge pages against the same weights where torch allocates them (4 KiB pages).

    python bench/huge_pages.py            # writes its table into docs/PERFORMANCE.md
    python bench/huge_pages.py --no-write

Each format (bf16 in the kernel's blocked layout, int8, int4-g32 with bf16 scales) gets the 48 [2048 x 1024]
weights of six `small`-shape decoder layers' worth of products, twice: as packed (torch's allocations) and copied
by ``llama4.kernels.cpu.huge_pages.place`` (what packed modules keep). One row is multiplied by every weight of a
set in turn (a decode step's pattern: each weight read once, the set far beyond the last-level cache); the two
sets take turns pass by pass in one process (the host's bandwidth drifts), and the table gives each side's median
GB/s (weight bytes read / time) over the rounds, at 1 and 2 threads. The outputs of both sides are checked equal.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_name, markdown_table, write_section  # noqa: E402
from llama4.kernels.cpu import huge_pages  # noqa: E402
from llama4.kernels.cpu import library as cpu_kernel  # noqa: E402
from llama4.kernels.cpu.library import WeightDescriptor  # noqa: E402
from llama4.kernels.cpu.packing import PackedWeight  # noqa: E402
from llama4.quant.formats import WeightFormat, quantize  # noqa: E402

SHAPE, COUNT = (2048, 1024), 48
FORMATS = ("bf16", "int8", "int4-g32")


def _weights(fmt: str, kernel) -> list[PackedWeight]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(COUNT):
        w = torch.randn(SHAPE, generator=g) * 0.02
        out.append(PackedWeight(w.bfloat16() if fmt == "bf16"
                                else quantize(w, WeightFormat.parse(fmt), torch.bfloat16), kernel))
    return out


def _placed(weight: PackedWeight) -> tuple[int, list]:
    """The address of a descriptor of ``weight`` whose tensors were copied by huge_pages.place (and what to keep)."""
    if weight.quantized is None:
        data = huge_pages.place(weight.blocked)
        descriptor = WeightDescriptor(0, 0, 0, data.data_ptr(), None, None)
        return ctypes.addressof(descriptor), [descriptor, data]
    q = weight.quantized
    codes, scale = huge_pages.place(q.codes), huge_pages.place(q.scale)
    zero = None if q.zero is None else huge_pages.place(q.zero)
    d = q.descriptor
    descriptor = WeightDescriptor(d.format, d.group, d.bf16_scales, codes.data_ptr(), scale.data_ptr(),
                                  None if zero is None else zero.data_ptr())
    return ctypes.addressof(descriptor), [descriptor, codes, scale, zero]


def _bytes(weight: PackedWeight) -> int:
    if weight.quantized is not None:
        return weight.quantized.nbytes
    return weight.blocked.numel() * weight.blocked.element_size()


def measure(fmt: str, kernel, threads: int, rounds: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    weights = _weights(fmt, kernel)
    placed = [_placed(w) for w in weights]
    x = torch.randn(1, SHAPE[1], generator=torch.Generator().manual_seed(1)).bfloat16()
    for w, (address, _) in zip(weights, placed):
        if not torch.equal(kernel.linear(x, w.address, w.shape), kernel.linear(x, address, w.shape)):
            raise AssertionError(f"{fmt}: the placed copy multiplies differently")
    total = sum(_bytes(w) for w in weights)
    sides = {"4 KiB pages": [w.address for w in weights], "huge pages": [a for a, _ in placed]}
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in (sides if r % 2 == 0 else reversed(list(sides))):
            start = time.perf_counter()
            for address in sides[name]:
                kernel.linear(x, address, SHAPE)
            speeds[name].append(total / (time.perf_counter() - start) / 1e9)
    return {name: statistics.median(v) for name, v in speeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not huge_pages.available():
        sys.exit("transparent huge pages are not available here (see llama4/kernels/cpu/huge_pages.py)")
    kernel = cpu_kernel.load("auto")
    if kernel is None:
        sys.exit("no CPU kernel runs here")
    rows = []
    for fmt in FORMATS:
        for threads in (1, 2):
            m = measure(fmt, kernel, threads, args.rounds)
            small, huge = m["4 KiB pages"], m["huge pages"]
            rows.append([fmt, str(threads), f"{small:.1f}", f"{huge:.1f}", f"{huge / small:.2f}x"])
            print(" | ".join(rows[-1]), flush=True)
    smaps = Path("/proc/self/smaps_rollup").read_text()
    anon_huge = re.search(r"AnonHugePages:\s+(\d+)", smaps)
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    table = markdown_table(["weights", "threads", "GB/s, 4 KiB pages", "GB/s, huge pages", "huge / 4 KiB"], rows)
    body = (f"### Packed weights on transparent huge pages\n\n{table}\n\n`python bench/huge_pages.py`: one row times "
            f"{COUNT} weights of {SHAPE[0]} x {SHAPE[1]} per pass, the two copies in turn, median of {args.rounds} "
            f"passes each; kernel {kernel.name}, {cpu_name()}, torch {torch.__version__}, THP setting `{setting}` "
            f"(this process's AnonHugePages at the end: {anon_huge.group(1) if anon_huge else '?'} kB), "
            f"{time.strftime('%Y-%m-%d')}.\n")
    print(body)
    if not args.no_write:
        write_section(ROOT / "docs" / "PERFORMANCE.md", "bench-huge-pages", body)


if __name__ == "__main__":
    main()
