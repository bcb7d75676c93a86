"""The quantized stand-ins against dequantize-then-multiply in float64.

Tolerances (relative Frobenius error against float64 products of the same dequantized weights): float32
inputs <= 1e-6 (float32 rounding of a few products); bfloat16 inputs <= 2e-2 (the weight dequantized to
bf16 and a few bf16 roundings through the SwiGLU chain, as tests/model/test_moe.py allows the float model).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.model.moe import Experts, MoE, dense_moe_reference, route
from llama4.quant.formats import WeightFormat, dequantize, quantize
from llama4.quant.modules import QuantizedExperts, QuantizedLinear, QuantizedWeight

DIM, HIDDEN, EXPERTS = 64, 128, 4
FORMATS = ["int8", "int4-g32", "int4-g64-asym"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def inputs(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_linear(bias: bool = False) -> nn.Linear:
    linear = nn.Linear(DIM, HIDDEN, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(inputs(HIDDEN, DIM, seed=2) * 0.1)
        if bias:
            linear.bias.copy_(inputs(HIDDEN, seed=3))
    return linear


def make_experts() -> Experts:
    experts = Experts(EXPERTS, DIM, HIDDEN)
    with torch.no_grad():
        experts.gate_up.copy_(inputs(EXPERTS, DIM, 2 * HIDDEN, seed=4) * 0.1)
        experts.down.copy_(inputs(EXPERTS, HIDDEN, DIM, seed=5) * 0.1)
    return experts


def swiglu_float64(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU of x through [out, in] weights, in float64."""
    gate, up = (x.double() @ gate_up.double().T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.double().T


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", FORMATS)
def test_linear_is_the_dequantized_product(name, bias, dtype, tol):
    linear = make_linear(bias)
    module = QuantizedLinear(linear, WeightFormat.parse(name))
    x = inputs(2, 5, DIM, dtype=dtype)
    want = x.double() @ dequantize(quantize(linear.weight, module.format)).double().T
    if bias:
        want = want + linear.bias.double()
    got = module(x)
    assert got.shape == (2, 5, HIDDEN) and got.dtype == dtype
    assert rel_err(got, want) <= tol


def test_linear_holds_codes_not_a_float_weight():
    module = QuantizedLinear(make_linear(), WeightFormat.parse("int4-g32-asym"))
    assert not hasattr(module, "weight") and list(module.parameters()) == []
    assert set(module.state_dict()) == {"qweight.codes", "qweight.scale", "qweight.zero"}
    assert module.dequantized_weight().shape == (HIDDEN, DIM) and module.dequantized_weight().dtype == torch.float32
    module.to(torch.bfloat16)  # a model cast: codes stay integers
    assert module.qweight.codes.dtype == torch.uint8 and module.qweight.zero.dtype == torch.uint8


@pytest.mark.parametrize("name", FORMATS)
def test_experts_quantize_output_channels_the_columns_of_x_at_w(name):
    fmt = WeightFormat.parse(name)
    experts = make_experts()
    module = QuantizedExperts(experts, fmt)
    groups = 1 if fmt.group is None else DIM // fmt.group
    assert module.gate_up.scale.shape == (EXPERTS, 2 * HIDDEN, groups)  # one row per output column of gate_up
    assert module.num_experts == EXPERTS and module.groups_in_one_call is False
    gate_up, down = module.dequantized_weights(2)
    assert torch.equal(gate_up, dequantize(quantize(experts.gate_up[2].t(), fmt)))
    assert torch.equal(down, dequantize(quantize(experts.down[2].t(), fmt)))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", FORMATS)
def test_expert_grouped_and_with_shared_are_the_dequantized_swiglu(name, dtype, tol):
    module = QuantizedExperts(make_experts(), WeightFormat.parse(name))
    x = inputs(9, DIM, dtype=dtype)
    weights = [module.dequantized_weights(e, torch.float64) for e in range(EXPERTS)]
    for e in range(EXPERTS):
        assert rel_err(module.expert(e, x), swiglu_float64(x, *weights[e])) <= tol
    counts = [3, 0, 4, 2]
    got = module.grouped(x, counts)
    want = torch.cat([swiglu_float64(part, *weights[e]) for e, part in enumerate(x.split(counts)) if counts[e]])
    assert rel_err(got, want) <= tol


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("name", FORMATS)
def test_moe_with_quantized_experts_matches_its_dense_oracle_and_float64(name, top_k):
    moe = MoE(DIM, HIDDEN, EXPERTS, top_k)
    with torch.no_grad():
        for seed, p in enumerate(moe.parameters()):
            p.copy_(inputs(*p.shape, seed=10 + seed) * 0.1)
        moe.experts = QuantizedExperts(moe.experts, WeightFormat.parse(name))
        x = inputs(2, 7, DIM)
        got = moe(x)
        assert rel_err(got, dense_moe_reference(moe, x)) <= 1e-6
        flat = x.reshape(-1, DIM)
        ids, scores = route(moe.router(flat), top_k, flat.dtype)
        shared = moe.shared
        want = swiglu_float64(flat, torch.cat((shared.gate.weight, shared.up.weight)), shared.down.weight)
        for n in range(flat.shape[0]):
            for k in range(top_k):
                weights = moe.experts.dequantized_weights(int(ids[n, k]), torch.float64)
                want[n] += swiglu_float64(flat[n:n + 1] * scores[n, k], *weights)[0]
        assert rel_err(got.reshape(-1, DIM), want) <= 1e-6


def test_only_the_chosen_experts_are_dequantized(monkeypatch):
    module = QuantizedExperts(make_experts(), WeightFormat.parse("int4-g32"))
    seen = []
    dequantize_weight = QuantizedWeight.dequantize

    def recording(self, dtype, index=None):
        seen.append(index)
        return dequantize_weight(self, dtype, index)

    monkeypatch.setattr(QuantizedWeight, "dequantize", recording)
    module.grouped(inputs(5, DIM), [2, 0, 3, 0])
    assert sorted(set(seen)) == [0, 2] and len(seen) == 4  # gate_up and down of experts 0 and 2, once each


def test_experts_with_batch_invariance_give_a_row_the_same_bits_at_any_row_count():
    module = QuantizedExperts(make_experts(), WeightFormat.parse("int8"))
    module.batch_invariant = True
    x = inputs(37, DIM)
    alone = module.expert(1, x[:1])
    for rows in (2, 16, 37):
        assert torch.equal(module.expert(1, x[:rows])[:1], alone)
