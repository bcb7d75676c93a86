"""The C kernel's products on int8 / int4 weights (csrc/quant_linear.c, kernels.cpu.quant_layout) and the packed
quantized modules and fused decode built on them, every kernel variant this CPU runs.

References: a float64 product of the rows and the dequantized weight (tolerance: the kernel sums in float32,
then rounds once to bf16: within one bf16 rounding of the float64 result plus 2^-20 of sum |x w|), where the rows
are the bf16 rows for int8 weights and, for int4 weights, the rows as the kernel quantizes them (int8 codes per
32-input block, re-derived here in float32 as the C code computes them; and against the bf16 rows, within the
quantization's bound: half a code step d_b / 2 per input); every row's result alone (bit for bit), the layout's
exact inverse, and llama4.quant's reference modules (dequantize, then the float product) for whole models.
"""

from __future__ import annotations

import copy

import pytest
import torch

import llama4
from llama4.kernels import cpu as cpu_kernels
from llama4.kernels.cpu import fused_decode
from llama4.kernels.cpu import library as cpu_kernel
from llama4.kernels.cpu.packing import PackedExperts, PackedLinear, PackedQKV, PackedSwiGLU, PackedWeight
from llama4.kernels.cpu.quant_layout import KernelQuantized, kernel_reads
from llama4.model.cache import KVCache
from llama4.quant import (
    QuantizedExperts,
    QuantizedLinear,
    QuantRecipe,
    WeightFormat,
    dequantize,
    quantize,
    quantize_model,
)
from llama4.quant.formats import unpack_int4
from tests.kernel_support import BF16_PACKING, FUSED_CHUNK, KERNEL, KERNELS, fused_decode_model, runnable_variants

FORMATS = ["int8", "int4-g32", "int4-g64", "int4-g128", "int4-g32-asym", "int4-g128-asym"]
SCALES = [torch.float32, torch.bfloat16]


RUNNABLE = runnable_variants() if KERNEL is not None else []


@pytest.fixture(params=RUNNABLE or [pytest.param(None, marks=pytest.mark.skip(reason="no CPU kernel runs here"))])
def variant(request):
    return cpu_kernel.load_variant(request.param)


