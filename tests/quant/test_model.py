"""A tiny random model quantized by recipe: what is swapped and what is not, its logits against the float
model's, generation, and the refusals.

Tolerance of the logits: the relative (Frobenius) error of the quantized model's logits is held to
3 x the relative error of its quantized weights taken together (measured on the model: 0.65% for int8,
10% for int4-g32). On this model (std 0.02 weights, 4 layers) the logits' error is measured at 2.0-2.2x
the weights' for the single-format recipes (int8, int4-g32/g64/g128, asym or not), and at 0.25x for the
mixed one, whose int4 experts (most of the weights) each see a few tokens, scaled by their router score.
A bf16 model gets 2e-2 more (bf16 rounding, as tests/model/test_moe.py allows the float model).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import llama4
from llama4.kernels.cpu.packing import packing_supported
from llama4.model.moe import MoE, Router
from llama4.presets import text_config
from llama4.quant import (
    QuantizedExperts,
    QuantizedLinear,
    QuantRecipe,
    quantize_model,
    quantized_bytes,
    quantized_with,
    summary,
    summary_text,
)
from tests.kernel_support import KERNEL
from tests.kernel_support import pack as pack_model

VOCAB = 97
RECIPES = ["int8", "int4", "int4-g128-asym", "experts=int4-g32,attention=int8,shared=int8,head=int8"]


def config(hidden: int = 128, tied: bool = False) -> llama4.ModelConfig:
    # layers 0 and 2 dense, 1 and 3 MoE; every input width (128, 128 and 256) a multiple of 128
    return llama4.ModelConfig(text=text_config(
        num_layers=4, moe_step=2, vocab_size=VOCAB, hidden_size=hidden, num_heads=4, num_kv_heads=2,
        head_dim=hidden // 4, intermediate_size=128, intermediate_size_mlp=256, num_experts=4,
        attention_chunk_size=5, floor_scale=3, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
        tie_word_embeddings=tied))


@pytest.fixture(scope="module")
def plain() -> llama4.Llama4Model:
    return llama4.random_model(config(), seed=3)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weight_error(quantized: nn.Module, plain: nn.Module) -> float:
    """Relative error of all quantized weights together (Frobenius), against the float model's."""
    error = norm = 0.0
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            pairs = [(module.dequantized_weight(), plain.get_submodule(name).weight)]
        elif isinstance(module, QuantizedExperts):
            ref = plain.get_submodule(name)
            pairs = [(w.t(), want) for e in range(module.num_experts)
                     for w, want in zip(module.dequantized_weights(e), (ref.gate_up[e], ref.down[e]))]
        else:
            continue
        for got, want in pairs:
            error += (got.double() - want.double()).pow(2).sum().item()
            norm += want.double().pow(2).sum().item()
    return math.sqrt(error / norm)


def quantized(plain: llama4.Llama4Model, recipe: str) -> llama4.Llama4Model:
    return quantize_model(copy.deepcopy(plain), recipe)


def test_the_recipe_names_what_is_swapped_and_the_rest_is_untouched(plain):
    model = quantized(plain, "experts=int4-g32,attention=int8,shared=int8")
    assert str(quantized_with(model)) == "experts=int4-g32,shared=int8,attention=int8"
    assert quantized_with(plain) is None
    for layer in model.text.layers:
        attn = layer.attn
        assert all(isinstance(m, QuantizedLinear) and str(m.format) == "int8"
                   for m in (attn.qkv.wq, attn.qkv.wk, attn.qkv.wv, attn.wo))
        mlp = layer.ffn.shared if isinstance(layer.ffn, MoE) else layer.ffn
        assert all(isinstance(m, QuantizedLinear) for m in (mlp.gate, mlp.up, mlp.down))
        if isinstance(layer.ffn, MoE):
            assert isinstance(layer.ffn.experts, QuantizedExperts) and str(layer.ffn.experts.format) == "int4-g32"
            assert type(layer.ffn.router) is Router
    assert type(model.text.output) is nn.Linear  # the head only when named
    float_state = plain.state_dict()
    kept = {name: t for name, t in model.state_dict().items() if name in float_state}
    assert kept and all(torch.equal(t, float_state[name]) for name, t in kept.items())
    assert {n for n in kept if "router" in n} == {n for n in float_state if "router" in n}
    assert {n for n in kept if "norm" in n} == {n for n in float_state if "norm" in n}
    assert "text.embed.weight" in kept


