"""Sparse MoE (sparse_experts / MoE.forward) against the dense every-expert oracle and a float64 re-derivation.

Tolerances: fp32 sparse vs dense oracle <= 1e-6 relative (Frobenius); fp32 vs float64 <= 1e-5 relative;
bf16 vs float64 <= 2e-2 relative (a few bf16 roundings through two matmul chains).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama4.model.moe as moe_module
from llama4.model import invariance
from llama4.model.moe import Experts, MoE, dense_moe_reference, route, sparse_experts

DIM, HIDDEN = 16, 24


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom else 1.0)


def make_moe(num_experts: int = 6, top_k: int = 1, seed: int = 0, dtype=torch.float32) -> MoE:
    g = torch.Generator().manual_seed(seed)
    moe = MoE(DIM, HIDDEN, num_experts, top_k)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe.to(dtype).eval()


def moe_float64(moe: MoE, x: torch.Tensor, scale_output: bool = False) -> torch.Tensor:
    """Re-derivation from the sheet (§4.4): top-k on raw logits, sigmoid score, score scales the INPUT,
    fused gate_up [E, D, 2I] used as x @ W, shared expert on the unscaled input."""
    xd = x.reshape(-1, x.shape[-1]).double()
    wr = moe.router.weight.double()
    gate_up, down = moe.experts.gate_up.double(), moe.experts.down.double()
    logits = xd @ wr.T
    top = logits.topk(moe.top_k, dim=-1).indices
    out = torch.zeros_like(xd)
    for n in range(xd.shape[0]):
        for e in top[n].tolist():
            s = torch.sigmoid(logits[n, e])
            z = xd[n] if scale_output else s * xd[n]
            gu = z @ gate_up[e]
            g, u = gu[:HIDDEN], gu[HIDDEN:]
            y = (F.silu(g) * u) @ down[e]
            out[n] += s * y if scale_output else y
    sh = moe.shared
    gx = xd @ sh.gate.weight.double().T
    out += (F.silu(gx) * (xd @ sh.up.weight.double().T)) @ sh.down.weight.double().T
    return out.reshape(x.shape)


def tokens(n: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 37])
def test_moe_forward_matches_dense_oracle_and_float64(top_k, n):
    moe = make_moe(top_k=top_k, seed=top_k)
    x = tokens(n, seed=n)
    with torch.no_grad():
        got = moe(x)
        assert rel_err(got, dense_moe_reference(moe, x)) <= 1e-6
        assert rel_err(got, moe_float64(moe, x)) <= 1e-5


def test_moe_forward_keeps_leading_shape():
    moe = make_moe(top_k=2)
    x = tokens(2 * 5, seed=3).reshape(2, 5, DIM)
    with torch.no_grad():
        got = moe(x)
    assert got.shape == (2, 5, DIM)
    assert rel_err(got, moe_float64(moe, x)) <= 1e-5


def test_ragged_loads_including_an_expert_with_no_tokens():
    moe = make_moe(num_experts=5, top_k=1, seed=4)
    x = tokens(40, seed=5)
    x[:, 0] = 1.0  # a constant input component
    with torch.no_grad():
        moe.router.weight[3] = 0.0
        moe.router.weight[3, 0] = -100.0  # expert 3's logit is -100 for every token: never chosen
        ids, _ = route(moe.router(x), 1, x.dtype)
        got = moe(x)
    loads = torch.bincount(ids.flatten(), minlength=5).tolist()
    assert loads[3] == 0 and len(set(loads)) > 2, f"loads should be ragged with an empty expert, got {loads}"
    assert rel_err(got, dense_moe_reference(moe, x)) <= 1e-6
    assert rel_err(got, moe_float64(moe, x)) <= 1e-5


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_all_tokens_routed_to_one_expert(top_k):
    moe = make_moe(num_experts=6, top_k=top_k, seed=6)
    x = tokens(25, seed=7)
    x[:, 0] = 1.0  # a constant input component so the router can prefer experts for every token
    with torch.no_grad():
        moe.router.weight.zero_()
        # expert 4 always first; the others get distinct, lower constant logits (no ties)
        moe.router.weight[:, 0] = torch.tensor([-1.0, -2.0, -3.0, -4.0, 5.0, -5.0])
        ids, _ = route(moe.router(x), top_k, x.dtype)
        assert (ids[:, 0] == 4).all()
        got = moe(x)
    assert rel_err(got, dense_moe_reference(moe, x)) <= 1e-6
    assert rel_err(got, moe_float64(moe, x)) <= 1e-5


def test_zero_tokens():
    moe = make_moe(top_k=2)
    x = torch.zeros(0, DIM)
    with torch.no_grad():
        got = moe(x)
        routed = sparse_experts(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), moe.experts)
    assert got.shape == (0, DIM) and routed.shape == (0, DIM)
    x3 = torch.zeros(2, 0, DIM)
    with torch.no_grad():
        assert moe(x3).shape == (2, 0, DIM)


def test_sparse_experts_direct_call_matches_loop():
    """sparse_experts alone (no shared expert): sum_e expert_e(score * x) over the chosen experts."""
    g = torch.Generator().manual_seed(8)
    experts = Experts(4, DIM, HIDDEN)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=g) * 0.3)
        experts.down.copy_(torch.randn(experts.down.shape, generator=g) * 0.3)
    x = tokens(9, seed=9)
    ids = torch.tensor([[0, 2], [2, 0], [3, 1], [3, 2], [0, 1], [1, 3], [2, 3], [2, 1], [0, 3]])
    scores = torch.rand(9, 2, generator=g)
    with torch.no_grad():
        got = sparse_experts(x, ids, scores, experts)
        ref = torch.zeros(9, DIM)
        for n in range(9):
            for slot in range(2):
                ref[n] += experts.expert(int(ids[n, slot]), scores[n, slot] * x[n:n + 1])[0]
    assert rel_err(got, ref) <= 1e-6


def test_score_multiplies_the_expert_input_not_its_output():
    moe = make_moe(top_k=1, seed=10)
    x = tokens(30, seed=11) * 3.0  # large enough that silu is far from linear
    with torch.no_grad():
        got = moe(x)
    input_scaled = moe_float64(moe, x)
    output_scaled = moe_float64(moe, x, scale_output=True)
    assert rel_err(got, input_scaled) <= 1e-5
    # The two placements are genuinely different for silu (silu(s a) != s silu(a)).
    assert rel_err(output_scaled, input_scaled) > 1e-2
    assert rel_err(got, output_scaled) > 1e-2


def test_scores_are_sigmoid_not_softmax_and_not_renormalised():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    ids, scores = route(logits, 2, torch.float32)
    assert ids.tolist() == [[3, 0]]
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([[3.0, 2.0]])), rtol=0, atol=1e-7)
    assert scores.sum().item() > 1.5  # not renormalised to 1


def test_only_chosen_experts_run_call_count(monkeypatch):
    moe = make_moe(num_experts=8, top_k=2, seed=12)
    x = tokens(3, seed=13)  # 3 tokens x 2 picks: at most 6 of 8 experts used
    with torch.no_grad():
        ids, _ = route(moe.router(x), 2, x.dtype)
    chosen = set(ids.flatten().tolist())
    calls: list[int] = []
    original = Experts.expert

    def counting(self, e, xe):
        calls.append(e)
        assert xe.shape[0] > 0, "an expert was run on zero tokens"
        return original(self, e, xe)

    monkeypatch.setattr(Experts, "expert", counting)
    with torch.no_grad():
        moe(x)
    assert sorted(calls) == sorted(chosen), (calls, chosen)  # each chosen expert exactly once


def test_unused_experts_with_nan_weights_do_not_leak():
    moe = make_moe(num_experts=6, top_k=1, seed=14)
    x = tokens(10, seed=15)
    with torch.no_grad():
        ids, _ = route(moe.router(x), 1, x.dtype)
        unused = sorted(set(range(6)) - set(ids.flatten().tolist()))
        assert unused, "need at least one unused expert for this test"
        ref = moe(x)
        for e in unused:
            moe.experts.gate_up[e] = float("nan")
            moe.experts.down[e] = float("nan")
        got = moe(x)
        dense = dense_moe_reference(moe, x)
    assert torch.isfinite(got).all()
    assert torch.equal(got, ref)  # the unused experts contributed exactly nothing
    assert not torch.isfinite(dense).all()  # the dense oracle would have run them (sanity of the setup)


def test_bf16_moe_close_to_float64():
    moe16 = make_moe(num_experts=6, top_k=2, seed=16, dtype=torch.bfloat16)
    x = tokens(64, seed=17)
    with torch.no_grad():
        got = moe16(x.to(torch.bfloat16))
        dense = dense_moe_reference(moe16, x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    # Truth: the float64 computation with the bf16-rounded weights and input. Routing is identical
    # unless two logits fall within bf16 noise of each other; check the selection first.
    with torch.no_grad():
        ids16, _ = route(moe16.router(x.to(torch.bfloat16)), 2, torch.bfloat16)
        ids64 = (x.to(torch.bfloat16).double() @ moe16.router.weight.double().T).topk(2).indices
    same = (ids16.sort().values == ids64.sort().values).all(-1)
    truth = moe_float64(moe16, x.to(torch.bfloat16))
    assert same.float().mean() >= 0.9
    assert rel_err(got[same], truth[same]) <= 2e-2  # bf16: ~3 roundings of 2^-8 through matmul chains
    assert rel_err(got, dense) <= 2e-2  # sparse vs dense in bf16 (summation order differs)


@pytest.mark.parametrize("n", [2, 9, 16])
def test_a_one_tile_decode_batch_equals_the_grouped_path_bit_for_bit(n, monkeypatch):
    """Top-1 batches of up to one row tile run each chosen expert once over all rows and keep each row's own
    expert's result; with batch invariance on, that is the grouped path's result exactly."""
    moe = make_moe(num_experts=6, top_k=1, seed=21).to(torch.bfloat16)
    x = tokens(n, seed=22, dtype=torch.bfloat16)
    rows_seen: list[int] = []
    original = Experts.expert

    def spying(self, e, xe):
        rows_seen.append(xe.shape[0])
        return original(self, e, xe)

    monkeypatch.setattr(Experts, "expert", spying)
    invariance.set_batch_invariant(moe, True)
    with torch.no_grad():
        ids, scores = route(moe.router(x), 1, x.dtype)
        one_tile = sparse_experts(x, ids, scores, moe.experts)
        whole_batch_calls, rows_seen[:] = list(rows_seen), []
        monkeypatch.setattr(moe_module, "ROW_TILE", 0)  # too small for any batch: the grouped path
        grouped = sparse_experts(x, ids, scores, moe.experts)
    chosen = len(set(ids.flatten().tolist()))
    assert chosen > 1 and whole_batch_calls == [n] * chosen and sum(rows_seen) == n
    assert torch.equal(one_tile, grouped)
    monkeypatch.setattr(moe_module, "ROW_TILE", 16)
    rows_seen[:] = []
    invariance.set_batch_invariant(moe, False)
    with torch.no_grad():
        sparse_experts(x, ids, scores, moe.experts)  # without row tiles a product's cost grows with its rows
    assert sum(rows_seen) == n, "without batch invariance the experts must see only their own rows"
