"""Packed weights on transparent huge pages (Linux).

A decode step streams every weight it uses once. On 4 KiB pages each 4 KiB of weights is a TLB miss (in a
virtual machine a two-level page walk) and a point where the hardware prefetcher stops; on 2 MiB pages the bf16,
int8 and int4 products of one row read 1.12-1.27x the bytes per second on an AMD EPYC VM (bench/huge_pages.py).
So the tensors a packed module keeps for the kernel (blocked bf16 weights, quantized codes, scales and zero
points) are copied into slabs of anonymous memory, 2 MiB-aligned and marked ``MADV_HUGEPAGE`` before their first
touch, as views
that keep their slab alive (a slab is unmapped when the last of its tensors is freed; the space of a tensor freed
before the others of its slab is not reused). Only long-lived weights go there, never a call's temporary.

Where the OS offers none (not Linux, or transparent huge pages set to ``never``) tensors stay where torch put them;
``KernelOptions(huge_pages=False)`` (``LLAMA4_HUGE_PAGES=0`` for the commands) leaves every packed weight there. The
values are never changed, only where they live.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
SLAB_BYTES = 64 << 20  # tensors above a quarter of this get a mapping of their own
ALIGN = 64
_MADV_HUGEPAGE = 14
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether the OS offers transparent huge pages to an madvise (Linux, THP ``always`` or ``madvise``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class _Slabs:
    def __init__(self):
        self.lock = threading.Lock()
        self.slab: torch.Tensor | None = None
        self.used = 0
        self.libc = None

    def region(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of fresh huge-page memory, a uint8 view of a slab (or of a mapping of its own)."""
        with self.lock:
            if nbytes > SLAB_BYTES // 4:
                return self._mapping(_round_up(nbytes, HUGE_PAGE))[:nbytes]
            if self.slab is None or self.used + nbytes > SLAB_BYTES:
                self.slab, self.used = self._mapping(SLAB_BYTES), 0
            start = self.used
            self.used = _round_up(start + nbytes, ALIGN)
            return self.slab[start:start + nbytes]

    def _mapping(self, nbytes: int) -> torch.Tensor:
        memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(memory, dtype=torch.uint8)  # keeps `memory` mapped while any view lives
        skip = -whole.data_ptr() % HUGE_PAGE
        if self.libc is None:
            self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.madvise(ctypes.c_void_p(whole.data_ptr() + skip), ctypes.c_size_t(nbytes), _MADV_HUGEPAGE)
        return whole[skip:skip + nbytes]


_SLABS = _Slabs()


def place(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (CPU, contiguous) copied onto huge pages where :func:`available`, else ``tensor`` itself."""
    if not _AVAILABLE or tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return tensor
    nbytes = tensor.numel() * tensor.element_size()
    out = _SLABS.region(nbytes).view(tensor.dtype).view(tensor.shape)
    out.copy_(tensor)
    return out


_AVAILABLE = available()
