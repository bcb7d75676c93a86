"""CPU weight packing against the plain modules it replaces (the unpacked model is the reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import llama4
from llama4.kernels.cpu import unpack as unpack_model
from llama4.kernels.cpu.packing import (
    ROW_BUCKET,
    PackedExperts,
    PackedLinear,
    PackedQKV,
    PackedRouter,
    PackedSwiGLU,
    packing_supported,
)
from llama4.model.moe import Experts
from llama4.presets import text_config
from tests.kernel_support import KERNEL
from tests.kernel_support import pack as pack_model

pytestmark = pytest.mark.skipif(not packing_supported(torch.float32, "cpu", KERNEL),
                                reason="oneDNN packing unavailable")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def plain():
    cfg = text_config(num_layers=4, moe_step=2, vocab_size=97, hidden_size=32, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=32, intermediate_size_mlp=48, num_experts=4,
                      attention_chunk_size=5, floor_scale=3)
    return llama4.random_model(llama4.ModelConfig(text=cfg), std=0.2, seed=4)


def test_every_target_is_swapped_and_routers_keep_their_plain_weight(plain):
    packed = pack_model(copy.deepcopy(plain))
    kinds = {type(m) for m in packed.modules()}
    assert {PackedQKV, PackedSwiGLU, PackedExperts, PackedLinear, PackedRouter} <= kinds
    for layer, reference in zip(packed.text.layers, plain.text.layers):
        if hasattr(layer.ffn, "router"):
            assert isinstance(layer.ffn.router, PackedRouter)
            assert torch.equal(layer.ffn.router.weight, reference.ffn.router.weight)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_packed_logits_match_the_plain_model(plain, dtype, tol):
    ref = copy.deepcopy(plain).to(dtype)
    packed = pack_model(copy.deepcopy(plain).to(dtype))
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(packed(ids), ref(ids)) <= tol
        cache_a, cache_b = llama4.KVCache(ref.config.text), llama4.KVCache(ref.config.text)
        ref(ids[:, :20], cache=cache_a)
        packed(ids[:, :20], cache=cache_b)
        assert rel_err(packed(ids[:, 20:21], cache=cache_b), ref(ids[:, 20:21], cache=cache_a)) <= tol


@pytest.mark.parametrize("rows", [0, 1, 7, ROW_BUCKET, ROW_BUCKET + 1, 3 * ROW_BUCKET + 5])
def test_packed_experts_equal_plain_experts_for_any_row_count(rows):
    experts = Experts(3, 16, 24)
    with torch.no_grad():
        experts.gate_up.normal_(0, 0.3)
        experts.down.normal_(0, 0.3)
    packed = PackedExperts(experts, KERNEL)
    packed.load_tensor("gate_up", experts.gate_up)
    packed.load_tensor("down", experts.down)
    x = torch.randn(rows, 16)
    with torch.no_grad():
        for e in range(3):
            got, want = packed.expert(e, x), experts.expert(e, x)
            assert got.shape == want.shape == (rows, 16)
            assert torch.allclose(got, want, atol=1e-5)


def test_unpack_restores_the_exact_weights(plain):
    model = copy.deepcopy(plain)
    before = {n: p.clone() for n, p in model.named_parameters()}
    unpack_model(pack_model(model))
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_saving_a_packed_model_writes_the_plain_tensors_and_keeps_it_packed(plain, tmp_path):
    llama4.save_model(plain, tmp_path / "plain")
    packed = pack_model(copy.deepcopy(plain))
    llama4.save_model(packed, tmp_path / "packed")
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "packed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(packed.text.layers[0].attn.qkv, PackedQKV)


def test_load_model_packs_by_default_and_not_when_asked(plain, tmp_path):
    llama4.save_model(plain, tmp_path)
    assert isinstance(llama4.load_model(tmp_path).text.layers[0].attn.qkv, PackedQKV)
    assert not isinstance(llama4.load_model(tmp_path, pack=False).text.layers[0].attn.qkv, PackedQKV)
