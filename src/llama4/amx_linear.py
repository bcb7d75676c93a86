"""Decode-sized bf16 products (up to 16 rows) on oneDNN-packed weights, by a small AMX kernel in C
(csrc/amx_linear.c).

A decode step multiplies one to a few rows by every weight matrix once, so it is bound by how fast the
weights stream from memory and by the fixed cost of each call. Through torch, oneDNN's packed linear
costs ~20-30 us a call whatever the size (tens of calls per token) and streams the weights at 8-24 GB/s
here, falling into a slow mode for seconds at a time; the kernel reads the same packed buffer (oneDNN's
AB16b64a2b layout, which is AMX's operand layout) front to back with software prefetch, at ~7-10 us a
call and ~20-25 GB/s, without the slow mode (bench/linear.py). It computes what oneDNN's one-row product
computes, bit for bit, and a row's result does not depend on the other rows. No second copy of the
weights: it reads oneDNN's buffer.

The kernel is compiled on first use with the system C compiler (well under a second) into a per-user
cache and loaded with ctypes; it runs its threads in torch's own OpenMP pool (the process already has
torch's libgomp loaded, which the library's libgomp dependency resolves to). Where it cannot be used (no
compiler, no AMX, a layout oneDNN chose differently, ``LLAMA4_AMX_LINEAR=0``) products stay on
oneDNN, which is also the reference the kernel is tested against.
"""

from __future__ import annotations

import ctypes
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

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("amx_linear.c", "decode_layer.c")]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp",
         "-fPIC", "-shared"]
OUT_BLOCK, IN_BLOCK = 64, 32  # the packed layout's block: 64 outputs x 32 inputs
MAX_ROWS = 16  # one AMX tile of rows; longer inputs (prefill) stay on oneDNN, which blocks them for reuse

_library: ctypes.CDLL | None = None
_load_attempted = False


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama4" / "kernels"


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # build aside, then move in atomically
        built = Path(scratch) / target.name
        done = subprocess.run([compiler, *FLAGS, "-o", str(built), *map(str, SOURCES)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; None where it cannot run here (logged once)."""
    global _library, _load_attempted
    if _load_attempted:
        return _library
    _load_attempted = True
    if os.environ.get("LLAMA4_AMX_LINEAR", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(FLAGS).encode()).hexdigest()[:16]
        target = cache_dir() / f"amx_linear-{digest}.so"
        if not target.is_file():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as exc:
        log.warning("llama4: the AMX linear kernel is not available (%s); decode products stay on oneDNN", exc)
        return None
    if not lib.llama4_amx_linear_supported():
        return None
    lib.llama4_amx_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.llama4_amx_linear.restype = None
    lib.llama4_amx_linear_groups.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_int64),
                                             ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.c_int]
    lib.llama4_amx_linear_groups.restype = None
    _library = lib
    return lib


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


SAMPLES = 4096


def readable(weight: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether the kernel can read ``packed``, oneDNN's packing of the plain [O, I] ``weight``: bf16, the
    input width a whole number of blocks, the kernel built, and oneDNN's buffer in the layout the kernel
    assumes (oneDNN picks layouts by shape and CPU): the buffer's size, and the weight's first and last
    entries and SAMPLES others (fixed seed) where the layout puts them."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.bfloat16 or in_features % IN_BLOCK or library() is None:
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


def linear(x: torch.Tensor, address: int, shape: tuple[int, int]) -> torch.Tensor:
    """x [..., I] bf16 (1 to MAX_ROWS rows) times the packed weight of ``shape`` [O, I] at ``address`` ->
    [..., O]. Inputs the kernel cannot take are refused (the kernel itself checks nothing)."""
    out_features, in_features = shape
    rows = x.numel() // max(x.shape[-1], 1)
    if x.dtype != torch.bfloat16 or x.shape[-1] != in_features or not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"amx_linear takes 1 to {MAX_ROWS} bf16 rows of {in_features} inputs, got {x.dtype} "
                         f"{tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
    _library.llama4_amx_linear(address, out_features, in_features, x.data_ptr(), rows, y.data_ptr(),
                               torch.get_num_threads())
    return y


def linear_groups(x: torch.Tensor, addresses: list[int], counts: list[int], shape: tuple[int, int]) -> torch.Tensor:
    """Rows of x [N, I] bf16 in consecutive groups (``counts[g]`` rows each, 0 to MAX_ROWS), each group times
    its own packed weight of ``shape`` [O, I] at ``addresses[g]``, in one call -> [N, O]: each row exactly as
    :func:`linear` computes it alone (the routed experts of a decode batch, rows sorted by expert)."""
    out_features, in_features = shape
    if (x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != in_features or len(addresses) != len(counts)
            or sum(counts) != x.shape[0] or not all(0 <= c <= MAX_ROWS for c in counts)):
        raise ValueError(f"amx_linear groups take bf16 rows of {in_features} inputs, 0 to {MAX_ROWS} per group and "
                         f"one weight per group; got {x.dtype} {tuple(x.shape)}, counts {counts}, "
                         f"{len(addresses)} weights")
    x = x.contiguous()
    y = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
    groups = len(counts)
    _library.llama4_amx_linear_groups((ctypes.c_uint64 * groups)(*addresses), (ctypes.c_int64 * groups)(*counts),
                                      groups, out_features, in_features, x.data_ptr(), y.data_ptr(),
                                      torch.get_num_threads())
    return y
