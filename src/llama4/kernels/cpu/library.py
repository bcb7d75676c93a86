"""Decode-sized products (up to 16 rows of bf16 inputs) on packed bf16, int8 or int4 weights by a small C kernel
(csrc/), built for the instruction set this CPU runs, and the library that also holds the fused decode layer
(fused_decode). The quantized formats' layouts and arithmetic are in csrc/weights.h and csrc/quant_linear.c
(packed by quant_layout.py).

A decode step multiplies one to a few rows by every weight matrix once, so it is bound by how fast the
weights stream from memory and by the fixed cost of each call, which through torch and oneDNN's packed
linear is tens of microseconds whatever the size (tens of calls per token). The kernel reads the same packed
buffer (oneDNN's AB16b64a2b layout: blocks of 64 outputs x 32 inputs, input pairs innermost) front to back
with software prefetch at a fraction of that cost (bench/linear.py). No second copy of the weights.

One library per instruction set, best first (``VARIANTS``): ``amx`` (AMX tiles; oneDNN's one-row product
bit for bit), ``avx512bf16`` (VDPBF16PS on the pairs as they lie), ``avx512`` and ``avx2`` (bf16 widened
by a shift, float32 FMAs). Each is compiled on first use with the system C compiler (well under a second)
into a per-user cache, only for a set the CPU reports (/proc/cpuinfo), loaded with ctypes and asked again
whether the CPU runs it. Its parallel loops run on a pool of its own (csrc/pool.c: a loop ends when its
items are done, not when every thread has turned up, so a loaded machine slows it rather than stalls it),
with as many threads as torch is set to use. In every variant a row's result does not depend on the other
rows of the call. ``KernelOptions.variant`` picks one (``auto``, the default; a variant's name; ``off``; the
command line reads it from ``LLAMA4_CPU_KERNEL``); where none can run (no compiler, another CPU, a layout
oneDNN chose differently) products stay on oneDNN, which is also the reference the kernels are tested against.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"]
_SHARED = ("quant_linear.c", "decode_layer.c", "pool.c")  # in every variant, beside its bf16 product
# name: (sources, compiler flags, the /proc/cpuinfo flags the CPU must report)
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "amx": (("amx_linear.c", *_SHARED), (*_AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
            ("avx512f", "avx512bw", "avx512vl", "fma", "avx512_bf16", "amx_tile", "amx_bf16")),
    "avx512bf16": (("vec_linear.c", *_SHARED), (*_AVX512, "-mavx512bf16"),
                   ("avx512f", "avx512bw", "avx512vl", "fma", "avx512_bf16")),
    "avx512": (("vec_linear.c", *_SHARED), tuple(_AVX512),
               ("avx512f", "avx512bw", "avx512vl", "fma")),
    "avx2": (("vec_linear.c", *_SHARED), ("-mavx2", "-mfma"), ("avx2", "fma")),
}
COMMON_FLAGS = ("-O3", "-pthread", "-fPIC", "-shared")
HEADERS = ("simd.h", "pool.h", "linear_groups.h", "weights.h")
OUT_BLOCK, IN_BLOCK = 64, 32  # the packed layout's block: 64 outputs x 32 inputs
MAX_ROWS = 16  # rows per call (group); longer inputs stay on oneDNN where it packed the weight

def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "llama4" / "kernels"


def cpu_flags() -> set[str]:
    """The instruction-set flags the kernel (Linux) reports for this CPU; empty where it cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def candidates(requested: str, flags: set[str]) -> list[str]:
    """The variants to try, best first: every one the CPU reports (``auto``), the one asked for if the CPU
    reports it, or none (``off``)."""
    if requested == "off":
        return []
    if requested != "auto" and requested not in VARIANTS:
        raise ValueError(f"CPU kernel {requested!r}: expected auto, off or one of {', '.join(VARIANTS)}")
    names = list(VARIANTS) if requested == "auto" else [requested]
    runnable = [name for name in names if set(VARIANTS[name][2]) <= flags]
    if requested != "auto" and not runnable:
        log.warning("llama4: this CPU lacks %s for the %s kernel; decode products stay on oneDNN",
                    ", ".join(sorted(set(VARIANTS[requested][2]) - flags)), requested)
    return runnable


