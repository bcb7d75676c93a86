"""Batch and split invariance: a row's result that does not depend on the rows computed beside it.

A GEMM kernel picks its blocking (and so the order in which it sums over K) from the row count M among
other things: oneDNN's bf16 kernels give a row a different result at M = 1 than at M >= 25 for K = 5120
(plain matmuls at M >= 4). Attention rounds differently for a query inside a causal block than for the
same query alone over its keys. So without care a row's result depends on its companions: the other
sequences of a decode batch, and the other tokens of its prefill piece (a prompt prefilled in other
pieces, e.g. after a prefix-cache hit, would not equal its cold run).

With invariance on, every row-wise product runs in tiles of exactly ROW_TILE rows (zero-padded), so the
kernel is the same whatever the row count, and every query is attended exactly as a one-token decode
step attends it (``ops.batch_invariant_attention``). A row's result then depends only on its own input
and keys. It is a property of a model, off by default and set by whoever runs it (the serving engine
turns it on: :func:`set_batch_invariant`): a 16-row tile costs a few percent more than a 1-row product in
decode, and bucketed attention makes a prefill piece slower than one fused causal call.

Each module that multiplies rows carries a ``batch_invariant`` attribute and tiles inside its forward
(hooks see the real rows); a bare linear is tiled by its caller, so a swapped-in module (CPU packing)
stays exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

ROW_TILE = 16


def set_batch_invariant(model: nn.Module, enabled: bool) -> None:
    """Turn fixed-tile products and per-query attention on or off for every module of ``model`` that
    has the setting. A row's result then equals its solo, unsplit run on a model with it on."""
    for module in model.modules():
        if hasattr(module, "batch_invariant"):
            module.batch_invariant = bool(enabled)


def is_batch_invariant(model: nn.Module) -> bool:
    return any(getattr(module, "batch_invariant", False) for module in model.modules())


def row_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, invariant: bool) -> torch.Tensor:
    """``fn(x)`` for a row-wise product ``fn`` over x [..., K] -> [..., N]; with ``invariant`` (CPU),
    computed so that each row's result is independent of the number of rows."""
    if not invariant:
        return fn(x)
    rows = x.shape[0] if x.dim() == 2 else x.shape[:-1].numel()
    if rows == ROW_TILE or rows == 0 or not x.is_cpu:
        return fn(x)
    if rows != x.shape[0]:  # rows over several leading dims (e.g. a prefill piece): one row axis
        return row_tiled(fn, x.reshape(rows, x.shape[-1]), True).reshape(*x.shape[:-1], -1)
    # rows on dim 0 (a decode step's [B, 1, K]): zero rows appended along it, no reshapes
    whole = rows - rows % ROW_TILE
    tiles = [fn(x[at:at + ROW_TILE]) for at in range(0, whole, ROW_TILE)]
    if whole < rows:
        tiles.append(fn(torch.cat((x[whole:], _zero_rows(x, ROW_TILE - (rows - whole)))))[:rows - whole])
    return torch.cat(tiles) if len(tiles) > 1 else tiles[0]


_ZERO_ROWS: dict[tuple, torch.Tensor] = {}  # read-only padding, shared by all calls (and threads)


def _zero_rows(x: torch.Tensor, count: int) -> torch.Tensor:
    key = (count, x.shape[1:], x.dtype, x.device)
    zeros = _ZERO_ROWS.get(key)
    if zeros is None:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            zeros = _ZERO_ROWS[key] = torch.zeros((count, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return zeros
