"""Quantized KV cache storage for the global (NoPE, full-attention) layers: the part of Llama 4's cache that grows
with the context (chunk-local layers hold one attention chunk and stay in the attention's dtype).

Applied from outside the model, like weight quantization: :func:`kv_storage` gives the caches
(:class:`~llama4.model.cache.KVCache`, the engine's :class:`~llama4.model.paged_cache.PagedKVCache`) one
:class:`KVFormat` per global layer, and they encode keys/values as written and decode what a pass attends over
(``llama4.model.cache.KVStorage``); the model never sees a code.

Blocks. One scale per entry: one token's ``head_dim`` values of one KV head. Measured on the embedded model's
global layer over 4,096 tokens of TinyStories (keys / values / attention output, relative L2 error against
float32): int8 per entry 5.2e-3 / 5.7e-3 / 3.2e-3; int8 keys per channel over groups of 32 tokens (KIVI's
layout) 5.2e-3 / 5.7e-3 / 2.7e-3; fp8 per entry 2.6e-2 / 2.5e-2 / 1.6e-2; for scale, bf16 storage itself
1.7e-3 / 1.7e-3 / 1.3e-3. Per-channel groups win little here - NoPE layers have no RoPE-made outlier channels
(the largest channel range of a head is 1.3-1.5x the median) - and would cost a float staging tail until a group
fills, re-quantization, and block operations that must keep a group whole. Per entry, a write quantizes only
the new tokens, and every cache operation (paged blocks, gathers, prefix copies, zero padding) moves stored
entries as they are, so the hooks stay generic and batch invariance (a token's codes depend on its own
values only) is kept.

Layout. An entry is stored as ``head_dim + 2`` bytes: the codes (int8, or float8_e4m3fn's bits), then the scale
as bfloat16, rounded *up* so that no code clips (as weight scales are, formats.py), in one uint8 row, so that
the caches index, copy and pad one tensor per layer: 0.52x bf16 at head_dim 64, 0.51x at 128 (Scout).

* ``int8``: scale = amax / 127, q = round(x / scale) in [-127, 127]; every value within scale / 2 of its original.
* ``fp8``: scale = amax / 448, q = x / scale rounded to the nearest float8_e4m3fn (relative error <= 2^-4 for
  normal codes, absolute <= scale * 2^-10 below 2^-6); better for heavy tails, coarser than int8 otherwise.

A stored zero row decodes to zeros (codes 0, scale 0), as the caches' zero-filled slots require. Decoding
rounds the exact product q * scale once to the attention's dtype (an int8 or e4m3 code times a bf16 scale is
exact in float32, and bf16's own products round once).

Reads. A pass on the torch layers decodes what it attends over, the layer's whole history: a transient copy of
one layer's keys and values in the attention's dtype, and one more pass over the cache per global layer and step,
about as long as the attention's own (bench/kv_quant.py). The fused C decode layer (llama4.kernels.cpu,
csrc/decode_layer.c) knows these entries by ``KVFormat.name`` and layout: it encodes new entries bit for bit as
:meth:`KVFormat.encode` does and decodes a block of entries at a time inside its attention, as :meth:`KVFormat.decode`
does for bf16 attention, so quantized decode steps stay one C call per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama4.config import TextConfig
from llama4.quant.formats import _nonzero, _stored_scale

KV_CACHE_FORMATS = ("auto", "bf16", "int8", "fp8")
QUANTIZED_KV_FORMATS = ("int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}  # float8_e4m3fn's largest finite value is 448
_SCALE_BYTES = 2  # bfloat16
_EXACT_PRODUCT = (torch.bfloat16, torch.float32)


def check_kv_format(name: str) -> str:
    """``name`` if it is a KV cache format (:data:`KV_CACHE_FORMATS`), else a ValueError naming them."""
    if name not in KV_CACHE_FORMATS:
        raise ValueError(f"unknown KV cache format {name!r}: expected one of {', '.join(KV_CACHE_FORMATS)}")
    return name


def quantize_kv(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of keys or values x [..., d] (any float dtype, computed in float32), one scale per
    [..., :] row: codes [..., d] int8 (``int8``) or float8_e4m3fn (``fp8``), scales [..., 1] bfloat16."""
    if fmt not in QUANTIZED_KV_FORMATS:
        raise ValueError(f"quantize_kv takes {' or '.join(QUANTIZED_KV_FORMATS)}, got {fmt!r}")
    qmax = _QMAX[fmt]
    x = x.float()
    scale = _stored_scale(x.abs().amax(-1, keepdim=True) / qmax, torch.bfloat16)
    y = x / _nonzero(scale)
    if fmt == "int8":
        return torch.round(y).clamp_(-qmax, qmax).to(torch.int8), scale
    return y.clamp_(-qmax, qmax).to(torch.float8_e4m3fn), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., d] (int8 or float8_e4m3fn, any strides) * scale [..., 1] in ``dtype``: the exact product, rounded
    once to ``dtype``."""
    if codes.dtype == torch.float8_e4m3fn:
        codes = _e4m3_as_bf16(codes)
    compute = dtype if dtype in _EXACT_PRODUCT else torch.float32
    return torch.mul(codes, scale.to(compute)).to(dtype)


_E4M3_IN_BF16 = 0x87F0  # bf16's sign bit and the low 7 bits of e4m3 shifted to bits 4-10 (wraps to int16)


def _e4m3_as_bf16(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes as their bfloat16 values, exactly, by moving bits (torch's float8 conversion runs element
    by element on CPU: ~3x slower than these few vectorized passes). e4m3 (s eeee mmm, exponent bias 7) sits in
    bf16 (s eeeeeeee mmmmmmm, bias 127) as s 0000eeee mmm0000, which reads as 2^-120 x its value (e4m3 subnormals
    as bf16 subnormals), so one exact product by 2^120 gives the value. The int8 view sign-extends: the mask keeps
    the sign bit and drops the extension. (Under torch.set_flush_denormal(True) the subnormal codes, |v| < 2^-6,
    read as 0.)"""
    bits = (codes.view(torch.int8).to(torch.int16) << 4) & _E4M3_IN_BF16
    return bits.view(torch.bfloat16) * 2.0 ** 120


