"""Quantized checkpoints: a quantized model saved in the compressed-tensors layout, and compressed-tensors (int4,
int8, FP8) and Meta's fbgemm_fp8 checkpoints loaded straight into our quantized modules.

Routed experts. transformers keeps Llama 4's routed experts as two fused 3-D tensors, which compressed-tensors
cannot quantize: it quantizes nn.Linear modules. For a pre-quantized compressed-tensors checkpoint transformers
(5.23) swaps Llama4TextExperts for SequentialLlama4TextExperts (transformers/quantizers/base.py), a ModuleList of
the dense MLP module, so expert e is three linears named as the MLP's under ``experts.{e}``: ``gate_proj`` [I, D],
``up_proj`` [I, D], ``down_proj`` [D, I]. llm-compressor writes that layout (its SequentialLlama4TextMoe), RedHatAI's
Llama 4 checkpoints have it and vLLM reads it; so do we, for quantized experts and, in a compressed-tensors
checkpoint (where transformers expects that layout for every expert), for float ones. The names are derived
from checkpoint/mapping.py: the experts' module name, and the leaf names of the MoE layer's shared expert.

Loading builds each quantized module from its codes and scales (QuantizedLinear.from_tensor,
QuantizedExperts.from_tensors), one module at a time: the float weights of a quantized module never exist.
Float tensors go through checkpoint.io.load_weights, strictly, as for a float checkpoint.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from llama4.checkpoint.hf_config import model_config_to_hf
from llama4.checkpoint.io import (
    DEFAULT_SHARD_BYTES,
    QUANTIZATION_KEY,
    CheckpointError,
    dtype_name,
    iter_checkpoint,
    load_weights,
    write_checkpoint,
)
from llama4.checkpoint.mapping import to_hf_name
from llama4.checkpoint.slices import Layout, read_layout, whole
from llama4.model.moe import Experts
from llama4.quant import compressed_tensors as ct
from llama4.quant import fp8
from llama4.quant.formats import QuantizedTensor, WeightFormat, dequantize, quantize
from llama4.quant.modules import QuantizedExperts, QuantizedLinear, QuantizedWeight
from llama4.quant.recipe import KINDS, QuantRecipe, quantizable_modules

SUPPORTED_METHODS = (ct.QUANT_METHOD, fp8.FBGEMM_METHOD)
_EXPERT_LINEARS = ("gate", "up", "down")  # our names of the MoE's SwiGLU linears, whose leaf names experts share


@dataclass(frozen=True)
class Site:
    """A linear or the routed experts of our model, with its HF module name and its recipe kind (None: a module
    a recipe never quantizes: router, vision tower, projector)."""

    name: str
    hf: str
    kind: str | None
    leaves: tuple[str, ...] = ()  # routed experts: the HF names of an expert's gate, up and down linears

    @property
    def experts(self) -> bool:
        return bool(self.leaves)

    def expert_linears(self, e: int) -> list[str]:
        return [f"{self.hf}.{e}.{leaf}" for leaf in self.leaves]


def sites(model: nn.Module) -> list[Site]:
    """Every linear and routed-experts module of ``model``, in model order."""
    multimodal = model.config.multimodal
    kinds = {target.name: target.kind for target in quantizable_modules(model)}
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (Experts, QuantizedExperts)):
            moe = name.rpartition(".")[0]
            leaves = tuple(to_hf_name(f"{moe}.shared.{w}.weight", multimodal).split(".")[-2] for w in _EXPERT_LINEARS)
            found.append(Site(name, to_hf_name(f"{name}.gate_up", multimodal).rpartition(".")[0], kinds.get(name),
                              leaves))
        elif isinstance(module, (nn.Linear, QuantizedLinear)):
            found.append(Site(name, to_hf_name(f"{name}.weight", multimodal).removesuffix(".weight"), kinds.get(name)))
    return found


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedWeight) for m in model.modules())


# ---------------------------------------------------------------- saving


def save_quantized(model: nn.Module, path: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a quantized (plain, not packed) model in the compressed-tensors layout: config.json with its
    ``quantization_config`` and safetensors, which transformers (with compressed-tensors) and vLLM load."""
    if getattr(model, "kernel_options", None) is not None:
        raise ValueError("the model is packed for the CPU kernels: save it with llama4.save_model, which unpacks it")
    nf4 = [name for name, m in model.named_modules() if isinstance(m, QuantizedWeight) and not m.format.is_integer]
    if nf4:
        raise ValueError(f"{nf4[0].rpartition('.')[0]} (and {len(nf4) - 1} more weights) is in "
                         f"{model.get_submodule(nf4[0]).format}, which the compressed-tensors layout cannot hold "
                         "(its pack-quantized weights are integer codes): save the float model and quantize to nf4 "
                         "at load (load_model(..., quant='nf4')), or save the adapter alone (llama4.lora.save_adapter)")
    tensors, quant_config = checkpoint_tensors(model)
    float_tensors = [t for name, t in tensors.items() if t.is_floating_point() and not name.endswith("weight_scale")]
    config = {**model_config_to_hf(model.config, dtype_name(float_tensors)), QUANTIZATION_KEY: quant_config}
    write_checkpoint(path, config, tensors, max_shard_bytes)


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (HF name -> tensor or view) and ``quantization_config`` of a quantized model."""
    multimodal = model.config.multimodal
    all_sites = sites(model)
    expert_params = {f"{s.name}.{p}" for s in all_sites if s.experts for p in ("gate_up", "down")}
    tensors = {to_hf_name(name, multimodal): p.detach() for name, p in model.named_parameters()
               if name not in expert_params}
    formats: dict[str, WeightFormat | None] = {}  # HF linear -> its format (None: float)
    for site in all_sites:
        module = model.get_submodule(site.name)
        if site.experts:
            for e in range(module.num_experts):
                for linear, weight in zip(site.expert_linears(e), _expert_weights(module, e)):
                    formats[linear] = _add_linear(tensors, linear, weight)
        elif isinstance(module, QuantizedLinear):
            formats[site.hf] = _add_linear(tensors, site.hf, module.qweight.tensor)
        else:
            formats[site.hf] = None
    if model.text.output is None:  # tied to the embeddings: transformers still has an lm_head linear, kept float
        formats[to_hf_name("text.output.weight", multimodal).removesuffix(".weight")] = None
    return tensors, _config_of(formats)


def _expert_weights(module: nn.Module, e: int) -> list[torch.Tensor | QuantizedTensor]:
    """Expert e's gate [I, D], up [I, D] and down [D, I] ([out, in]; float ones as views)."""
    if isinstance(module, QuantizedExperts):
        gate_up, down = module.gate_up.tensor[e], module.down.tensor[e]
        hidden = gate_up.codes.shape[0] // 2
        return [_rows(gate_up, slice(0, hidden)), _rows(gate_up, slice(hidden, None)), down]
    hidden = module.gate_up.shape[2] // 2
    gate_up = module.gate_up[e].detach()
    return [gate_up[:, :hidden].t(), gate_up[:, hidden:].t(), module.down[e].detach().t()]


