"""FP8 weights (float8_e4m3fn codes times a float scale per output channel) as this package holds them: converted
at load to our int8 format (one scale per output channel), or dequantized where a module stays float.

Why int8 and not bf16: the same bytes per weight as FP8 (plus a float32 scale per row), where bf16 would double
an FP8 checkpoint's memory (Maverick: ~400 GB -> ~800 GB), and int8 runs on the quantized paths. The price is a
second rounding: on normal(0, 0.02) weights of 1024 x 5120 (tests/quant/test_checkpoint_fp8.py measures it),
FP8 itself is 2.6 % from the original values (relative Frobenius); the int8 codes are 0.9 % from the FP8 values
(at most half an int8 step, max|row| / 254, per element) and 2.8 % from the originals.

Two checkpoint layouts carry FP8 weights:

* Meta's ``fbgemm_fp8`` (Llama 4 Maverick FP8): a converted linear keeps ``X.weight`` fp8 [out, in] with its row
  scales in ``X.weight_scale`` float32 [out, 1]; the fused routed experts keep their [E, in, out] layout with one
  scale per output column: ``gate_up_proj`` [E, D, 2I] with ``gate_up_proj_scale`` [E, 1, 2I], ``down_proj``
  [E, I, D] with ``down_proj_scale`` [E, D, 1] (transformers' FbgemmFp8Llama4TextExperts). The scale of tensor T
  is always T + ``_scale``. Modules in ``modules_to_not_convert`` are plain bf16 tensors; which modules are FP8
  is read from the tensors themselves (an fp8 tensor with its scale).
* compressed-tensors ``float-quantized`` (FP8-dynamic): ``m.weight`` fp8 [out, in] and ``m.weight_scale`` [out, 1]
  (or one value, per tensor), read through compressed_tensors.py.

Activations: both schemes quantize activations to FP8 on GPUs (per token; fbgemm clamps their scale at
``activation_scale_ub``). Here activations stay in the model's float dtype.
"""

from __future__ import annotations

import torch

from llama4.quant.formats import QuantizedTensor, WeightFormat, quantize

FBGEMM_METHOD = "fbgemm_fp8"
SCALE_SUFFIX = "_scale"
FP8_DTYPES = (torch.float8_e4m3fn,)
INT8 = WeightFormat(8)


class FP8Error(ValueError):
    """FP8 weights or scales that cannot be read; the message says which and what is allowed."""


def dequantize_rows(weight: torch.Tensor, scale: torch.Tensor, where: str) -> torch.Tensor:
    """float32 [out, in]: fp8 ``weight`` [out, in] times its scale per output row ([out, 1], [out], or one value)."""
    if weight.dtype not in FP8_DTYPES or weight.dim() != 2:
        raise FP8Error(f"{where}: expected float8_e4m3fn weights [out, in], got {weight.dtype} {tuple(weight.shape)}")
    if not scale.is_floating_point() or scale.dtype in FP8_DTYPES:
        raise FP8Error(f"{where}: expected a float32/bfloat16/float16 scale, got {scale.dtype}")
    out = weight.shape[0]
    if scale.numel() == 1:
        rows = scale.reshape(1, 1)
    elif scale.numel() == out and scale.dim() <= 2 and (scale.dim() < 2 or scale.shape[1] == 1):
        rows = scale.reshape(out, 1)
    else:
        raise FP8Error(f"{where}: scale {tuple(scale.shape)} is neither per output row ([{out}, 1]) nor per tensor")
    return weight.float() * rows.float()


def to_int8(weight: torch.Tensor, scale: torch.Tensor, where: str, row_max: torch.Tensor | None = None
            ) -> QuantizedTensor:
    """Our int8 codes (float32 scales) of the fp8 ``weight`` [out, in] with its row ``scale``; ``row_max`` [out]:
    the whole rows' largest magnitudes, where ``weight`` is some of their columns (formats.quantize's amax)."""
    return quantize(dequantize_rows(weight, scale, where), INT8, torch.float32, row_max)


def _check_fused(weight: torch.Tensor, scale: torch.Tensor, where: str) -> None:
    if weight.dim() != 3 or scale.numel() != weight.shape[0] * weight.shape[2]:
        raise FP8Error(f"{where}: expected fp8 experts [E, in, out] with one scale per expert and output column, "
                       f"got {weight.dtype} {tuple(weight.shape)} and scale {tuple(scale.shape)}")


def fused_row_max(weight: torch.Tensor, scale: torch.Tensor, where: str) -> torch.Tensor:
    """float32 [E, out]: the largest magnitude of each expert's output row of fbgemm's fused experts (as
    :func:`fused_experts_to_int8` takes them), one expert at a time."""
    _check_fused(weight, scale, where)
    experts, _, out = weight.shape
    return torch.stack([dequantize_rows(weight[e].t(), scale[e].reshape(out, 1), where).abs().amax(1)
                        for e in range(experts)])


def fused_experts_to_int8(weight: torch.Tensor, scale: torch.Tensor, where: str,
                          row_max: torch.Tensor | None = None) -> QuantizedTensor:
    """fbgemm's fused experts ``weight`` fp8 [E, in, out] with ``scale`` of E x out elements ([E, 1, out] or
    [E, out, 1]) -> int8 [E, out, in] (our [out, in] per expert), one expert's float32 copy at a time;
    ``row_max`` [E, out] as in :func:`to_int8`."""
    _check_fused(weight, scale, where)
    experts, _, out = weight.shape
    first = to_int8(weight[0].t(), scale[0].reshape(out, 1), f"{where}[0]", None if row_max is None else row_max[0])
    codes = torch.empty((experts, *first.codes.shape), dtype=first.codes.dtype, device=first.codes.device)
    scales = torch.empty((experts, *first.scale.shape), dtype=first.scale.dtype, device=first.scale.device)
    codes[0], scales[0] = first.codes, first.scale
    for e in range(1, experts):
        q = to_int8(weight[e].t(), scale[e].reshape(out, 1), f"{where}[{e}]", None if row_max is None else row_max[e])
        codes[e], scales[e] = q.codes, q.scale
    return QuantizedTensor(INT8, codes, scales)


def check_fbgemm_config(config: dict) -> None:
    """Refuse an ``fbgemm_fp8`` quantization_config we would misread."""
    if config.get("quant_method") != FBGEMM_METHOD:
        raise FP8Error(f"quant_method must be {FBGEMM_METHOD!r}, got {config.get('quant_method')!r}")
    skipped = config.get("modules_to_not_convert")
    if skipped is not None and not (isinstance(skipped, list) and all(isinstance(m, str) for m in skipped)):
        raise FP8Error(f"quantization_config.modules_to_not_convert: expected a list of names, got {skipped!r}")
    bound = config.get("activation_scale_ub", 1200.0)
    if not isinstance(bound, (int, float)) or bound <= 0:
        raise FP8Error(f"quantization_config.activation_scale_ub: expected a positive number, got {bound!r}")
