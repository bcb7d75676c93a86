"""NF4 (QLoRA's 4-bit NormalFloat) against a float64 re-derivation of its definition; recipes, modules, the CPU
packing's fallback to the reference path, and the checkpoint refusal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import llama4
from llama4.info import weight_bytes
from llama4.kernels.cpu import unpack as unpack_model
from llama4.kernels.cpu.packing import PackedExperts, PackedQKV, packing_supported
from llama4.kernels.cpu.quant_layout import kernel_reads
from llama4.quant import (
    QuantizedExperts,
    QuantizedLinear,
    QuantRecipe,
    WeightFormat,
    dequantize,
    quantize,
    quantize_model,
    quantized_bytes,
    save_quantized,
)
from llama4.quant.formats import NF4_LEVELS, unpack_int4
from tests.kernel_support import KERNEL
from tests.kernel_support import pack as pack_model
from tests.lora.helpers import ids, lora_config_model, rel_err

NF4 = WeightFormat.parse("nf4")


def nf4_levels_float64() -> torch.Tensor:
    """The QLoRA paper's construction (appendix E) in float64: quantiles of N(0, 1), 8 positive ones at
    probabilities evenly spaced from delta to 1/2 (1/2 left out), 7 negative ones likewise, an exact 0, all
    divided by the largest."""
    delta = 0.9677083
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat((positive, negative, torch.zeros(1, dtype=torch.float64))).sort().values
    return levels / levels.max()


def nearest_level_reference(weight: torch.Tensor, group: int, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each element's nearest float64 level (its index) for its group's stored absmax, and how far the normalised
    value is from the midpoint between its two nearest levels (a near tie may round either way in float32)."""
    levels = nf4_levels_float64()
    w = weight.double().reshape(*weight.shape[:-1], -1, group)
    s = scale.double()[..., None]
    normalised = torch.where(s == 0, torch.zeros_like(w), w / torch.where(s == 0, torch.ones_like(s), s))
    distance = (normalised[..., None] - levels).abs()
    two = distance.topk(2, dim=-1, largest=False).values
    return distance.argmin(-1).reshape(weight.shape), (two[..., 1] - two[..., 0]).reshape(weight.shape)


