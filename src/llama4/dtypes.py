"""The names of torch dtypes, in one table: on command lines (``--dtype bf16``), in the engine process's
settings and in the frames of ``llama4.serve.wire`` (image tiles: ``str(dtype)`` without ``torch.``).

Names map to torch's attribute names, so that a command line can check its arguments without
importing torch (:func:`torch_dtype` imports it when a dtype is wanted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}
WEIGHT_DTYPES = ("bf16", "bfloat16", "fp32", "float32")  # what --dtype offers for a model's weights


def torch_dtype(name: str) -> torch.dtype:
    """The dtype called ``name`` (a key of :data:`DTYPES`); raises ValueError for any other name."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


def dtype_name(dtype: torch.dtype) -> str:
    """torch's own name of ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")
