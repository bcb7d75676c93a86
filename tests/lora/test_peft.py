"""PEFT both ways against transformers' Llama4ForCausalLM + peft (test extra): our adapters loaded by peft, and
peft's (attention, shared expert, dense MLP, fused experts) loaded by us, with the same fp32 logits (1e-5)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama4
from llama4.lora import LoraConfig, apply_lora, load_adapter, lora_modules, merge_and_unload, save_adapter
from tests.lora.helpers import ids, lora_config_model, randomize_adapters, rel_err

transformers = pytest.importorskip("transformers", reason="transformers (the test extra) is the oracle")
peft = pytest.importorskip("peft", reason="peft (the test extra) is the oracle")


def _hf(path):
    return transformers.Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("top_k,config", [
    (1, LoraConfig(rank=4, alpha=8, targets=("attention", "shared", "mlp", "experts"))),
    (2, LoraConfig(rank=2, alpha=3, rslora=True, dropout=0.1, targets=("wq", "wo", "*.ffn.shared.up", "experts.down"))),
    (1, LoraConfig(rank=3, alpha=6, dropout=0.05, targets=("wk", "text.layers.0.ffn.*"))),
], ids=["all-linears-and-experts", "rslora-top2-down-only", "no-experts-dropout"])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, top_k, config):
    model = lora_config_model(top_k=top_k)
    llama4.save_model(model, tmp_path / "base")
    apply_lora(model, config)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    experts = any("experts" in t for t in config.targets)
    assert written["lora_dropout"] == (0.0 if experts else config.dropout)  # peft refuses dropout on parameters
    hf = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), tmp_path / "adapter").eval()
    tokens = ids()
    with torch.no_grad():
        ours, theirs, base = model(tokens), hf(tokens).logits, _hf(tmp_path / "base")(tokens).logits
    assert rel_err(ours, theirs) <= 1e-5
    assert rel_err(base, theirs) > 1e-2  # the adapter changed the logits


def test_peft_adapter_loads_into_ours_with_the_same_logits(tmp_path):
    llama4.save_model(lora_config_model(top_k=2), tmp_path / "base")
    torch.manual_seed(0)
    hf = peft.get_peft_model(_hf(tmp_path / "base"), peft.LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False,  # random A and B
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"])).eval()
    hf.save_pretrained(tmp_path / "adapter")
    model = load_adapter(llama4.load_model(tmp_path / "base", pack=False), tmp_path / "adapter")
    assert len(lora_modules(model)) == 4 * 2 + 3 + 3 + 1
    assert model.lora_config.scaling == 8.0
    tokens = ids()
    with torch.no_grad():
        assert rel_err(model(tokens), hf(tokens).logits) <= 1e-5
    save_adapter(model, tmp_path / "again")  # and back: the very tensors peft wrote, under the same names
    theirs, ours = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(
        tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_merged_checkpoint_with_router_and_expert_adapters_loads_in_transformers(tmp_path):
    model = apply_lora(lora_config_model(top_k=2), LoraConfig(rank=4, alpha=8, targets=("router", "experts", "wv")))
    randomize_adapters(model)
    with pytest.raises(ValueError, match="peft cannot express a router adapter"):
        save_adapter(model, tmp_path / "adapter")
    tokens = ids()
    with torch.no_grad():
        adapted = model(tokens)
        llama4.save_model(merge_and_unload(model), tmp_path / "merged")
        assert rel_err(_hf(tmp_path / "merged")(tokens).logits, adapted) <= 1e-5


def test_load_adapter_refuses_what_it_does_not_implement(tmp_path):
    model = lora_config_model()
    llama4.save_model(model, tmp_path / "base")
    hf = peft.get_peft_model(_hf(tmp_path / "base"), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    hf.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_adapter(model, tmp_path / "dora")
    hf = peft.get_peft_model(_hf(tmp_path / "base"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    hf.save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="base_model.model.lm_head"):
        load_adapter(model, tmp_path / "head")
    with pytest.raises(FileNotFoundError, match="adapter_config.json and adapter_model.safetensors"):
        load_adapter(model, tmp_path)
    assert not lora_modules(model)
    save_adapter(apply_lora(lora_config_model(), LoraConfig(targets=("attention", "experts"))), tmp_path / "ours")
    weights = tmp_path / "ours" / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.model.layers.1.feed_forward.experts.lora_B.weight"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="experts.lora_B.weight is missing"):
        load_adapter(model, tmp_path / "ours")
    assert not lora_modules(model) and not hasattr(model, "lora_config")  # left as it was
