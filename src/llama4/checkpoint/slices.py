"""Parts of a tensor, described per dimension, so that the same description cuts a tensor in memory or reads
just that part of a safetensors file (``safe_open(...).get_slice(name)[index]``).

A :data:`Layout` has one :data:`Ranges` per dimension: the ranges of that dimension kept, concatenated in order.
At most one dimension has several ranges (the fused experts' ``gate_up`` keeps a gate piece and the matching up
piece). llama4.distributed describes each rank's shard this way; llama4.quant reads a quantized tensor's part.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Ranges = tuple[tuple[int, int], ...]  # pieces of one dimension, concatenated in this order
Layout = tuple[Ranges, ...]  # one Ranges per dimension


def whole(shape: tuple[int, ...]) -> Layout:
    """The layout of all of a tensor of ``shape``."""
    return tuple(((0, n),) for n in shape)


def layout_shape(layout: Layout) -> tuple[int, ...]:
    return tuple(sum(stop - start for start, stop in ranges) for ranges in layout)


def read_layout(read: Callable[[tuple[slice, ...]], torch.Tensor], layout: Layout) -> torch.Tensor:
    """The part: ``read(index)`` for each piece (a tuple of slices), concatenated along the dimension with
    several ranges."""
    dim = next((d for d, ranges in enumerate(layout) if len(ranges) > 1), 0)
    parts = []
    for start, stop in layout[dim]:
        index = tuple(slice(start, stop) if d == dim else slice(*ranges[0]) for d, ranges in enumerate(layout))
        parts.append(read(index))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
