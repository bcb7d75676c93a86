"""Quantized weights (int8, int4 in groups) for a built model, applied by module swap like the CPU kernels'
packing: :func:`quantize_model` replaces the linears and routed experts a :class:`QuantRecipe` names with
stand-ins that hold integer codes and scales (formats.py) and compute by dequantizing them (modules.py,
the reference path)."""

from llama4.quant.formats import QuantizedTensor, WeightFormat, dequantize, quantize
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
    "QuantRecipe", "QuantizedExperts", "QuantizedLinear", "QuantizedModule", "QuantizedTensor", "WeightFormat",
    "dequantize", "quantize", "quantize_model", "quantized_bytes", "quantized_with", "summary", "summary_text",
]
