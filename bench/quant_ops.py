"""Quantized CPU products that torch already ships, against bf16 / fp32 linear, on this machine.

    python bench/quant_ops.py            # writes its tables into docs/PERFORMANCE.md
    python bench/quant_ops.py --no-write

Before writing a quantized CPU kernel by hand: what do torch's own weight-only int8 / int4 ops (and its
int8 x int8 linears) reach on the products of the `small` bench shape? Each distinct [K -> N] product of one
decoder layer (q, k, v, o, routed and shared expert gate_up / down) is timed at 1, 2, 4, 8, 16 rows (decode)
and 512 rows (a prefill piece), with torch's default thread count and with 1 thread:

- fp32 / bf16 ``F.linear`` on plain weights, and the bf16 path llama4 itself runs (kernels.cpu packing);
- int8 weight-only ``aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])`` (scales in x's dtype);
- int4 weight-only ``aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, innerKTiles)`` then
  ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [K / group, N, 2])``, a weight
  being ``(q - 8) * scale + zero`` per group of ``group`` inputs;
- int8 x int8: fbgemm's ``quantized.linear_dynamic`` and oneDNN's ``onednn.qlinear_pointwise`` (activations
  quantized per call, per tensor; that quantization is in the time);
- the x86 fallback of ``aten._dyn_quant_matmul_4bit`` (KleidiAI is Arm-only), at one row;
- the reference path: dequantize the int8 / int4 weight (nibbles packed two a byte) every call, then linear.

Every call reads another copy of its weights (copies that together exceed the last-level cache), as a decode
step reads every matrix once: GB/s is the weight's stored bytes over the time per call. Each op's first output
per shape and row count is checked against fp32 ``x @ dequantized(W).T``; an op whose max relative error
(max |y - ref| / max |ref|) exceeds TOLERANCE is marked wrong and left out of every comparison. The ops take
turns call by call (the host may be shared); the tables give each op's median call.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, copy_bandwidth, cpu_name, gemm_rate, markdown_table, write_section  # noqa: E402
from llama4.kernels.cpu import library as cpu_kernel  # noqa: E402
from llama4.kernels.cpu.packing import PackedWeight, _linear  # noqa: E402
from llama4.presets import SMALL  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 512)
GROUPS = (32, 64, 128)
TOLERANCE = 0.03  # bf16 outputs and per-call int8 activation quantization stay well inside this
COLD_BYTES = 64 << 20  # each op's copies of one weight together: twice the L3 of the machine we bench on
MAX_COPIES = 512
CACHE_MATTERS = 1e9  # bytes/s: an op reading its weight slower than this gains nothing from a warm cache
MIN_SAMPLES, MAX_SAMPLES = 3, 60  # timed calls per op, shape, row count and thread count
BF16 = torch.bfloat16

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")


# ---------------------------------------------------------------------------------------------- shapes, weights


def layer_products(text=SMALL.text) -> list[tuple[str, int, int, int]]:
    """(names, K, N, products per layer) for each distinct x[rows, K] @ W[K, N] of one decoder layer."""
    q, kv, dim, hidden = text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim, text.hidden_size, \
        text.intermediate_size
    products = [("q", dim, q), ("k", dim, kv), ("v", dim, kv), ("o", q, dim), ("expert gate_up", dim, 2 * hidden),
                ("expert down", hidden, dim), ("shared gate_up", dim, 2 * hidden), ("shared down", hidden, dim)]
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, k, n in products:
        shapes.setdefault((k, n), []).append(name)
    return [(", ".join(names), k, n, len(names)) for (k, n), names in shapes.items()]


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(BF16).float()


@dataclass
class Int4:
    """One group size's asymmetric int4 weight: q [N, K] int32 in 0..15, scale / zero [N, K / group]."""

    group: int
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    dequantized: torch.Tensor

    @property
    def scales_and_zeros(self) -> torch.Tensor:
        """[K / group, N, 2] (scale, zero): the layout _weight_int4pack_mm_for_cpu takes."""
        return torch.stack([self.scale, self.zero], -1).transpose(0, 1).contiguous()

    @property
    def nibbles(self) -> torch.Tensor:
        """[N, K / 2] uint8, input 2j in the low nibble, 2j + 1 in the high one (the reference path's storage)."""
        return (self.q[:, 0::2] | (self.q[:, 1::2] << 4)).to(torch.uint8)


