"""Meta's fbgemm_fp8 checkpoints (Llama 4 Maverick FP8), made by transformers' own FP8 quantizer op
(FbgemmFp8Quantize, with transformers' pure-PyTorch row quantizer standing in for fbgemm's CUDA one), laid out
as transformers' FbgemmFp8Linear / FbgemmFp8Llama4TextExperts hold them; and the FP8 -> int8 conversion.

Tolerances (fp32, relative Frobenius error of the logits), with one routed expert so that no expert choice flips
with the rounding:
* our logits equal the float model of our own dequantized int8 weights to 1e-6 (the load is exact);
* against the float model of the exact FP8 values: <= 3x the int8 codes' relative error from those values
  (the bound of tests/quant/test_model.py);
* every int8 weight within half an int8 step of its FP8 value.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import llama4
from llama4.checkpoint.io import CheckpointError
from llama4.model.moe import Router
from llama4.quant import QuantizedExperts, QuantizedLinear, quantized_with
from llama4.quant.formats import WeightFormat, dequantize, quantize
from llama4.quant.fp8 import dequantize_rows, to_int8
from tests.quant.test_checkpoint import dequantized_copy, prompt, rel_err

transformers = pytest.importorskip("transformers")
from transformers.integrations import fbgemm_fp8  # noqa: E402
from transformers.integrations.compressed_tensors import quantize_fp8_per_row  # noqa: E402

HF_CONFIG = dict(vocab_size=97, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=1,
                 interleave_moe_layer_step=2, attention_chunk_size=5, floor_scale=3, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)
NOT_CONVERTED = {  # modules_to_not_convert, as transformers matches them (prefix at a module boundary or suffix)
    "mlp_only": ["lm_head", "model.layers.*.feed_forward.router", "model.layers.*.self_attn"],  # FP8 MLPs only
    "all_but_head": ["lm_head"],  # also attention and the routers (which we dequantize: they stay float here)
}


def fbgemm_checkpoint(path, not_converted: list[str], seed: int = 0):
    """An fbgemm_fp8 checkpoint of a random tiny Llama 4, and the float checkpoint of its exact FP8 values."""
    torch.manual_seed(seed)
    cfg = transformers.Llama4TextConfig(**HF_CONFIG)
    hf = transformers.Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.feed_forward, "experts"):
                layer.feed_forward.experts.gate_up_proj.normal_(0, 0.05)
                layer.feed_forward.experts.down_proj.normal_(0, 0.05)
    layout = copy.deepcopy(hf)  # the modules transformers loads an fbgemm_fp8 checkpoint into
    for name, module in list(layout.named_modules()):
        if not fbgemm_fp8.should_convert_module(name, not_converted):
            continue
        parent, _, attribute = name.rpartition(".")
        if isinstance(module, transformers.models.llama4.modeling_llama4.Llama4TextExperts):
            setattr(layout.get_submodule(parent), attribute, fbgemm_fp8.FbgemmFp8Llama4TextExperts(cfg))
        elif isinstance(module, torch.nn.Linear):
            setattr(layout.get_submodule(parent), attribute,
                    fbgemm_fp8.FbgemmFp8Linear(module.in_features, module.out_features, module.bias is not None))
    fp8_tensors, exact = {}, {}
    op = fbgemm_fp8.FbgemmFp8Quantize(None)
    for name, value in hf.state_dict().items():
        owner = layout.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, (fbgemm_fp8.FbgemmFp8Linear, fbgemm_fp8.FbgemmFp8Llama4TextExperts)):
            converted = op.convert({name: [value]}, model=layout)
            fp8_tensors.update({k: v.detach() for k, v in converted.items()})
            codes, scale = converted[name].detach(), converted[f"{name}_scale"].detach()
            exact[name] = codes.float() * scale  # row scales broadcast over [out, 1] / [E, 1, out] / [E, out, 1]
            if name.endswith("down_proj") and codes.dim() == 3:
                exact[name] = codes.float() * scale.transpose(1, 2)
        else:
            fp8_tensors[name] = exact[name] = value
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in layout.state_dict().items()}
    assert {k: (v.dtype, tuple(v.shape)) for k, v in fp8_tensors.items()} == expected  # exactly fbgemm's layout
    for directory, tensors in ((path / "fp8", fp8_tensors), (path / "exact", exact)):
        hf.config.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    raw = json.loads((path / "fp8" / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                  "modules_to_not_convert": not_converted}
    (path / "fp8" / "config.json").write_text(json.dumps(raw))
    return path / "fp8", path / "exact"


@pytest.fixture(autouse=True)
def _pure_torch_row_quantizer(monkeypatch):
    monkeypatch.setattr(fbgemm_fp8, "quantize_fp8_per_row", quantize_fp8_per_row, raising=False)


@pytest.mark.parametrize("variant", sorted(NOT_CONVERTED))
def test_fbgemm_fp8_loads_as_int8(tmp_path, variant):
    fp8_path, exact_path = fbgemm_checkpoint(tmp_path, NOT_CONVERTED[variant])
    ours, exact = llama4.load_model(fp8_path, pack=False), llama4.load_model(exact_path, pack=False)
    attention = "int8" if variant == "all_but_head" else None
    assert str(quantized_with(ours)) == ",".join(
        f"{kind}=int8" for kind in ("experts", "shared", "attention") if kind != "attention" or attention)
    assert isinstance(ours.text.layers[1].ffn.experts, QuantizedExperts)
    assert type(ours.text.layers[1].ffn.router) is Router  # an FP8 router is dequantized: it stays float
    assert torch.equal(ours.text.layers[1].ffn.router.weight, exact.text.layers[1].ffn.router.weight)
    error = norm = 0.0
    for name, module in ours.named_modules():
        if isinstance(module, QuantizedLinear):
            pairs = [(module.qweight.tensor, exact.get_submodule(name).weight)]
        elif isinstance(module, QuantizedExperts):
            reference = exact.get_submodule(name)
            pairs = [(module.gate_up.tensor[0], reference.gate_up[0].t()),
                     (module.down.tensor[0], reference.down[0].t())]
        else:
            continue
        for tensor, values in pairs:
            got = dequantize(tensor)
            assert ((got - values).abs() <= tensor.scale * (0.5 + 1e-5)).all()
            error += (got.double() - values.double()).pow(2).sum().item()
            norm += values.double().pow(2).sum().item()
    weight_error = math.sqrt(error / norm)
    ids = prompt()
    with torch.no_grad():
        logits = ours(ids)
        assert rel_err(logits, dequantized_copy(ours)(ids)) <= 1e-6
        assert rel_err(logits, exact(ids)) <= 3 * weight_error


def test_an_fp8_tensor_without_its_scale_is_refused(tmp_path):
    from safetensors import safe_open

    fp8_path, _ = fbgemm_checkpoint(tmp_path, NOT_CONVERTED["mlp_only"])
    with safe_open(fp8_path / "model.safetensors", framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"].to(
        torch.float8_e4m3fn)
    save_file(tensors, fp8_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"float8 tensor\(s\) without a scale.*self_attn\.o_proj\.weight"):
        llama4.load_model(fp8_path, pack=False)


def test_fp8_to_int8_error_as_the_docstring_states():
    """llama4.quant.fp8's figures: normal(0, 0.02) weights 1024 x 5120, FP8 per row as fbgemm does it."""
    w = torch.randn(1024, 5120, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, scale = quantize_fp8_per_row(w)
    values = dequantize_rows(codes, scale, "w")
    int8 = dequantize(to_int8(codes, scale.reshape(-1, 1), "w"))
    assert 0.025 < rel_err(values, w) < 0.028  # FP8 itself: 2.6 %
    assert 0.008 < rel_err(int8, values) < 0.0095  # the int8 codes from the FP8 values: 0.9 %
    assert 0.027 < rel_err(int8, w) < 0.029  # and from the originals: 2.8 %
    assert rel_err(dequantize(quantize(w, WeightFormat(8))), w) < 0.0095  # int8 of the originals, for scale


@pytest.mark.parametrize("scale, message", [
    (torch.ones(3, 2), "neither per output row"), (torch.ones(4, 1, dtype=torch.int32), "float32/bfloat16"),
])
def test_bad_fp8_scales_are_refused(scale, message):
    with pytest.raises(ValueError, match=message):
        dequantize_rows(torch.zeros(4, 8, dtype=torch.float8_e4m3fn), scale, "w")
