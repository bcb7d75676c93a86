"""Weight formats: parsing, the round-to-nearest bound, exact round trips, int4 packing and edge cases.

The bound: every element dequantizes to within scale / 2 of its original, its group's scale (a relative
1e-5 of slack for float32 arithmetic in w / scale and q * scale).
"""

from __future__ import annotations

import pytest
import torch

from llama4.quant.formats import (
    QuantizedTensor,
    WeightFormat,
    dequantize,
    pack_int4,
    quantize,
    stack,
    unpack_int4,
)

FORMATS = ["int8", "int4-g32", "int4-g64", "int4-g128", "int4-g32-asym", "int4-g128-asym"]


def per_element_scale(q: QuantizedTensor) -> torch.Tensor:
    """Each element's scale, [..., out, in]."""
    groups = q.scale.shape[-1]
    return q.scale.float().repeat_interleave(q.shape[-1] // groups, dim=-1)


def weight(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w[..., 3] *= 40  # an outlier column: every group's scale differs
    return w


@pytest.mark.parametrize("text, bits, group, symmetric, name", [
    ("int8", 8, None, True, "int8"),
    ("int4", 4, 32, True, "int4-g32"),
    ("int4-g64", 4, 64, True, "int4-g64"),
    ("int4-g128-asym", 4, 128, False, "int4-g128-asym"),
    ("int4-asym", 4, 32, False, "int4-g32-asym"),
    (" INT4-G32 ", 4, 32, True, "int4-g32"),
])
def test_parse(text, bits, group, symmetric, name):
    fmt = WeightFormat.parse(text)
    assert (fmt.bits, fmt.group, fmt.symmetric) == (bits, group, symmetric)
    assert str(fmt) == name and WeightFormat.parse(name) == fmt


@pytest.mark.parametrize("text, message", [
    ("int2", "unknown weight format"), ("int8-g32", "unknown weight format"), ("fp8", "unknown weight format"),
    ("int4-g48", "group size in"), ("int4-g16-asym", "group size in"), ("", "unknown weight format"),
])
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        WeightFormat.parse(text)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=8, group=32), "int8 is per output channel"), (dict(bits=8, symmetric=False), "int8 is per output"),
    (dict(bits=4), "group size"), (dict(bits=3, group=32), "bits must be 8 or 4"),
])
def test_format_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightFormat(**kwargs)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FORMATS)
def test_error_is_at_most_half_a_scale(name, scale_dtype):
    fmt = WeightFormat.parse(name)
    w = weight(3, 40, 256)  # leading dim: stacked experts
    q = quantize(w, fmt, scale_dtype)
    assert q.shape == w.shape and q.scale.dtype == scale_dtype
    error = (dequantize(q) - w).abs()
    assert (error <= per_element_scale(q) * (0.5 + 1e-5)).all()
    assert error.max() > 0  # random weights are not all representable


@pytest.mark.parametrize("name", FORMATS)
def test_codes_shapes_and_ranges(name):
    fmt = WeightFormat.parse(name)
    q = quantize(weight(24, 256), fmt)
    groups = 1 if fmt.group is None else 256 // fmt.group
    assert q.scale.shape == (24, groups)
    if fmt.bits == 8:
        assert q.codes.dtype == torch.int8 and q.codes.shape == (24, 256)
        assert q.codes.abs().max() <= 127
        assert q.zero is None
    else:
        assert q.codes.dtype == torch.uint8 and q.codes.shape == (24, 128)
        nibbles = unpack_int4(q.codes)
        if fmt.symmetric:
            assert q.zero is None and nibbles.min() >= 1  # q + 8 with q in [-7, 7]
        else:
            assert q.zero.shape == (24, groups) and q.zero.dtype == torch.uint8 and q.zero.max() <= 15


def test_grid_weights_round_trip_exactly():
    """Weights on each format's grid (power-of-two scales, every group reaching its extremes) come back bit for bit."""
    g = torch.Generator().manual_seed(1)
    int8 = torch.randint(-127, 128, (8, 64), generator=g).float()
    int8[:, 0] = 127
    int8 *= 2.0 ** -9
    symmetric = torch.randint(-7, 8, (8, 64), generator=g).float()
    symmetric[:, 0::32] = -7
    symmetric *= 2.0 ** -6
    asym = torch.randint(-5, 11, (8, 64), generator=g).float()
    asym[:, 0::32], asym[:, 1::32] = -5, 10  # range [-5, 10]: scale 1, zero point 5 (in units of 2^-6)
    asym *= 2.0 ** -6
    for w, name in ((int8, "int8"), (symmetric, "int4-g32"), (asym, "int4-g32-asym")):
        assert torch.equal(dequantize(quantize(w, WeightFormat.parse(name))), w), name


