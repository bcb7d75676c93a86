"""What the CPU fast paths may use, decided by the caller (the command line reads it from the environment)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llama4.kernels.cpu.library import VARIANTS, Kernel, load

CHOICES = ("auto", "off", *VARIANTS)


@dataclass(frozen=True)
class KernelOptions:
    """``variant``: the C kernel for decode-sized products - ``auto`` (the best this CPU runs), ``off`` (oneDNN
    only) or one of ``VARIANTS``; ``fused_decode``: the layers of a pass with a cache in C where the model
    allows; ``huge_pages``: packed weights on transparent huge pages where the OS offers them (huge_pages.py);
    ``compiler`` (default cc or gcc on PATH) and ``cache_dir`` (default ~/.cache/llama4/kernels) build the kernel
    on first use."""

    variant: str = "auto"
    fused_decode: bool = True
    huge_pages: bool = True
    compiler: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.variant not in CHOICES:
            raise ValueError(f"CPU kernel {self.variant!r}: expected one of {', '.join(CHOICES)}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> KernelOptions:
        """From ``LLAMA4_CPU_KERNEL``, ``LLAMA4_FUSED_DECODE`` and ``LLAMA4_HUGE_PAGES`` (``0``: off), ``CC`` and
        ``XDG_CACHE_HOME``."""
        cache = environ.get("XDG_CACHE_HOME")
        return cls(variant=environ.get("LLAMA4_CPU_KERNEL", "auto").strip().lower() or "auto",
                   fused_decode=environ.get("LLAMA4_FUSED_DECODE", "1").strip() != "0",
                   huge_pages=environ.get("LLAMA4_HUGE_PAGES", "1").strip() != "0",
                   compiler=environ.get("CC") or None,
                   cache_dir=str(Path(cache) / "llama4" / "kernels") if cache else None)

    def kernel(self) -> Kernel | None:
        """The loaded kernel these options allow on this CPU (built once per process), or None."""
        return load(self.variant, self.compiler, Path(self.cache_dir) if self.cache_dir else None)
