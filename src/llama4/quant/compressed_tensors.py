"""The compressed-tensors checkpoint layout for our weight formats: the ``quantization_config`` and the tensors
of one quantized linear, both ways (tensors and JSON only; files are checkpoint.py's).

This is the layout of the ``compressed-tensors`` package (v0.20), which llm-compressor writes (RedHatAI's
Llama 4 w4a16 / w8a16 / FP8-dynamic checkpoints) and transformers and vLLM read. A quantized linear ``m``
stores, by its config group's ``format``:

* ``pack-quantized`` (int weights, weight-only; the package's own choice for int4 *and* int8 without activation
  quantization): ``m.weight_packed`` int32 [out, ceil(in * bits / 32)], codes q + 2^(bits-1) packed densely,
  element i at bit i * bits (little-endian words, so an int4 word's bytes are exactly our nibble pairs and an
  int8 word's bytes our codes with the sign bit flipped); ``m.weight_scale`` [out, groups] (int8: [out, 1]);
  ``m.weight_shape`` int64 [2] = (out, in); asymmetric: ``m.weight_zero_point`` int32 [ceil(out / 8), groups],
  the zero points z + 8 packed the same way along the *output* dim. The package's codes are signed (int4 in
  [-8, 7]), ours are offset: q_ours = q + 8 and z_ours = z + 8 give the same (q - z) * scale.
* ``naive-quantized`` / ``int-quantized``: ``m.weight`` int8 [out, in] and ``m.weight_scale`` (read only).
* ``float-quantized``: ``m.weight`` float8_e4m3fn and ``m.weight_scale`` (read only, converted by fp8.py).

The config: ``config_groups`` (each a scheme: ``targets``, ``weights`` {num_bits, type, strategy, group_size,
symmetric, ...}, ``input_activations``, ``format``), ``ignore`` (modules kept float), ``format``,
``quant_method: compressed-tensors``, ``quantization_status: compressed``. A target or ignore entry is a
module name, ``re:`` + a regex matched from the name's start, or a class name: ``Linear`` matches every linear
(the router is one too), and that is the only class name resolved here.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llama4.checkpoint.slices import Layout, whole
from llama4.quant.formats import QuantizedTensor, WeightFormat, pack_int4, unpack_int4

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
INT_FORMATS = (PACK_QUANTIZED, "naive-quantized", "int-quantized")
FLOAT_QUANTIZED = "float-quantized"
LINEAR_CLASS = "Linear"
_SUPPORTED = ("int4 in groups of 32, 64 or 128, symmetric or asymmetric (pack-quantized); int8 per channel, "
              "symmetric (pack-, naive- or int-quantized); fp8 per channel or per tensor (float-quantized)")


class CompressedTensorsError(ValueError):
    """A compressed-tensors config or tensor this package cannot read; the message says what and what is allowed."""


@dataclass(frozen=True)
class Scheme:
    """One config group: its targets and how its weights are stored."""

    name: str
    targets: tuple[str, ...]
    format: str
    num_bits: int
    type: str
    strategy: str
    group_size: int | None
    symmetric: bool

    @property
    def fp8(self) -> bool:
        return self.format == FLOAT_QUANTIZED

    def weight_format(self) -> WeightFormat:
        """Our format for these codes (FP8: int8, what fp8.py converts them to)."""
        if self.fp8:
            return WeightFormat(8)
        if self.num_bits == 8:
            return WeightFormat(8)
        return WeightFormat(4, self.group_size, self.symmetric)

    def tensor_names(self) -> tuple[set[str], set[str]]:
        """(required, optional) tensor suffixes of one module of this scheme."""
        if self.format == PACK_QUANTIZED:
            required = {"weight_packed", "weight_scale", "weight_shape"}
            return (required if self.symmetric else required | {"weight_zero_point"}), {"weight_g_idx"}
        return {"weight", "weight_scale"}, set()


def parse_scheme(name: str, group: dict, default_format: str) -> Scheme:
    """A config group, checked against the formats we hold; CompressedTensorsError names what is not supported."""
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise CompressedTensorsError(f"{where}: expected a scheme with 'targets' and 'weights', got {group!r}")
    weights, targets = group["weights"], group.get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CompressedTensorsError(f"{where}.targets: expected a list of names, got {targets!r}")
    fmt = group.get("format") or default_format
    scheme = Scheme(name, tuple(targets), fmt, int(weights.get("num_bits", 0)), str(weights.get("type", "int")),
                    str(weights.get("strategy")), weights.get("group_size"), bool(weights.get("symmetric", True)))
    inputs = group.get("input_activations")
    if isinstance(inputs, dict) and not inputs.get("dynamic", False):
        raise CompressedTensorsError(f"{where}: static input activation scales are not supported (they would be "
                                     "ignored); supported: weight-only schemes or dynamic activation quantization, "
                                     "whose activations this package keeps in float")
    if group.get("output_activations"):
        raise CompressedTensorsError(f"{where}: output activation quantization is not supported")
    ok = ((fmt == PACK_QUANTIZED and scheme.type == "int" and scheme.num_bits == 4 and scheme.strategy == "group"
           and scheme.group_size in (32, 64, 128))
          or (fmt in INT_FORMATS and scheme.type == "int" and scheme.num_bits == 8 and scheme.strategy == "channel"
              and scheme.symmetric)
          or (fmt == FLOAT_QUANTIZED and scheme.type == "float" and scheme.num_bits == 8
              and scheme.strategy in ("channel", "tensor") and scheme.symmetric))
    if not ok:
        raise CompressedTensorsError(
            f"{where}: {fmt} {scheme.type}{scheme.num_bits} strategy={scheme.strategy} group_size={scheme.group_size} "
            f"symmetric={scheme.symmetric} is not supported; supported: {_SUPPORTED}")
    return scheme


@dataclass(frozen=True)
class Config:
    """A parsed ``quantization_config``: the schemes and the ignore list."""

    schemes: tuple[Scheme, ...]
    ignore: tuple[str, ...]

    def scheme_for(self, module: str) -> Scheme | None:
        """The scheme that quantizes linear ``module`` (HF name), or None if it is kept float."""
        if _matches(module, self.ignore):
            return None
        return next((s for s in self.schemes if _matches(module, s.targets)), None)


def parse_config(config: dict) -> Config:
    if config.get("quant_method") != QUANT_METHOD:
        raise CompressedTensorsError(f"quant_method must be {QUANT_METHOD!r}, got {config.get('quant_method')!r}")
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise CompressedTensorsError(f"quantization_status {status!r}: only compressed checkpoints are supported "
                                     "(their weights stored as codes)")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CompressedTensorsError("quantization_config.config_groups: expected at least one group")
    if config.get("kv_cache_scheme"):
        raise CompressedTensorsError("quantization_config.kv_cache_scheme: quantized KV caches are not supported")
    ignore = config.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise CompressedTensorsError(f"quantization_config.ignore: expected a list of names, got {ignore!r}")
    default = config.get("format")
    schemes = tuple(parse_scheme(name, group, default) for name, group in groups.items())
    return Config(schemes, tuple(ignore))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == name or pattern == LINEAR_CLASS:
            return True
    return False


def scheme_config(fmt: WeightFormat, targets: list[str]) -> dict:
    """The config group of weights in our ``fmt`` (weight-only, as the package infers such a scheme)."""
    weights = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "dynamic": False,
               "strategy": "channel" if fmt.group is None else "group", "group_size": fmt.group}
    return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
            "format": PACK_QUANTIZED}


def quantization_config(groups: list[tuple[WeightFormat, list[str]]], ignore: list[str]) -> dict:
    """The ``quantization_config`` of a checkpoint whose quantized linears are in ``groups`` (format, targets)."""
    return {
        "quant_method": QUANT_METHOD, "format": PACK_QUANTIZED, "quantization_status": "compressed",
        "config_groups": {f"group_{i}": scheme_config(fmt, targets) for i, (fmt, targets) in enumerate(groups)},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
        "transform_config": {},
    }


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("the int32 packing of compressed-tensors is read and written as bytes on little-endian "
                           "hosts only")


def compress(tensor: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one weight [out, in], by suffix (``weight_packed``, ...)."""
    _check_little_endian()
    fmt = tensor.format
    out, in_features = tensor.shape
    if fmt.bits == 8:
        codes = tensor.codes.view(torch.uint8) ^ 0x80  # q + 128
        pad = -in_features % 4
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad), value=0x80)
    else:
        codes = tensor.codes.contiguous()
    result = {"weight_packed": _words(codes), "weight_scale": tensor.scale,
              "weight_shape": torch.tensor([out, in_features], dtype=torch.int64)}
    if tensor.zero is not None:
        result["weight_zero_point"] = _pack_columns(tensor.zero)
    return result


