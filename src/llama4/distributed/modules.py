"""The module stand-ins a parallel plan swaps in: plain torch.distributed collectives in small wrappers.

DTensor / ``torch.distributed.tensor.parallel`` would shard nn.Linear well, but the model's fused experts
([E, D, 2I] with gate and up halves), the GQA head grouping (KV heads replicated over ranks) and the
combined shared + routed reduction are not the layouts its ColwiseParallel / RowwiseParallel styles
describe; every collective here is one explicit call, which is also what the counting test checks.

Activations stay replicated: every rank holds the whole hidden state [N, D] between blocks, identical on
every rank (an all-reduce leaves the same sum everywhere), so the router picks the same experts on
every rank and the routed experts need no dispatch: each rank runs the tokens routed to its own experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llama4.distributed.plan import ParallelPlan
from llama4.model.moe import Experts, Router, route
from llama4.quant.modules import QuantizedLinear


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of x over the group's ranks, in place where x is contiguous."""
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W_r^T: the rank's input columns ``weight`` [out, in / world], one all-reduce."""

    def __init__(self, in_features: int, out_features: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.group = group
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(F.linear(x, self.weight), self.group)


def all_gather_vocab(local: torch.Tensor, world: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's logits over its vocabulary rows [..., V / world], concatenated: [..., V] on every rank."""
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=-1)


class VocabParallelHead(nn.Module):
    """The output head over the rank's vocabulary rows ``weight`` [V / world, D]; the logits of all ranks
    are gathered (one all-gather) so that every rank samples from the same [..., V]."""

    def __init__(self, vocab_rows: int, dim: int, world: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.group, self.world = group, world
        self.in_features, self.out_features = dim, vocab_rows
        self.weight = nn.Parameter(torch.empty(vocab_rows, dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_vocab(F.linear(x, self.weight), self.world, self.group)


class QuantizedParallelLinear(nn.Module):
    """A RowParallelLinear or VocabParallelHead whose weight is quantized (``qweight``, as a QuantizedLinear holds
    it, and multiplied as it multiplies: dequantized in the input's dtype), with the same collective after the
    rank's product. Not a QuantizedLinear, so that nothing that handles those (packing, adapters) takes it for a
    whole linear."""

    def __init__(self, linear: QuantizedLinear, like: RowParallelLinear | VocabParallelHead):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("parallel linears have no bias")
        self.qweight, self.float_dtype = linear.qweight, linear.float_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group = like.group
        self.world = like.world if isinstance(like, VocabParallelHead) else None  # None: all-reduce

    @property
    def format(self):
        return self.qweight.format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.qweight.dequantize(x.dtype))
        if self.world is None:
            return all_reduce(local, self.group)
        return all_gather_vocab(local, self.world, self.group)

    def extra_repr(self) -> str:
        kind = "row-parallel" if self.world is None else "vocabulary-parallel"
        return f"{kind}, in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def row_max_over(plan: ParallelPlan, rank: int, group: dist.ProcessGroup | None
                  ) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """``full_row_max(param, part_max)`` for int8 rows split over ranks (the quantized loaders', quantize_sharded's):
    a part's row maxima all-gathered (one collective; every rank calls it for the same parameters in turn), the
    largest over the ranks holding the other columns of the same rows: every rank for the tensor-parallel linears,
    the ranks of the same expert block for the routed experts (``param`` names them: ``...experts.down``)."""
    world = plan.world_size
    block = range(rank // plan.expert_tp * plan.expert_tp, (rank // plan.expert_tp + 1) * plan.expert_tp)

    def full_row_max(param: str, local: torch.Tensor) -> torch.Tensor:
        local = local.float().contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        peers = block if ".experts." in param else range(world)
        return torch.stack([parts[r] for r in peers]).amax(0)

    return full_row_max


def local_routed(x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor, experts: Experts,
                 first: int) -> torch.Tensor:
    """This rank's part of the routed output for x [N, D]: its experts ``first .. first + E_local - 1`` on the
    score-scaled inputs of the assignments routed to them (expert_ids / scores [N, k]), zeros elsewhere."""
    n, k = expert_ids.shape
    local_ids = expert_ids.reshape(-1) - first
    count = experts.num_experts
    mine = ((local_ids >= 0) & (local_ids < count)).nonzero().squeeze(1)  # assignment indices [M]
    out = torch.zeros_like(x)
    if not mine.numel():
        return out
    mine = mine[local_ids[mine].argsort(stable=True)]  # grouped by expert, token order kept within one
    token_of = mine // k
    scaled = x[token_of] * scores.reshape(-1)[mine, None]  # the score scales the expert's input
    counts = torch.bincount(local_ids[mine], minlength=count).tolist()
    return out.index_add_(0, token_of, experts.grouped(scaled, counts))


class ParallelMoE(nn.Module):
    """MoE with the rank's routed experts (``experts``: E / ep experts, hidden I / (world / ep)) and its shared
    expert: a column/row split piece (``shared_partial``, tp > 1) or the whole replicated one.

    One all-reduce per call: the partial shared output and the partial routed output are summed together;
    a replicated shared expert is added after the sum.
    """

    def __init__(self, router: Router, experts: Experts, shared: nn.Module, top_k: int, first_expert: int,
                 shared_partial: bool, group: dist.ProcessGroup | None):
        super().__init__()
        self.router, self.experts, self.shared = router, experts, shared
        self.top_k, self.first_expert, self.shared_partial = top_k, first_expert, shared_partial
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        expert_ids, scores = route(self.router(flat), self.top_k, flat.dtype)
        out = local_routed(flat, expert_ids, scores, self.experts, self.first_expert)
        if self.shared_partial:
            out += self.shared(flat)
        out = all_reduce(out, self.group)
        if not self.shared_partial:
            out += self.shared(flat)
        return out.reshape(shape)
