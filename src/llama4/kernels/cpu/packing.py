"""CPU weight packing: linear and expert weights in oneDNN's blocked layout, applied by module swap.

On CPUs, ``F.linear`` on plain row-major weights runs decode and prefill products at about half the rate
the same weights reach once reordered into oneDNN's blocked layout (bench/forward.py, bench/generate.py),
with identical bf16 results. Products of up to 16 rows (decode) run on the C kernel (library.py), which reads the
same packed buffers (or, on CPUs where oneDNN packs bf16 differently or not at all, its own copy in that
layout). Packing replaces modules of a finished model (the model code is unchanged and stays the
reference); :func:`swap_out` restores plain weights, e.g. for saving. The routers keep their plain weight,
so that expert choice is computed exactly as the reference computes it, and add a packed copy whose
one-row products (decode) are the same bits.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.kernels.cpu import huge_pages
from llama4.kernels.cpu.library import (
    IN_BLOCK,
    MAX_ROWS,
    Kernel,
    bf16_descriptor,
    from_blocked,
    readable,
    to_blocked,
)
from llama4.kernels.cpu.quant_layout import KernelQuantized, kernel_reads
from llama4.model.invariance import ROW_TILE, row_tiled
from llama4.model.moe import Experts, Router, SwiGLU, each_expert_on_its_rows, shared_plus_routed, sort_by_expert
from llama4.model.transformer import QKVProjection
from llama4.quant.formats import QuantizedTensor, dequantize, stack
from llama4.quant.modules import QuantizedExperts, QuantizedLinear

Place = Callable[[torch.Tensor], torch.Tensor]  # where a module's packed tensors go (huge_pages.place)


@functools.cache
def _onednn_packs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), probe, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def packing_supported(dtype: torch.dtype, device: torch.device | str, kernel: Kernel | None) -> bool:
    """Whether weights of ``dtype`` can be packed here: by oneDNN, or (bf16) in the CPU kernel's own layout
    where oneDNN cannot pack bf16 (CPUs without AVX-512 BF16 or AMX) but a kernel runs."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    return _onednn_packs(dtype) or (dtype == torch.bfloat16 and kernel is not None)


class PackedWeight:
    """One [out, in] weight packed for CPU products, and where ``kernel`` (decode-sized products) reads it
    from (``address``: its WeightDescriptor), if it can.

    A quantized weight (a QuantizedTensor) is kept in the kernel's quantized layout (``quantized``), whose
    products of up to 16 rows run on the kernel; longer inputs (prefill) and inputs the kernel does not take
    multiply the weight dequantized for the call (bf16 products as a packed bf16 weight would run them).
    Without a kernel (or a weight it cannot read) the QuantizedTensor stays as it is (``reference``) and
    every product dequantizes it: llama4.quant's reference arithmetic.

    ``place``: where a module's weight (never a call's temporary) keeps its kernel-layout tensors, e.g.
    huge_pages.place (transparent huge pages); None leaves them where torch put them.

    Normally oneDNN's blocked layout (an opaque mkldnn tensor; AMX and AVX-512 BF16 CPUs pack bf16 in the
    layout the kernel reads). Where oneDNN cannot pack bf16 or packs it in another layout (AVX2, AVX-512
    without BF16) but a kernel runs, the weight is kept in the kernel's layout instead (``blocked``, a plain
    tensor) and every product runs on the kernel (longer inputs 16 rows per group). A weight neither can
    take (e.g. inputs not a multiple of 32 there) stays plain (``plain``).
    """

    __slots__ = ("tensor", "blocked", "plain", "shape", "address", "kernel", "descriptor", "quantized", "reference")

    def __init__(self, weight: torch.Tensor | QuantizedTensor, kernel: Kernel | None, place: Place | None = None):
        self.tensor = self.blocked = self.plain = self.address = self.kernel = self.descriptor = None
        self.quantized = self.reference = None
        if isinstance(weight, QuantizedTensor):
            self.shape = weight.shape
            if kernel is not None and kernel_reads(weight):
                self.quantized = KernelQuantized(weight, place)
                self.kernel = kernel
                self.address = self.quantized.address
            else:
                self.reference = weight
            return
        weight = weight.detach().contiguous()
        self.shape = weight.shape
        if _onednn_packs(weight.dtype):
            self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            if kernel is not None and readable(weight, self.tensor):
                self._on(kernel, torch.ops.mkldnn.data_ptr(self.tensor))
                return
        if weight.dtype == torch.bfloat16 and weight.shape[1] % IN_BLOCK == 0 and kernel is not None:
            blocked = to_blocked(weight)
            self.tensor, self.blocked = None, place(blocked) if place else blocked
            self._on(kernel, self.blocked.data_ptr())
        elif self.tensor is None:
            self.plain = weight

    def _on(self, kernel: Kernel, buffer: int) -> None:
        self.descriptor, self.kernel = bf16_descriptor(buffer), kernel
        self.address = ctypes.addressof(self.descriptor)

    @property
    def is_quantized(self) -> bool:
        return self.quantized is not None or self.reference is not None

    def to_quantized(self) -> QuantizedTensor:
        """The QuantizedTensor of a quantized weight (equal values)."""
        return self.reference if self.reference is not None else self.quantized.to_tensor()

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The plain [out, in] weight (a quantized one dequantized, in ``dtype``, default float32)."""
        if self.is_quantized:
            return dequantize(self.to_quantized(), dtype or torch.float32)
        if self.plain is not None:
            return self.plain
        if self.blocked is not None:
            return from_blocked(self.blocked, self.shape)
        return self.tensor.to_dense()


def _on_kernel(x: torch.Tensor, weight: PackedWeight | None) -> bool:
    """Up to one tile of bf16 rows (a decode step; with batch invariance, every product) and a weight the
    kernel reads: each row then gets its one-row product (on AMX, oneDNN's), whatever the row count."""
    return (weight is not None and weight.address is not None and x.dtype == torch.bfloat16
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1])


