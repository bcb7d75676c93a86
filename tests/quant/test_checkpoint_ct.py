"""compressed-tensors checkpoints made by the package itself (as llm-compressor makes RedHatAI's Llama 4 w4a16,
w8a16, w8a8 and FP8-dynamic ones): a transformers Llama 4 with its routed experts unfused into per-expert linears
(transformers' SequentialLlama4TextExperts), the package's scheme applied, min-max scales from its own
calculate_qparams, compressed by its ModelCompressor. We load them into our quantized modules.

Tolerances (fp32, relative Frobenius error of the logits):
* int codes (int4 groups, int8) are ours exactly: against transformers' dequantize-then-float model <= 1e-5
  (measured 2.5e-7);
* FP8 weights become int8 per channel (llama4.quant.fp8): every weight within half an int8 step of its FP8 value;
  our logits equal our dequantized int8 weights' float model to 1e-6, and are within 3x the weights' relative
  error of transformers' exact-FP8 float model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import llama4
from llama4.checkpoint.io import CheckpointError
from llama4.quant import QuantizedExperts, QuantizedLinear, quantized_with
from llama4.quant.checkpoint import sites
from llama4.quant.formats import QuantizedTensor, dequantize
from tests.quant.test_checkpoint import dequantized_copy, prompt, rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers.quantizers.base import SequentialLlama4TextExperts  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HF_CONFIG = dict(vocab_size=97, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                 interleave_moe_layer_step=2, attention_chunk_size=5, floor_scale=3, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)


def int_args(bits: int, group: int | None = None, symmetric: bool = True) -> QuantizationArgs:
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group" if group else "channel",
                            group_size=group)


FP8 = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
DYNAMIC_FP8 = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
DYNAMIC_INT8 = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)


def reference_checkpoint(path, weights: QuantizationArgs, inputs: QuantizationArgs | None = None, seed: int = 0,
                         experts: int = 4):
    """A compressed-tensors checkpoint of a random tiny Llama 4, made by the package (routers and head ignored)."""
    torch.manual_seed(seed)
    cfg = transformers.Llama4TextConfig(**{**HF_CONFIG, "num_local_experts": experts})
    model = transformers.Llama4ForCausalLM(cfg).eval()
    hidden = cfg.intermediate_size
    with torch.no_grad():
        for layer in model.model.layers:
            if not hasattr(layer.feed_forward, "experts"):
                continue
            fused = layer.feed_forward.experts
            fused.gate_up_proj.normal_(0, 0.05)
            fused.down_proj.normal_(0, 0.05)
            experts = SequentialLlama4TextExperts(cfg)
            for e, mlp in enumerate(experts):
                mlp.gate_proj.weight.copy_(fused.gate_up_proj[e, :, :hidden].t())
                mlp.up_proj.weight.copy_(fused.gate_up_proj[e, :, hidden:].t())
                mlp.down_proj.weight.copy_(fused.down_proj[e].t())
            layer.feed_forward.experts = experts
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head", "re:.*router$"]))
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = module.weight.detach()
        w = w.reshape(w.shape[0], -1, args.group_size) if args.strategy == "group" else w.unsqueeze(1)
        scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    compressor.update_config(path)
    return path


def hf_dequantized(path):
    return transformers.Llama4ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()


@pytest.mark.parametrize("weights, inputs, fmt, recipe", [
    (int_args(4, 128), None, "pack-quantized", "experts=int4-g128,shared=int4-g128,attention=int4-g128"),  # w4a16
    (int_args(4, 32, symmetric=False), None, "pack-quantized",
     "experts=int4-g32-asym,shared=int4-g32-asym,attention=int4-g32-asym"),
    (int_args(8), None, "pack-quantized", "experts=int8,shared=int8,attention=int8"),  # w8a16
    (int_args(8), DYNAMIC_INT8, "int-quantized", "experts=int8,shared=int8,attention=int8"),  # w8a8: weights only
])
def test_int_checkpoints_load_as_their_codes(tmp_path, weights, inputs, fmt, recipe):
    path = reference_checkpoint(tmp_path, weights, inputs)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == fmt
    ours = llama4.load_model(path, pack=False)
    assert str(quantized_with(ours)) == recipe
    assert isinstance(ours.text.layers[1].ffn.experts, QuantizedExperts)
    assert type(ours.text.layers[1].ffn.router).__name__ == "Router" and ours.text.output.weight.dtype == torch.float32
    ids = prompt()
    with torch.no_grad():
        assert rel_err(ours(ids), hf_dequantized(path)(ids).logits) <= 1e-5


def test_fp8_dynamic_becomes_int8_per_channel(tmp_path):
    """One routed expert, so that no expert choice flips with the rounding: the logits' error then follows the
    weights' (the 3x bound of tests/quant/test_model.py; measured 1.5-1.6 % of the logits for the int8 codes'
    0.65 % from the FP8 values, over seeds 0-3)."""
    path = reference_checkpoint(tmp_path, FP8, DYNAMIC_FP8, experts=1)
    ours, hf = llama4.load_model(path, pack=False), hf_dequantized(path)
    assert str(quantized_with(ours)) == "experts=int8,shared=int8,attention=int8"
    error = norm = 0.0
    for site in sites(ours):
        module = ours.get_submodule(site.name)
        if isinstance(module, QuantizedLinear):
            pairs = [(module.qweight.tensor, hf.get_submodule(site.hf).weight)]
        elif isinstance(module, QuantizedExperts):
            gate_up, down = module.gate_up.tensor[0], module.down.tensor[0]
            pairs = [(QuantizedTensor(gate_up.format, gate_up.codes[rows], gate_up.scale[rows]),
                      hf.get_submodule(f"{site.hf}.0.{leaf}").weight)
                     for rows, leaf in ((slice(0, 128), site.leaves[0]), (slice(128, None), site.leaves[1]))]
            pairs.append((down, hf.get_submodule(f"{site.hf}.0.{site.leaves[2]}").weight))
        else:
            continue
        for tensor, fp8_values in pairs:
            got = dequantize(tensor)
            assert tensor.scale.dtype == torch.float32
            assert ((got - fp8_values).abs() <= tensor.scale * (0.5 + 1e-5)).all()  # half an int8 step per element
            error += (got.double() - fp8_values.double()).pow(2).sum().item()
            norm += fp8_values.double().pow(2).sum().item()
    weight_error = math.sqrt(error / norm)
    assert weight_error < 0.01
    ids = prompt()
    with torch.no_grad():
        logits = ours(ids)
        assert rel_err(logits, dequantized_copy(ours)(ids)) <= 1e-6
        assert rel_err(logits, hf(ids).logits) <= 3 * weight_error


def test_activation_ordered_groups_are_refused(tmp_path):
    """GPTQ act-order stores weight_g_idx: consecutive groups load, permuted ones are refused by name."""
    from safetensors import safe_open

    path = reference_checkpoint(tmp_path, int_args(4, 32))
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    module = "model.layers.2.self_attn.v_proj"
    tensors[f"{module}.weight_g_idx"] = torch.arange(128, dtype=torch.int32) // 32
    save_file(tensors, path / "model.safetensors")
    want = llama4.load_model(path, pack=False)
    tensors[f"{module}.weight_g_idx"] = torch.arange(128, dtype=torch.int32).flip(0) // 32
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{module}\.weight_g_idx: activation-ordered groups"):
        llama4.load_model(path, pack=False)
    assert isinstance(want.text.layers[2].attn.qkv.wv, QuantizedLinear)
