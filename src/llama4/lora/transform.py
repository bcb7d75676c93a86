"""LoRA applied to a finished model from outside (module swap, as quantization and CPU packing are): the
config, which modules it targets, and the operations on an adapted model (merge, unmerge, merge for good,
the adapters' tensors)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import NamedTuple

import torch
import torch.nn as nn

from llama4.lora.modules import EXPERT_TENSORS, LoraExperts, LoraLinear
from llama4.model.moe import MoE
from llama4.model.transformer import Llama4Model, text_decoder
from llama4.quant.modules import QuantizedExperts, QuantizedLinear

# Kinds of target, each naming a set of modules in every layer. "gate", "up", "down" name both the shared
# expert's and the dense MLPs' (the checkpoint's SwiGLU linears); "shared" and "mlp" tell them apart.
KINDS = ("attention", "wq", "wk", "wv", "wo", "shared", "mlp", "gate", "up", "down", "experts",
         "experts.gate_up", "experts.down", "router", "projector")
_TARGETS_HELP = (f"a kind ({', '.join(KINDS)}) or a pattern over module names with * and ? (e.g. "
                 "text.layers.*.attn.qkv.wq, text.layers.3.ffn.experts.gate_up)")


@dataclass(frozen=True)
class LoraConfig:
    """What LoRA adds: ``rank`` r, ``alpha`` (the update is scaled by alpha / r, or alpha / sqrt(r) with
    ``rslora``), ``dropout`` on the adapters' input (training only), and ``targets``: kinds of module or
    fnmatch patterns over our module names (see KINDS; experts' tensors are named
    ``text.layers.{i}.ffn.experts.gate_up`` / ``.down``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = ("attention",)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise ValueError(f"targets is empty: give at least one, each {_TARGETS_HELP}")
        for target in targets:
            if not isinstance(target, str) or not (target in KINDS or "." in target or "*" in target):
                raise ValueError(f"unknown target {target!r}: each target is {_TARGETS_HELP}")
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class Candidate(NamedTuple):
    """A module (or an expert tensor) LoRA may adapt: our name, its kinds, where it hangs."""

    name: str
    kinds: frozenset[str]
    parent: nn.Module
    attribute: str
    tensor: str | None  # experts only: gate_up or down


def candidates(model: nn.Module) -> list[Candidate]:
    """Every module LoRA may adapt, with its kinds (the one place that knows where each kind lives)."""
    text, prefix = text_decoder(model, "LoRA")
    found = []
    for i, layer in enumerate(text.layers):
        at = f"{prefix}layers.{i}"
        found += [Candidate(f"{at}.attn.qkv.{w}", frozenset({"attention", w}), layer.attn.qkv, w, None)
                  for w in ("wq", "wk", "wv")]
        found.append(Candidate(f"{at}.attn.wo", frozenset({"attention", "wo"}), layer.attn, "wo", None))
        mlp, mlp_name, kind = layer.ffn, f"{at}.ffn", "mlp"
        if isinstance(layer.ffn, MoE):
            found.append(Candidate(f"{at}.ffn.router", frozenset({"router"}), layer.ffn, "router", None))
            found += [Candidate(f"{at}.ffn.experts.{t}", frozenset({"experts", f"experts.{t}"}), layer.ffn,
                                "experts", t) for t in EXPERT_TENSORS]
            mlp, mlp_name, kind = layer.ffn.shared, f"{at}.ffn.shared", "shared"
        found += [Candidate(f"{mlp_name}.{w}", frozenset({kind, w}), mlp, w, None) for w in ("gate", "up", "down")]
    if isinstance(model, Llama4Model) and model.projector is not None:
        found.append(Candidate("projector", frozenset({"projector"}), model, "projector", None))
    return found


def _matches(candidate: Candidate, target: str) -> bool:
    if target in candidate.kinds or fnmatchcase(candidate.name, target):
        return True
    return candidate.tensor is not None and fnmatchcase(candidate.name.rpartition(".")[0], target)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear | LoraExperts]:
    """The model's LoRA wrappers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts))}


def _check_plain(model: nn.Module) -> None:
    text, _ = text_decoder(model, "LoRA")
    if getattr(model, "kernel_options", None) is not None or text.fast_decode is not None:
        raise ValueError("the model's weights are packed for the CPU kernels: apply LoRA to a plain model, loaded "
                         "with llama4.load_model(..., pack=False) or unpacked with llama4.kernels.cpu.unpack(model)")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters: merge_and_unload(model) first, or start from the "
                         "base model")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's weights are on the meta device: load them before applying LoRA")


def apply_lora(model: nn.Module, config: LoraConfig, dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """Swap LoRA wrappers in for the modules ``config.targets`` name, in place, and return the model.

    Every parameter of the model is frozen (requires_grad False) except the adapters' A and B. A is drawn
    as PEFT draws it (reproducibly from ``seed``), B is zero, so the adapted model starts equal to the base.
    ``dtype``: the adapters' dtype (default: the base's float dtype). Bases may be float or quantized
    (llama4.quant: QLoRA).
    """
    _check_plain(model)
    found = candidates(model)
    chosen = [c for c in found if any(_matches(c, t) for t in config.targets)]
    unmatched = [t for t in config.targets if not any(_matches(c, t) for c in found)]
    if unmatched:
        raise ValueError(f"targets {unmatched} match no module of this model: each target is {_TARGETS_HELP}")
    generator = torch.Generator().manual_seed(seed)
    experts: dict[int, list[Candidate]] = {}
    for c in chosen:
        if c.tensor is not None:
            experts.setdefault(id(c.parent), []).append(c)
    model.requires_grad_(False)
    for c in chosen:
        if c.tensor is not None:
            group = experts.pop(id(c.parent), None)
            if group is None:
                continue  # the other tensor of experts already wrapped
            base = getattr(c.parent, c.attribute)
            tensors = tuple(t for t in EXPERT_TENSORS if any(g.tensor == t for g in group))
            wrapper: nn.Module = LoraExperts(base, tensors, config.rank, config.scaling, config.dropout, dtype,
                                             _device_generator(base, generator))
        else:
            base = getattr(c.parent, c.attribute)
            wrapper = LoraLinear(base, config.rank, config.scaling, config.dropout, dtype,
                                 _device_generator(base, generator))
        wrapper.train(base.training)  # dropout follows the model's mode
        setattr(c.parent, c.attribute, wrapper)
    for module in lora_modules(model).values():
        for p in module.adapter_parameters().values():
            p.requires_grad_(True)
    model.lora_config = config
    return model


def _device_generator(base: nn.Module, cpu: torch.Generator) -> torch.Generator:
    """The CPU generator, or one on the base's accelerator seeded from it (init draws on the tensor's device)."""
    device = next(itertools.chain(base.parameters(), base.buffers())).device
    if device.type == "cpu":
        return cpu
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (), generator=cpu)))


def merge_lora(model: nn.Module) -> None:
    """Add every adapter's update into its float base (the forward then runs the base alone). The unmerged
    weights are kept, so :func:`unmerge_lora` restores them bit for bit: one extra copy of the adapted
    weights while merged (merge_and_unload merges in place with no copy). Quantized bases refuse, before
    anything is merged."""
    wrappers = _wrappers(model)
    quantized = [name for name, m in wrappers.items() if not _float_base(m)]
    if quantized:
        raise ValueError(f"{quantized[0]} (and {len(quantized) - 1} more) has a quantized base (QLoRA): it cannot "
                         f"merge in place; merge_and_unload(model) merges into float copies of the dequantized "
                         f"weights instead")
    for module in wrappers.values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`: the base weights as they were, bit for bit, and the adapters active again."""
    for module in _wrappers(model).values():
        module.unmerge()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge every adapter for good and put plain modules back, in place: float bases are merged into their own
    weights (no copy); a quantized base becomes a float module holding its dequantized weight plus the update
    (``dtype``: default the float model's). The result is a plain model (``llama4.save_model`` writes a
    checkpoint transformers loads, if no module is left quantized)."""
    for name, module in _wrappers(model).items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, module.merged_module(dtype))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def _wrappers(model: nn.Module) -> dict[str, LoraLinear | LoraExperts]:
    wrappers = lora_modules(model)
    if not wrappers:
        raise ValueError("the model has no LoRA adapters (apply_lora or load_adapter first)")
    return wrappers


def _float_base(module: LoraLinear | LoraExperts) -> bool:
    return not isinstance(module.base, (QuantizedLinear, QuantizedExperts))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by our parameter names (``text.layers.0.attn.qkv.wq.lora_A.weight``,
    ``text.layers.1.ffn.experts.gate_up_A`` [E, D, r], ...), detached (not copies)."""
    return {f"{name}.{local}": p.detach() for name, module in _wrappers(model).items()
            for local, p in module.adapter_parameters().items()}


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (as :func:`lora_state_dict` names them) into the model's adapters, strictly: every
    adapter tensor given, no other, each of its shape (values converted to the adapter's dtype and device)."""
    params = {f"{name}.{local}": p for name, module in _wrappers(model).items()
              for local, p in module.adapter_parameters().items()}
    if any(m.merged for m in lora_modules(model).values()):
        raise ValueError("the adapters are merged: unmerge_lora(model) before loading adapter tensors")
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"adapter tensors do not match the model's adapters: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    wrong = [f"{n}: {tuple(tensors[n].shape)}, expected {tuple(p.shape)}" for n, p in params.items()
             if tensors[n].shape != p.shape]
    if wrong:
        raise ValueError("adapter tensor shapes differ: " + "; ".join(wrong[:5]))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