@pytest.mark.parametrize("name", FORMATS)
def test_zero_groups_get_scale_zero_and_come_back_as_zeros(name):
    fmt = WeightFormat.parse(name)
    w = weight(4, 256)
    w[1] = 0  # a whole channel
    w[2, :128] = 0  # the first groups of a channel (int4)
    q = quantize(w, fmt)
    out = dequantize(q)
    assert torch.isfinite(out).all()
    assert (q.scale[1] == 0).all() and torch.equal(out[1], torch.zeros(256))
    assert torch.equal(out[2, :128], torch.zeros(128))  # zeros are on every grid
    assert (torch.as_tensor(0.0) == dequantize(quantize(torch.zeros(2, 128), fmt))).all()


def test_asymmetric_groups_keep_zero_exact_and_use_the_range():
    """A group of positive weights: the asymmetric scale spans [0, max] / 15, half the symmetric max / 7."""
    w = torch.rand(2, 64, generator=torch.Generator().manual_seed(2)) + 0.5
    asym, sym = quantize(w, WeightFormat.parse("int4-g32-asym")), quantize(w, WeightFormat.parse("int4-g32"))
    assert (asym.scale < sym.scale).all()
    assert (asym.zero == 0).all()
    with_zero = torch.cat((torch.zeros(1, 32), w[:1, :32]), dim=1)
    assert dequantize(quantize(with_zero, WeightFormat.parse("int4-g32-asym")))[0, :32].eq(0).all()


def test_bf16_weights_are_quantized_from_their_values():
    w = weight(8, 128).bfloat16()
    q = quantize(w, WeightFormat.parse("int4-g64"))
    assert (dequantize(q, torch.float32) - w.float()).abs().le(per_element_scale(q) * (0.5 + 1e-5)).all()
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16


def test_input_dim_not_a_multiple_of_the_group_is_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(weight(4, 96), WeightFormat.parse("int4-g64"))
    assert quantize(weight(4, 96), WeightFormat.parse("int8")).shape == (4, 96)  # int8: one group per channel


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[1.0, float("nan")] * 16]), "inf or nan"),
    (torch.ones(32), "float weight"),
    (torch.ones(2, 32, dtype=torch.int32), "float weight"),
    (torch.ones(2, 32, device="meta"), "float weight"),
])
def test_bad_weights_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        quantize(bad, WeightFormat.parse("int4"))


def test_scale_dtype_is_checked():
    with pytest.raises(ValueError, match="scales are stored"):
        quantize(weight(2, 32), WeightFormat.parse("int8"), scale_dtype=torch.float16)


def test_pack_int4_layout_and_round_trip():
    assert pack_int4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    nibbles = torch.randint(0, 16, (3, 5, 64), generator=torch.Generator().manual_seed(3)).to(torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(nibbles)), nibbles)


@pytest.mark.parametrize("bad", [
    torch.zeros(3, dtype=torch.uint8), torch.full((2,), 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.int8),
])
def test_pack_int4_refuses_what_it_cannot_pack(bad):
    with pytest.raises(ValueError, match="pack_int4"):
        pack_int4(bad)


@pytest.mark.parametrize("name", FORMATS)
def test_stack_and_index_match_quantizing_the_stack(name):
    """Quantization is per output channel, so experts quantized one by one equal the stack quantized at once."""
    fmt = WeightFormat.parse(name)
    w = weight(3, 16, 128)
    whole, parts = quantize(w, fmt), stack([quantize(e, fmt) for e in w])
    for a, b in ((whole.codes, parts.codes), (whole.scale, parts.scale), (whole.zero, parts.zero)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(dequantize(whole[1]), dequantize(whole)[1])


@pytest.mark.parametrize("name, expected", [
    ("int8", 16 * 256 + 16 * 4),  # codes, one fp32 scale per channel
    ("int4-g32", 16 * 128 + 16 * 8 * 4),  # two codes a byte, a scale per 32 inputs
    ("int4-g128-asym", 16 * 128 + 16 * 2 * 4 + 16 * 2),  # and a zero point byte per group
])
def test_nbytes(name, expected):
    assert quantize(weight(16, 256), WeightFormat.parse(name)).nbytes == expected