def test_levels_are_the_normal_quantiles_of_the_definition():
    derived = nf4_levels_float64()
    assert derived.shape == (16,) and derived[0] == -1 and derived[-1] == 1 and derived[7] == 0
    assert torch.allclose(NF4_LEVELS.double(), derived, rtol=0, atol=2e-7)
    assert torch.equal(NF4_LEVELS, NF4_LEVELS.sort().values)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_every_element_is_its_nearest_level_times_the_group_absmax(group, scale_dtype):
    g = torch.Generator().manual_seed(group)
    weight = torch.cat((torch.randn(6, 512, generator=g) * 0.02, torch.rand(5, 512, generator=g) - 0.5,
                        torch.zeros(1, 512)))
    fmt = WeightFormat.parse(f"nf4-g{group}")
    q = quantize(weight, fmt, scale_dtype)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (12, 256) and q.zero is None
    assert q.scale.dtype == scale_dtype and q.scale.shape == (12, 512 // group)
    absmax = weight.reshape(12, -1, group).abs().amax(-1)
    assert (q.scale.float() >= absmax).all()  # rounded up: no normalised value leaves [-1, 1]
    if scale_dtype == torch.float32:
        assert torch.equal(q.scale, absmax)
    index, margin = nearest_level_reference(weight, group, q.scale)
    codes = unpack_int4(q.codes).long()
    assert ((codes == index) | (margin < 1e-6)).all() and (codes == index).float().mean() > 0.9999
    got = dequantize(q)
    assert torch.equal(got, (NF4_LEVELS[codes].reshape(12, -1, group) * q.scale.float()[..., None]).reshape(12, 512))
    assert not got[-1].any() and not q.scale[-1].any()  # a row of zeros: scale 0, exact zeros


def test_error_bound_and_round_trip():
    weight = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    q = quantize(weight, NF4)
    back = dequantize(q)
    levels = NF4_LEVELS.double()
    half_gap = torch.cat((levels[1:] - levels[:-1], torch.zeros(1, dtype=torch.float64))) / 2
    # the bound of each element: half the gap between the two levels around its normalised value
    normalised = (weight.double().reshape(64, -1, 64) / q.scale.double()[..., None]).reshape(64, 1024)
    below = (torch.searchsorted(levels, normalised.contiguous(), right=True) - 1).clamp(0, 15)
    bound = half_gap[below] * q.scale.double().repeat_interleave(64, dim=1)
    assert ((weight.double() - back.double()).abs() <= bound + 1e-9).all()
    assert (weight - back).abs().max() <= q.scale.max() * (1 - 0.6961928) / 2 + 1e-9
    relative = (weight - back).norm() / weight.norm()
    assert 0.05 < relative < 0.11  # NF4 on normal weights: ~9 % (int4-g32: ~11 %, int8: ~0.4 %)
    again = quantize(back, NF4)  # the values NF4 stands for are its own codes again
    assert torch.equal(again.codes, q.codes) and torch.equal(again.scale, q.scale)
    assert torch.equal(dequantize(again), back)


def test_nibbles_are_level_indices_even_input_low():
    levels = NF4_LEVELS
    row = torch.cat((levels, levels.flip(0), levels[[3, 15, 0, 7]].repeat(8))) * 0.5  # 64 inputs, absmax 0.5
    q = quantize(row[None], NF4)
    expected = torch.cat((torch.arange(16), torch.arange(15, -1, -1), torch.tensor([3, 15, 0, 7]).repeat(8)))
    assert torch.equal(q.codes[0], (expected[0::2] | (expected[1::2] << 4)).to(torch.uint8))
    assert torch.equal(dequantize(q)[0], row)


def test_formats_parse_and_refuse():
    assert NF4 == WeightFormat(4, 64, family="nf") and NF4.name == "nf4-g64" and not NF4.is_integer
    assert WeightFormat.parse("NF4-G256").name == "nf4-g256"
    assert NF4 != WeightFormat.parse("int4-g64") and WeightFormat.parse("int4-g64").is_integer
    with pytest.raises(ValueError, match="nf4 groups are"):
        WeightFormat.parse("nf4-g48")
    with pytest.raises(ValueError, match="unknown weight format 'nf4-asym'.*nf4 \\(= nf4-g64\\)"):
        WeightFormat.parse("nf4-asym")
    with pytest.raises(ValueError, match="nf4 is 4 bits, symmetric"):
        WeightFormat(4, 64, symmetric=False, family="nf")
    with pytest.raises(ValueError, match="family must be 'int' or 'nf'"):
        WeightFormat(4, 64, family="fp")
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(torch.randn(4, 96), NF4)


def test_recipes_take_nf4_alone_and_mixed():
    recipe = QuantRecipe.parse("experts=nf4,attention=int8")
    assert recipe.experts == NF4 and recipe.attention == WeightFormat(8) and recipe.shared is None
    assert str(recipe) == "experts=nf4-g64,attention=int8" and QuantRecipe.parse(str(recipe)) == recipe
    single = QuantRecipe.parse("nf4-g32,scales=bf16")
    assert single.experts == single.shared == single.attention == WeightFormat.parse("nf4-g32")
    assert single.head is None and single.scale_dtype == torch.bfloat16


def test_quantized_model_computes_with_the_dequantized_weights():
    float_model = lora_config_model(top_k=2)
    model = quantize_model(copy.deepcopy(float_model), "nf4-g32,head=nf4-g32")
    linear = model.text.layers[0].attn.qkv.wq
    experts = model.text.layers[1].ffn.experts
    assert isinstance(linear, QuantizedLinear) and linear.format == WeightFormat.parse("nf4-g32")
    assert isinstance(experts, QuantizedExperts) and experts.format == linear.format
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(linear(x), F.linear(x, dequantize(linear.qweight.tensor)))
    # the whole model: NF4's ~9 % per weight, within 3x that on the logits
    tokens = ids()
    with torch.no_grad():
        assert rel_err(model(tokens), float_model(tokens)) < 0.3
    assert quantized_bytes(model) == weight_bytes(model.config, "nf4-g32,head=nf4-g32", torch.float32)[
        "total_bytes"] - sum(p.numel() * 4 for p in model.parameters())


def test_saving_nf4_in_the_compressed_tensors_layout_is_refused(tmp_path):
    model = quantize_model(lora_config_model(), "experts=nf4-g32,attention=int8")
    with pytest.raises(ValueError, match="nf4-g32, which the compressed-tensors layout cannot hold.*quant='nf4'"):
        save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not packing_supported(torch.float32, "cpu", KERNEL), reason="oneDNN packing unavailable")
def test_packing_keeps_nf4_on_the_reference_path():
    plain = quantize_model(lora_config_model(top_k=1), "nf4-g32,attention=int8")
    q = plain.text.layers[1].ffn.experts.gate_up.tensor[0]
    assert not kernel_reads(q)
    packed = pack_model(copy.deepcopy(plain))
    qkv = next(m for m in packed.modules() if isinstance(m, PackedQKV))
    experts = next(m for m in packed.modules() if isinstance(m, PackedExperts))
    assert experts.gate_up[0].reference is not None and experts.gate_up[0].address is None
    assert not experts.groups_in_one_call
    if KERNEL is not None:  # int8 attention still goes to the kernel beside the nf4 weights
        assert qkv.packed.address is not None
    tokens = ids()
    with torch.no_grad():
        assert rel_err(packed(tokens), plain(tokens)) <= 1e-5
        cache_a, cache_b = llama4.KVCache(plain.config.text), llama4.KVCache(plain.config.text)
        plain(tokens, cache=cache_a)
        packed(tokens, cache=cache_b)
        step = torch.tensor([[5], [6]])
        assert rel_err(packed(step, cache=cache_b), plain(step, cache=cache_a)) <= 1e-5
    back = unpack_model(packed)
    for name, module in plain.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedExperts)):
            for a, b in zip(module.buffers(), back.get_submodule(name).buffers()):
                assert torch.equal(a, b)