def quantize_int4(w: torch.Tensor, group: int) -> Int4:
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = bf16_round(((hi - lo) / 15).clamp(min=1e-8))
    zero = bf16_round(lo + 8 * scale)
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    dequantized = ((q - 8) * scale[..., None] + zero[..., None]).view(n, k)
    return Int4(group, q.view(n, k).to(torch.int32), scale, zero, dequantized)


@dataclass
class Weights:
    """One [N, K] weight (the linear layout) in every format, and the fp32 weight each format stands for."""

    w: torch.Tensor
    q8: torch.Tensor = field(init=False)
    scale8: torch.Tensor = field(init=False)
    int4: dict[int, Int4] = field(init=False)
    refs: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self):
        self.scale8 = bf16_round(self.w.abs().amax(1) / 127)
        self.q8 = torch.round(self.w / self.scale8[:, None]).clamp(-127, 127).to(torch.int8)
        self.int4 = {g: quantize_int4(self.w, g) for g in GROUPS}
        self.refs = {"fp": self.w, "int8": self.q8.float() * self.scale8[:, None]}
        self.refs.update({f"int4 g{g}": q.dequantized for g, q in self.int4.items()})
        # what _dyn_quant_matmul_4bit computes from the same nibbles and scales: (q - 8) * scale, no zero
        q32 = self.int4[32]
        self.refs["int4 g32 symmetric"] = ((q32.q.float() - 8).view(*q32.scale.shape, 32) * q32.scale[..., None]) \
            .view_as(self.w)


# ---------------------------------------------------------------------------------------------- the ops


@dataclass
class Op:
    """A product under test: ``prepare(weights)`` builds its state once, ``call(x, state)`` runs it."""

    name: str
    family: str  # fp32, bf16, int8 or int4: what it is compared within
    act: torch.dtype
    ref: str  # the key of Weights.refs it computes
    prepare: Callable[[Weights], object]
    call: Callable[[torch.Tensor, object], torch.Tensor]
    nbytes: Callable[[int, int], int]  # stored weight bytes of an [N, K] weight
    max_rows: int = 1 << 30


def int8pack_op(act: torch.dtype, max_rows: int = 1 << 30) -> Op:
    """``_weight_int8pack_mm`` with ``act`` activations (fp32 ones run a slow loop: ``max_rows`` bounds the run)."""
    return Op(f"int8 _weight_int8pack_mm, {dtype_name(act)} x", "int8", act, "int8",
              lambda w: (w.q8, w.scale8.to(act)),
              lambda x, s: torch.ops.aten._weight_int8pack_mm(x, s[0], s[1]),
              lambda n, k: n * k + n * act.itemsize, max_rows)


