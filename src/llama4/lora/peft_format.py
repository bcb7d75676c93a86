"""Adapters in PEFT's file format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors`` as the
``peft`` library writes them for transformers' Llama 4 (no import of peft: the format is plain JSON and
safetensors).

Tensor names are ``base_model.model.<transformers module path>.lora_A.weight`` / ``.lora_B.weight``; the module
paths come from checkpoint/mapping.py (a module's path is its weight's checkpoint name without ``.weight``).

Linears (attention, shared expert, dense MLP, projector) are PEFT ``target_modules``: lora_A.weight [r, in],
lora_B.weight [out, r], ours as they are. The routed experts are PEFT ``target_parameters`` on transformers'
fused ``Llama4TextExperts.gate_up_proj`` [E, D, 2I] / ``down_proj`` [E, I, D] (peft's ParamWrapper): for a
3-D [E, in, out] parameter peft keeps lora_A.weight [E*r, out] (expert-major rows) and lora_B.weight
[in, r*E] (column j*E + e is expert e's j-th), and the delta of expert e is lora_B_e @ lora_A_e [in, out] --
our A_e @ B_e. peft nests one wrapper per targeted parameter of a module, in the module's registration
order (gate_up_proj, then down_proj): with both targeted, gate_up's tensors sit under ``experts.base_layer.``
and down's under ``experts.``. peft refuses dropout on such parameters, so an adapter with expert targets is
written with lora_dropout 0 (dropout only acts in training). The router (a linear whose transformers forward
returns a tuple) has no PEFT form: save_adapter refuses it; lora_state_dict keeps it in this project.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from llama4.checkpoint.mapping import from_hf_name, to_hf_name
from llama4.lora.modules import EXPERT_TENSORS, LoraExperts, LoraLinear
from llama4.lora.transform import LoraConfig, apply_lora, load_lora_state_dict, lora_modules
from llama4.model.transformer import Llama4Model

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_HF_EXPERT_PARAMS = {"gate_up": "gate_up_proj", "down": "down_proj"}
# PEFT settings this project does not implement: a config that sets any of them is refused, naming it
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "bias": "none", "modules_to_save": None,
                "layer_replication": None, "trainable_token_indices": None, "use_qalora": False,
                "alora_invocation_tokens": None, "use_bdlora": None, "rank_pattern": {}, "alpha_pattern": {}}


def _multimodal(model: nn.Module) -> bool:
    if not isinstance(model, Llama4Model):
        raise TypeError(f"PEFT adapters are for a whole Llama4Model (its config names the checkpoint layout), got "
                        f"{type(model).__name__}")
    return model.config.multimodal


def _hf_tensor_names(name: str, module: LoraLinear | LoraExperts, multimodal: bool) -> dict[str, str]:
    """Our adapter tensor name (local to the module) -> PEFT's full name (an expert's A, on the input side, is what
    peft calls lora_B there, see the module docstring)."""
    if isinstance(module, LoraLinear):
        path = to_hf_name(f"{name}.weight", multimodal).removesuffix(".weight")
        return {f"lora_{side}.weight": f"{PREFIX}{path}.lora_{side}.weight" for side in "AB"}
    path = to_hf_name(f"{name}.{EXPERT_TENSORS[0]}", multimodal).rpartition(".")[0]
    tensors = module.tensors
    names = {}
    for i, tensor in enumerate(tensors):
        nested = ".base_layer" * (len(tensors) - 1 - i)
        names |= {f"{tensor}_{ours}": f"{PREFIX}{path}{nested}.lora_{peft}.weight" for ours, peft in ("AB", "BA")}
    return names


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's adapters as PEFT does (``adapter_config.json`` + ``adapter_model.safetensors``): peft's
    PeftModel.from_pretrained loads them onto transformers' Llama4ForCausalLM / Llama4ForConditionalGeneration
    of the same checkpoint. Merged adapters are refused (the file would hold an update already in the base)."""
    multimodal = _multimodal(model)
    wrappers = lora_modules(model)
    config: LoraConfig | None = getattr(model, "lora_config", None)
    if not wrappers or config is None:
        raise ValueError("the model has no LoRA adapters to save (apply_lora or load_adapter first)")
    if any(m.merged for m in wrappers.values()):
        raise ValueError("the adapters are merged: unmerge_lora(model) before saving them")
    routers = [name for name in wrappers if name.endswith(".ffn.router")]
    if routers:
        raise ValueError(f"{routers[0]}: peft cannot express a router adapter on transformers' Llama 4 (its router's "
                         "forward returns a tuple); keep it with lora_state_dict, or merge_and_unload and save the "
                         "model")
    tensors, modules, parameters = {}, [], []
    for name, module in wrappers.items():
        hf_names = _hf_tensor_names(name, module, multimodal)
        for local, p in module.adapter_parameters().items():
            tensors[hf_names[local]] = _to_peft(local, p.detach())
        if isinstance(module, LoraLinear):
            modules.append(hf_names["lora_A.weight"].removeprefix(PREFIX).removesuffix(".lora_A.weight"))
        else:
            parameters += [to_hf_name(f"{name}.{t}", multimodal) for t in module.tensors]
    document = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": config.rank, "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": 0.0 if parameters else config.dropout, "use_rslora": config.rslora,
        "target_modules": sorted(modules), "target_parameters": sorted(parameters) or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")


