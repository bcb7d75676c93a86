"""Quantized checkpoints written by us (compressed-tensors layout): their layout as the package itself reads it,
transformers (with compressed-tensors) loading them, our own round trip, quantizing at load, and the refusals.

Tolerances (fp32, relative Frobenius error of the logits):
* our save -> load: bit for bit (the codes and scales are stored as they are);
* transformers' logits against ours (the same dequantized weights, then the float model): <= 1e-5, as the float
  models' parity (tests/parity); measured 3.3e-7 to 3.5e-7 for every recipe below;
* the compressed-tensors package's own decompressor on our tensors: the same float weights, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import llama4
from llama4.checkpoint.io import CheckpointError
from llama4.config import VisionConfig
from llama4.model.moe import Experts
from llama4.presets import text_config
from llama4.quant import QuantizedExperts, QuantizedLinear, quantize_model, quantized_with
from llama4.quant.formats import dequantize

VOCAB = 97
SYMMETRIC = ["int8", "int4", "int4-g128", "experts=int4-g32,attention=int8", "attention=int8,head=int8",
             "experts=int4-g64,shared=int8,scales=bf16"]


def config(multimodal: bool = False) -> llama4.ModelConfig:
    """Layers 0 and 2 dense, 1 and 3 MoE; every input width a multiple of 128 (any int4 group fits)."""
    text = text_config(num_layers=4, moe_step=2, vocab_size=VOCAB, hidden_size=128, num_heads=4, num_kv_heads=2,
                       head_dim=32, intermediate_size=128, intermediate_size_mlp=256, num_experts=4,
                       attention_chunk_size=5, floor_scale=3, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    if not multimodal:
        return llama4.ModelConfig(text=text)
    vision = VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128, image_size=28,
                          patch_size=7, num_channels=3, norm_eps=1e-5, vision_output_dim=48, pixel_shuffle_ratio=0.5,
                          projector_input_dim=48, projector_output_dim=48, multi_modal_projector_bias=False,
                          rope_theta=10000.0)
    return llama4.ModelConfig(text=text, vision=vision, image_token_id=90, boi_token_id=91, eoi_token_id=92)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def prompt(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 89, (batch, length), generator=torch.Generator().manual_seed(seed))


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The float model the quantized one computes: every quantized weight dequantized (float32) into the float
    module it stands in for. The "dequantize, then the float model" oracle."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        parent_name, _, attribute = name.rpartition(".")
        if isinstance(module, QuantizedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight = nn.Parameter(module.dequantized_weight(torch.float32), requires_grad=False)
        elif isinstance(module, QuantizedExperts):
            weights = [module.dequantized_weights(e, torch.float32) for e in range(module.num_experts)]
            linear = Experts(module.num_experts, weights[0][0].shape[1], weights[0][0].shape[0] // 2)
            linear.gate_up = nn.Parameter(torch.stack([g.t() for g, _ in weights]), requires_grad=False)
            linear.down = nn.Parameter(torch.stack([d.t() for _, d in weights]), requires_grad=False)
        else:
            continue
        setattr(model.get_submodule(parent_name), attribute, linear)
    model.quant_recipe = None
    return model


def tensors_of(path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


@pytest.fixture(scope="module")
def plain() -> llama4.Llama4Model:
    return llama4.random_model(config(), seed=3)


def saved(plain, recipe: str, path) -> llama4.Llama4Model:
    model = quantize_model(copy.deepcopy(plain), recipe)
    llama4.save_model(model, path)
    return model


def test_layout_is_the_compressed_tensors_packages(plain, tmp_path):
    """Per-expert linears, int32-packed codes, config groups and ignore list; the package's own decompressor
    turns our tensors back into exactly our dequantized weights (symmetric int4, asymmetric int4, int8)."""
    compressors = pytest.importorskip("compressed_tensors.compressors")
    from compressed_tensors.quantization import QuantizationScheme

    model = saved(plain, "experts=int4-g32-asym,shared=int4-g64,attention=int8", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    qc = raw["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert "re:model\\.layers\\.\\d+\\.feed_forward\\.router$" in qc["ignore"] and "re:lm_head$" in qc["ignore"]
    schemes = {}
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        for target in group["targets"]:
            schemes[target] = scheme
    tensors = tensors_of(tmp_path)
    assert not any("gate_up_proj" in name for name in tensors)
    assert tensors["model.layers.1.feed_forward.experts.3.down_proj.weight_packed"].dtype == torch.int32
    assert tensors["model.layers.1.feed_forward.experts.3.down_proj.weight_zero_point"].shape == (16, 4)

    def scheme_of(module: str) -> QuantizationScheme:
        return next(s for t, s in schemes.items() if re.match(t.removeprefix("re:"), module))

    experts = model.text.layers[1].ffn.experts
    checks = [("model.layers.1.feed_forward.experts.2.up_proj", experts.dequantized_weights(2)[0][128:]),
              ("model.layers.1.feed_forward.experts.0.down_proj", experts.dequantized_weights(0)[1]),
              ("model.layers.0.feed_forward.down_proj", model.text.layers[0].ffn.down.dequantized_weight()),
              ("model.layers.3.self_attn.k_proj", model.text.layers[3].attn.qkv.wk.dequantized_weight())]
    for module, want in checks:
        scheme = scheme_of(module)
        state = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
        compressor = compressors.BaseCompressor.get_value_from_registry(scheme.format)
        assert torch.equal(compressor.decompress(state, scheme)["weight"], want), module


@pytest.mark.parametrize("recipe", SYMMETRIC)
def test_transformers_loads_it_and_computes_our_logits(plain, tmp_path, recipe):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model = saved(plain, recipe, tmp_path)
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    ids = prompt()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        assert rel_err(theirs, ours) <= 1e-5
        assert rel_err(dequantized_copy(model)(ids), ours) <= 1e-6


def test_a_tied_head_is_ignored(tmp_path):
    """With tied embeddings transformers still builds an lm_head linear, which the ``Linear`` target would match."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    tied = config()
    tied = dataclasses.replace(tied, text=dataclasses.replace(tied.text, tie_word_embeddings=True))
    model = quantize_model(llama4.random_model(tied, seed=1), "int4")
    llama4.save_model(model, tmp_path)
    assert "re:lm_head$" in json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_err(hf(prompt()).logits, model(prompt())) <= 1e-5
        assert torch.equal(llama4.load_model(tmp_path, pack=False)(prompt()), model(prompt()))