def int4pack_op(group: int, act: torch.dtype, max_rows: int = 1 << 30) -> Op:
    def prepare(w: Weights):
        q = w.int4[group]
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.q, 1), q.scales_and_zeros.to(act)

    return Op(f"int4 _weight_int4pack_mm_for_cpu g{group}, {dtype_name(act)} x", "int4", act, f"int4 g{group}",
              prepare, lambda x, s: torch.ops.aten._weight_int4pack_mm_for_cpu(x, s[0], group, s[1]),
              lambda n, k: n * k // 2 + (k // group) * n * 2 * act.itemsize, max_rows)


def dequant_int8_linear(x: torch.Tensor, state) -> torch.Tensor:
    q, scale = state
    return F.linear(x, q.to(x.dtype) * scale[:, None])


def dequant_int4_linear(x: torch.Tensor, state) -> torch.Tensor:
    nibbles, scale, zero = state
    n, group = nibbles.shape[0], nibbles.shape[1] * 2 // scale.shape[1]
    q = torch.stack((nibbles & 15, nibbles >> 4), -1).view(n, scale.shape[1], group).to(x.dtype)
    return F.linear(x, ((q - 8) * scale[..., None] + zero[..., None]).view(n, -1))


def dequant_op(kind: str, act: torch.dtype, group: int = 128) -> Op:
    if kind == "int8":
        return Op(f"int8 dequantize + {dtype_name(act)} F.linear (reference)", "int8", act, "int8",
                  lambda w: (w.q8, w.scale8.to(act)), dequant_int8_linear, lambda n, k: n * k + n * act.itemsize)
    return Op(f"int4 g{group} dequantize + {dtype_name(act)} F.linear (reference)", "int4", act, f"int4 g{group}",
              lambda w: (w.int4[group].nibbles, w.int4[group].scale.to(act), w.int4[group].zero.to(act)),
              dequant_int4_linear, lambda n, k: n * k // 2 + (k // group) * n * 2 * act.itemsize)


def fbgemm_prepare(w: Weights):
    n = w.q8.shape[0]
    qw = torch._make_per_channel_quantized_tensor(w.q8, w.scale8.double(), torch.zeros(n, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Per-tensor asymmetric uint8 (what qlinear_pointwise takes), computed per call."""
    lo, hi = torch.aminmax(x.float())
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / 255
    zero_point = int(round(-lo / scale))
    return torch.clamp(torch.round(x.float() / scale) + zero_point, 0, 255).to(torch.uint8), scale, zero_point


def onednn_op(out: torch.dtype, max_rows: int) -> Op:
    def prepare(w: Weights):
        n = w.q8.shape[0]
        return torch.ops.onednn.qlinear_prepack(w.q8, None), w.scale8, torch.zeros(n, dtype=torch.long)

    def call(x: torch.Tensor, state) -> torch.Tensor:
        qx, scale, zero_point = quantize_activations(x)
        return torch.ops.onednn.qlinear_pointwise(qx, scale, zero_point, *state, None, 1.0, 0, out, "none", [], "")

    return Op(f"int8 x int8 onednn.qlinear_pointwise, {dtype_name(out)} out", "int8", BF16, "int8", prepare, call,
              lambda n, k: n * k + 4 * n, max_rows)


def dyn_quant_4bit_op(group: int = 32) -> Op:
    def prepare(w: Weights):
        q, (n, k) = w.int4[group], w.w.shape
        # symmetric: the kernel reads (nibble - 8) * scale (checked against that weight, not the asymmetric one)
        return torch.ops.aten._dyn_quant_pack_4bit_weight(q.nibbles, q.scale, None, group, k, n)

    def call(x: torch.Tensor, packed) -> torch.Tensor:
        return torch.ops.aten._dyn_quant_matmul_4bit(x, packed, group, x.shape[1], packed_n(packed, x.shape[1], group))

    return Op(f"int4 _dyn_quant_matmul_4bit g{group}, fp32 x (x86 fallback)", "int4", torch.float32,
              f"int4 g{group} symmetric", prepare, call, lambda n, k: 4 * (n * k // 2 + n * k // group), max_rows=1)


def packed_n(packed: torch.Tensor, k: int, group: int) -> int:
    return packed.numel() // (k // 2 + k // group)


def llama4_op(kernel) -> Op:
    probe = PackedWeight(torch.zeros(64, 64, dtype=BF16), kernel)
    where = f"kernel {kernel.name}" if probe.kernel is not None else "oneDNN" if probe.tensor is not None else "plain"
    return Op(f"bf16 llama4 packed linear ({where})", "bf16", BF16, "fp",
              lambda w: PackedWeight(w.w.to(BF16), kernel), lambda x, s: _linear(x, s), lambda n, k: 2 * n * k)


def all_ops(kernel) -> list[Op]:
    ops = [
        Op("fp32 F.linear", "fp32", torch.float32, "fp", lambda w: w.w.clone(), F.linear, lambda n, k: 4 * n * k),
        Op("bf16 F.linear", "bf16", BF16, "fp", lambda w: w.w.to(BF16), F.linear, lambda n, k: 2 * n * k),
        llama4_op(kernel),
        int8pack_op(BF16), int8pack_op(torch.float32, max_rows=4),
        Op("int8 x int8 fbgemm quantized.linear_dynamic, fp32 x", "int8", torch.float32, "int8", fbgemm_prepare,
           lambda x, s: torch.ops.quantized.linear_dynamic(x, s, True), lambda n, k: n * k + 4 * n),
        onednn_op(BF16, max_rows=1), onednn_op(torch.float32, max_rows=4),
        dequant_op("int8", BF16), dequant_op("int8", torch.float32),
    ]
    ops += [int4pack_op(g, BF16) for g in GROUPS]
    ops += [int4pack_op(128, torch.float32, max_rows=4), dequant_op("int4", BF16), dequant_op("int4", torch.float32),
            dyn_quant_4bit_op()]
    return ops


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", BF16: "bf16"}[dtype]


# ---------------------------------------------------------------------------------------------- measuring


def copy_state(op: Op, weights: Weights, state):
    """Another copy of a prepared state: plain tensors are cloned, opaque packs prepared again."""
    if isinstance(state, torch.Tensor) and state.layout == torch.strided:
        return state.clone()
    if isinstance(state, tuple) and all(isinstance(t, torch.Tensor) and t.layout == torch.strided for t in state):
        return tuple(t.clone() for t in state)
    return op.prepare(weights)


class Runner:
    """One op's copies of its prepared weight on one shape, taken in turn, so that a call reads a copy that is not
    in cache (as a decode step reads each matrix once). Copies are added only for an op fast enough for the cache
    to matter (fresh memory is slow to fault in on a VM)."""

    def __init__(self, op: Op, weights: Weights):
        self.op, self.weights = op, weights
        self.nbytes = op.nbytes(*weights.w.shape)
        self.copies, self.next = [op.prepare(weights)], 0

    def make_cold(self, seconds_per_call: float) -> None:
        if self.nbytes / seconds_per_call < CACHE_MATTERS:
            return
        wanted = min(MAX_COPIES, math.ceil(COLD_BYTES / self.nbytes))
        self.copies += [copy_state(self.op, self.weights, self.copies[0]) for _ in range(wanted - len(self.copies))]

    def call(self, x: torch.Tensor) -> torch.Tensor:
        state = self.copies[self.next]
        self.next = (self.next + 1) % len(self.copies)
        return self.op.call(x, state)

    def per_call(self, x: torch.Tensor, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            self.call(x)
        return (time.perf_counter() - start) / calls


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


@dataclass
class Result:
    seconds: float
    error: float


def measure(runners: list[Runner], weights: Weights, rows: int, budget: float) -> dict[str, Result]:
    """Time every runner on ``rows`` rows: warm up (checking the output), then one call each in turn, round after
    round, until each has ``budget`` seconds or MAX_SAMPLES calls (at least MIN_SAMPLES); the median call."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, weights.w.shape[1], generator=g).to(BF16)
    xs = {BF16: x, torch.float32: x.float()}
    refs = {key: xs[torch.float32] @ w.T for key, w in weights.refs.items()}
    errors = {}
    for r in runners:
        start = time.perf_counter()
        y = r.call(xs[r.op.act])
        first = time.perf_counter() - start
        errors[r.op.name] = relative_error(y, refs[r.op.ref])
        if first < 0.05:  # a second warm-up call where one is cheap (the first pays one-time setup)
            first = r.per_call(xs[r.op.act], 1)
        r.make_cold(first)
    samples = {r.op.name: [] for r in runners}
    pending = list(runners)
    while pending:
        for r in pending:
            samples[r.op.name].append(r.per_call(xs[r.op.act], 1))
        pending = [r for r in pending if len(samples[r.op.name]) < MIN_SAMPLES or (
            len(samples[r.op.name]) < MAX_SAMPLES and sum(samples[r.op.name]) < budget)]
    return {name: Result(statistics.median(t), errors[name]) for name, t in samples.items()}


def read_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s of reading a large buffer once (a sum), best of ``reps``: the decode roofline's denominator."""
    src = torch.ones(nbytes // 4)
    src.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


# ---------------------------------------------------------------------------------------------- tables


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 10e-3 else f"{seconds * 1e3:.1f} ms"


def shape_table(ops: list[Op], results: dict, shape: tuple[int, int], threads: int, rows_list) -> str:
    """One shape at one thread count: an op per line, a row count per column, 'time / GB/s / x vs bf16 F.linear'."""
    k, n = shape
    lines = []
    for op in ops:
        cells, worst = [], 0.0
        for rows in rows_list:
            r = results.get((op.name, k, n, threads, rows))
            if r is None:
                cells.append("-")
                continue
            worst = max(worst, r.error)
            base = results[("bf16 F.linear", k, n, threads, rows)].seconds
            gbs = op.nbytes(n, k) / r.seconds / 1e9
            mark = "" if not r.error > TOLERANCE else " WRONG"
            cells.append(f"{fmt_time(r.seconds)} / {gbs:.1f} / {base / r.seconds:.2f}x{mark}")
        lines.append([op.name, *cells, f"{worst:.1e}"])
    return markdown_table(["op", *[f"{rows} rows" for rows in rows_list], "max rel err"], lines)


def step_time(results: dict, op: Op, threads: int, rows: int, products) -> float | None:
    """Seconds for ``rows`` rows through every product of the 8 layers (None if an op is missing or wrong)."""
    total = 0.0
    for _, k, n, count in products:
        r = results.get((op.name, k, n, threads, rows))
        if r is None or r.error > TOLERANCE:
            return None
        total += count * SMALL.text.num_layers * r.seconds
    return total


def step_bytes(op: Op, products) -> int:
    return sum(count * SMALL.text.num_layers * op.nbytes(n, k) for _, k, n, count in products)


def summary_table(ops, results, products, threads_list, rows_list, bandwidth, flop_rate) -> str:
    """Per thread count and row count: the fastest correct op of each family over one decode step's products."""
    lines = []
    flops_per_row = sum(count * SMALL.text.num_layers * 2 * k * n for _, k, n, count in products)
    bf16_linear = next(op for op in ops if op.name == "bf16 F.linear")
    for threads in threads_list:
        for rows in rows_list:
            base = step_time(results, bf16_linear, threads, rows, products)
            best = {}
            for op in ops:
                t = step_time(results, op, threads, rows, products)
                if t is not None and (op.family not in best or t < best[op.family][1]):
                    best[op.family] = (op, t)
            best_bf16 = best["bf16"][1]
            for family in ("fp32", "bf16", "int8", "int4"):
                if family not in best:
                    continue
                op, t = best[family]
                nbytes = step_bytes(op, products)
                memory, compute = nbytes / bandwidth[threads], rows * flops_per_row / flop_rate[threads]
                lines.append([threads, rows, family, op.name, f"{t * 1e3:.2f}", f"{nbytes / t / 1e9:.1f}",
                              f"{base / t:.2f}x", f"{best_bf16 / t:.2f}x", f"{memory * 1e3:.2f}",
                              f"{compute * 1e3:.2f}", f"{max(memory, compute) / t:.0%}"])
    return markdown_table(["threads", "rows", "family", "fastest correct op", "ms per step", "weight GB/s",
                           "vs bf16 F.linear", "vs best bf16", "memory floor ms", "fp32 GEMM floor ms",
                           "of the larger floor"], lines)


# ---------------------------------------------------------------------------------------------- main


def run_all(ops, products, threads_list, budget: float) -> dict:
    results = {}
    for names, k, n, _ in products:
        weights = Weights(torch.randn(n, k, generator=torch.Generator().manual_seed(k * n)) * k ** -0.5)
        start = time.perf_counter()
        runners = [Runner(op, weights) for op in ops]
        for threads in threads_list:
            torch.set_num_threads(threads)
            for rows in ROWS:
                active = [r for r in runners if rows <= r.op.max_rows]
                measured = measure(active, weights, rows, budget)
                for name, r in measured.items():
                    results[(name, k, n, threads, rows)] = r
            print(f"[{k} -> {n}] ({names}): {threads} thread(s) done, {sum(len(r.copies) for r in runners)} "
                  f"weight copies, {time.perf_counter() - start:.1f} s", flush=True)
        del runners
    return results


def machine_rates(threads_list) -> tuple[dict, dict, dict]:
    read, copy, flops = {}, {}, {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        read[threads], copy[threads] = read_bandwidth(), copy_bandwidth(256 << 20)
        flops[threads] = gemm_rate(torch.float32, n=1024, reps=3)
    return read, copy, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.1,
                        help="seconds of timed calls per op, shape, row count and thread count (at least 3 calls)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.backends.quantized.engine = "fbgemm"
    default_threads = torch.get_num_threads()
    threads_list = [default_threads] + ([1] if default_threads > 1 else [])
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    ops, products = all_ops(cpu_kernel.load()), layer_products()
    read, copy, flops = machine_rates(threads_list)
    results = run_all(ops, products, threads_list, args.budget)
    body = report(ops, products, results, threads_list, read, copy, flops, load_before)
    print(f"\n{body}\n\n(total {time.perf_counter() - started:.0f} s)")
    if not args.no_write:
        write_section(ROOT / "docs" / "PERFORMANCE.md", "bench-quant-ops", body)


def report(ops, products, results, threads_list, read, copy, flops, load_before) -> str:
    parts = ["## Quantized products torch ships (`python bench/quant_ops.py`)", ""]
    parts.append("Cells: time per call / weight GB/s (stored weight bytes over that time) / speedup over bf16 "
                 f"`F.linear` on the same product; WRONG: max relative error over {TOLERANCE} (left out of the "
                 "summary). Weights [N, K] random (std K^-1/2); int8 symmetric per output channel, int4 asymmetric "
                 "per group, scales bf16-representable.")
    for threads in threads_list:
        for names, k, n, count in products:
            parts += ["", f"**{k} -> {n}** ({names}; {count} per layer), {threads} thread(s):", "",
                      shape_table(ops, results, (k, n), threads, ROWS)]
    parts += ["", "One decode step of the `small` shape: every product above, "
              f"{SMALL.text.num_layers} layers (one routed expert; no output head, no router), for `rows` rows. "
              "Floors: the op's stored weight bytes over the read bandwidth, and the step's FLOPs over the "
              "fp32 GEMM rate (int8 x int8 products may beat the latter).", "",
              summary_table(ops, results, products, threads_list, ROWS, read, flops), ""]
    rates = "; ".join(f"{t} thread(s): read {read[t] / 1e9:.1f} GB/s, copy {copy[t] / 1e9:.1f} GB/s "
                      f"(read + write), fp32 GEMM {flops[t] / 1e9:.0f} GFLOP/s" for t in threads_list)
    parts.append(f"Machine: {rates}. {cpu_name()}, torch {torch.__version__}, load average {load_before:.1f} "
                 f"before the run (a shared host), {time.strftime('%Y-%m-%d')}.")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