@pytest.mark.parametrize("recipe", RECIPES)
def test_logits_are_within_the_weights_error(plain, ids, recipe):
    model = quantized(plain, recipe)
    bound = 3 * weight_error(model, plain)
    with torch.no_grad():
        want, got = plain(ids), model(ids)
        assert rel_err(got, want) <= bound
        cache = llama4.KVCache(model.config.text)  # the cached path: prefill, then a decode step
        model(ids[:, :20], cache=cache)
        step = model(ids[:, 20:21], cache=cache)
        assert rel_err(step[:, 0], got[:, 20]) <= 1e-5
    assert bound < {"int8": 0.03}.get(recipe, 0.5)  # int8 far tighter than int4


def test_bf16_model(plain, ids):
    model = quantize_model(copy.deepcopy(plain).to(torch.bfloat16), "int8")
    with torch.no_grad():
        assert rel_err(model(ids), plain(ids)) <= 3 * weight_error(model, plain) + 2e-2


def test_generation_runs_and_batch_invariance_holds(plain):
    model = quantized(plain, "int4")
    out = llama4.generate(model, [[5, 6, 7], [8, 9, 10, 11, 12]], max_new_tokens=6, stop_tokens=[])
    assert [len(row) for row in out] == [9, 11]
    model.set_batch_invariant(True)
    prompts = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(prompts)[1], model(prompts[1:2])[0])


def test_summary_and_bytes(plain):
    model = quantized(plain, "experts=int4-g32,attention=int8,head=int8")
    rows = summary(model)
    assert {(r.kind, str(r.format)) for r in rows} == {("experts", "int4-g32"), ("attention", "int8"),
                                                        ("shared", "None"), ("head", "int8")}
    assert len([r for r in rows if r.kind == "attention"]) == 4 * 4
    assert sum(r.stored_bytes for r in rows if r.format is not None) == quantized_bytes(model)
    experts = next(r for r in rows if r.kind == "experts")
    assert experts.stored_bytes / experts.float_bytes == pytest.approx((0.5 + 4 / 32) / 4)  # fp32 -> 4.5 + 0.5 bits
    assert "experts" in summary_text(model) and quantized_bytes(plain) == 0


def test_packed_models_are_refused(plain):
    if not packing_supported(torch.float32, "cpu", KERNEL):
        pytest.skip("oneDNN packing unavailable")
    packed = pack_model(copy.deepcopy(plain))
    with pytest.raises(ValueError, match=r"pack=False.*llama4.kernels.cpu.unpack"):
        quantize_model(packed, "int8")


def test_refusals_leave_the_model_as_it_was(plain):
    narrow = llama4.random_model(config(hidden=64))
    before = narrow.state_dict()
    with pytest.raises(ValueError, match="multiples of 128"):
        quantize_model(narrow, "experts=int8,attention=int4-g128")  # experts pass the check, attention does not
    assert narrow.state_dict().keys() == before.keys() and quantized_with(narrow) is None
    model = quantized(plain, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="tied to the embeddings"):
        quantize_model(llama4.random_model(config(tied=True)), "int8,head=int8")
    with pytest.raises(TypeError, match="Llama4Model or TextModel"):
        quantize_model(nn.Linear(4, 4), QuantRecipe())


@pytest.mark.parametrize("recipe", ["int8", "experts=int4-g32,attention=int8"])
def test_packing_a_quantized_float32_model_keeps_its_logits(plain, ids, recipe):
    """kernels.cpu.pack swaps the quantized modules too (their codes in the kernel's layout); float32 inputs
    multiply the weights dequantized in float32, so the logits stay those of the quantized model."""
    if not packing_supported(torch.float32, "cpu", KERNEL):
        pytest.skip("oneDNN packing unavailable")
    model = quantized(plain, recipe)
    with torch.no_grad():
        want = model(ids)
    packed = pack_model(model)
    assert not any(isinstance(m, QuantizedLinear) for m in packed.modules())
    with torch.no_grad():
        assert rel_err(packed(ids), want) < 1e-5
