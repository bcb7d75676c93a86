"""Which weights of a model are quantized to which format (a recipe), and the module swap that applies it.

The kinds of weight a recipe names, in the text decoder (the vision tower and projector stay float):

* ``experts``: the routed experts of the MoE layers;
* ``shared``: the SwiGLU feed-forwards, i.e. the MoE layers' shared expert and the dense layers' MLP;
* ``attention``: wq, wk, wv and wo;
* ``head``: the output projection (not in the single-format recipes: like llama.cpp's dynamic quants, the
  head is the one matrix every token's distribution goes through, and it stays float unless named);
* ``embeddings``: not supported yet.

The MoE routers and the norms are never quantized: a router's rounding would change which expert runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from llama4.model.moe import Experts, MoE, Router
from llama4.model.transformer import text_decoder
from llama4.quant.formats import SCALE_DTYPES, WeightFormat
from llama4.quant.modules import QuantizedExperts, QuantizedLinear, QuantizedWeight

KINDS = ("experts", "shared", "attention", "head", "embeddings")
SINGLE_FORMAT_KINDS = ("experts", "shared", "attention")  # what a recipe of one format ("int8") quantizes
_SCALE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class QuantRecipe:
    """A format (or None: kept float) per kind of weight, and the dtype of the scales."""

    experts: WeightFormat | None = None
    shared: WeightFormat | None = None
    attention: WeightFormat | None = None
    head: WeightFormat | None = None
    embeddings: WeightFormat | None = None
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for kind in KINDS:
            value = getattr(self, kind)
            if value is not None and not isinstance(value, WeightFormat):
                raise ValueError(f"{kind}: a WeightFormat or None, got {value!r}")
        if self.embeddings is not None:
            raise ValueError("embeddings quantization is not supported yet: leave embeddings unset")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype}")

    @classmethod
    def parse(cls, text: str) -> QuantRecipe:
        """A recipe from a string: one format for experts, shared and attention (``int8``, ``int4-g64``, ``nf4``), or
        ``kind=format`` items (``experts=int4-g32,attention=int8,shared=int8,head=int8``; ``none`` keeps a
        kind float), optionally after a format that sets the rest (``int4,attention=int8``), and
        ``scales=bf16`` (default fp32)."""
        items = [item.strip() for item in text.split(",")]
        if not text.strip() or not all(items):
            raise ValueError(f"empty recipe or item in {text!r}: expected e.g. int8, int4-g64 or "
                             f"experts=int4-g32,attention=int8")
        base, chosen, scale_dtype = None, {}, torch.float32
        for item in items:
            key, has_value, value = (part.strip() for part in item.partition("="))
            if not has_value:
                if base is not None:
                    raise ValueError(f"recipe {text!r} gives more than one format for all kinds")
                base = WeightFormat.parse(key)
            elif key == "scales":
                if value not in _SCALE_NAMES:
                    raise ValueError(f"scales must be one of {sorted(_SCALE_NAMES)}, got {value!r}")
                scale_dtype = _SCALE_NAMES[value]
            elif key not in KINDS:
                raise ValueError(f"unknown kind {key!r} in recipe {text!r}: kinds are {', '.join(KINDS)} "
                                 f"(and scales=fp32|bf16)")
            elif key in chosen:
                raise ValueError(f"kind {key!r} given twice in recipe {text!r}")
            else:
                chosen[key] = None if value.lower() == "none" else WeightFormat.parse(value)
        formats = {kind: base for kind in SINGLE_FORMAT_KINDS} | chosen
        return cls(**formats, scale_dtype=scale_dtype)

    def format_for(self, kind: str) -> WeightFormat | None:
        return getattr(self, kind)

    def __str__(self) -> str:
        items = [f"{kind}={self.format_for(kind)}" for kind in KINDS if self.format_for(kind) is not None]
        if self.scale_dtype != torch.float32:
            items.append("scales=bf16")
        return ",".join(items) or "none"


class Target(NamedTuple):
    """A module a recipe may quantize: its kind, its name in the model, and where it hangs."""

    kind: str
    name: str  # the module's name in the model
    parent: nn.Module
    attribute: str


def quantizable_modules(model: nn.Module) -> list[Target]:
    """Every module a recipe may quantize, with its kind (the one place that knows where each kind lives)."""
    text, prefix = text_decoder(model, "quantization")
    targets = []
    for i, layer in enumerate(text.layers):
        at = f"{prefix}layers.{i}"
        qkv = layer.attn.qkv
        targets += [Target("attention", f"{at}.attn.qkv.{w}", qkv, w) for w in ("wq", "wk", "wv")]
        targets.append(Target("attention", f"{at}.attn.wo", layer.attn, "wo"))
        mlp, mlp_name = layer.ffn, f"{at}.ffn"
        if isinstance(layer.ffn, MoE) or hasattr(layer.ffn, "experts"):  # a MoE, or a stand-in (a rank's part)
            targets.append(Target("experts", f"{at}.ffn.experts", layer.ffn, "experts"))
            mlp, mlp_name = layer.ffn.shared, f"{at}.ffn.shared"
        targets += [Target("shared", f"{mlp_name}.{w}", mlp, w) for w in ("gate", "up", "down")]
    if text.output is not None:
        targets.append(Target("head", f"{prefix}output", text, "output"))
    return targets


def _check_plain(model: nn.Module) -> None:
    text, _ = text_decoder(model, "quantization")
    if getattr(model, "kernel_options", None) is not None or text.fast_decode is not None:
        raise ValueError("the model's weights are packed for the CPU kernels (llama4.kernels.cpu): quantize a plain "
                         "model, loaded with llama4.load_model(..., pack=False) or unpacked first with "
                         "llama4.kernels.cpu.unpack(model)")
    if any(isinstance(m, QuantizedWeight) for m in model.modules()):
        raise ValueError("the model is already quantized: quantize a float model")


def _check_target(target: Target, fmt: WeightFormat) -> None:
    child = getattr(target.parent, target.attribute)
    if isinstance(child, Experts) and target.kind == "experts":
        in_dims = (child.gate_up.shape[1], child.down.shape[1])
    elif isinstance(child, nn.Linear) and not isinstance(child, Router) and target.kind != "experts":
        in_dims = (child.in_features,)
    else:
        raise TypeError(f"{target.name}: expected the float model's module, got {type(child).__name__}")
    if any(p.is_meta for p in child.parameters()):
        raise ValueError(f"{target.name}: the weights are on the meta device: load them before quantizing")
    if fmt.group is not None and any(d % fmt.group for d in in_dims):
        raise ValueError(f"{target.name}: {fmt} needs input dimensions that are multiples of {fmt.group}, "
                         f"got {in_dims}; use a smaller group or int8")


def checked_targets(model: nn.Module, recipe: QuantRecipe | str, what: str = "quantization"
                    ) -> tuple[QuantRecipe, list[Target]]:
    """The recipe (parsed) and the modules it quantizes, every check made first (the model plain and float, the
    head untied where the recipe quantizes it, each module's inputs fitting its format's groups), so that a refused
    recipe leaves the model as it was."""
    if isinstance(recipe, str):
        recipe = QuantRecipe.parse(recipe)
    _check_plain(model)
    text, _ = text_decoder(model, what)
    if recipe.head is not None and text.output is None:
        raise ValueError("the output head is tied to the embeddings (tie_word_embeddings), and embeddings "
                         "quantization is not supported yet: leave head unset for this model")
    chosen = [target for target in quantizable_modules(model) if recipe.format_for(target.kind) is not None]
    for target in chosen:
        _check_target(target, recipe.format_for(target.kind))
    return recipe, chosen


def quantize_model(model: nn.Module, recipe: QuantRecipe | str) -> nn.Module:
    """Swap quantized stand-ins in for the weights ``recipe`` names, in place, and return the model.

    ``model`` is a plain (not packed) Llama4Model or TextModel with its weights loaded; each float module is
    freed as soon as its replacement exists.
    """
    recipe, chosen = checked_targets(model, recipe)
    for target in chosen:
        fmt, child = recipe.format_for(target.kind), getattr(target.parent, target.attribute)
        if isinstance(child, Experts):
            replacement: nn.Module = QuantizedExperts(child, fmt, recipe.scale_dtype)
        else:
            replacement = QuantizedLinear(child, fmt, recipe.scale_dtype)
        setattr(target.parent, target.attribute, replacement)
    model.quant_recipe = recipe
    return model


def quantized_with(model: nn.Module) -> QuantRecipe | None:
    """The recipe the model was quantized with, or None if it is not quantized."""
    return getattr(model, "quant_recipe", None)


@dataclass(frozen=True)
class QuantizedModule:
    """One quantizable module of a model: its format (None: float) and its weights' bytes, float and now."""

    name: str
    kind: str
    format: WeightFormat | None
    float_bytes: int
    stored_bytes: int