def _build(sources: list[Path], flags: tuple[str, ...], target: Path, compiler: str | None) -> None:
    compiler = compiler or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # build aside, then move in atomically
        built = Path(scratch) / target.name
        done = subprocess.run([compiler, *COMMON_FLAGS, *flags, "-o", str(built), *map(str, sources)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)


BF16, INT8, INT4 = 0, 1, 2  # a weight's format as the C side names it (csrc/weights.h)


class WeightDescriptor(ctypes.Structure):
    """csrc/weights.h's ``struct llama4_weight``: what a product reads (its address is what the kernel's entries
    take as a weight). ``data``: the blocked weight (bf16) or codes; ``scale``: float32 or (``bf16_scales``)
    bf16 [O/64][groups][64] (int8: one group); ``zero``: uint8, the same shape, or NULL (symmetric int4, whose
    codes are centred on 8)."""

    _fields_ = [("format", ctypes.c_int64), ("group", ctypes.c_int64), ("bf16_scales", ctypes.c_int64),
                ("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p)]


def bf16_descriptor(address: int) -> WeightDescriptor:
    """The descriptor of a bf16 weight in the blocked layout at ``address``."""
    return WeightDescriptor(BF16, 0, 0, address, None, None)


class Kernel:
    """One loaded variant of the library: the decode-sized products, and the fused layer's entry."""

    def __init__(self, name: str, lib: ctypes.CDLL):
        self.name, self.lib = name, lib

    def __repr__(self) -> str:
        return f"Kernel({self.name!r})"

    def linear(self, x: torch.Tensor, address: int, shape: tuple[int, int]) -> torch.Tensor:
        """x [..., I] bf16 (1 to MAX_ROWS rows) times the weight of ``shape`` [O, I] whose WeightDescriptor is at
        ``address`` -> [..., O]. Inputs the kernel cannot take are refused (the C code itself checks nothing)."""
        out_features, in_features = shape
        rows = x.numel() // max(x.shape[-1], 1)
        if x.dtype != torch.bfloat16 or x.shape[-1] != in_features or not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"the CPU kernel takes 1 to {MAX_ROWS} bf16 rows of {in_features} inputs, got {x.dtype} "
                             f"{tuple(x.shape)}")
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
        if self.lib.llama4_linear(address, out_features, in_features, x.data_ptr(), rows, y.data_ptr(),
                                  torch.get_num_threads()):
            raise MemoryError("the CPU kernel could not allocate its scratch for the rows")
        return y

    def linear_groups(self, x: torch.Tensor, addresses: list[int], counts: list[int],
                      shape: tuple[int, int]) -> torch.Tensor:
        """Rows of x [N, I] bf16 in consecutive groups (``counts[g]`` rows each, 0 to MAX_ROWS), each group times
        its own weight of ``shape`` [O, I] (its WeightDescriptor at ``addresses[g]``; formats may differ), in one
        call -> [N, O]: each row exactly as :meth:`linear` computes it alone (the routed experts of a decode batch,
        rows sorted by expert)."""
        out_features, in_features = shape
        if (x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != in_features or len(addresses) != len(counts)
                or sum(counts) != x.shape[0] or not all(0 <= c <= MAX_ROWS for c in counts)):
            raise ValueError(f"the CPU kernel's groups take bf16 rows of {in_features} inputs, 0 to {MAX_ROWS} per "
                             f"group and one weight per group; got {x.dtype} {tuple(x.shape)}, counts {counts}, "
                             f"{len(addresses)} weights")
        x = x.contiguous()
        y = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
        groups = len(counts)
        if self.lib.llama4_linear_groups((ctypes.c_uint64 * groups)(*addresses), (ctypes.c_int64 * groups)(*counts),
                                         groups, out_features, in_features, x.data_ptr(), y.data_ptr(),
                                         torch.get_num_threads()):
            raise MemoryError("the CPU kernel could not allocate its scratch for the rows")
        return y


@functools.cache
def load_variant(name: str, compiler: str | None = None, cache_dir: Path | None = None) -> Kernel | None:
    """The ``name`` variant, compiled into ``cache_dir`` (default ~/.cache/llama4/kernels) with ``compiler``
    (default cc or gcc) if not built yet; None if the CPU does not run it. Raises OSError / RuntimeError when
    it cannot be built or loaded."""
    files, flags, _ = VARIANTS[name]
    sources = [CSRC / f for f in files]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*sources, *(CSRC / h for h in HEADERS)])
                            + " ".join((*COMMON_FLAGS, *flags)).encode()).hexdigest()[:16]
    target = (cache_dir or default_cache_dir()) / f"llama4_{name}-{digest}.so"
    if not target.is_file():
        _build(sources, flags, target, compiler)
    lib = ctypes.CDLL(str(target))
    if not lib.llama4_kernel_supported():
        return None
    lib.llama4_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_void_p, ctypes.c_int]
    lib.llama4_linear.restype = ctypes.c_int
    lib.llama4_linear_groups.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_int64),
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_int]
    lib.llama4_linear_groups.restype = ctypes.c_int
    lib.llama4_pool_warm.argtypes = [ctypes.c_int64]
    lib.llama4_pool_warm.restype = None
    return Kernel(name, lib)


