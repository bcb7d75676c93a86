"""What training minimises and how fast: next-token loss, the MoE load-balancing loss, the lr schedule.

The router logits are captured with forward hooks on each MoE layer's ``router`` module, so the model
code is unchanged and inference pays nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.model.moe import MoE
from llama4.train.data import IGNORE


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over targets != IGNORE. logits [B, T, V] float32, targets [B, T] int64.

    Returns (loss, number of target tokens). A batch with no target gives loss 0 (still differentiable).
    """
    count = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss / max(count, 1), count


def router_aux_loss(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-Transformer load-balancing loss of one MoE layer: ``E * sum_e f_e * P_e``.

    router_logits [N, E]. ``f_e`` is the fraction of the N * top_k assignments that go to expert e (the
    top-k of the raw logits, the model's own routing; not differentiable); ``P_e`` is the mean over
    tokens of the **softmax** of the router logits (the form of transformers' ``load_balancing_loss_func``,
    which Llama 4's ``router_aux_loss_coef`` refers to; Llama 4 scores with a sigmoid, but a softmax
    makes P a distribution, so a perfectly balanced router gives exactly 1.0 and collapse gives E).
    Returns (loss scalar float32, f [E] float32).
    """
    logits = router_logits.float()
    num_experts = logits.shape[-1]
    chosen = torch.topk(logits, top_k, dim=-1).indices  # [N, k]
    f = torch.bincount(chosen.flatten(), minlength=num_experts).float() / max(chosen.numel(), 1)
    p = torch.softmax(logits, dim=-1).mean(dim=0)  # [E]
    return num_experts * (f * p).sum(), f


class RouterCapture:
    """Context manager: records every MoE router's output logits [N, E] during forward passes.

    ``with RouterCapture(model) as cap: model(x)`` then ``cap.logits`` is a list (one per MoE layer call,
    in order) and ``cap.top_k`` the routing width. Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module):
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]
        self.top_k = self.moes[0].top_k if self.moes else 1
        self.logits: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "RouterCapture":
        for moe in self.moes:
            self._handles.append(moe.router.register_forward_hook(lambda _m, _i, out: self.logits.append(out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def aux_loss(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean over captured layers of :func:`router_aux_loss`, and each layer's token shares f [E]."""
        if not self.logits:
            return torch.zeros(()), []
        losses, shares = zip(*(router_aux_loss(x, self.top_k) for x in self.logits))
        return torch.stack(losses).mean(), list(shares)

    def clear(self) -> None:
        self.logits.clear()


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps from
    lr / warmup to lr, then cosine decay from lr to ``min_lr`` at the last step (``total - 1``)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - 1 - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, vision_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: decay on weight matrices (attention, feed-forward, experts, router, LM head); no
    decay on norms (1-D) or the token embedding (decay would pull rare tokens' rows to zero).
    Parameters with ``requires_grad=False`` are left out (frozen). With ``vision_lr_scale != 1`` the
    vision tower's parameters get groups of their own whose ``lr_scale`` multiplies the scheduled lr (a
    pre-trained tower then moves slowly while the language model learns to read it)."""
    embed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    scales = (1.0,) if vision_lr_scale == 1.0 else (1.0, vision_lr_scale)
    groups = {(scale, decays): [] for scale in scales for decays in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = vision_lr_scale if name.startswith("vision.") else 1.0
            groups[(scale, not (p.dim() < 2 or id(p) in embed))].append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (scale, decays), params in groups.items() if params or scale == 1.0]
