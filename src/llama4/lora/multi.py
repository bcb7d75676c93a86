"""Many LoRA adapters in one model at once, each row of a batch on its own adapter (or none): what a server
needs to serve several fine-tunes of one base without merging any of them.

* :class:`MultiLora` owns the adapters of one model: ``max_loras`` slots (slot 0 is "no adapter"), each
  holding one PEFT adapter (:func:`read_adapter`: the files ``save_adapter`` or peft write), loaded and
  unloaded at run time. It swaps a wrapper in for each module an adapter targets, the first time one does
  (the base model is otherwise untouched; wrappers stay when their adapters go, holding nothing).
* :class:`AdapterRows` is the one small object the wrappers share (not a global): before each forward the
  caller sets the adapter slot of every token row (``with rows.using(slots): model(...)``), in the order
  the model flattens its input (``[B, T]`` -> ``b * T + t``: a prefill piece's tokens, a decode step's rows).
* :class:`MultiLoraLinear` (attention projections, shared expert, dense MLP, router) adds
  ``scaling_s * B_s A_s x`` to each row on slot s; :class:`MultiLoraExperts` (routed experts) does the same
  inside each expert's SwiGLU, the token's slot following it through routing.

The wrappers never see whole batches only: with batch invariance every caller runs a linear in 16-row
tiles (``model.invariance.row_tiled``, the last one zero-padded), so a wrapper may be called several times
per forward. Each wrapper therefore walks the rows with a cursor of its own (:meth:`AdapterRows.claim`):
its calls see the rows in order, a padded tail row is on slot 0. The routed experts are the exception
(rows sorted by expert): their wrapper takes the whole token batch at ``with_shared`` and sorts the slots
with the tokens.

Arithmetic: the updates are computed per slot on exactly that slot's rows, through contiguous views of the
stacked per-slot buffers shaped as the adapter's own A and B, with the same operations as LoraLinear /
LoraExperts (in fixed row tiles with batch invariance). So a row on adapter s computes what the same row
computes on the model with only adapter s applied (``load_adapter``), and with batch invariance a row's
result does not depend on the adapters of the rows beside it (tests/lora/test_multi.py).

Not for packed models (the CPU kernels' packed weights and fused decode take no adapters): serve the plain
model (``llama4.load_model(..., pack=False)``). The vision projector is not a target here (its rows are
image features, not tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from llama4.checkpoint.mapping import from_hf_name
from llama4.lora.modules import EXPERT_TENSORS
from llama4.lora.peft_format import (
    WEIGHTS_FILE,
    from_peft_tensor,
    peft_module_path,
    read_adapter_config,
    targeted_expert_tensors,
)
from llama4.lora.transform import LoraConfig, candidates, lora_modules
from llama4.model.invariance import ROW_TILE, is_batch_invariant, row_tiled
from llama4.model.moe import Experts, sort_by_expert
from llama4.model.transformer import Llama4Model
from llama4.quant.modules import QuantizedExperts, QuantizedLinear


class AdapterError(ValueError):
    """An adapter that cannot be loaded or unloaded (bad files, rank or targets this model or its limits do not
    take, a name already taken, no free slot)."""


class UnknownAdapter(AdapterError, LookupError):
    def __init__(self, name: str, loaded: Sequence[str]):
        super().__init__(f"no adapter named {name!r} is loaded"
                         + (f" (loaded: {', '.join(map(repr, loaded))})" if loaded else " (none is loaded)"))
        self.name = name


class AdapterRows:
    """The adapter slot of each token row of the forward under way, shared by every wrapper of one model.

    Set it around a forward with :meth:`using`. Each wrapper claims the rows its calls see, in order, with a
    cursor of its own (a forward may call one linear once per 16-row tile)."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # [N] int64 on the CPU
        self.active = False  # some row is on an adapter (otherwise the wrappers run their base alone)
        self.generation = 0  # one per forward: a wrapper whose cursor is from an earlier one starts at row 0

    @contextmanager
    def using(self, slots: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Rows on ``slots`` (one per token, in the model's flattening order) for the forward in the block."""
        slots = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
        self.slots, self.active = slots, bool((slots != 0).any())
        self.generation += 1
        try:
            yield
        finally:
            self.slots, self.active = None, False

    def claim(self, owner: _Cursor, count: int) -> torch.Tensor:
        """The slots of the next ``count`` rows ``owner`` sees (rows past the batch: a padded tile, slot 0)."""
        if owner.generation != self.generation:
            owner.generation, owner.at = self.generation, 0
        total = self.slots.numel()
        if owner.at >= total:
            raise RuntimeError(f"a LoRA wrapper saw more rows than the {total} token rows set for this forward: "
                               "the slots must be set per forward, one per token")
        real = min(count, total - owner.at)
        part = self.slots[owner.at:owner.at + real]
        owner.at += real
        return part if real == count else torch.cat((part, part.new_zeros(count - real)))


@dataclass
class _Cursor:
    generation: int = -1
    at: int = 0


def _slot_rows(slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, row indices) for every adapter slot (not 0) among ``slots``."""
    return [(s, (slots == s).nonzero().squeeze(1)) for s in torch.unique(slots).tolist() if s != 0]


class MultiLoraLinear(nn.Module):
    """A linear (nn.Linear, the MoE Router, or a QuantizedLinear) plus each row's own adapter: rows on slot s
    get ``scaling_s * B_s(A_s(x))``, as LoraLinear computes it; rows on slot 0 the base alone.

    A and B of every slot live in two stacked buffers of ``max_rank`` (one row per slot); slot s's adapter,
    of rank r <= max_rank, is a contiguous [r, in] / [out, r] view of its row."""

    def __init__(self, base: nn.Module, rows: AdapterRows, slots: int, max_rank: int, dtype: torch.dtype):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise TypeError(f"MultiLoraLinear wraps nn.Linear or QuantizedLinear, got {type(base).__name__}")
        self.base, self.rows, self.cursor = base, rows, _Cursor()
        self.batch_invariant = getattr(base, "batch_invariant", False)
        device = base.weight.device if isinstance(base, nn.Linear) else base.qweight.codes.device
        self.register_buffer("lora_A", torch.zeros(slots, max_rank * base.in_features, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots, base.out_features * max_rank, device=device, dtype=dtype),
                             persistent=False)
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # slot -> (A, B, scaling)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        rank = a.shape[0]
        a_view = self.lora_A[slot, :rank * self.in_features].view(rank, self.in_features)
        b_view = self.lora_B[slot, :self.out_features * rank].view(self.out_features, rank)
        a_view.copy_(a)
        b_view.copy_(b)
        self.adapters[slot] = (a_view, b_view, scaling)

    def clear_slot(self, slot: int) -> None:
        if self.adapters.pop(slot, None) is not None:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.rows.active:
            return out
        slots = self.rows.claim(self.cursor, x.shape[:-1].numel())
        chosen = [(s, rows) for s, rows in _slot_rows(slots) if s in self.adapters]
        if not chosen:
            return out
        shape = out.shape
        flat_x, out = x.reshape(-1, x.shape[-1]), out.reshape(-1, shape[-1])
        for s, rows in chosen:
            a, b, scaling = self.adapters[s]
            update = row_tiled(lambda r: scaling * F.linear(F.linear(r.to(a.dtype), a), b), flat_x[rows],
                               self.batch_invariant)
            out[rows] = out[rows] + update.to(out.dtype)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return f"adapters in slots {sorted(self.adapters)}"


class MultiLoraExperts(nn.Module):
    """Routed experts (Experts or QuantizedExperts) plus each token's own adapter (LoraExperts' layout: expert
    e's gate_up update is ``scaling_s * (x @ A_s[e]) @ B_s[e]``, A [E, D, r], B [E, r, 2I]; down likewise).

    The MoE calls :meth:`with_shared` with every token of the forward, in order: the tokens' slots are claimed
    there and sorted with them by expert. ``expert`` / ``grouped`` (which see rows without their tokens) run
    the base alone and refuse while a row is on an adapter."""

    groups_in_one_call = False

    def __init__(self, base: nn.Module, rows: AdapterRows, slots: int, max_rank: int, dtype: torch.dtype):
        super().__init__()
        if not isinstance(base, (Experts, QuantizedExperts)):
            raise TypeError(f"MultiLoraExperts wraps Experts or QuantizedExperts, got {type(base).__name__}")
        self.base, self.rows, self.cursor = base, rows, _Cursor()
        self.batch_invariant = base.batch_invariant
        if isinstance(base, Experts):
            experts, dim, two_hidden = base.gate_up.shape
            device = base.gate_up.device
        else:
            experts, two_hidden, dim = base.gate_up.tensor.shape
            device = base.gate_up.codes.device
        self.shapes = {"gate_up": (dim, two_hidden), "down": (two_hidden // 2, dim)}  # (in, out) of x @ W
        for name, (fan_in, fan_out) in self.shapes.items():
            self.register_buffer(f"{name}_A", torch.zeros(slots, experts * fan_in * max_rank, device=device,
                                                          dtype=dtype), persistent=False)
            self.register_buffer(f"{name}_B", torch.zeros(slots, experts * max_rank * fan_out, device=device,
                                                          dtype=dtype), persistent=False)
        # slot -> {tensor: (A [E, in, r], B [E, r, out])} and its scaling
        self.adapters: dict[int, tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]] = {}

    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    def set_slot(self, slot: int, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        views = {}
        for name, (a, b) in pairs.items():
            experts, fan_in, rank = a.shape
            fan_out = b.shape[-1]
            a_view = getattr(self, f"{name}_A")[slot, :experts * fan_in * rank].view(experts, fan_in, rank)
            b_view = getattr(self, f"{name}_B")[slot, :experts * rank * fan_out].view(experts, rank, fan_out)
            a_view.copy_(a)
            b_view.copy_(b)
            views[name] = (a_view, b_view)
        self.adapters[slot] = (views, scaling)

    def clear_slot(self, slot: int) -> None:
        if self.adapters.pop(slot, None) is not None:
            for name in EXPERT_TENSORS:
                getattr(self, f"{name}_A")[slot].zero_()
                getattr(self, f"{name}_B")[slot].zero_()

    def _refuse_rows(self) -> None:
        if self.rows.active:
            raise RuntimeError("MultiLoraExperts needs each token's adapter: the MoE calls with_shared with the "
                               "tokens in order; expert() and grouped() see rows without their tokens")

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        self._refuse_rows()
        return self.base.expert(e, x)

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        self._refuse_rows()
        return self.base.grouped(x, counts)

    def with_shared(self, shared: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                    scores: torch.Tensor) -> torch.Tensor:
        """The MoE output for x [N, D]: as the base computes it, every token's chosen experts with its adapter."""
        if not self.rows.active:
            return self.base.with_shared(shared, x, expert_ids, scores)
        slots = self.rows.claim(self.cursor, x.shape[0])
        if not any(s in self.adapters for s, _ in _slot_rows(slots)):
            return self.base.with_shared(shared, x, expert_ids, scores)
        out = shared(x)
        out += self._routed(x, expert_ids, scores, slots)
        return out

    def _routed(self, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        """moe.sparse_experts with each assignment's slot sorted along with its token."""
        n, k = expert_ids.shape
        if n == 0:
            return torch.zeros_like(x)
        token_of, scaled, counts = sort_by_expert(x, expert_ids, scores, self.num_experts)
        slot_of = slots[token_of]
        routed = torch.empty_like(scaled)
        offset = 0
        for e, count in enumerate(counts):
            if count:
                block = slice(offset, offset + count)
                routed[block] = _tiled_with_slots(lambda rows, s: self._swiglu(e, rows, s), scaled[block],
                                                  slot_of[block], self.batch_invariant)
                offset += count
        if k == 1:
            return torch.empty_like(x).index_copy_(0, token_of, routed)
        return torch.zeros_like(x).index_add_(0, token_of, routed)

    def _swiglu(self, e: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, Experts):
            gate_up, down = self.base.gate_up[e], self.base.down[e]
        else:
            gate_up, down = (w.t() for w in self.base.dequantized_weights(e, x.dtype))
        gate, up = self._product("gate_up", e, x, slots, gate_up).chunk(2, dim=-1)
        return self._product("down", e, F.silu(gate) * up, slots, down)

    def _product(self, name: str, e: int, x: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = x @ weight
        for s, rows in _slot_rows(slots):
            views, scaling = self.adapters.get(s, ({}, 0.0))
            if name not in views:
                continue
            a, b = views[name]
            update = row_tiled(lambda r: (r.to(a.dtype) @ a[e]) @ b[e], x[rows], self.batch_invariant)
            out[rows] = out[rows] + (scaling * update).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"adapters in slots {sorted(self.adapters)}"


def _tiled_with_slots(fn, x: torch.Tensor, slots: torch.Tensor, invariant: bool) -> torch.Tensor:
    """``fn(rows, their slots)`` as row_tiled runs a row-wise product: in tiles of exactly ROW_TILE rows with
    ``invariant`` on the CPU (the last zero-padded, its padding on slot 0), else over all rows at once."""
    rows = x.shape[0]
    if not invariant or not x.is_cpu or rows in (0, ROW_TILE):
        return fn(x, slots)
    out = []
    for at in range(0, rows, ROW_TILE):
        part, part_slots = x[at:at + ROW_TILE], slots[at:at + ROW_TILE]
        real = part.shape[0]
        if real < ROW_TILE:
            part = torch.cat((part, part.new_zeros(ROW_TILE - real, x.shape[1])))
            part_slots = torch.cat((part_slots, part_slots.new_zeros(ROW_TILE - real)))
        out.append(fn(part, part_slots)[:real])
    return torch.cat(out) if len(out) > 1 else out[0]


@dataclass
class AdapterFiles:
    """A PEFT adapter read and checked against a model (:func:`read_adapter`), not yet in any slot: its rank,
    scaling, and tensors in our layout by module name (linears: (A [r, in], B [out, r]); experts:
    {gate_up|down: (A [E, in, r], B [E, r, out])})."""

    path: str
    rank: int
    scaling: float
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return sorted([*self.linears, *(f"{m}.{t}" for m, pairs in self.experts.items() for t in pairs)])


def read_adapter(model: Llama4Model, path: str, max_rank: int | None = None) -> AdapterFiles:
    """Read the PEFT LoRA adapter at ``path`` (as :func:`~llama4.lora.load_adapter` reads it) and check it
    against ``model`` without changing the model: every tensor must name a module this model has, with the
    adapter's rank (at most ``max_rank``) and the module's widths. Raises AdapterError naming what is wrong."""
    if not isinstance(model, Llama4Model):
        raise TypeError(f"adapters are read for a whole Llama4Model, got {type(model).__name__}")
    multimodal = model.config.multimodal
    try:
        document = read_adapter_config(path)
        stored = load_file(str(Path(path) / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as e:  # (FileNotFoundError is an OSError)
        raise AdapterError(f"cannot read the adapter at {path}: {e}") from None
    try:
        rank = int(document["r"])
        config = LoraConfig(rank=rank, alpha=float(document.get("lora_alpha", 8)),
                            rslora=bool(document.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: adapter_config.json has no usable r / lora_alpha: {e}") from None
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"{path}: the adapter's rank {rank} exceeds the largest rank this server takes, "
                           f"{max_rank} (--max-lora-rank)")
    found = {c.name: c for c in candidates(model)}
    files = AdapterFiles(str(path), rank, config.scaling)
    linears: dict[str, dict[str, torch.Tensor]] = {}
    experts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    num_experts = model.config.text.num_experts
    for key, tensor in stored.items():
        try:
            module_path = peft_module_path(key)
        except ValueError as e:
            raise AdapterError(f"{path}: {e}") from None
        peft_side = "A" if key.endswith(".lora_A.weight") else "B"
        plain = module_path.replace(".base_layer", "")
        ours = from_hf_name(f"{plain}.weight", multimodal)
        if ours is not None and ours.endswith(".weight"):
            name = ours.removesuffix(".weight")
            if name == "projector":
                raise AdapterError(f"{path}: {key}: the vision projector is not served with adapters (only the text "
                                   "decoder's linears and experts)")
            if name not in found:
                raise AdapterError(f"{path}: {key}: this model has no module {name}")
            linears.setdefault(name, {})[peft_side] = tensor
            continue
        tensors = targeted_expert_tensors(plain, document.get("target_parameters") or (), multimodal)
        if not tensors:
            raise AdapterError(f"{path}: {key}: no module of this model takes it (supported: attention, shared "
                               f"expert and dense MLP linears, and the experts' gate_up_proj / down_proj)")
        nesting = module_path.count(".base_layer")
        index = len(tensors) - 1 - nesting  # peft nests one wrapper per targeted parameter (peft_format.py)
        if not 0 <= index < len(tensors):
            raise AdapterError(f"{path}: {key}: nested deeper than the adapter's target_parameters allow")
        tensor_name = tensors[index]
        name = from_hf_name(f"{plain}.gate_up_proj", multimodal).rpartition(".")[0]
        ours_side = "B" if peft_side == "A" else "A"  # an expert's A (input side) is what peft calls lora_B
        local = f"{tensor_name}_{ours_side}"
        try:
            converted = from_peft_tensor(local, tensor, num_experts)
        except RuntimeError as e:
            raise AdapterError(f"{path}: {key}: shape {tuple(tensor.shape)} does not fit {num_experts} experts: "
                               f"{e}") from None
        experts.setdefault(name, {}).setdefault(tensor_name, {})[ours_side] = converted
    if not linears and not experts:
        raise AdapterError(f"{path}: the adapter holds no tensors")
    for name, sides in linears.items():
        base = getattr(found[name].parent, found[name].attribute)
        base = getattr(base, "base", base)
        expected = {"A": (rank, base.in_features), "B": (base.out_features, rank)}
        files.linears[name] = _pair(path, name, sides, expected)
    for name, per_tensor in experts.items():
        candidate = found[f"{name}.gate_up"]
        base = getattr(candidate.parent, candidate.attribute)
        base = getattr(base, "base", base)
        if isinstance(base, Experts):
            _, dim, two_hidden = base.gate_up.shape
        else:
            _, two_hidden, dim = base.gate_up.tensor.shape
        fan = {"gate_up": (dim, two_hidden), "down": (two_hidden // 2, dim)}
        files.experts[name] = {
            t: _pair(path, f"{name}.{t}", sides, {"A": (num_experts, fan[t][0], rank), "B": (num_experts, rank,
                                                                                             fan[t][1])})
            for t, sides in per_tensor.items()}
    return files


def _pair(path: str, name: str, sides: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [s for s in "AB" if s not in sides]
    if missing:
        raise AdapterError(f"{path}: {name} has no lora_{missing[0]} tensor")
    for side in "AB":
        if tuple(sides[side].shape) != expected[side]:
            raise AdapterError(f"{path}: {name}: lora {side} has shape {tuple(sides[side].shape)}, but the adapter's "
                               f"rank and this model's module need {expected[side]} (a rank or target mismatch: an "
                               "adapter for another model?)")
    return sides["A"], sides["B"]


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter in a slot. ``uid`` is unique for the model's lifetime (a name loaded again gets a new one),
    so that state kept per adapter (the prefix cache) is never shared with a later adapter of the same name."""

    name: str
    path: str
    slot: int
    uid: int
    rank: int
    targets: tuple[str, ...]


class MultiLora:
    """The adapters of one plain model (see the module docstring): up to ``max_loras`` at once, each of rank at
    most ``max_rank``, stored in ``dtype`` (default: the model's). Not thread-safe: :meth:`install` and
    :meth:`unload` change the model, so the caller runs them between forwards (the engine does, under its
    step lock); :meth:`read` only reads files."""

    def __init__(self, model: Llama4Model, max_loras: int, max_rank: int, dtype: torch.dtype | None = None):
        if not isinstance(model, Llama4Model):
            raise TypeError(f"MultiLora takes a Llama4Model, got {type(model).__name__}")
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_rank must be >= 1, got {max_loras} and {max_rank}")
        if getattr(model, "kernel_options", None) is not None or model.text.fast_decode is not None:
            raise ValueError("the model's weights are packed for the CPU kernels, which take no adapters: serve "
                             "adapters on a plain model (llama4.load_model(..., pack=False))")
        if lora_modules(model):
            raise ValueError("the model already has LoRA adapters applied: serve its base (or merge_and_unload it)")
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.dtype = dtype or model.text.embed.weight.dtype
        self.rows = AdapterRows()
        self._candidates = {c.name: c for c in candidates(model)}
        self._loaded: dict[str, LoadedAdapter] = {}
        self._wrappers: dict[str, MultiLoraLinear | MultiLoraExperts] = {}
        self._next_uid = 1

    @property
    def loaded(self) -> dict[str, LoadedAdapter]:
        return dict(self._loaded)

    def get(self, name: str) -> LoadedAdapter:
        adapter = self._loaded.get(name)
        if adapter is None:
            raise UnknownAdapter(name, list(self._loaded))
        return adapter

    def read(self, path: str) -> AdapterFiles:
        return read_adapter(self.model, path, self.max_rank)

    def install(self, name: str, files: AdapterFiles) -> LoadedAdapter:
        """Put a read adapter in a free slot under ``name``."""
        if not name or not isinstance(name, str):
            raise AdapterError(f"an adapter needs a non-empty name, got {name!r}")
        if name in self._loaded:
            raise AdapterError(f"an adapter named {name!r} is already loaded (from {self._loaded[name].path}): "
                               "unload it first")
        taken = {a.slot for a in self._loaded.values()}
        free = [s for s in range(1, self.max_loras + 1) if s not in taken]
        if not free:
            raise AdapterError(f"all {self.max_loras} adapter slots are taken (--max-loras): unload one first")
        slot = free[0]
        with torch.no_grad():
            for module, (a, b) in files.linears.items():
                self._wrapper(module).set_slot(slot, a, b, files.scaling)
            for module, pairs in files.experts.items():
                self._wrapper(module).set_slot(slot, pairs, files.scaling)
        adapter = LoadedAdapter(name, files.path, slot, self._next_uid, files.rank, tuple(files.targets))
        self._next_uid += 1
        self._loaded[name] = adapter
        return adapter

    def load(self, name: str, path: str) -> LoadedAdapter:
        return self.install(name, self.read(path))

    def unload(self, name: str) -> LoadedAdapter:
        adapter = self.get(name)
        with torch.no_grad():
            for wrapper in self._wrappers.values():
                wrapper.clear_slot(adapter.slot)
        del self._loaded[name]
        return adapter

    def _wrapper(self, module: str) -> MultiLoraLinear | MultiLoraExperts:
        """The wrapper of module ``module`` (our name; experts: ``...ffn.experts``), swapped in on first use."""
        wrapper = self._wrappers.get(module)
        if wrapper is not None:
            return wrapper
        candidate = self._candidates.get(module) or self._candidates[f"{module}.gate_up"]
        base = getattr(candidate.parent, candidate.attribute)
        slots = self.max_loras + 1
        if candidate.tensor is None:
            wrapper = MultiLoraLinear(base, self.rows, slots, self.max_rank, self.dtype)
        else:
            wrapper = MultiLoraExperts(base, self.rows, slots, self.max_rank, self.dtype)
        # a wrapper swapped in after model.set_batch_invariant computes as the model was set to
        wrapper.batch_invariant = is_batch_invariant(self.model)
        setattr(candidate.parent, candidate.attribute, wrapper)
        self._wrappers[module] = wrapper
        return wrapper

