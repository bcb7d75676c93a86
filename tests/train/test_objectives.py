import math

import pytest
import torch

from llama4.build import random_model
from llama4.train.data import IGNORE
from llama4.train.objectives import RouterCapture, lr_at, next_token_loss, param_groups, router_aux_loss


def test_loss_ignores_masked_positions():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, IGNORE, 4], [IGNORE, IGNORE, 0]])
    loss, n = next_token_loss(logits, targets)
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 0, 1] + logp[0, 2, 4] + logp[1, 2, 0]) / 3
    assert n == 3 and torch.allclose(loss, expected)
    # changing logits at ignored positions changes nothing
    logits2 = logits.clone()
    logits2[0, 1] += 100
    assert torch.equal(next_token_loss(logits2, targets)[0], loss)


def test_lr_schedule_values():
    kw = dict(lr=1.0, min_lr=0.1, warmup=4, total=15)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0  # cosine starts at the peak
    assert lr_at(9, **kw) == pytest.approx(0.55)  # halfway: (lr + min_lr) / 2
    assert lr_at(14, **kw) == pytest.approx(0.1)  # last step: min_lr
    assert lr_at(100, **kw) == pytest.approx(0.1)
    vals = [lr_at(s, **kw) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_aux_loss_hand_example():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    loss, f = router_aux_loss(logits, top_k=1)
    assert f.tolist() == [0.5, 0.25, 0.25]  # top-1: experts 0, 1, 0, 2
    # direct re-derivation in float64
    p = torch.zeros(3, dtype=torch.float64)
    for row in logits.double():
        e = torch.exp(row)
        p += e / e.sum()
    p /= 4
    expected = 3 * sum(fe * pe for fe, pe in zip([0.5, 0.25, 0.25], p.tolist()))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_aux_loss_bounds_balanced_and_collapsed():
    balanced = torch.eye(4).repeat(8, 1) * 0  # uniform probabilities...
    balanced[torch.arange(32), torch.arange(32) % 4] = 1e-6  # ...ties broken evenly
    assert float(router_aux_loss(balanced, 1)[0]) == pytest.approx(1.0, rel=1e-4)
    collapsed = torch.zeros(32, 4)
    collapsed[:, 2] = 50.0
    assert float(router_aux_loss(collapsed, 1)[0]) == pytest.approx(4.0, rel=1e-4)


def test_aux_loss_top2_counts_assignments():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 3.0]])
    _, f = router_aux_loss(logits, top_k=2)
    assert f.tolist() == [0.25, 0.25, 0.25, 0.25]


def test_router_capture_hooks_every_moe_and_removes_them(config):
    model = random_model(config, seed=0)
    x = torch.randint(0, 64, (2, 16))
    with RouterCapture(model) as cap:
        model(x)
    assert len(cap.logits) == 2 and cap.logits[0].shape == (32, 4)
    loss, shares = cap.aux_loss()
    assert loss.dim() == 0 and len(shares) == 2 and all(math.isclose(float(s.sum()), 1.0) for s in shares)
    model(x)
    assert len(cap.logits) == 2  # hooks removed


def test_param_groups_no_decay_on_norms_and_embeddings(config):
    model = random_model(config, seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any(p is model.text.embed.weight for p in no_decay["params"])
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p is not model.text.embed.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