@dataclass(frozen=True)
class KVFormat:
    """A :class:`~llama4.model.cache.KVStorage`: entries stored as ``int8`` or ``fp8`` codes with their scale in one
    uint8 row of ``head_dim + 2`` bytes, or cast to ``bf16`` (for caches of models that compute in float32)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in (*QUANTIZED_KV_FORMATS, "bf16"):
            raise ValueError(f"unknown KV storage format {self.name!r}: expected int8, fp8 or bf16")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.uint8

    def width(self, head_dim: int) -> int:
        return head_dim if self.name == "bf16" else head_dim + _SCALE_BYTES

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> stored [..., width(d)]."""
        if self.name == "bf16":
            return x.to(torch.bfloat16)
        codes, scale = quantize_kv(x, self.name)
        return torch.cat((codes.view(torch.uint8), scale.view(torch.uint8)), dim=-1)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """stored [..., width(d)] (any strides) -> [..., d] in ``dtype``."""
        if self.name == "bf16":
            return stored.to(dtype)
        d = stored.shape[-1] - _SCALE_BYTES
        codes = stored[..., :d].view(torch.int8 if self.name == "int8" else torch.float8_e4m3fn)
        scale = stored[..., d:].contiguous().view(torch.bfloat16)
        return dequantize_kv(codes, scale, dtype)

    def entry_bytes(self, head_dim: int) -> int:
        """Bytes of one stored entry (one token, one KV head, keys or values), read off :meth:`encode`."""
        return self.encode(torch.zeros(1, head_dim)).nbytes


def kv_storage(config: TextConfig, kv_cache: str, dtype: torch.dtype) -> list[KVFormat | None] | None:
    """The ``storage`` argument of KVCache / PagedKVCache for a model computing in ``dtype``: ``kv_cache`` (one of
    :data:`KV_CACHE_FORMATS`) for the global layers, None (the attention's dtype) for the chunk-local ones. None
    when nothing is stored otherwise: ``auto``, or ``bf16`` for a bf16 model."""
    check_kv_format(kv_cache)
    if kv_cache == "auto" or (kv_cache == "bf16" and dtype == torch.bfloat16):
        return None
    fmt = KVFormat(kv_cache)
    return [None if spec.chunked else fmt for spec in config.layers]