def _rows(tensor: QuantizedTensor, rows: slice) -> QuantizedTensor:
    return QuantizedTensor(tensor.format, tensor.codes[rows], tensor.scale[rows],
                           None if tensor.zero is None else tensor.zero[rows])


def _add_linear(tensors: dict, name: str, weight: torch.Tensor | QuantizedTensor) -> WeightFormat | None:
    if isinstance(weight, QuantizedTensor):
        tensors.update({f"{name}.{suffix}": t for suffix, t in ct.compress(weight).items()})
        return weight.format
    tensors[f"{name}.weight"] = weight
    return None


def _config_of(formats: dict[str, WeightFormat | None]) -> dict:
    """config_groups (one per format; targets ``Linear`` when there is one) and the ignore list (the float
    linears), as regexes over layer and expert indices where those name exactly the same modules."""
    groups: dict[WeightFormat, list[str]] = {}
    for name, fmt in formats.items():
        groups.setdefault(fmt, []).append(name)
    float_linears = groups.pop(None, [])
    quantized = [name for names in groups.values() for name in names]
    if len(groups) == 1:
        targets = {fmt: [ct.LINEAR_CLASS] for fmt in groups}
    else:
        targets = {fmt: _patterns(names, [n for n in formats if n not in set(names)]) for fmt, names in groups.items()}
    return ct.quantization_config([(fmt, targets[fmt]) for fmt in groups], _patterns(float_linears, quantized))