def summary(model: nn.Module) -> list[QuantizedModule]:
    """Every module a recipe may quantize, in model order, with the format it has."""
    rows = []
    for target in quantizable_modules(model):
        module = getattr(target.parent, target.attribute)
        weights = [m for m in module.modules() if isinstance(m, QuantizedWeight)]
        if weights:
            dtype = module.float_dtype
            elements = sum(w.tensor.shape.numel() for w in weights)
            float_bytes = elements * torch.empty((), dtype=dtype).element_size()
            rows.append(QuantizedModule(target.name, target.kind, module.format, float_bytes,
                                        sum(w.tensor.nbytes for w in weights)))
        else:
            size = sum(p.numel() * p.element_size() for p in module.parameters())
            rows.append(QuantizedModule(target.name, target.kind, None, size, size))
    return rows


def summary_text(model: nn.Module) -> str:
    """:func:`summary` per kind and format: modules, and megabytes before -> after."""
    totals: dict[tuple[str, str], list[int]] = {}
    for row in summary(model):
        total = totals.setdefault((row.kind, str(row.format or "float")), [0, 0, 0])
        total[0] += 1
        total[1] += row.float_bytes
        total[2] += row.stored_bytes
    return "\n".join(f"{kind:<10} {fmt:<14} {count:>4} modules {before / 1e6:9.2f} MB -> {after / 1e6:9.2f} MB"
                     for (kind, fmt), (count, before, after) in totals.items())


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's quantized weights (codes, scales, zero points)."""
    return sum(m.tensor.nbytes for m in model.modules() if isinstance(m, QuantizedWeight))
