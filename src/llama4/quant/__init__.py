"""Quantized weights (int8, int4 in groups) for a built model, applied by module swap like the CPU kernels'
packing: :func:`quantize_model` replaces the linears and routed experts a :class:`QuantRecipe` names with
stand-ins that hold integer codes and scales (formats.py) and compute by dequantizing them (modules.py,
the reference path); :func:`gptq_quantize_model` swaps in the same modules with GPTQ-calibrated codes (gptq.py).
Quantized checkpoints (checkpoint.py): saved in the compressed-tensors layout, loaded from it and from FP8
checkpoints (compressed_tensors.py, fp8.py) straight into those modules."""

from llama4.quant.checkpoint import is_quantized, load_quantized, save_quantized
from llama4.quant.formats import QuantizedTensor, WeightFormat, dequantize, quantize
from llama4.quant.gptq import calibration_windows, gptq_quantize, gptq_quantize_model
from llama4.quant.kv_cache import KVFormat, dequantize_kv, kv_storage, quantize_kv
from llama4.quant.modules import QuantizedExperts, QuantizedLinear
from llama4.quant.recipe import (
    QuantizedModule,
    QuantRecipe,
    quantize_model,
    quantized_bytes,
    quantized_with,
    summary,
    summary_text,
)

__all__ = [
    "KVFormat", "dequantize_kv", "kv_storage", "quantize_kv",
    "QuantRecipe", "QuantizedExperts", "QuantizedLinear", "QuantizedModule", "QuantizedTensor", "WeightFormat",
    "calibration_windows", "dequantize", "gptq_quantize", "gptq_quantize_model",
    "is_quantized", "load_quantized", "quantize", "quantize_model", "quantized_bytes", "quantized_with",
    "save_quantized", "summary", "summary_text",
]
