"""LoRA / QLoRA wrappers against float64 re-derivations; routing, merge / unmerge, gradients, state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.lora import (
    LoraConfig,
    LoraExperts,
    LoraLinear,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from llama4.model.moe import MoE, route
from llama4.quant import QuantizedExperts, QuantizedLinear, quantize_model
from tests.lora.helpers import dequantized_float_copy, ids, lora_config_model, randomize_adapters, rel_err

ALL = ("attention", "shared", "mlp", "experts", "router")


def _randn(*shape, seed=0, std=0.2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def _linear_reference(w: LoraLinear, x: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
    x = x.double()
    a, b = w.lora_A.weight.double(), w.lora_B.weight.double()
    return x @ base_weight.double().T + w.scaling * (x @ a.T) @ b.T


def test_config_checks_name_what_is_allowed():
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        LoraConfig(alpha=float("nan"))
    with pytest.raises(ValueError, match="unknown target 'q_proj'.*attention, wq"):
        LoraConfig(targets=("q_proj",))
    assert LoraConfig(targets="wq").targets == ("wq",)
    assert LoraConfig(rank=4, alpha=8).scaling == 2.0
    assert LoraConfig(rank=4, alpha=8, rslora=True).scaling == 4.0
    model = lora_config_model()
    with pytest.raises(ValueError, match=r"targets \['text.layers.7.\*'\] match no module"):
        apply_lora(model, LoraConfig(targets=("wq", "text.layers.7.*")))
    assert not lora_modules(model)  # a refused config leaves the model as it was


def test_targets_pick_the_named_modules():
    targets = ("wq", "shared", "experts.down", "text.layers.0.ffn.up")
    model = apply_lora(lora_config_model(), LoraConfig(targets=targets))
    wrapped = lora_modules(model)
    assert sorted(wrapped) == ["text.layers.0.attn.qkv.wq", "text.layers.0.ffn.up", "text.layers.1.attn.qkv.wq",
                               "text.layers.1.ffn.experts", "text.layers.1.ffn.shared.down",
                               "text.layers.1.ffn.shared.gate", "text.layers.1.ffn.shared.up"]
    assert wrapped["text.layers.1.ffn.experts"].tensors == ("down",)
    assert not any(m.training for m in model.modules())  # wrappers (and their dropout) follow the model's mode
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig())


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_equals_float64_rederivation(rslora):
    base = nn.Linear(24, 40, bias=False)
    wrapper = LoraLinear(base, rank=3, scaling=LoraConfig(rank=3, alpha=5, rslora=rslora).scaling, dropout=0.0)
    assert wrapper.lora_B.weight.abs().max() == 0 and wrapper.lora_A.weight.abs().max() > 0  # PEFT's init
    with torch.no_grad():
        wrapper.lora_B.weight.copy_(_randn(40, 3))
    x = _randn(2, 7, 24, seed=1, std=1.0)
    assert rel_err(wrapper(x), _linear_reference(wrapper, x, base.weight)) <= 1e-6


def test_linear_dropout_acts_on_the_adapter_input_only():
    base = nn.Linear(16, 8, bias=True)
    wrapper = LoraLinear(base, rank=2, scaling=2.0, dropout=0.5).train()
    with torch.no_grad():
        wrapper.lora_B.weight.copy_(_randn(8, 2))
    x = _randn(5, 16, seed=2, std=1.0)
    torch.manual_seed(0)
    got = wrapper(x)
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.5, training=True).double()
    a, b = wrapper.lora_A.weight.double(), wrapper.lora_B.weight.double()
    ref = x.double() @ base.weight.double().T + base.bias.double() + 2.0 * (dropped @ a.T) @ b.T
    assert rel_err(got, ref) <= 1e-6
    wrapper.eval()
    assert rel_err(wrapper(x), _linear_reference(wrapper, x, base.weight) + base.bias.double()) <= 1e-6


def _moe_with_adapters(top_k: int, tensors=("gate_up", "down")) -> tuple[MoE, LoraExperts]:
    torch.manual_seed(0)
    moe = MoE(dim=32, hidden=16, num_experts=4, top_k=top_k)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.2)
    wrapper = LoraExperts(moe.experts, tensors, rank=3, scaling=1.5, dropout=0.0)
    with torch.no_grad():
        for p in wrapper.adapter_parameters().values():
            p.normal_(0.0, 0.2)
    moe.experts = wrapper
    return moe, wrapper


@pytest.mark.parametrize("top_k", [1, 2])
def test_experts_equal_float64_rederivation(top_k):
    """Every token through each of its chosen experts with that expert's merged weights, in float64."""
    moe, wrapper = _moe_with_adapters(top_k)
    base = wrapper.base
    x = _randn(11, 32, seed=4, std=1.0)
    expert_ids, scores = route(moe.router(x), top_k, x.dtype)
    ref = torch.zeros(11, 32, dtype=torch.float64)
    for n in range(11):
        xd = x[n].double()
        h = xd @ moe.shared.gate.weight.double().T
        ref[n] = (F.silu(h) * (xd @ moe.shared.up.weight.double().T)) @ moe.shared.down.weight.double().T
        for e, score in zip(expert_ids[n].tolist(), scores[n].double()):
            gate_up = base.gate_up[e].double() + 1.5 * wrapper.gate_up_A[e].double() @ wrapper.gate_up_B[e].double()
            down = base.down[e].double() + 1.5 * wrapper.down_A[e].double() @ wrapper.down_B[e].double()
            gate, up = ((score * xd) @ gate_up).chunk(2)
            ref[n] += (F.silu(gate) * up) @ down
    assert rel_err(moe(x), ref) <= 1e-6