@functools.cache
def load(requested: str = "auto", compiler: str | None = None, cache_dir: Path | None = None) -> Kernel | None:
    """The best variant this CPU runs among those ``requested`` allows (``auto``, a variant's name, ``off``),
    building it if needed; None where none can run here (logged once per request)."""
    for name in candidates(requested, cpu_flags()):
        try:
            kernel = load_variant(name, compiler, cache_dir)
        except (OSError, RuntimeError) as exc:
            log.warning("llama4: the %s kernel is not available (%s); decode products stay on oneDNN", name, exc)
            return None
        if kernel is not None:
            return kernel
    return None


def packed_view(packed: torch.Tensor) -> torch.Tensor:
    """An opaque oneDNN-packed weight's buffer as a flat tensor of its dtype (a view: no copy; valid while
    ``packed`` lives)."""
    size = torch.ops.mkldnn._nbytes(packed)
    buffer = (ctypes.c_uint8 * size).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(buffer, dtype=packed.dtype)


def blocked_index(out_index: torch.Tensor, in_index: torch.Tensor, in_features: int) -> torch.Tensor:
    """Flat position of weight[o, i] in the kernel's layout [O/64, I/32, 16, 64, 2] (zero-padded)."""
    in_blocks = -(-in_features // IN_BLOCK)
    block = (out_index // OUT_BLOCK) * in_blocks + in_index // IN_BLOCK
    inside = (in_index % IN_BLOCK) // 2 * (OUT_BLOCK * 2) + (out_index % OUT_BLOCK) * 2 + in_index % 2
    return block * (OUT_BLOCK * IN_BLOCK) + inside


def to_blocked(weight: torch.Tensor) -> torch.Tensor:
    """A plain [O, I] weight (I a multiple of 32) in the kernel's layout, flat and zero-padded to 64 outputs."""
    out_features, in_features = weight.shape
    padded = torch.zeros(-(-out_features // OUT_BLOCK) * OUT_BLOCK, in_features, dtype=weight.dtype)
    padded[:out_features] = weight
    return padded.view(-1, OUT_BLOCK, in_features // IN_BLOCK, IN_BLOCK // 2, 2).permute(0, 2, 3, 1, 4).flatten()


def from_blocked(flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The plain [O, I] weight back from :func:`to_blocked`'s layout (a copy)."""
    out_features, in_features = shape
    blocks = flat.view(-1, in_features // IN_BLOCK, IN_BLOCK // 2, OUT_BLOCK, 2).permute(0, 3, 1, 2, 4)
    return blocks.reshape(-1, in_features)[:out_features].contiguous()


SAMPLES = 4096


def readable(weight: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether the kernel can read ``packed``, oneDNN's packing of the plain [O, I] ``weight``: bf16, the
    input width a whole number of blocks, and oneDNN's buffer in the layout the kernel
    assumes (oneDNN picks layouts by shape and CPU): the buffer's size, and the weight's first and last
    entries and SAMPLES others (fixed seed) where the layout puts them."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.bfloat16 or in_features % IN_BLOCK:
        return False
    padded_out = -(-out_features // OUT_BLOCK) * OUT_BLOCK
    try:
        flat = packed_view(packed)
    except (RuntimeError, AttributeError):
        return False
    if flat.numel() != padded_out * in_features:
        return False
    g = torch.Generator().manual_seed(0)
    out_index = torch.cat((torch.tensor([0, out_features - 1]), torch.randint(out_features, (SAMPLES,), generator=g)))
    in_index = torch.cat((torch.tensor([0, in_features - 1]), torch.randint(in_features, (SAMPLES,), generator=g)))
    return torch.equal(flat[blocked_index(out_index, in_index, in_features)], weight[out_index, in_index])