def _patterns(members: list[str], others: list[str]) -> list[str]:
    """``re:`` patterns matching exactly ``members`` (module names with every index generalised), falling back to
    the names themselves for a pattern that would also match one of ``others``."""
    by_pattern: dict[str, list[str]] = {}
    for name in members:
        pattern = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split(".")) + "$"
        by_pattern.setdefault(pattern, []).append(name)
    result = []
    for pattern, names in by_pattern.items():
        regex = re.compile(pattern)
        result += names if any(regex.match(other) for other in others) else [f"re:{pattern}"]
    return result


# ---------------------------------------------------------------- loading


@dataclass
class _Loaded:
    """What a quantized load swapped in: formats per kind (None: a float module of that kind) and scale dtypes."""

    formats: dict[str, set]
    scale_dtypes: set

    def add(self, kind: str | None, tensor: QuantizedTensor | None) -> None:
        if kind is not None:
            self.formats.setdefault(kind, set()).add(None if tensor is None else tensor.format)
        if tensor is not None:
            self.scale_dtypes.add(tensor.scale.dtype)

    def recipe(self) -> QuantRecipe | None:
        """The recipe of these modules, where each kind has one format (or is float) throughout."""
        if any(len(f) != 1 for f in self.formats.values()):
            return None
        chosen = {kind: next(iter(f)) for kind, f in self.formats.items() if kind in KINDS}
        scale = torch.bfloat16 if self.scale_dtypes == {torch.bfloat16} else torch.float32
        return QuantRecipe(**chosen, scale_dtype=scale)