def test_each_token_goes_through_its_own_experts_adapter():
    moe, wrapper = _moe_with_adapters(top_k=1)
    x = _randn(40, 32, seed=5, std=1.0)
    chosen = route(moe.router(x), 1, x.dtype)[0][:, 0]
    target = int(chosen.bincount().argmax())
    with torch.no_grad():
        for p in wrapper.adapter_parameters().values():
            keep = torch.zeros(p.shape[0], 1, 1)
            keep[target] = 1
            p.mul_(keep)  # an adapter on one expert only
    adapted = moe(x)
    moe.experts = wrapper.base
    plain = moe(x)
    others = chosen != target
    assert torch.equal(adapted[others], plain[others])
    assert (adapted[~others] - plain[~others]).abs().amax(dim=-1).min() > 1e-4


def test_model_merge_equals_unmerged_and_unmerge_restores_the_base_bit_for_bit():
    model = apply_lora(lora_config_model(top_k=2), LoraConfig(rank=4, alpha=8, targets=ALL))
    randomize_adapters(model)
    tokens = ids()
    with torch.no_grad():
        unmerged = model(tokens)
        bases = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
        merge_lora(model)
        merged = model(tokens)
        unmerge_lora(model)
        again = model(tokens)
    assert rel_err(merged, unmerged) <= 1e-5
    assert all(torch.equal(p, bases[n]) for n, p in model.named_parameters() if ".base." in n)
    assert torch.equal(again, unmerged)


def test_merge_and_unload_leaves_a_plain_model_with_the_same_logits():
    model = apply_lora(lora_config_model(), LoraConfig(rank=4, alpha=8, targets=ALL))
    randomize_adapters(model)
    tokens = ids()
    with torch.no_grad():
        adapted = model(tokens)
        merge_and_unload(model)
        merged = model(tokens)
    assert not lora_modules(model) and not hasattr(model, "lora_config")
    assert sorted(model.state_dict()) == sorted(lora_config_model().state_dict())
    assert rel_err(merged, adapted) <= 1e-5


def test_gradients_reach_only_the_adapters():
    model = apply_lora(lora_config_model(top_k=2), LoraConfig(rank=4, alpha=8, dropout=0.1, targets=ALL)).train()
    randomize_adapters(model)
    adapters = {f"{name}.{local}" for name, m in lora_modules(model).items() for local in m.adapter_parameters()}
    tokens = ids()
    F.cross_entropy(model(tokens)[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.requires_grad and p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_batch_invariance_covers_the_adapters():
    model = apply_lora(lora_config_model(), LoraConfig(rank=4, alpha=8, targets=ALL))
    randomize_adapters(model)
    model.set_batch_invariant(True)
    tokens = ids(batch=3, length=5)
    with torch.no_grad():
        batch = model(tokens)
        solo = model(tokens[1:2])
    assert torch.equal(batch[1:2], solo)


def test_state_dict_round_trip_and_strictness():
    config = LoraConfig(rank=4, alpha=8, targets=ALL)
    model = apply_lora(lora_config_model(), config)
    randomize_adapters(model)
    tensors = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert "text.layers.1.ffn.experts.gate_up_A" in tensors and tensors["text.layers.1.ffn.experts.gate_up_A"].shape \
        == (4, 32, 4)
    other = apply_lora(lora_config_model(), config, seed=7)
    load_lora_state_dict(other, tensors)
    tokens = ids()
    with torch.no_grad():
        assert torch.equal(other(tokens), model(tokens))
    name = "text.layers.0.attn.qkv.wq.lora_A.weight"
    with pytest.raises(ValueError, match=f"missing.*{name}"):
        load_lora_state_dict(other, {k: v for k, v in tensors.items() if k != name})
    bad = dict(tensors, **{name: torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="shapes differ"):
        load_lora_state_dict(other, bad)


@pytest.mark.parametrize("fmt", ["int4-g32", "int8"])
def test_qlora_equals_dequantized_base_plus_adapter(fmt):
    config = LoraConfig(rank=4, alpha=8, targets=("attention", "shared", "mlp", "experts"))
    float_model = lora_config_model(top_k=2)
    quantized = quantize_model(copy.deepcopy(float_model), fmt)
    reference = dequantized_float_copy(quantized, float_model)
    apply_lora(quantized, config)
    apply_lora(reference, config)
    assert isinstance(lora_modules(quantized)["text.layers.1.ffn.experts"].base, QuantizedExperts)
    randomize_adapters(quantized)
    load_lora_state_dict(reference, lora_state_dict(quantized))
    tokens = ids()
    with torch.no_grad():
        got, ref = quantized(tokens), reference(tokens)
    assert rel_err(got, ref) <= 1e-5
    with pytest.raises(ValueError, match="quantized base .*merge_and_unload"):
        merge_lora(quantized)
    with torch.no_grad():
        merge_and_unload(quantized)
        assert rel_err(quantized(tokens), ref) <= 1e-5
    assert not any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in quantized.modules())


def test_qlora_gradients_reach_the_adapters_of_quantized_bases():
    model = apply_lora(quantize_model(lora_config_model(), "int4-g32"), LoraConfig(rank=2, targets=("wv", "experts")))
    randomize_adapters(model)
    model(ids()).square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 2 + 4 and all(g is not None and g.abs().max() > 0 for g in grads.values())