def _to_peft(local: str, tensor: torch.Tensor) -> torch.Tensor:
    """One of our adapter tensors in PEFT's layout (see the module docstring)."""
    if local.endswith(".weight"):
        return tensor
    experts, rows, cols = tensor.shape
    if local.endswith("_A"):  # ours [E, in, r] -> PEFT's lora_B [in, r*E], column j*E + e
        return tensor.permute(1, 2, 0).reshape(rows, cols * experts)
    return tensor.reshape(experts * rows, cols)  # ours B [E, r, out] -> PEFT's lora_A [E*r, out]


def from_peft_tensor(local: str, tensor: torch.Tensor, experts: int) -> torch.Tensor:
    """A stored PEFT tensor in our layout for the adapter tensor ``local`` (a linear's ``lora_A.weight`` as it is;
    an expert tensor's ``gate_up_A`` ... from peft's 2-D ParamWrapper layout over ``experts`` experts)."""
    if local.endswith(".weight"):
        return tensor
    if local.endswith("_A"):  # PEFT's lora_B [in, r*E] -> ours [E, in, r]
        return tensor.reshape(tensor.shape[0], -1, experts).permute(2, 0, 1)
    return tensor.reshape(experts, -1, tensor.shape[-1])  # PEFT's lora_A [E*r, out] -> ours [E, r, out]


def read_adapter_config(path: str | os.PathLike) -> dict:
    """adapter_config.json of a PEFT LoRA adapter, checked for settings this project implements."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                                f"(pickled adapter_model.bin files are not read)")
    document = json.loads((path / CONFIG_FILE).read_text())
    if document.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {document.get('peft_type')!r}, only LORA adapters are supported")
    for key, default in _UNSUPPORTED.items():
        if document.get(key, default) not in (default, None, {}, False):
            raise ValueError(f"{path}: {key}={document[key]!r} is not supported (only plain LoRA: {key} must be "
                             f"{default!r})")
    return document


def load_adapter(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Apply the PEFT LoRA adapter at ``path`` (trained with peft on transformers' Llama 4, or written by
    :func:`save_adapter`) to ``model``, in place: targets, rank, alpha, rsLoRA and dropout from its config,
    the tensors renamed through checkpoint/mapping.py. Returns the model."""
    multimodal = _multimodal(model)
    document = read_adapter_config(path)
    stored = load_file(str(Path(path) / WEIGHTS_FILE))
    targets: list[str] = []
    seen: set[str] = set()
    for key in stored:
        module_path = peft_module_path(key).replace(".base_layer", "")
        if module_path in seen:
            continue
        seen.add(module_path)
        ours = from_hf_name(f"{module_path}.weight", multimodal)
        if ours is not None and ours.endswith(".weight"):
            targets.append(ours.removesuffix(".weight"))
            continue
        expert_tensors = targeted_expert_tensors(module_path, document.get("target_parameters") or (), multimodal)
        if not expert_tensors:
            raise ValueError(f"{key}: no module of this model takes it (supported: attention, shared expert, dense "
                             f"MLP and projector linears, and the experts' gate_up_proj / down_proj parameters)")
        targets += [from_hf_name(f"{module_path}.{_HF_EXPERT_PARAMS[t]}", multimodal) for t in expert_tensors]
    config = LoraConfig(rank=int(document["r"]), alpha=float(document.get("lora_alpha", 8)),
                        dropout=float(document.get("lora_dropout") or 0.0),
                        rslora=bool(document.get("use_rslora", False)), targets=tuple(targets))
    apply_lora(model, config, dtype)
    try:
        tensors = {}
        for name, module in lora_modules(model).items():
            experts = module.num_experts if isinstance(module, LoraExperts) else 0
            for local, hf in _hf_tensor_names(name, module, multimodal).items():
                if hf not in stored:
                    raise ValueError(f"{path}: {hf} is missing")
                tensors[f"{name}.{local}"] = from_peft_tensor(local, stored.pop(hf), experts)
        if stored:
            raise ValueError(f"{path}: tensors this model has no place for: {sorted(stored)[:5]}")
        load_lora_state_dict(model, tensors)
    except Exception:
        _remove_wrappers(model)
        raise
    return model


def _remove_wrappers(model: nn.Module) -> None:
    """Put the base modules back (an adapter that failed to load leaves the model as it was, frozen)."""
    for name, module in lora_modules(model).items():
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module.base)
    del model.lora_config


def peft_module_path(key: str) -> str:
    """The transformers module path of a PEFT tensor name (``base_model.model.<path>.lora_A.weight``)."""
    if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
        raise ValueError(f"{key}: not a PEFT LoRA tensor name (base_model.model.<module>.lora_A.weight / "
                         f".lora_B.weight; lora magnitude vectors, embeddings and biases are not supported)")
    return key.removeprefix(PREFIX).rsplit(".", 2)[0]


def targeted_expert_tensors(module_path: str, target_parameters, multimodal: bool) -> list[str]:
    """The expert tensors (ours, EXPERT_TENSORS order) that the config's ``target_parameters`` name on the module
    at ``module_path``, matched as peft matches them (the full name, or a suffix after a dot); [] when the
    module is not routed experts."""
    found = []
    for tensor in EXPERT_TENSORS:
        key = f"{module_path}.{_HF_EXPERT_PARAMS[tensor]}"
        if from_hf_name(key, multimodal) is None:
            return []
        if any(key == t or key.endswith(f".{t}") for t in target_parameters):
            found.append(tensor)
    return found