class _Reader:
    """A checkpoint's tensor index, and reads of a few tensors (or parts of them) at a time, each file mapped only
    while read. ``layouts`` (our parameter name -> the part this process holds, None: whole) is set for a sharded
    load (llama4.distributed.load_sharded), whose model's modules have the shapes of those parts."""

    def __init__(self, path: Path, layouts: dict[str, Layout | None] | None = None,
                 full_row_max: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
        self.path = path
        self.layouts = layouts or {}
        self.full_row_max = full_row_max
        self.files: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, file, handle in iter_checkpoint(path):
            self.files[name] = file
            piece = handle.get_slice(name)
            self.dtypes[name], self.shapes[name] = piece.get_dtype(), tuple(piece.get_shape())
        self.read_names: set[str] = set()
        self.claimed: set[str] = set()  # module prefixes ("m.") whose tensors a loader owns, read or not

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def layout(self, param: str) -> Layout | None:
        return self.layouts.get(param)

    def read(self, names: list[str], parts: dict[str, Layout] | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each whole or the part ``parts`` gives it."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise CheckpointError(f"checkpoint {self.path} lacks {len(missing)} tensor(s) of a quantized module: "
                                  f"{missing[:10]}")
        parts = parts or {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, group in by_file.items():
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in group:
                        if name in parts:
                            piece = handle.get_slice(name)
                            out[name] = read_layout(lambda index: piece[index].clone(), parts[name])
                        else:
                            out[name] = handle.get_tensor(name).clone()  # owned: the mapping closes below
            except SafetensorError as e:
                raise CheckpointError(f"{file}: cannot read {group[0]}: {e}") from None
        self.read_names.update(names)
        return out

    def row_max(self, param: str, window: _Window | None, local: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """For FP8 weights becoming int8 per row: where this part holds some of its rows' columns, the whole rows'
        largest magnitudes (``full_row_max`` of the part's, ``local()``); None where the part holds whole rows."""
        if window is None or window.cols == (0, window.full[1]):
            return None
        if self.full_row_max is None:
            raise ValueError(f"{param}: a part of FP8 rows needs full_row_max to convert them as whole rows")
        return self.full_row_max(param, local())

    def handled(self) -> set[str]:
        """The tensors the quantized loaders own: those read and those of the modules they claimed."""
        prefixes = tuple(self.claimed)
        return self.read_names | ({n for n in self.files if n.startswith(prefixes)} if prefixes else set())


@dataclass(frozen=True)
class _Window:
    """The part of one linear's weight [out, in] = ``full`` a process holds: ``rows`` x ``cols``."""

    full: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    @classmethod
    def of(cls, layout: Layout, full: tuple[int, int]) -> _Window:
        if any(len(ranges) != 1 for ranges in layout):
            raise ValueError(f"a linear's part must be one range of rows and one of columns, got {layout}")
        return cls(full, layout[0][0], layout[1][0])

    @property
    def layout(self) -> Layout:
        return ((self.rows,), (self.cols,))


def _expert_windows(reader: _Reader, site: Site, shape: tuple[int, int, int]) -> tuple[int, list[_Window | None]]:
    """(first expert held, the windows of an expert's gate, up and down) of an experts site whose module has
    ``shape`` = (experts, D, hidden) (a sharded load's part: some experts, some hidden columns of each)."""
    gate_up, down = reader.layout(f"{site.name}.gate_up"), reader.layout(f"{site.name}.down")
    if gate_up is None and down is None:
        return 0, [None, None, None]
    experts, dim, _ = shape
    (first, _), = gate_up[0]
    (lo, hi), (up_lo, _) = gate_up[2]
    full_hidden = up_lo - lo
    if down[0] != gate_up[0] or down[1] != ((lo, hi),):
        raise ValueError(f"experts part gate_up {gate_up} and down {down} do not hold the same experts and columns")
    gate = _Window((full_hidden, dim), (lo, hi), (0, dim))
    return first, [gate, gate, _Window((dim, full_hidden), (0, dim), (lo, hi))]


def load_quantized(model: nn.Module, path: str | os.PathLike, config: dict, dtype: torch.dtype,
                   device: torch.device | str, progress: Callable[[int, int], None] | None = None) -> None:
    """Fill ``model`` (built on the meta device) from a checkpoint whose ``quantization_config`` is ``config``:
    quantized modules swapped in from their codes, float tensors loaded as usual. Sets ``model.quant_recipe``
    where every kind has one format."""
    count = len(sites(model))
    handled = load_quantized_modules(model, path, config, dtype, device, progress)
    shapes = {name: p.shape for name, p in model.named_parameters() if p.is_meta}
    load_weights(model, path, dtype, device, None if progress is None else
                 (lambda done, total: progress(count + done, count + total)), shapes, handled=handled)


def load_quantized_modules(model: nn.Module, path: str | os.PathLike, config: dict, dtype: torch.dtype,
                           device: torch.device | str, progress: Callable[[int, int], None] | None = None,
                           layouts: dict[str, Layout | None] | None = None,
                           full_row_max: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> set[str]:
    """The quantized half of :func:`load_quantized`: every linear and routed-experts module stored quantized is
    swapped in from its codes (a float module of a kind no recipe quantizes gets its dequantized values). Float
    tensors are left to the caller; returns the checkpoint's tensor names it read or owns, for the caller's
    strict load of the rest.

    ``layouts`` (a sharded load: our parameter name -> the part this process holds, None: whole; ``model`` built
    with the parts' shapes): each module is read as its part, packed codes and scales included, never whole.
    FP8 weights become int8 with one scale per whole row, as a single process converts them: for a part holding
    some of each row's columns, ``full_row_max(param, part_max)`` gives the whole rows' largest magnitudes from
    the part's (its ``[..., out]`` maxima; every process holding a part of those rows calls it for the same
    parameters in the same order).
    """
    path = Path(path)
    method = config.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise CheckpointError(f"{path}: quantization_config.quant_method {method!r} is not supported; supported: "
                              f"{list(SUPPORTED_METHODS)}")
    try:
        if method == ct.QUANT_METHOD:
            loader: _Loader = _CompressedTensorsLoader(ct.parse_config(config))
        else:
            fp8.check_fbgemm_config(config)
            loader = _FbgemmLoader()
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    reader, loaded = _Reader(path, layouts, full_row_max), _Loaded({}, set())
    all_sites = sites(model)
    for done, site in enumerate(all_sites, 1):
        try:
            loader.load(model, site, reader, loaded, dtype, device)
        except CheckpointError:
            raise
        except ValueError as e:
            where = "" if str(e).startswith(site.hf) else f"{site.hf}: "
            raise CheckpointError(f"{path}: {where}{e}") from None
        if progress is not None:
            progress(done, len(all_sites))
    handled = reader.handled()
    unscaled = [n for n, d in reader.dtypes.items() if d.startswith("F8") and n not in handled]
    if unscaled:
        raise CheckpointError(f"{path}: float8 tensor(s) without a scale this loader knows: {unscaled[:10]}")
    model.quant_recipe = loaded.recipe()
    return handled


class _Loader(Protocol):
    """Builds one site's quantized module from a checkpoint layout's tensors."""

    def load(self, model: nn.Module, site: Site, reader: _Reader, loaded: _Loaded, dtype: torch.dtype,
             device: torch.device | str) -> None: ...


class _CompressedTensorsLoader:
    def __init__(self, config: ct.Config):
        self.config = config

    def load(self, model, site, reader, loaded, dtype, device):
        if site.experts:
            self._experts(model, site, reader, loaded, dtype, device)
        elif f"{site.hf}.weight_scale" in reader:
            scheme = self.config.scheme_for(site.hf)
            if scheme is None:
                raise ValueError("has quantized tensors but no config group targets it (or it is ignored)")
            layout = reader.layout(f"{site.name}.weight")
            window = None if layout is None else _Window.of(layout, _stored_shape(reader, site.hf))
            weight = self._read(reader, site.hf, scheme, window)
            _install_linear(model, site, weight, loaded, dtype, device, _fp8_row_max(reader, site, weight, window))
        else:
            loaded.add(site.kind, None)

    def _read(self, reader: _Reader, linear: str, scheme: ct.Scheme,
              window: _Window | None = None) -> QuantizedTensor | torch.Tensor:
        """Our codes of an int scheme; FP8 weights as their float32 values (int8 where a kind lives); the
        ``window`` part of the weight only, where one is given."""
        required, optional = scheme.tensor_names()
        suffixes = sorted(required) + [s for s in optional if f"{linear}.{s}" in reader]
        names = [f"{linear}.{s}" for s in suffixes]
        parts = None
        if window is not None:
            stored = {s: reader.shapes[f"{linear}.{s}"] for s in suffixes if f"{linear}.{s}" in reader}
            layouts = ct.window_layouts(scheme, stored, window.full, window.rows, window.cols, linear)
            parts = {f"{linear}.{s}": layout for s, layout in layouts.items()}
        tensors = {name.rpartition(".")[2]: t for name, t in reader.read(names, parts).items()}
        if window is not None:
            tensors = ct.narrowed(tensors, scheme, window.full, window.rows, window.cols, linear)
        if scheme.fp8:
            return fp8.dequantize_rows(tensors["weight"], tensors["weight_scale"], linear)
        return ct.decompress(tensors, scheme, linear)

    def _experts(self, model, site, reader, loaded, dtype, device):
        module = model.get_submodule(site.name)
        experts, dim, two_hidden = module.gate_up.shape
        first, windows = _expert_windows(reader, site, (experts, dim, two_hidden // 2))
        if not any(f"{site.expert_linears(first)[0]}.{s}" in reader for s in ("weight", "weight_scale")):
            loaded.add(site.kind, None)
            return  # fused float experts: load_weights reads them
        held = range(first, first + experts)
        reader.claimed.update(f"{name}." for e in range(model.config.text.num_experts) if e not in held
                              for name in site.expert_linears(e))  # the other ranks' experts
        linears = [name for e in held for name in site.expert_linears(e)]
        schemes = {self.config.scheme_for(n) if f"{n}.weight_scale" in reader else None for n in linears}
        if len(schemes) != 1:
            raise ValueError("its experts' linears are not all stored in one format")
        scheme = schemes.pop()
        if scheme is None:
            _install_float_experts(module, site, reader, dtype, device, first, windows)
            loaded.add(site.kind, None)
            return
        per_expert = []
        for e in held:
            linears = []
            for name, param, window in zip(site.expert_linears(e), ("gate_up", "gate_up", "down"), windows):
                weight = self._read(reader, name, scheme, window)
                if isinstance(weight, QuantizedTensor):
                    linears.append(weight)
                else:
                    amax = reader.row_max(f"{site.name}.{param}", window, lambda w=weight: w.abs().amax(1))
                    linears.append(_codes(weight, amax))
            per_expert.append(linears)
        _install_experts(model, site, per_expert, (experts, dim, two_hidden // 2), loaded, dtype, device, first)


def _stored_shape(reader: _Reader, linear: str) -> tuple[int, int]:
    """A stored linear's weight shape (out, in): its ``weight``'s, or a packed one's ``weight_shape`` (2 numbers)."""
    if f"{linear}.weight" in reader:
        return reader.shapes[f"{linear}.weight"]
    shape = reader.read([f"{linear}.weight_shape"])[f"{linear}.weight_shape"].tolist()
    if len(shape) != 2:
        raise CheckpointError(f"{reader.path}: {linear}.weight_shape: expected (out, in), got {shape}")
    return tuple(shape)


class _FbgemmLoader:
    def load(self, model, site, reader, loaded, dtype, device):
        multimodal = model.config.multimodal
        if site.experts:
            names = [to_hf_name(f"{site.name}.{p}", multimodal) for p in ("gate_up", "down")]
            if not any(n + fp8.SCALE_SUFFIX in reader for n in names):
                loaded.add(site.kind, None)
                return
            parts = {}
            for name, param in zip(names, ("gate_up", "down")):
                layout = reader.layout(f"{site.name}.{param}")
                if layout is not None and name + fp8.SCALE_SUFFIX in reader:
                    parts[name] = layout  # fbgemm keeps our [E, in, out]
                    parts[name + fp8.SCALE_SUFFIX] = _column_scale_part(layout, reader.shapes[name + fp8.SCALE_SUFFIX])
            tensors = reader.read([n for name in names for n in (name, name + fp8.SCALE_SUFFIX)], parts)
            module = model.get_submodule(site.name)
            experts, dim, two_hidden = module.gate_up.shape
            _, windows = _expert_windows(reader, site, (experts, dim, two_hidden // 2))
            converted = []
            for name, param, window in zip(names, ("gate_up", "down"), windows[1:]):
                weight, scale = tensors[name], tensors[name + fp8.SCALE_SUFFIX]
                row_max = reader.row_max(f"{site.name}.{param}", window, lambda: fp8.fused_row_max(weight, scale, name))
                converted.append(fp8.fused_experts_to_int8(weight, scale, name, row_max))
            gate_up, down = converted
            _check_shape(gate_up, (experts, two_hidden, dim), names[0])
            _check_shape(down, (experts, dim, two_hidden // 2), names[1])
            _swap(model, site.name, QuantizedExperts.from_tensors(_to(gate_up, device), _to(down, device), dtype))
            loaded.add(site.kind, gate_up)
            return
        weight = f"{site.hf}.weight"
        if weight + fp8.SCALE_SUFFIX not in reader:
            loaded.add(site.kind, None)
            return
        parts = None
        layout = reader.layout(f"{site.name}.weight")
        if layout is not None:
            scale = reader.shapes[weight + fp8.SCALE_SUFFIX]
            parts = {weight: layout, weight + fp8.SCALE_SUFFIX: whole(scale) if math.prod(scale) == 1
                     else (layout[0], *whole(scale[1:]))}
        tensors = reader.read([weight, weight + fp8.SCALE_SUFFIX], parts)
        values = fp8.dequantize_rows(tensors[weight], tensors[weight + fp8.SCALE_SUFFIX], weight)
        window = None if layout is None else _Window.of(layout, reader.shapes[weight])
        _install_linear(model, site, values, loaded, dtype, device, _fp8_row_max(reader, site, values, window))


def _fp8_row_max(reader: _Reader, site: Site, weight: QuantizedTensor | torch.Tensor,
                 window: _Window | None) -> torch.Tensor | None:
    """The whole rows' largest magnitudes of a linear's FP8 values (float32 ``weight``) held in part; else None."""
    if isinstance(weight, QuantizedTensor) or site.kind is None:
        return None
    return reader.row_max(f"{site.name}.weight", window, lambda: weight.abs().amax(1))


def _column_scale_part(layout: Layout, scale: tuple[int, ...]) -> Layout:
    """The part of fbgemm's fused experts' scale (one per expert and output column: [E, 1, out] or [E, out, 1])
    that goes with the part ``layout`` of the weight [E, in, out]."""
    columns = layout[2]
    if len(scale) != 3:
        raise ValueError(f"fused experts' scale {list(scale)}: expected [E, 1, out] or [E, out, 1]")
    if scale[1] == 1 and scale[2] != 1:
        return layout[0], ((0, 1),), columns
    if scale[2] == 1:
        return layout[0], columns, ((0, 1),)
    raise ValueError(f"fused experts' scale {list(scale)}: expected [E, 1, out] or [E, out, 1]")


def _install_linear(model: nn.Module, site: Site, weight: QuantizedTensor | torch.Tensor, loaded: _Loaded,
                    dtype: torch.dtype, device: torch.device | str, row_max: torch.Tensor | None = None) -> None:
    """A quantized linear's weight (codes, or FP8 values in float32, converted with ``row_max`` as in _codes) into
    the model: our QuantizedLinear where a recipe kind lives, else (router, vision) its float values into the
    float module."""
    module = model.get_submodule(site.name)
    _check_shape(weight, tuple(module.weight.shape), site.hf)
    if site.kind is None:
        values = dequantize(weight, torch.float32) if isinstance(weight, QuantizedTensor) else weight
        module._parameters["weight"] = nn.Parameter(values.to(device=device, dtype=dtype), requires_grad=False)
        return
    if module.bias is not None:
        raise ValueError("quantized linears with a bias are not supported")
    tensor = _codes(weight, row_max)
    _swap(model, site.name, QuantizedLinear.from_tensor(_to(tensor, device), None, dtype))
    loaded.add(site.kind, tensor)


def _install_experts(model: nn.Module, site: Site, per_expert: list[list[QuantizedTensor]], shape: tuple[int, ...],
                     loaded: _Loaded, dtype: torch.dtype, device: torch.device | str, first: int = 0) -> None:
    """Expert first + e's gate, up and down (``per_expert[e]``) stacked as QuantizedExperts' gate_up [E, 2I, D] and
    down."""
    experts, dim, hidden = shape
    for e, (gate, up, down) in enumerate(per_expert):
        for tensor, want, name in zip((gate, up, down), ((hidden, dim), (hidden, dim), (dim, hidden)),
                                      site.expert_linears(first + e)):
            _check_shape(tensor, want, name)
    formats = {t.format for linears in per_expert for t in linears}
    if len(formats) != 1:
        raise ValueError(f"its experts' linears are in more than one format: {sorted(map(str, formats))}")
    gate_up = _stack([_cat_rows(gate, up) for gate, up, _ in per_expert], device)
    down = _stack([linears[2] for linears in per_expert], device)
    _swap(model, site.name, QuantizedExperts.from_tensors(gate_up, down, dtype))
    loaded.add(site.kind, gate_up)


def _install_float_experts(module: Experts, site: Site, reader: _Reader, dtype: torch.dtype,
                           device: torch.device | str, first: int = 0,
                           windows: list[_Window | None] | None = None) -> None:
    """Per-expert float linears (experts first, first + 1, ...) fused into the Experts' gate_up [E, D, 2I] and down
    [E, I, D], expert by expert; each linear's ``windows`` part only, where given."""
    experts, dim, two_hidden = module.gate_up.shape
    hidden = two_hidden // 2
    gate_up = torch.empty((experts, dim, two_hidden), dtype=dtype, device=device)
    down = torch.empty((experts, hidden, dim), dtype=dtype, device=device)
    for e in range(experts):
        names = [f"{n}.weight" for n in site.expert_linears(first + e)]
        parts = {name: window.layout for name, window in zip(names, windows or ()) if window is not None}
        tensors = reader.read(names, parts)
        for name, want in zip(names, ((hidden, dim), (hidden, dim), (dim, hidden))):
            got = tensors[name]
            if not got.is_floating_point() or tuple(got.shape) != want:
                raise ValueError(f"{name}: expected float {list(want)}, got {got.dtype} {list(got.shape)}")
        gate_up[e, :, :hidden] = tensors[names[0]].t()
        gate_up[e, :, hidden:] = tensors[names[1]].t()
        down[e] = tensors[names[2]].t()
    module._parameters["gate_up"] = nn.Parameter(gate_up, requires_grad=False)
    module._parameters["down"] = nn.Parameter(down, requires_grad=False)


def _codes(weight: QuantizedTensor | torch.Tensor, row_max: torch.Tensor | None = None) -> QuantizedTensor:
    """Codes as they are; FP8 values (float32) as int8 per channel with float32 scales (see fp8.py), scaled by
    ``row_max`` (the whole rows' largest magnitudes) where given."""
    return weight if isinstance(weight, QuantizedTensor) else quantize(weight, fp8.INT8, torch.float32, row_max)


def _check_shape(tensor: QuantizedTensor | torch.Tensor, want: tuple[int, ...], name: str) -> None:
    if tuple(tensor.shape) != tuple(want):
        raise ValueError(f"{name}: checkpoint weight {list(tensor.shape)}, model {list(want)}")


def _cat_rows(a: QuantizedTensor, b: QuantizedTensor) -> QuantizedTensor:
    zero = None if a.zero is None else torch.cat((a.zero, b.zero))
    return QuantizedTensor(a.format, torch.cat((a.codes, b.codes)), torch.cat((a.scale, b.scale.to(a.scale.dtype))),
                           zero)


def _stack(tensors: list[QuantizedTensor], device: torch.device | str) -> QuantizedTensor:
    first = tensors[0]
    zero = None if first.zero is None else torch.stack([t.zero for t in tensors]).to(device)
    return QuantizedTensor(first.format, torch.stack([t.codes for t in tensors]).to(device),
                           torch.stack([t.scale.to(first.scale.dtype) for t in tensors]).to(device), zero)


def _to(tensor: QuantizedTensor, device: torch.device | str) -> QuantizedTensor:
    return QuantizedTensor(tensor.format, tensor.codes.to(device), tensor.scale.to(device),
                           None if tensor.zero is None else tensor.zero.to(device))


def _swap(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, replacement)
