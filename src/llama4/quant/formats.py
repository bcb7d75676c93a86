"""Weight formats: round-to-nearest integer codes for a weight matrix, and the float weight back.

A weight is always given as W [..., out, in], nn.Linear's layout (the experts' x @ W matrices are passed
transposed): every OUTPUT channel (a row) is quantized on its own, in groups of consecutive INPUT elements,
so that a row's dequantization needs only its own scales. Leading dims (experts) are kept.

* ``int8``: one symmetric scale per output channel; codes q in [-127, 127] (int8), w ~ q * scale.
* ``int4-gG``: one scale per G inputs of a channel. Symmetric: q in [-7, 7] stored as q + 8, w ~ (q - 8) * scale.
  Asymmetric (``-asym``): q in [0, 15] and a zero point z per group, w ~ (q - z) * scale, the group's range
  widened to include 0 so that zero stays exact. Two codes per byte, the even input in the low nibble.

* ``nf4-gG`` (``nf4`` = nf4-g64): QLoRA's 4-bit NormalFloat. One absmax scale per G inputs of a channel
  (G in 32, 64, 128, 256); each element is the nearest of the 16 levels :data:`NF4_LEVELS` (in [-1, 1]) times
  its group's absmax, the level's index stored as a nibble (two per byte, the even input in the low nibble, as
  int4). No double quantization of the scales: they are float32 or bfloat16 as for int4, so nf4-g64 costs
  4.5 bits a weight with float32 scales and 4.25 with bfloat16 (QLoRA's 8-bit second-level scales: 4.127).
  Neither the CPU kernels nor the compressed-tensors layout read it: it computes on the reference path.

Every int element dequantizes to within scale / 2 of its original, every nf4 element to within absmax times half
the gap between the two levels around it: the scale is rounded *up* to its storage dtype (float32 or
bfloat16), so that no code is clipped. A group of zeros gets scale 0 and comes back as
exact zeros. The input dimension must be a multiple of the group, or the weight is refused: Llama 4's widths
(5120, 8192, 16384, ...) all are multiples of 128, and padding would make the codes' shape differ from the
weight's for the fast kernels to come.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

INT4_GROUPS = (32, 64, 128)
NF4_GROUPS = (32, 64, 128, 256)
SCALE_DTYPES = (torch.float32, torch.bfloat16)
_INT4 = re.compile(r"int4(?:-g(?P<group>\d+))?(?P<asym>-asym)?")
_NF4 = re.compile(r"nf4(?:-g(?P<group>\d+))?")
_FORMAT_HELP = ("int8, int4 (= int4-g32), int4-g32, int4-g64 or int4-g128, the int4 ones with an optional -asym, "
                "or nf4 (= nf4-g64), nf4-g32, nf4-g64, nf4-g128 or nf4-g256")

# QLoRA's NF4 (Dettmers et al. 2023, appendix E; the table bitsandbytes uses). With delta = 0.9677083 and Phi^-1
# the standard normal quantile: the 8 positive levels Phi^-1(p) for p in linspace(delta, 0.5, 9) without its last
# point (0.5), the 7 negative levels -Phi^-1(p) for p in linspace(delta, 0.5, 8) without 0.5, and an exact 0, all
# divided by Phi^-1(delta) (so -1 and 1 are levels). Asymmetric on purpose: 0 exact and 8 levels above it. As
# float32 constants; tests/quant/test_nf4.py re-derives them in float64.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524242401123, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# A normalised value goes to the level whose midpoint interval holds it (a value on a midpoint: the lower level).
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
# byte -> its two levels (low nibble first): dequantizing is one gather per byte, no unpacking.
_NF4_PAIRS = torch.stack((NF4_LEVELS[torch.arange(256) & 15], NF4_LEVELS[torch.arange(256) >> 4]), dim=-1)


@dataclass(frozen=True)
class WeightFormat:
    """How a weight is stored: ``bits`` per code (8 or 4), the input group that shares a scale (int4: 32,
    64 or 128; nf4: 32 to 256; int8: None, one scale per output channel), whether codes are ``symmetric``
    around zero (int4 may instead carry a zero point per group), and the ``family`` of the codes: ``int``
    (a code is an integer times the scale) or ``nf`` (a code indexes NF4_LEVELS, times the group's absmax)."""

    bits: int
    group: int | None = None
    symmetric: bool = True
    family: str = "int"

    def __post_init__(self) -> None:
        if self.family == "nf":
            if self.bits != 4 or self.group not in NF4_GROUPS or not self.symmetric:
                raise ValueError(f"nf4 is 4 bits, symmetric, in groups of {NF4_GROUPS}, got bits={self.bits!r}, "
                                 f"group={self.group!r}, symmetric={self.symmetric!r}")
        elif self.family != "int":
            raise ValueError(f"family must be 'int' or 'nf', got {self.family!r}")
        elif self.bits == 8:
            if self.group is not None or not self.symmetric:
                raise ValueError(f"int8 is per output channel and symmetric (group=None, symmetric=True), "
                                 f"got group={self.group!r}, symmetric={self.symmetric!r}")
        elif self.bits == 4:
            if self.group not in INT4_GROUPS:
                raise ValueError(f"int4 needs a group size in {INT4_GROUPS}, got {self.group!r}")
        else:
            raise ValueError(f"bits must be 8 or 4, got {self.bits!r}")

    @classmethod
    def parse(cls, text: str) -> WeightFormat:
        """``int8``, ``int4`` (int4-g32), ``int4-g64``, ``int4-g128-asym``, ``nf4`` (nf4-g64), ``nf4-g128``, ..."""
        name = text.strip().lower()
        if name == "int8":
            return cls(8)
        nf4 = _NF4.fullmatch(name)
        if nf4 is not None:
            group = int(nf4["group"] or 64)
            if group not in NF4_GROUPS:
                raise ValueError(f"unknown weight format {text!r}: nf4 groups are {NF4_GROUPS}")
            return cls(4, group, family="nf")
        match = _INT4.fullmatch(name)
        if match is None:
            raise ValueError(f"unknown weight format {text!r}: expected {_FORMAT_HELP}")
        return cls(4, int(match["group"] or 32), symmetric=match["asym"] is None)

    @property
    def is_integer(self) -> bool:
        """Integer codes (int8, int4): what the CPU kernels and the compressed-tensors layout take."""
        return self.family == "int"

    @property
    def name(self) -> str:
        if self.family == "nf":
            return f"nf4-g{self.group}"
        if self.bits == 8:
            return "int8"
        return f"int4-g{self.group}" + ("" if self.symmetric else "-asym")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight [..., out, in] in ``format``: ``codes`` int8 [..., out, in] (int8) or uint8 [..., out, in / 2]
    (int4, two per byte); ``scale`` [..., out, groups] float32 or bfloat16 (int8: one group); ``zero`` uint8
    [..., out, groups] (asymmetric int4 only, else None)."""

    format: WeightFormat
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        per_byte = 2 if self.format.bits == 4 else 1
        return torch.Size((*self.codes.shape[:-1], self.codes.shape[-1] * per_byte))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def __getitem__(self, index: int) -> QuantizedTensor:
        """The weight at ``index`` of the leading dim (one expert of stacked experts)."""
        return QuantizedTensor(self.format, self.codes[index], self.scale[index],
                               None if self.zero is None else self.zero[index])


def quantize(weight: torch.Tensor, fmt: WeightFormat, scale_dtype: torch.dtype = torch.float32,
             amax: torch.Tensor | None = None) -> QuantizedTensor:
    """Round-to-nearest codes of ``weight`` [..., out, in] (any float dtype; computed in float32).

    ``amax`` (symmetric int8 per channel only: [..., out]): the largest magnitude of each row to scale by instead
    of the weight's own, where ``weight`` holds some columns of rows whose other columns are elsewhere (a rank's
    part), so that the part gets the codes and scales the whole rows would.
    """
    if weight.dim() < 2 or not weight.is_floating_point() or weight.is_meta:
        raise ValueError(f"quantize takes a float weight [..., out, in] with values, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scales are stored in one of {SCALE_DTYPES}, got {scale_dtype}")
    in_features = weight.shape[-1]
    group = fmt.group or in_features
    if in_features % group:
        raise ValueError(f"{fmt} needs the input dimension to be a multiple of {group}, got a weight "
                         f"{tuple(weight.shape)} (out, in); use a smaller group or int8")
    w = weight.detach().float().reshape(*weight.shape[:-1], in_features // group, group)
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a weight with inf or nan values")
    if fmt.family == "nf":
        return _quantize_nf4(weight.shape, w, fmt, scale_dtype)
    if amax is not None and (fmt.family != "int" or fmt.bits != 8 or fmt.group is not None):
        raise ValueError(f"a given amax scales int8 per channel only, not {fmt}")
    if amax is not None and tuple(amax.shape) != tuple(weight.shape[:-1]):
        raise ValueError(f"amax {tuple(amax.shape)} must have one value per row of the weight {tuple(weight.shape)}")
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        largest = w.abs().amax(-1) if amax is None else amax.float().reshape(*weight.shape[:-1], 1)
        scale = _stored_scale(largest / qmax, scale_dtype)
        codes = _round(w, scale).clamp(-qmax, qmax)
        zero = None
    else:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = _stored_scale((high - low) / 15, scale_dtype)
        zero = torch.round(-low / _nonzero(scale)).clamp(0, 15)
        codes = (_round(w, scale) + zero[..., None]).clamp(0, 15)
        zero = zero.to(torch.uint8)
    codes = codes.reshape(weight.shape)
    if fmt.bits == 8:
        codes = codes.to(torch.int8)
    else:
        codes = pack_int4((codes + 8 if fmt.symmetric else codes).to(torch.uint8))
    return QuantizedTensor(fmt, codes, scale, zero)


def dequantize(tensor: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [..., out, in] the codes stand for (computed in float32, returned in ``dtype``)."""
    fmt = tensor.format
    if fmt.family == "nf":
        codes = tensor.codes
        # index_select, not advanced indexing: 3x faster on the CPU
        levels = _NF4_PAIRS.to(codes.device).index_select(0, codes.reshape(-1).int())
        levels = levels.reshape(*codes.shape[:-1], tensor.scale.shape[-1], -1)  # [..., out, groups, group]
        return (levels * tensor.scale.float()[..., None]).reshape(tensor.shape).to(dtype)
    codes = tensor.codes.float() if fmt.bits == 8 else unpack_int4(tensor.codes).float()
    groups = tensor.scale.shape[-1]
    codes = codes.reshape(*codes.shape[:-1], groups, codes.shape[-1] // groups)
    if fmt.bits == 4:
        codes = codes - (8 if fmt.symmetric else tensor.zero[..., None].float())
    return (codes * tensor.scale.float()[..., None]).reshape(tensor.shape).to(dtype)


def _quantize_nf4(shape: torch.Size, w: torch.Tensor, fmt: WeightFormat, scale_dtype: torch.dtype) -> QuantizedTensor:
    """NF4 codes of ``w`` [..., groups, group] (float32), ``shape`` the weight's: each element the nearest level
    of its normalised value w / absmax (a group of zeros: scale 0, every code the level 0)."""
    scale = _stored_scale(w.abs().amax(-1), scale_dtype)
    normalised = (w / _nonzero(scale)[..., None]).contiguous()
    codes = torch.bucketize(normalised, _NF4_MIDPOINTS.to(w.device)).to(torch.uint8)
    return QuantizedTensor(fmt, pack_int4(codes.reshape(shape)), scale)


def stack(tensors: list[QuantizedTensor]) -> QuantizedTensor:
    """Weights of one format and shape stacked along a new leading dim (experts quantized one by one)."""
    fmt = tensors[0].format
    if any(t.format != fmt for t in tensors):
        raise ValueError("stack takes weights of one format")
    zero = None if tensors[0].zero is None else torch.stack([t.zero for t in tensors])
    return QuantizedTensor(fmt, torch.stack([t.codes for t in tensors]), torch.stack([t.scale for t in tensors]), zero)


def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15] [..., n] (n even) -> bytes [..., n / 2], element 2j in the low nibble of byte j."""
    if nibbles.dtype != torch.uint8 or nibbles.shape[-1] % 2 or (nibbles.numel() and int(nibbles.max()) > 15):
        raise ValueError(f"pack_int4 takes uint8 values in [0, 15] over an even last dim, got {nibbles.dtype} "
                         f"{tuple(nibbles.shape)}")
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: bytes [..., m] -> uint8 values in [0, 15] [..., 2m]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in ``dtype``, rounded up where the cast rounded down (a smaller scale would clip codes)."""
    stored = scale.to(dtype)
    return torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """The scale as the divisor of float32 weights: 1 for groups of zeros (their codes are 0 whatever it is)."""
    scale = scale.float()
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(w / _nonzero(scale)[..., None])
