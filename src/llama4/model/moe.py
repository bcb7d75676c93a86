"""Mixture of experts: sigmoid top-k router, routed SwiGLU experts (fused weights), shared expert.

The routed experts are sparse: tokens are grouped by expert and each expert multiplies only its own
tokens (with batch invariance, where every product costs a fixed row tile, a top-1 decode batch of at
most one tile instead runs each chosen expert once over the tile: the same cost, without the
grouping). :func:`dense_moe_reference` evaluates every expert on every token (as transformers does)
and is the oracle the sparse path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.model.invariance import ROW_TILE, row_tiled


class SwiGLU(nn.Module):
    """Dense feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.batch_invariant = False
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_tiled(lambda rows: self.down(F.silu(self.gate(rows)) * self.up(rows)), x, self.batch_invariant)


class Experts(nn.Module):
    """E SwiGLU experts in the checkpoint's fused layout, used as x @ W (no transposes).

    gate_up [E, D, 2I]: columns [:I] feed silu (gate), [I:] are the up projection; down [E, I, D].
    """

    groups_in_one_call = False  # grouped() multiplies expert by expert (a stand-in may do all at once)

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.batch_invariant = False
        self.gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, dim))

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [n, D] -> [n, D] (a few tokens in fixed row tiles: batch-invariant)."""
        return row_tiled(lambda rows: self._swiglu(e, rows), x, self.batch_invariant)

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Tokens sorted by expert, x [sum(counts), D] (``counts[e]`` rows for expert e) -> each row's expert
        output [sum(counts), D]."""
        return each_expert_on_its_rows(self, x, counts)

    def with_shared(self, shared: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                    scores: torch.Tensor) -> torch.Tensor:
        """The MoE output for x [N, D]: the shared expert on x plus the chosen experts on score-scaled x."""
        return shared_plus_routed(self, shared, x, expert_ids, scores)

    def _swiglu(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down[e]


class Router(nn.Linear):
    """The MoE router: a linear (left plain by CPU packing) whose decode-sized products run in fixed row
    tiles with batch invariance, so that a decode row's expert choice and scores do not depend on the batch
    (model.invariance). Tiling happens inside forward: hooks on the router see exactly the real rows."""

    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_tiled(super().forward, x, self.batch_invariant)


def route(router_logits: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts by raw logit and their sigmoid scores (no renormalisation).

    router_logits [N, E] -> (expert ids [N, k] int64, scores [N, k] in ``dtype``; sigmoid in float32).
    """
    top_logits, top_ids = torch.topk(router_logits, top_k, dim=-1)
    return top_ids, torch.sigmoid(top_logits.float()).to(dtype)


def sparse_experts(x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor, experts: nn.Module) -> torch.Tensor:
    """Routed output for x [N, D]: sum over the chosen experts of expert(score * x). Only chosen experts run.

    Assignments are sorted by expert so each expert multiplies one contiguous block of its tokens
    (``experts.grouped``); the results are scattered back to token order once.
    """
    n, k = expert_ids.shape
    if n == 0:
        return torch.zeros_like(x)
    flat_ids = expert_ids.reshape(-1)
    if n * k == 1:  # one token, one expert (decode): no grouping needed
        return experts.expert(int(flat_ids), x * scores)
    if k == 1 and n <= ROW_TILE and experts.batch_invariant and x.is_cpu and not experts.groups_in_one_call:
        return _one_tile_experts(x, flat_ids, scores, experts)
    token_of, scaled, counts = sort_by_expert(x, expert_ids, scores, experts.num_experts)
    routed = experts.grouped(scaled, counts)
    if k == 1:
        return torch.empty_like(x).index_copy_(0, token_of, routed)
    return torch.zeros_like(x).index_add_(0, token_of, routed)


def sort_by_expert(x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Assignments grouped by expert, token order kept within one: each assignment's token [N*k], its
    score-scaled input [N*k, D] (the score scales the expert's *input*), and the count per expert [E]."""
    flat_ids = expert_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    token_of = order // expert_ids.shape[1]
    scaled = x[token_of] * scores.reshape(-1)[order, None]
    return token_of, scaled, torch.bincount(flat_ids, minlength=num_experts).tolist()


def shared_plus_routed(experts: nn.Module, shared: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                       scores: torch.Tensor) -> torch.Tensor:
    """Experts.with_shared by the definition: shared(x) + sparse_experts(...), added in place."""
    out = shared(x)
    out += sparse_experts(x, expert_ids, scores, experts)
    return out


def each_expert_on_its_rows(experts: nn.Module, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Experts.grouped by the definition: each expert multiplies its own block of rows."""
    out = torch.empty_like(x)
    offset = 0
    for e, count in enumerate(counts):
        if count:
            out[offset:offset + count] = experts.expert(e, x[offset:offset + count])
            offset += count
    return out


def _one_tile_experts(x: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, experts: nn.Module) -> torch.Tensor:
    """Top-1 routing of a batch that fits one row tile (a decode step) with batch invariance on: a
    product then costs one tile however many of its rows are used, so each chosen expert runs once over
    the whole batch and every row keeps its own expert's result - no sorting, gathering, padding per
    expert or scattering back. Each row is computed as in the grouped path (its own score-scaled input,
    in a fixed tile), bit for bit. Without tiles, products over more rows cost more: grouped then."""
    scaled = x * scores
    out = None
    for e in torch.unique(ids).tolist():
        y = experts.expert(e, scaled)
        out = y if out is None else torch.where((ids == e)[:, None], y, out)
    return out


class MoE(nn.Module):
    """Llama 4 MoE block: shared expert on x plus the routed experts on score-scaled x."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = Router(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, hidden)
        self.shared = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        expert_ids, scores = route(self.router(flat), self.top_k, flat.dtype)
        return self.experts.with_shared(self.shared, flat, expert_ids, scores).reshape(shape)


def dense_moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Oracle: every expert on every token, unselected experts fed zeros (as transformers computes it)."""
    flat = x.reshape(-1, x.shape[-1])
    logits = moe.router(flat)
    expert_ids, scores = route(logits, moe.top_k, flat.dtype)
    full_scores = torch.zeros_like(logits).scatter(1, expert_ids, scores)  # [N, E]
    routed = torch.zeros_like(flat)
    for e in range(moe.experts.num_experts):
        routed = routed + moe.experts.expert(e, flat * full_scores[:, e:e + 1])
    return (moe.shared(flat) + routed).reshape(x.shape)