def _linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if bias is None and _on_kernel(x, weight):
        return weight.kernel.linear(x, weight.address, weight.shape)
    if weight.blocked is not None and x.dtype == torch.bfloat16 and x.numel():
        # the kernel's own layout (CPUs where oneDNN's bf16 GEMM is weak or absent): longer inputs on the kernel
        # too, 16 rows per group of one call
        return _kernel_in_groups(x, weight, bias)
    if weight.quantized is not None and x.dtype == torch.bfloat16 and x.numel() and not _onednn_packs(x.dtype):
        # where the bf16 products are the kernel's too (no oneDNN bf16 GEMM): longer inputs 16 rows per group,
        # each row as its decode step computes it
        return _kernel_in_groups(x, weight, bias)
    if weight.is_quantized:  # longer inputs (prefill), float32, or no kernel: the weight dequantized for the call
        dense = weight.to_dense(x.dtype)
        if weight.kernel is not None and x.dtype == torch.bfloat16:
            return _linear(x, PackedWeight(dense, weight.kernel), bias)
        return F.linear(x, dense, bias)
    if weight.tensor is None:  # plain (no kernel reads it)
        return F.linear(x, weight.to_dense(), bias)
    # the resolved overload: calling the op packet looks the overload up in Python on every call
    return torch.ops.mkldnn._linear_pointwise.default(x, weight.tensor, bias, "none", [], "")


