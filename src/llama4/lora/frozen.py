"""The product of an input with a frozen base weight, for training adapters over it (LoRA's and QLoRA's base).

Autograd's own linear saves the weight it multiplied for the input's gradient. For a quantized base that
weight is the dequantized float copy: kept alive from the forward to the backward, one per quantized matrix
that ran, which together are the float model QLoRA exists not to hold. :func:`frozen_linear` saves nothing
but the way to build the weight (the quantized module's codes, which are kept anyway) and builds it again in
the backward, where it computes the input's gradient only (the base is frozen: no weight gradient).

Both products run against a contiguous [out, in] weight (``F.linear(a, W)``): the forward's for [out, in]
weights, the backward's against a transposed copy made for the call. CPU GEMMs take that layout fastest; with
bf16 on CPUs without AVX-512 BF16, torch's products with an [in, out]-contiguous right operand (``g @ W`` of
autograd's linear backward, the float experts' ``x @ W``) measured 10-20x slower (611 ms against 40 ms for
[32, 2048] x [2048, 1024] on an AVX2 EPYC, torch 2.13).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

WeightFn = Callable[[torch.dtype], torch.Tensor]


def _as_out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.t().contiguous() if transposed else weight


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: WeightFn, transposed: bool,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight, ctx.transposed, ctx.dtype = weight, transposed, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.batch_shape = x.shape[:-1]
        return F.linear(x, _as_out_in(weight(x.dtype), transposed), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.weight(ctx.dtype)  # rebuilt: [out, in], or [in, out] with transposed
        grad = grad.to(ctx.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # x W^T's input gradient is g W: as F.linear(g, W^T), against W^T in [out', in'] = [in, out] layout
            grad_x = F.linear(grad, w if ctx.transposed else w.t().contiguous())
        grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


def frozen_linear(x: torch.Tensor, weight: WeightFn, transposed: bool = False,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a frozen weight that ``weight(dtype)`` builds in ``dtype`` ([out, in]; with
    ``transposed`` [in, out], and the product is ``x @ W``), computed in x's dtype.

    Where autograd needs x's gradient, nothing is saved but ``weight``: the backward builds the weight again and
    returns x's gradient (and the bias's, if it requires one), never the weight's. Otherwise it is the plain
    product: ``F.linear(x, W, bias)``, or ``x @ W`` (+ bias) for a transposed weight.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _FrozenLinear.apply(x, weight, transposed, bias)
    w = weight(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if transposed:
        out = x @ w
        return out if bias is None else out + bias
    return F.linear(x, w, bias)