def _quantized(out_features: int, in_features: int, fmt: str, scale_dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * in_features ** -0.5
    weight[: out_features // 7, : in_features // 3] *= 8  # groups of very different ranges
    return quantize(weight, WeightFormat.parse(fmt), scale_dtype)


def _rows(rows: int, in_features: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_features, generator=g).bfloat16()


def _kernel_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows as the int4 products see them: each 32-input block as int8 codes q = x * (127 / max |x|) rounded
    to nearest even, in float32, and d = max |x| / 127; returns (d * q in float64, d per block)."""
    blocks = x.float().view(x.shape[0], -1, 32)
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, torch.tensor(127.0) / largest, torch.zeros_like(largest))
    codes = torch.round(blocks * inverse)
    assert codes.abs().max() <= 127
    d = largest / 127.0
    return (codes.double() * d.double()).view_as(x), d.double().squeeze(-1)


def _assert_within_one_rounding(got: torch.Tensor, x: torch.Tensor, tensor) -> None:
    w = dequantize(tensor, torch.float64)
    rows = _kernel_rows(x)[0] if tensor.format.bits == 4 else x.double()
    exact = rows @ w.T
    bound = exact.abs() * 2.0 ** -8 + (rows.abs() @ w.abs().T) * 2.0 ** -20
    assert got.dtype == torch.bfloat16
    excess = (got.double() - exact).abs() - bound
    assert excess.max() <= 0, f"off by {excess.max().item():.3g} beyond one bf16 rounding"
    if tensor.format.bits == 4:  # against the bf16 rows: at most half a code step per input, and the rounding
        d = _kernel_rows(x)[1]
        step = (d.repeat_interleave(32, dim=1) / 2) @ w.abs().T
        unquantized = x.double() @ w.T
        excess = (got.double() - unquantized).abs() - (step + unquantized.abs() * 2.0 ** -8 + bound)
        assert excess.max() <= 0, f"off by {excess.max().item():.3g} beyond the rows' quantization"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale_dtype", SCALES, ids=["fp32-scales", "bf16-scales"])
def test_products_are_the_dequantized_product_within_one_bf16_rounding(variant, fmt, scale_dtype):
    tensor = _quantized(200, 384, fmt, scale_dtype)  # outputs not a multiple of 64: a padded block column
    packed = KernelQuantized(tensor)
    x = _rows(16, 384)
    for rows in (1, 2, 3, 4, 5, 8, 16):
        got = variant.linear(x[:rows], packed.address, (200, 384))
        _assert_within_one_rounding(got, x[:rows], tensor)


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g64-asym"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(variant, fmt):
    tensor = _quantized(130, 256, fmt, seed=3)
    packed = KernelQuantized(tensor)
    x = _rows(16, 256, seed=4)
    together = variant.linear(x, packed.address, (130, 256))
    for start, stop in ((0, 1), (3, 4), (5, 7), (1, 4), (7, 16), (2, 13)):
        assert torch.equal(variant.linear(x[start:stop], packed.address, (130, 256)), together[start:stop])


def test_one_call_mixes_formats_each_group_as_its_own_product(variant):
    """The routed experts of a decode batch: bf16, int8 and int4 weights side by side in one call."""
    g = torch.Generator().manual_seed(5)
    plain = (torch.randn(192, 256, generator=g) * 0.06).bfloat16()
    weights = [PackedWeight(plain, variant), KernelQuantized(_quantized(192, 256, "int8")),
               KernelQuantized(_quantized(192, 256, "int4-g32-asym", torch.bfloat16)), None]
    weights[3] = weights[1]
    if weights[0].address is None:
        pytest.skip("the bf16 weight is not on the kernel here")
    counts = [3, 1, 16, 2]
    x = _rows(sum(counts), 256, seed=6)
    got = variant.linear_groups(x, [w.address for w in weights], counts, (192, 256))
    at = 0
    for w, count in zip(weights, counts):
        assert torch.equal(got[at:at + count], variant.linear(x[at:at + count], w.address, (192, 256)))
        at += count


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_kernels_layout_gives_the_exact_tensor_back(fmt):
    for scale_dtype in SCALES:
        tensor = _quantized(100, 256, fmt, scale_dtype)
        back = KernelQuantized(tensor).to_tensor()
        assert back.format == tensor.format
        for a, b in ((back.codes, tensor.codes), (back.scale, tensor.scale), (back.zero, tensor.zero)):
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))


def test_the_kernels_layout_puts_each_code_where_the_c_side_reads_it():
    """int4: cells [O/64, 8-output column, I/32, load k, output j, byte t], byte t holding inputs 4k + t (low
    nibble) and 16 + 4k + t (high) of the block; int8: block (o // 64, i // 32), then input, then output o % 64."""
    int4 = _quantized(70, 64, "int4-g32")
    cells = KernelQuantized(int4).codes
    assert cells.shape == (2, 8, 2, 4, 8, 4)
    codes = unpack_int4(int4.codes)
    o, block, k, t = 64 + 5, 1, 2, 3  # output 69: block column 1, 8-output column 0, j = 5
    byte = int(cells[1, 0, block, k, 5, t])
    assert byte & 15 == codes[o, 32 * block + 4 * k + t] and byte >> 4 == codes[o, 32 * block + 16 + 4 * k + t]
    o = 2 * 8 + 1  # block column 0, 8-output column 2, j = 1
    assert int(cells[0, 2, 0, 0, 1, 0]) & 15 == codes[o, 0]
    assert (cells[1, 0, :, :, 6:] == 0).all() and (cells[1, 1:] == 0).all()  # padded outputs
    int8 = _quantized(70, 64, "int8")
    blocked = KernelQuantized(int8).codes  # [O/64, I/32, 32, 64]
    assert blocked[1, 1, 7, 3] == int8.codes[64 + 3, 32 + 7]


def test_weights_the_kernel_cannot_read_are_refused_or_kept_for_the_reference_path():
    odd = quantize(torch.randn(8, 48), WeightFormat.parse("int8"))  # inputs not a whole number of 32-blocks
    assert not kernel_reads(odd)
    with pytest.raises(ValueError, match="multiple of 32"):
        KernelQuantized(odd)
    packed = PackedWeight(odd, KERNEL)
    assert packed.address is None and packed.reference is odd
    x = torch.randn(3, 48).bfloat16()
    assert torch.equal(cpu_kernels.packing._linear(x, packed), torch.nn.functional.linear(x, dequantize(odd, x.dtype)))


@pytest.mark.skipif(KERNEL is None, reason="no CPU kernel runs here")
def test_longer_inputs_run_as_the_bf16_products_of_this_cpu_run():
    """Where oneDNN has no bf16 GEMM (the bf16 products are the kernel's too), every row as its decode step;
    elsewhere the weight dequantized for the call, through oneDNN. Float32 inputs: the float32 product."""
    tensor = _quantized(96, 256, "int4-g64")
    packed = PackedWeight(tensor, KERNEL)
    x = _rows(40, 256)
    got = cpu_kernels.packing._linear(x, packed)
    if cpu_kernels.packing._onednn_packs(torch.bfloat16):
        expected = cpu_kernels.packing._linear(x, PackedWeight(dequantize(tensor, torch.bfloat16), KERNEL))
    else:
        expected = torch.cat([KERNEL.linear(x[r:r + 1], packed.address, (96, 256)) for r in range(40)])
    assert torch.equal(got, expected)
    x32 = x.float()
    torch.testing.assert_close(cpu_kernels.packing._linear(x32, packed), x32 @ dequantize(tensor).T)


# ---------------------------------------------------------------------------------------------------------------
# whole models

CHUNK = FUSED_CHUNK


@pytest.fixture(scope="module")
def plain():
    """RoPE + chunked, NoPE + temperature tuning, MoE and dense layers (the fused decode tests' model)."""
    return fused_decode_model().to(torch.bfloat16)


RECIPES = ["int8", "int4-g32", "experts=int4-g64-asym,attention=int8,shared=int4-g32,head=int8,scales=bf16"]


def _quantized_model(plain, recipe: str):
    model = copy.deepcopy(plain)
    quantize_model(model, QuantRecipe.parse(recipe))
    return model


needs_packing = pytest.mark.skipif(not BF16_PACKING or KERNEL is None, reason="no CPU kernel runs on this machine")


@needs_packing
@pytest.mark.parametrize("recipe", RECIPES)
def test_packing_a_quantized_model_puts_every_quantized_weight_on_the_kernel(plain, recipe):
    reference = _quantized_model(plain, recipe)
    packed = cpu_kernels.pack(_quantized_model(plain, recipe), KERNELS)
    assert not any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in packed.modules())
    layer = packed.text.layers[1]
    assert isinstance(layer.attn.qkv, PackedQKV) and layer.attn.qkv.packed.quantized is not None
    assert isinstance(layer.ffn.experts, PackedExperts) and layer.ffn.experts.groups_in_one_call
    assert isinstance(layer.ffn.shared, PackedSwiGLU) and layer.ffn.shared.down.packed.quantized is not None
    assert isinstance(packed.text.output, PackedLinear)
    assert packed.text.output.packed.is_quantized == ("head" in recipe)
    assert isinstance(packed.text.fast_decode, fused_decode.FusedDecode) and packed.text.fast_decode.ready()
    cpu_kernels.unpack(packed)  # the same quantized modules, the same codes and scales, back
    before, after = reference.state_dict(), packed.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_packing
@pytest.mark.parametrize("recipe", RECIPES)
def test_packed_quantized_decode_stays_as_close_to_float32_as_the_reference_modules(plain, recipe):
    """Greedy decode over chunk boundaries: the fused C steps on quantized weights against the same quantized
    weights in float32 (reference modules), typically no further than the bf16 reference modules are (the
    medians over the steps, x1.25 + 2e-3). Where int4 products run, the rows they take are quantized to int8
    per 32 inputs as well (half a code step, 1/254 of the block's largest value, per input: about doubling the
    error on this small random model, whose every block sees it): x2.5 there. Not every step: a top-1
    router's near tie may go the other way on one path (its cache then differs for good), which the max bound
    (0.3) still allows."""
    reference = _quantized_model(plain, recipe)
    exact = copy.deepcopy(reference).float()
    packed = cpu_kernels.pack(_quantized_model(plain, recipe), KERNELS)
    ids = torch.randint(3, 211, (1, 5), generator=torch.Generator().manual_seed(0))
    caches = [KVCache(plain.config.text) for _ in range(3)]
    with torch.no_grad():
        logits = [m(ids, cache=c)[:, -1] for m, c in zip((packed, reference, exact), caches)]
        errors = []
        for _ in range(2 * CHUNK + 3):
            token = logits[2].argmax(-1, keepdim=True)
            logits = [m(token, cache=c)[:, -1] for m, c in zip((packed, reference, exact), caches)]
            errors.append((_rel_err(logits[0], logits[2]), _rel_err(logits[1], logits[2])))
    fast, ref = torch.tensor(errors).T
    factor = 2.5 if "int4" in recipe else 1.25
    assert fast.median() <= factor * ref.median() + 2e-3 and fast.max() < 0.3, errors


@needs_packing
@pytest.mark.parametrize("lengths", [[5, 11, 19], [7] * 18])  # ragged rows; more rows than one kernel tile
def test_a_quantized_rows_decode_in_a_batch_equals_its_solo_run(plain, lengths):
    """Each prompt prefilled alone, then decoded together (as the engine batches): every row writes what it
    writes alone, on the fused C steps (rows of one call never touch each other's arithmetic)."""
    packed = cpu_kernels.pack(_quantized_model(plain, "experts=int4-g32,attention=int8,shared=int4-g32"), KERNELS)
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in lengths]
    with torch.inference_mode():
        batched = llama4.generate(packed, prompts, max_new_tokens=2 * CHUNK + 2, stop_tokens=[])
        solo = [llama4.generate(packed, [p], max_new_tokens=2 * CHUNK + 2, stop_tokens=[])[0] for p in prompts]
    for row, alone in enumerate(solo):
        assert batched[row] == alone, row