def test_asymmetric_int4_loads_in_transformers_only_dequantized(plain, tmp_path):
    """transformers 5.23 + compressed-tensors 0.20 build asymmetric modules on the meta device with their zero
    points unpacked ([out, groups]), so the package's own packed zero points ([out / 8, groups], what it writes
    and vLLM reads) are refused as a size mismatch; with dequantize=True the same tensors load."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model = saved(plain, "int4-g32-asym", tmp_path)
    hf = transformers.Llama4ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()
    ids = prompt()
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids)) <= 1e-5
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        transformers.Llama4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("recipe", ["int8", "int4-g32-asym", "experts=int4-g128,head=int8,scales=bf16"])
def test_round_trip_is_bit_for_bit(plain, tmp_path, recipe):
    model = saved(plain, recipe, tmp_path)
    back = llama4.load_model(tmp_path, pack=False)
    assert str(quantized_with(back)) == str(quantized_with(model))
    assert isinstance(back.text.layers[1].ffn.experts, QuantizedExperts)
    assert list(back.parameters()) and not any(p.is_meta or p.requires_grad for p in back.parameters())
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
        packed = llama4.load_model(tmp_path)  # packed for the CPU paths wherever supported
        assert rel_err(packed(ids), model(ids)) <= 1e-5
    llama4.save_model(packed, tmp_path / "again")  # saved from the packed model: the same checkpoint
    again = llama4.load_model(tmp_path / "again", pack=False).state_dict()
    assert again.keys() == want.keys() and all(torch.equal(want[k], again[k]) for k in want)


def test_bf16_model_round_trip_and_sharding(plain, tmp_path):
    llama4.save_model(plain, tmp_path / "float")
    model = llama4.load_model(tmp_path / "float", dtype=torch.bfloat16, pack=False,
                              quant="experts=int4-g32,attention=int8,scales=bf16")
    llama4.save_model(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = llama4.load_model(tmp_path, dtype=torch.bfloat16, pack=False)
    with torch.no_grad():
        assert torch.equal(back(prompt()), model(prompt()))


def test_multimodal_model_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model = quantize_model(llama4.random_model(config(multimodal=True), seed=5), "int4")
    llama4.save_model(model, tmp_path)
    ignore = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    assert "re:vision_model\\.model\\.layers\\.\\d+\\.self_attn\\.q_proj$" in ignore
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32,
                                                                      attn_implementation="eager").eval()
    ids = torch.cat((torch.tensor([[1, 91]]), torch.full((1, 4), 90), torch.tensor([[92, 5, 6, 7]])), dim=1)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    back = llama4.load_model(tmp_path, pack=False)
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels)
        assert rel_err(hf(input_ids=ids, pixel_values=pixels).logits, ours) <= 1e-5
        assert torch.equal(back(ids, pixel_values=pixels), ours)


def test_quantizing_at_load_equals_quantizing_after(plain, tmp_path):
    llama4.save_model(plain, tmp_path)
    loaded = llama4.load_model(tmp_path, pack=False, quant="experts=int4-g32,attention=int8")
    want = quantize_model(copy.deepcopy(plain), "experts=int4-g32,attention=int8")
    assert str(quantized_with(loaded)) == "experts=int4-g32,attention=int8"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), want.state_dict().values()))
    with pytest.raises(ValueError, match="unknown weight format"):
        llama4.load_model(tmp_path, quant="int3")


def test_refusals(plain, tmp_path):
    saved(plain, "int8", tmp_path)
    with pytest.raises(CheckpointError, match="already quantized.*without quant="):
        llama4.load_model(tmp_path, quant="int4")
    config_file = tmp_path / "config.json"
    raw = json.loads(config_file.read_text())

    def load_with(change) -> None:
        edited = copy.deepcopy(raw)
        change(edited["quantization_config"])
        config_file.write_text(json.dumps(edited))
        llama4.load_model(tmp_path, pack=False)

    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not supported; supported"):
        load_with(lambda qc: qc.update(quant_method="gptq"))
    with pytest.raises(CheckpointError, match="int4 strategy=group group_size=16.*supported: int4 in groups"):
        load_with(lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4, strategy="group",
                                                                             group_size=16))
    with pytest.raises(CheckpointError, match="static input activation scales are not supported"):
        load_with(lambda qc: qc["config_groups"]["group_0"].update(
            input_activations={"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False}))
    with pytest.raises(CheckpointError, match="weight_packed .* does not hold a weight"):
        load_with(lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4, strategy="group",
                                                                             group_size=32))
    with pytest.raises(CheckpointError, match="no config group targets it"):
        load_with(lambda qc: qc.update(ignore=qc["ignore"] + ["re:.*self_attn.*"]))


def test_a_missing_quantized_tensor_is_named(plain, tmp_path):
    from safetensors.torch import save_file

    saved(plain, "int4", tmp_path)
    tensors = tensors_of(tmp_path)
    del tensors["model.layers.2.self_attn.o_proj.weight_shape"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*layers\.2\.self_attn\.o_proj\.weight_shape"):
        llama4.load_model(tmp_path, pack=False)


def test_experts_kept_float_are_written_per_expert(plain, tmp_path):
    """transformers expects every expert of a compressed-tensors checkpoint as its own three linears."""
    model = saved(plain, "attention=int4", tmp_path)
    tensors = tensors_of(tmp_path)
    experts = plain.text.layers[3].ffn.experts
    assert torch.equal(tensors["model.layers.3.feed_forward.experts.1.up_proj.weight"], experts.gate_up[1][:, 128:].t())
    assert torch.equal(tensors["model.layers.3.feed_forward.experts.1.down_proj.weight"], experts.down[1].t())
    back = llama4.load_model(tmp_path, pack=False)
    assert isinstance(back.text.layers[3].ffn.experts, Experts)
    assert torch.equal(back.text.layers[3].ffn.experts.gate_up, experts.gate_up)
    with torch.no_grad():
        assert torch.equal(back(prompt()), model(prompt()))


def test_from_tensor_constructors_keep_the_interfaces():
    linear = nn.Linear(64, 32, bias=True)
    built = QuantizedLinear(linear, llama4.quant.WeightFormat.parse("int4-g32"))
    again = QuantizedLinear.from_tensor(built.qweight.tensor, linear.bias.detach(), torch.float32)
    x = torch.randn(3, 64)
    assert torch.equal(again(x), built(x)) and (again.in_features, again.out_features) == (64, 32)
    assert torch.equal(dequantize(again.qweight.tensor), built.dequantized_weight())
    with pytest.raises(ValueError, match="bias"):
        QuantizedLinear.from_tensor(built.qweight.tensor, torch.zeros(31))
    experts = QuantizedExperts(_experts(), llama4.quant.WeightFormat.parse("int8"))
    rebuilt = QuantizedExperts.from_tensors(experts.gate_up.tensor, experts.down.tensor, torch.float32)
    assert torch.equal(rebuilt.expert(1, x), experts.expert(1, x)) and rebuilt.num_experts == 2
    with pytest.raises(ValueError, match="not \\[E, 2I, D\\]"):
        QuantizedExperts.from_tensors(experts.gate_up.tensor, experts.gate_up.tensor)


def _experts() -> Experts:
    experts = Experts(2, 64, 32)
    with torch.no_grad():
        experts.gate_up.normal_(0, 0.05)
        experts.down.normal_(0, 0.05)
    return experts
