"""Shared pieces of the benchmarks: random reference checkpoints, worker subprocesses, machine rates.

Every measurement runs in its own subprocess so that peak RSS belongs to one implementation, one dtype
and one length. Both implementations load the same safetensors checkpoint of transformers' random init.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"


def bench_config(shape: str) -> dict:
    path = SHARED_BENCH / f"{shape}.config.json"
    if path.is_file():
        return json.loads(path.read_text())
    raise SystemExit(f"benchmark shape {shape!r} not found at {path} (needs ../shared/bench)")


def ensure_checkpoint(shape: str, cache_dir: Path, seed: int = 0) -> Path:
    """transformers' Llama4ForCausalLM with its own random init (seed ``seed``), saved once as bf16."""
    path = cache_dir / f"{shape}-seed{seed}"
    if (path / "config.json").is_file():
        return path
    import sys as _sys
    import types

    _sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import transformers

    torch.manual_seed(seed)
    config = transformers.Llama4TextConfig(**{k: v for k, v in bench_config(shape).items()
                                              if k not in ("architectures", "model_type", "dtype")})
    model = transformers.Llama4ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def cpu_name() -> str:
    """The CPU's model name and whether it has AMX / AVX-512 BF16 (what the decode kernels depend on)."""
    name, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == platform.machine():
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else \
        "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa})"


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across exec from the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# What each CPU path needs in a worker's environment: the instruction set oneDNN, ATen and our kernel may use
# (capping them on a CPU that has more runs the path of a CPU that has only that).
CPU_PATHS = {
    "avx512bf16": {"LLAMA4_CPU_KERNEL": "avx512bf16", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx2": {"LLAMA4_CPU_KERNEL": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


class BusyCores:
    """``count`` processes that each keep a core busy (a tight loop) while the block runs, bounded in time
    (they stop themselves after ``limit`` seconds if the block outlives that): other work on the machine."""

    def __init__(self, count: int, limit: float = 3600):
        self.count, self.limit, self.procs = count, limit, []

    def __enter__(self):
        loop = f"import time\nend = time.time() + {self.limit}\nwhile time.time() < end: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(self.count)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def run_worker(script: Path, args: list[str], timeout: float = 1800, env: dict[str, str] | None = None) -> dict:
    """Run ``script --worker ARGS`` in a fresh interpreter (``env``: added to the environment); it prints one
    JSON line as its last output."""
    env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gemm_rate(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """This machine's matmul peak in ``dtype``: the best FLOP/s of a large square product, over plain
    ``torch.mm`` and oneDNN's packed-weight linear (the kernel llama4 uses on CPU), best of ``reps``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    candidates = [lambda: a @ b]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), 1)
        candidates.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    except (RuntimeError, AttributeError):
        pass
    best = float("inf")
    for run in candidates:
        run()
        for _ in range(reps):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Measured bytes/s of reading + writing a large buffer (a copy moves 2 x nbytes)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(doc: Path, marker: str, body: str) -> None:
    """Replace the text between <!-- marker --> and <!-- /marker --> in ``doc`` (appending if absent)."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    text = (doc.read_text() if doc.exists()
            else "# Performance\n\nMeasured tables, each written by the benchmark named in it.\n")
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