def decompress(tensors: dict[str, torch.Tensor], scheme: Scheme, where: str) -> QuantizedTensor:
    """Our QuantizedTensor from one module's int tensors (by suffix) stored under ``scheme``."""
    _check_little_endian()
    fmt = scheme.weight_format()
    scale = _scale(tensors["weight_scale"], where)
    if scheme.format != PACK_QUANTIZED:
        codes = tensors["weight"]
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise CompressedTensorsError(f"{where}.weight: expected int8 [out, in] codes, got {codes.dtype} "
                                         f"{tuple(codes.shape)}")
        return _checked(QuantizedTensor(fmt, codes, scale), where)
    packed, shape = tensors["weight_packed"], tensors["weight_shape"].tolist()
    if packed.dtype != torch.int32 or packed.dim() != 2 or len(shape) != 2:
        raise CompressedTensorsError(f"{where}: expected weight_packed int32 [out, words] and weight_shape (out, in), "
                                     f"got {packed.dtype} {tuple(packed.shape)} and {shape}")
    out, in_features = shape
    per_word = 32 // scheme.num_bits
    if packed.shape != (out, -(-in_features // per_word)):
        raise CompressedTensorsError(f"{where}.weight_packed {tuple(packed.shape)} does not hold a weight {shape}")
    raw = packed.contiguous().view(torch.uint8)
    codes = (raw[:, :in_features] ^ 0x80).view(torch.int8) if fmt.bits == 8 else raw[:, :in_features // 2]
    zero = None
    if not fmt.symmetric:
        zero = _unpack_columns(tensors["weight_zero_point"], out, where)
    if "weight_g_idx" in tensors:
        _check_group_index(tensors["weight_g_idx"], in_features, fmt.group, where)
    return _checked(QuantizedTensor(fmt, codes.contiguous(), scale, zero), where)


def window_layouts(scheme: Scheme, stored: dict[str, tuple[int, ...]], full: tuple[int, int], rows: tuple[int, int],
                   cols: tuple[int, int], where: str) -> dict[str, Layout]:
    """The part of each stored tensor (suffix -> its shape) that holds ``rows`` x ``cols`` of one module's weight
    [out, in] = ``full``, for reading a shard without the rest (:func:`narrowed` then makes them the tensors of
    a [rows, cols] module). Packed codes and group scales are cut on their word and group boundaries: columns
    that do not fall on them raise CompressedTensorsError."""
    (r0, r1), (c0, c1) = rows, cols
    out, in_features = full
    parts: dict[str, Layout] = {}
    if scheme.format == PACK_QUANTIZED:
        per_word, group = 32 // scheme.num_bits, scheme.group_size
        for unit, what, whole_units in ((per_word, f"{per_word} codes per int32 word", "words"),
                                        (group, f"groups of {group} inputs", "groups")):
            if unit and (c0 % unit or (c1 % unit and c1 != in_features)):
                raise CompressedTensorsError(f"{where}: inputs {c0}:{c1} of [{out}, {in_features}] do not fall on the "
                                             f"{what}: a part must hold whole {whole_units} (a plan with fewer ranks "
                                             f"splitting it, or a checkpoint with smaller groups)")
        parts["weight_packed"] = ((rows,), ((c0 // per_word, -(-c1 // per_word)),))
        groups = ((c0 // group, -(-c1 // group)),) if group else ((0, stored["weight_scale"][1]),)
        parts["weight_scale"] = ((rows,), groups)
        if "weight_zero_point" in stored:
            parts["weight_zero_point"] = (((r0 // 8, -(-r1 // 8)),), groups)
        for suffix in ("weight_shape", "weight_g_idx"):
            if suffix in stored:
                parts[suffix] = whole(stored[suffix])
        return parts
    parts["weight"] = ((rows,), (cols,))
    scale = stored["weight_scale"]
    parts["weight_scale"] = whole(scale) if math.prod(scale) == 1 else ((rows,), *whole(scale[1:]))
    return parts


def narrowed(tensors: dict[str, torch.Tensor], scheme: Scheme, full: tuple[int, int], rows: tuple[int, int],
             cols: tuple[int, int], where: str) -> dict[str, torch.Tensor]:
    """The tensors :func:`window_layouts` read, as those of a module whose weight is the [rows, cols] part (for
    :func:`decompress`): its shape, the zero points of its rows alone, the group index checked whole."""
    if scheme.format != PACK_QUANTIZED:
        return tensors
    (r0, r1), (c0, c1) = rows, cols
    out = dict(tensors)
    out["weight_shape"] = torch.tensor([r1 - r0, c1 - c0], dtype=torch.int64)
    if "weight_g_idx" in out:
        _check_group_index(out.pop("weight_g_idx"), full[1], scheme.group_size, where)
    if "weight_zero_point" in out:
        packed = out["weight_zero_point"]
        first = r0 // 8 * 8
        zero = _unpack_columns(packed, 8 * packed.shape[0], f"{where} (rows {first}:{first + 8 * packed.shape[0]})")
        out["weight_zero_point"] = _pack_columns(zero[r0 - first:r1 - first])
    return out


def _scale(scale: torch.Tensor, where: str) -> torch.Tensor:
    """A stored scale as one of our scale dtypes (float16 widened exactly to float32)."""
    if scale.dtype == torch.float16:
        return scale.float()
    if scale.dtype not in (torch.float32, torch.bfloat16):
        raise CompressedTensorsError(f"{where}.weight_scale: {scale.dtype} scales are not supported; supported: "
                                     "float32, bfloat16, float16")
    return scale


def _checked(tensor: QuantizedTensor, where: str) -> QuantizedTensor:
    out, in_features = tensor.shape
    groups = 1 if tensor.format.group is None else in_features // tensor.format.group
    if tuple(tensor.scale.shape) != (out, groups):
        raise CompressedTensorsError(f"{where}.weight_scale {tuple(tensor.scale.shape)} does not fit {tensor.format} "
                                     f"weights [{out}, {in_features}]: expected [{out}, {groups}]")
    return tensor


def _pack_columns(zero: torch.Tensor) -> torch.Tensor:
    """Zero points uint8 [out, groups] (0..15) packed along ``out``: int32 [ceil(out / 8), groups]."""
    out = zero.shape[0]
    rows = torch.nn.functional.pad(zero.t(), (0, -out % 8))  # [groups, out rounded up to 8]
    return _words(pack_int4(rows.contiguous())).t().contiguous()


def _words(rows: torch.Tensor) -> torch.Tensor:
    """Bytes [n, 4k] as little-endian int32 words [n, k]."""
    return rows.contiguous().reshape(-1).view(torch.int32).reshape(rows.shape[0], -1)


def _unpack_columns(packed: torch.Tensor, out: int, where: str) -> torch.Tensor:
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != -(-out // 8):
        raise CompressedTensorsError(f"{where}.weight_zero_point: expected int32 [{-(-out // 8)}, groups] (packed "
                                     f"along the outputs), got {packed.dtype} {tuple(packed.shape)}")
    nibbles = unpack_int4(packed.t().contiguous().view(torch.uint8))  # [groups, 8 * words]
    return nibbles[:, :out].t().contiguous()


def _check_group_index(index: torch.Tensor, in_features: int, group: int | None, where: str) -> None:
    """Activation-ordered groups (GPTQ's act-order) keep non-contiguous groups, which our format cannot hold."""
    expected = torch.arange(in_features) // (group or in_features)
    if tuple(index.shape) != (in_features,) or not torch.equal(index.long().cpu(), expected):
        raise CompressedTensorsError(f"{where}.weight_g_idx: activation-ordered groups are not supported (only "
                                     "consecutive groups of inputs)")