def _kernel_in_groups(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Any number of rows on the kernel, 16 rows per group of one call."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    counts = [min(MAX_ROWS, n - start) for start in range(0, n, MAX_ROWS)]
    y = weight.kernel.linear_groups(rows, [weight.address] * len(counts), counts, weight.shape)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


# Batch invariance (model.invariance): like the model's own modules, the packed stand-ins for a composite
# (q/k/v, SwiGLU, experts) run decode-sized inputs in fixed row tiles themselves, while a bare linear
# (PackedLinear, like nn.Linear) is tiled by its caller (the model tiles wo and the output head).


class PackedLinear(nn.Module):
    """An nn.Linear whose weight lives in oneDNN's blocked layout (the bias, if any, stays plain).

    Built empty from a (possibly meta-device) linear; ``load_tensor`` fills it, so a checkpoint loader
    can pack each weight as it is read and never hold the plain and packed copies of the whole model.
    """

    def __init__(self, linear: nn.Linear | QuantizedLinear, kernel: Kernel | None, place: Place | None = None):
        super().__init__()
        self.kernel, self.place = kernel, place
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.has_bias = linear.bias is not None
        self.float_dtype = getattr(linear, "float_dtype", None)
        self.packed: PackedWeight | None = None
        self.bias = None

    def load_tensor(self, name: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        if name == "weight":
            self.packed = PackedWeight(tensor, self.kernel, place=self.place)
        elif name == "bias" and self.has_bias:
            self.bias = nn.Parameter(tensor.detach(), requires_grad=False)
        else:
            raise KeyError(f"PackedLinear has no tensor {name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.bias)

    def unpack(self) -> nn.Linear | QuantizedLinear:
        if self.packed.is_quantized:
            return QuantizedLinear.from_tensor(self.packed.to_quantized(), self.bias, self.float_dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.has_bias, device="meta")
        linear.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
        if self.has_bias:
            linear.bias = self.bias
        return linear


# oneDNN builds (and keeps) a kernel per distinct row count; experts see every count from 1 to the
# batch, so counts above ROW_BUCKET are rounded up to a multiple of it (zero rows, sliced off
# afterwards). With batch invariance on, every count runs in tiles of ROW_TILE rows
# instead (the same kernel whatever the count, so a token's expert output does not depend on how many
# others chose that expert).
ROW_BUCKET = ROW_TILE


class PackedExperts(nn.Module):
    """Experts with each expert's gate/up and down matrices packed ([out, in] before packing)."""

    def __init__(self, experts: Experts | QuantizedExperts, kernel: Kernel | None, place: Place | None = None):
        super().__init__()
        self.kernel, self.place = kernel, place
        self.batch_invariant = experts.batch_invariant
        self.num_experts = experts.num_experts
        self.float_dtype = getattr(experts, "float_dtype", None)
        self.gate_up: list[PackedWeight] = []  # [2I, D] per expert
        self.down: list[PackedWeight] = []  # [D, I] per expert
        # every expert's weights on the CPU kernel, which then runs all chosen experts of a decode batch in
        # one call per matrix (moe.sparse_experts then groups the rows for it)
        self.groups_in_one_call = False

    def load_tensor(self, name: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        """``gate_up`` [E, D, 2I] or ``down`` [E, I, D], in the checkpoint's x @ W layout; quantized, [E, 2I, D]
        or [E, D, I] (QuantizedExperts' [out, in] per expert)."""
        if name not in ("gate_up", "down"):
            raise KeyError(f"PackedExperts has no tensor {name!r}")
        quantized = isinstance(tensor, QuantizedTensor)
        setattr(self, name, [PackedWeight(tensor[e] if quantized else tensor[e].t(), self.kernel, place=self.place)
                             for e in range(self.num_experts)])
        weights = [*self.gate_up, *self.down]
        self.groups_in_one_call = len(weights) == 2 * self.num_experts and all(w.address is not None for w in weights)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.batch_invariant:
            return row_tiled(lambda tile: self._swiglu(e, tile), x, True)
        bucket = rows if rows <= ROW_BUCKET else -(-rows // ROW_BUCKET) * ROW_BUCKET
        if bucket != rows:
            x = F.pad(x, (0, 0, 0, bucket - rows))
        return self._swiglu(e, x)[:rows]

    def _swiglu(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = _linear(x, self.gate_up[e]).chunk(2, dim=-1)
        return _linear(F.silu(gate) * up, self.down[e])

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Experts.grouped: rows sorted by expert. Up to a tile of rows per expert, one kernel call per
        matrix for all chosen experts (each row as its own one-row product, as expert() computes it)."""
        if not (self.groups_in_one_call and x.dtype == torch.bfloat16 and max(counts) <= MAX_ROWS):
            return each_expert_on_its_rows(self, x, counts)
        chosen = [e for e, count in enumerate(counts) if count]
        return self._swiglu_groups(x, [counts[e] for e in chosen], [self.gate_up[e] for e in chosen],
                                   [self.down[e] for e in chosen])

    def _swiglu_groups(self, x: torch.Tensor, rows: list[int], gate_up: list[PackedWeight],
                       down: list[PackedWeight]) -> torch.Tensor:
        """SwiGLU of consecutive groups of rows, group g through gate_up[g] and down[g], on the kernel."""
        kernel = gate_up[0].kernel
        gate, up = kernel.linear_groups(x, [w.address for w in gate_up], rows, gate_up[0].shape).chunk(2, dim=-1)
        return kernel.linear_groups(F.silu(gate) * up, [w.address for w in down], rows, down[0].shape)

    def with_shared(self, shared: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                    scores: torch.Tensor) -> torch.Tensor:
        """Experts.with_shared. A top-1 decode batch (up to a tile of rows) with the shared expert on the
        kernel too and of the experts' width: the shared expert's rows and the chosen experts' rows go
        through one kernel call per matrix (each row as its own one-row product: the same bits)."""
        n = x.shape[0]
        fused = (isinstance(shared, PackedSwiGLU) and expert_ids.shape[1] == 1 and self.groups_in_one_call
                 and _on_kernel(x, shared.packed) and _on_kernel(x, shared.down.packed)
                 and shared.packed.shape == self.gate_up[0].shape)
        if not fused:
            return shared_plus_routed(self, shared, x, expert_ids, scores)
        token_of, scaled, counts = sort_by_expert(x, expert_ids, scores, self.num_experts)
        chosen = [e for e, count in enumerate(counts) if count]
        both = self._swiglu_groups(torch.cat((x, scaled)), [n] + [counts[e] for e in chosen],
                                   [shared.packed] + [self.gate_up[e] for e in chosen],
                                   [shared.down.packed] + [self.down[e] for e in chosen])
        out = both[:n]
        out += torch.empty_like(x).index_copy_(0, token_of, both[n:])
        return out

    def unpack(self) -> Experts | QuantizedExperts:
        first = self.gate_up[0]
        if first.is_quantized:
            return QuantizedExperts.from_tensors(stack([w.to_quantized() for w in self.gate_up]),
                                                 stack([w.to_quantized() for w in self.down]),
                                                 self.float_dtype, self.batch_invariant)
        experts = Experts(self.num_experts, first.shape[1], first.shape[0] // 2)
        experts.gate_up = nn.Parameter(torch.stack([w.to_dense().t() for w in self.gate_up]), requires_grad=False)
        experts.down = nn.Parameter(torch.stack([w.to_dense().t() for w in self.down]), requires_grad=False)
        experts.batch_invariant = self.batch_invariant
        return experts


class _FusedLinears(nn.Module):
    """Several bias-free linears of one input packed as one matrix (one wide product streams faster than
    several narrow ones at decode); outputs are views of its result."""

    def __init__(self, parts: dict[str, nn.Linear | QuantizedLinear], kernel: Kernel | None, batch_invariant: bool,
                 place: Place | None = None):
        super().__init__()
        self.kernel, self.batch_invariant, self.place = kernel, batch_invariant, place
        self.sizes = {name: linear.out_features for name, linear in parts.items()}
        self.in_features = next(iter(parts.values())).in_features
        self.float_dtype = getattr(next(iter(parts.values())), "float_dtype", None)
        self.pending: dict[str, torch.Tensor] = {}
        self.packed: PackedWeight | None = None

    def load_part(self, name: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        if name not in self.sizes:
            raise KeyError(f"no fused part {name!r}; parts: {list(self.sizes)}")
        self.pending[name] = tensor if isinstance(tensor, QuantizedTensor) else tensor.detach()
        if len(self.pending) == len(self.sizes):  # all parts read: pack them as one [sum(out), in] matrix
            self.packed = PackedWeight(_cat_rows([self.pending[n] for n in self.sizes]), self.kernel, place=self.place)
            self.pending = {}

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parts' outputs for x [..., in] (untiled: callers tile)."""
        return _linear(x, self.packed).split(list(self.sizes.values()), dim=-1)

    def unpacked_parts(self) -> dict[str, nn.Linear | QuantizedLinear]:
        if self.packed.is_quantized:
            tensor, parts, start = self.packed.to_quantized(), {}, 0
            for name, size in self.sizes.items():
                parts[name] = QuantizedLinear.from_tensor(_rows(tensor, start, start + size), None, self.float_dtype)
                start += size
            return parts
        weights = self.packed.to_dense().split(list(self.sizes.values()))
        parts = {}
        for (name, size), weight in zip(self.sizes.items(), weights):
            parts[name] = nn.Linear(self.in_features, size, bias=False, device="meta")
            parts[name].weight = nn.Parameter(weight.clone(), requires_grad=False)
        return parts


def _cat_rows(weights: list[torch.Tensor | QuantizedTensor]) -> torch.Tensor | QuantizedTensor:
    """[out_k, in] weights as one [sum(out_k), in]: plain tensors, or quantized ones of one format."""
    if not any(isinstance(w, QuantizedTensor) for w in weights):
        return torch.cat(weights)
    fmt = weights[0].format if isinstance(weights[0], QuantizedTensor) else None
    if not all(isinstance(w, QuantizedTensor) and w.format == fmt for w in weights):
        raise ValueError("linears packed as one matrix must all be float or all quantized in one format, got "
                         + ", ".join(str(getattr(w, "format", w.dtype)) for w in weights))
    zero = None if weights[0].zero is None else torch.cat([w.zero for w in weights])
    return QuantizedTensor(fmt, torch.cat([w.codes for w in weights]), torch.cat([w.scale for w in weights]), zero)


def _rows(tensor: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    zero = None if tensor.zero is None else tensor.zero[start:stop].clone()
    return QuantizedTensor(tensor.format, tensor.codes[start:stop].clone(), tensor.scale[start:stop].clone(), zero)


class PackedQKV(_FusedLinears):
    """QKVProjection with wq, wk, wv fused into one packed matrix."""

    def __init__(self, qkv: QKVProjection, kernel: Kernel | None, place: Place | None = None):
        super().__init__({"wq": qkv.wq, "wk": qkv.wk, "wv": qkv.wv}, kernel, qkv.batch_invariant, place)

    def load_tensor(self, name: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        self.load_part(name.removesuffix(".weight"), tensor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        products = row_tiled(lambda rows: _linear(rows, self.packed), x, self.batch_invariant)
        return products.split(list(self.sizes.values()), dim=-1)

    def unpack(self) -> QKVProjection:
        parts = self.unpacked_parts()
        qkv = QKVProjection(self.in_features, self.sizes["wq"], self.sizes["wk"])
        qkv.wq, qkv.wk, qkv.wv = parts["wq"], parts["wk"], parts["wv"]
        qkv.batch_invariant = self.batch_invariant
        return qkv


class PackedSwiGLU(_FusedLinears):
    """SwiGLU (shared expert, dense FFN) with gate and up fused into one packed matrix."""

    def __init__(self, mlp: SwiGLU, kernel: Kernel | None, place: Place | None = None):
        super().__init__({"gate": mlp.gate, "up": mlp.up}, kernel, mlp.batch_invariant, place)
        self.down = PackedLinear(mlp.down, kernel, place)

    def load_tensor(self, name: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        part = name.removesuffix(".weight")
        if part == "down":
            self.down.load_tensor("weight", tensor)
        else:
            self.load_part(part, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_tiled(self._swiglu, x, self.batch_invariant)

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.outputs(x)
        return self.down(F.silu(gate) * up)

    def unpack(self) -> SwiGLU:
        parts = self.unpacked_parts()
        mlp = SwiGLU(self.in_features, self.sizes["gate"])
        mlp.gate, mlp.up, mlp.down = parts["gate"], parts["up"], self.down.unpack()
        mlp.batch_invariant = self.batch_invariant
        return mlp


class PackedRouter(Router):
    """The MoE router, keeping its plain weight (the reference product, as transformers computes it) and,
    beside it, a packed copy for the CPU kernel (Scout: 16 x 5120 padded to 64 rows, 640 KB a layer):
    inputs of up to a tile of rows (a decode step; with batch invariance every tile) get each row's one-row
    product, which on AMX is what the plain product computes for one row, bit for bit (tested; elsewhere
    within a rounding); longer inputs keep the plain product."""

    def __init__(self, router: Router, kernel: Kernel | None, place: Place | None = None):
        super().__init__(router.in_features, router.out_features, bias=False, device="meta")
        self.kernel, self.batch_invariant, self.place = kernel, router.batch_invariant, place
        self.packed: PackedWeight | None = None

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if name != "weight":
            raise KeyError(f"PackedRouter has no tensor {name!r}")
        self.weight = nn.Parameter(tensor.detach(), requires_grad=False)
        self.packed = PackedWeight(tensor, self.kernel, place=self.place)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_tiled(self._product, x, self.batch_invariant)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if _on_kernel(x, self.packed):
            return self.packed.kernel.linear(x, self.packed.address, self.packed.shape)
        return F.linear(x, self.weight)

    def unpack(self) -> Router:
        router = Router(self.in_features, self.out_features, bias=False, device="meta")
        router.weight = self.weight
        router.batch_invariant = self.batch_invariant
        return router


COMPOSITES = (QKVProjection, SwiGLU, Experts)
LINEARS = (nn.Linear, QuantizedLinear)


def _swap_targets(model: nn.Module) -> list[tuple[str, str]]:
    """(parent module name, child name) of every module to pack; names only, so that each plain module
    can be freed as soon as its packed replacement exists. Linears inside a composite go with it; a
    composite holding a stand-in of another kind is left as it is."""
    targets = []
    for parent, module in model.named_modules():
        if isinstance(module, COMPOSITES):
            continue
        for name, child in module.named_children():
            if (isinstance(child, (*LINEARS, QuantizedExperts))
                    or isinstance(child, COMPOSITES) and _packable(child)):
                targets.append((parent, name))
    return targets


def _packable(composite: nn.Module) -> bool:
    """Whether every weight of the composite is its own or a linear's (plain or quantized: what the packed one
    reads)."""
    return all(isinstance(child, LINEARS) or not any(True for _ in child.parameters())
               and not any(True for _ in child.buffers()) for child in composite.children())


def _packed_shell(child: nn.Module, kernel: Kernel | None, place: Place | None) -> nn.Module:
    for plain, packed in ((Experts, PackedExperts), (QuantizedExperts, PackedExperts), (QKVProjection, PackedQKV),
                          (SwiGLU, PackedSwiGLU), (Router, PackedRouter)):
        if isinstance(child, plain):
            return packed(child, kernel, place)
    return PackedLinear(child, kernel, place)


def _weights(module: nn.Module, prefix: str = ""):
    """(name, weight) of what a packed shell loads from ``module``: parameters, and each quantized linear's or
    experts' weight as one QuantizedTensor (``weight``; ``gate_up``, ``down``)."""
    if isinstance(module, QuantizedLinear):
        yield f"{prefix}weight", module.qweight.tensor
        if module.bias is not None:
            yield f"{prefix}bias", module.bias
        return
    if isinstance(module, QuantizedExperts):
        yield f"{prefix}gate_up", module.gate_up.tensor
        yield f"{prefix}down", module.down.tensor
        return
    for name, parameter in module.named_parameters(recurse=False):
        yield f"{prefix}{name}", parameter
    for name, child in module.named_children():
        yield from _weights(child, f"{prefix}{name}.")


PACKED = (PackedLinear, PackedExperts, PackedQKV, PackedSwiGLU, PackedRouter)


def swap_in(model: nn.Module, kernel: Kernel | None, fill: bool, huge: bool = True) -> None:
    """Swap packed modules in for every linear and the expert weights, in place: filled from the plain
    modules' weights (``fill``; each plain module is freed as soon as its replacement exists), or left empty
    for a loader to fill (e.g. on a meta-device model). The MoE routers keep their plain weight beside the
    packed one. ``huge``: the packed weights on transparent huge pages where the OS offers them."""
    place = huge_pages.place if huge else None
    for parent_name, name in _swap_targets(model):
        parent = model.get_submodule(parent_name)
        child = getattr(parent, name)
        shell = _packed_shell(child, kernel, place)
        if fill:
            for tensor_name, tensor in _weights(child):
                shell.load_tensor(tensor_name, tensor)
        setattr(parent, name, shell)
        del child


def swap_out(model: nn.Module) -> None:
    """The plain modules back, in place, with the packed weights' values."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PACKED):
                setattr(module, name, child.unpack())
