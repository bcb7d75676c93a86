"""The layers of a pass with a cache in C, one call per layer (csrc/decode_layer.c), for packed bf16 models
on x86-64 CPUs with AVX2 or better (built with the product kernel of library.py, for the CPU's instruction set).

At decode the torch glue between the products (norms, RoPE, cache writes, attention, routing: ~70 small ops
a layer, each paying torch's dispatch and a cold cache after every weight stream) costs a large share of a
step beside the weight stream itself (bench/generate.py: ``llama4-layers`` against ``llama4``). The C layer
does that glue in plain loops between the same kernel products (library.py), so a step costs little more
than its weight stream.

It is a specialisation of the model's layers, which stay the reference: it follows their float32 arithmetic
and rounds to bf16 where they round, so it agrees with them to bf16 rounding (summation order, exp; top-1
ties go to the lowest expert index), not bit for bit; tests/test_fused_decode.py holds it to that. A row's
result never depends on the other rows, so batched decode still equals each row's solo run, and with batch
invariance (the server's default) it also takes one sequence's prefill pieces, every token as a row of its
own, so that a prefilled token is bit for bit its decode step. It takes a pass only when everything it
assumes holds (bf16, a cache that hands out decode slots - KVCache or a paged batch - storing each layer as bf16
or as llama4.quant.kv_cache's int8 / fp8 entries, every layer's weights on the kernel, top-1 routing; several
tokens per row only with batch invariance, one row); otherwise the layers run. Quantized entries are written as
the Python encoder writes them (the same bytes) and attended over decoded as the torch layers decode them.
``KernelOptions.fused_decode`` (cli: ``LLAMA4_FUSED_DECODE=0``) leaves it out.
"""

from __future__ import annotations

import ctypes
from operator import is_not

import torch

from llama4.kernels.cpu.library import Kernel
from llama4.model.cache import Cache
from llama4.model.moe import MoE
from llama4.model.transformer import PositionTables, TextModel


class _Layer(ctypes.Structure):
    _fields_ = [
        ("dim", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
        ("use_rope", ctypes.c_int64), ("qk_norm", ctypes.c_int64), ("tune_temperature", ctypes.c_int64),
        ("num_experts", ctypes.c_int64), ("hidden", ctypes.c_int64),
        ("eps", ctypes.c_double),
        ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
        ("qkv", ctypes.c_uint64), ("wo", ctypes.c_uint64), ("router", ctypes.c_uint64),
        ("gate_up", ctypes.POINTER(ctypes.c_uint64)), ("down", ctypes.POINTER(ctypes.c_uint64)),
        ("shared_gate_up", ctypes.c_uint64), ("shared_down", ctypes.c_uint64),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("rows", ctypes.c_int64), ("h", ctypes.c_void_p), ("k_store", ctypes.c_void_p), ("v_store", ctypes.c_void_p),
        ("head_stride", ctypes.c_int64), ("write", ctypes.c_void_p), ("count", ctypes.c_void_p),
        ("first", ctypes.c_void_p), ("gather", ctypes.c_void_p), ("gather_width", ctypes.c_int64),
        ("rope", ctypes.c_void_p), ("q_scale", ctypes.c_void_p),
        ("threads", ctypes.c_int64), ("kv_format", ctypes.c_int64), ("entry_bytes", ctypes.c_int64),
    ]


# KV storages the C layer reads and writes itself (csrc/decode_layer.c's KV_* codes), by KVStorage name: its code
# and an entry's bytes for head_dim d (int8 / fp8: llama4.quant.kv_cache's layout, d codes then a bf16 scale)
_KV_FORMATS = {"bf16": (0, lambda d: 2 * d), "int8": (1, lambda d: d + 2), "fp8": (2, lambda d: d + 2)}


# How long the kernel pool's workers are kept polling from the start of a pass (csrc/pool.h: llama4_pool_warm): what
# comes before the first product (the slots of the first layer) takes tens of microseconds, a sleeping worker about
# as long to wake
_WARM_NS = 200_000


def _parts_within_chunks(start: int, tokens: int, chunk: int) -> list[tuple[int, int]]:
    """(offset, count) parts of a pass over sequence indices start..start+tokens-1, cut where a chunk begins."""
    parts, offset = [], 0
    while offset < tokens:
        count = min(tokens - offset, chunk - (start + offset) % chunk)
        parts.append((offset, count))
        offset += count
    return parts


def _address(weight) -> int | None:
    """The kernel address of a packed weight (packing.PackedWeight), None if the kernel cannot read it."""
    return getattr(weight, "address", None)


def _home(owner: object, name: str) -> dict:
    """The dict that holds ``owner.name`` (or would: an absent attribute reads as None from it)."""
    stores = vars(owner) if hasattr(owner, "__dict__") else {}
    for kind in ("_parameters", "_modules", "_buffers"):
        if name in stores.get(kind, ()):
            return stores[kind]
    return stores


class FusedDecode:
    """TextModel.fast_decode for a packed bf16 model. Binds to the layers' weights on first use (a loader
    fills packed modules after they are installed) and declines every step if any layer cannot run in C."""

    def __init__(self, model: TextModel, kernel: Kernel):
        self.model, self.kernel = model, kernel
        self.layers: list[_Layer] | None = None
        self._keep: list = []  # ctypes arrays the layer structs point into
        self._bound: list[tuple[dict, str, object]] = []  # (where owner.attribute lives, attribute, what it held)
        self._watched: tuple[tuple, tuple, tuple] = ((), (), ())  # _bound as three columns, for _stale
        self._step = _Step()  # a pass's step, filled in place for each layer
        self._step_ref = ctypes.byref(self._step)
        self._layer_refs: list = []  # ctypes.byref of each layer struct
        self._decode_layer = None
        self._warm = kernel.lib.llama4_pool_warm

    def __call__(self, h: torch.Tensor, tables: PositionTables, cache: Cache) -> torch.Tensor | None:
        """The layers for h [B, T, D] -> [B, T, D], or None to let the torch layers run. ``cache``: any Cache (its
        ``decode_slots``). Takes decode steps (T = 1) and, with batch invariance,
        one sequence's prefill pieces too: each token then computes what its decode step would, bit for bit
        (a piece is run in parts that each stay within one attention chunk)."""
        rows, tokens = h.shape[:2]
        if (h.dtype != torch.bfloat16 or not h.is_cpu or rows == 0
                or h.requires_grad or (tokens != 1 and not (rows == 1 and self.model.batch_invariant))):
            return None  # (autograd cannot see into C)
        if not self.ready():
            return None
        config = self.model.config
        layers = self.layers
        formats = [self._kv_format(cache, i, config.head_dim) for i in range(len(layers))]
        if None in formats:
            return None  # (before touching the cache: a storage the C layer does not know runs the layers)
        out = h.reshape(rows * tokens, -1).clone()
        half = config.head_dim // 2
        rope = torch.view_as_real(tables.rope.expand(rows, tokens, half).reshape(rows * tokens, half)).contiguous()
        q_scale = tables.q_scale.reshape(rows * tokens).contiguous() if tables.q_scale is not None else None
        # One step struct for every layer and part, filled in place (a decode step makes these calls for every
        # layer, so the loop below keeps to plain attribute stores)
        step, step_ref, layer_refs, decode_layer = self._step, self._step_ref, self._layer_refs, self._decode_layer
        decode_slots, kv_heads, head_dim, dtype, device = (cache.decode_slots, config.num_kv_heads, config.head_dim,
                                                           h.dtype, h.device)
        step.threads = threads = torch.get_num_threads()
        if threads > 1:  # the pool's workers sleep since the last step: wake them while the slots are prepared
            self._warm(_WARM_NS)
        start, chunk = tables.starts[0], config.attention_chunk_size
        for offset, count in _parts_within_chunks(start, tokens, chunk) if tokens > 1 else ((0, 1),):
            step.rows, step.h, step.rope = rows * count, out[offset:].data_ptr(), rope[offset:].data_ptr()
            step.q_scale = q_scale[offset:].data_ptr() if q_scale is not None else None
            for index, (kv_format, entry_bytes, stored) in enumerate(formats):
                slots = decode_slots(index, rows, kv_heads, head_dim, dtype, device, tokens=count, offset=offset)
                keys, values = slots.keys, slots.values
                if not (keys.dtype == stored and values.dtype == stored and keys.is_contiguous()
                        and values.is_contiguous()):
                    raise ValueError(f"fused decode needs contiguous {stored} key/value storage")
                write, counts, first, gather = slots.write, slots.count, slots.first, slots.gather
                # (kept alive until the call returns: contiguous() may make copies)
                write, counts = write.contiguous(), counts.contiguous()
                step.k_store, step.v_store = keys.data_ptr(), values.data_ptr()
                step.head_stride = slots.head_stride * keys.element_size()
                step.write, step.count = write.data_ptr(), counts.data_ptr()
                step.kv_format, step.entry_bytes = kv_format, entry_bytes
                if first is not None:
                    first = first.contiguous()
                    step.first = first.data_ptr()
                else:
                    step.first = None
                if gather is not None:
                    gather = gather.contiguous()
                    step.gather, step.gather_width = gather.data_ptr(), gather.shape[1] if gather.shape[0] > 1 else 0
                else:
                    step.gather, step.gather_width = None, 0
                if decode_layer(layer_refs[index], step_ref) != 0:
                    raise MemoryError("the fused decode layer could not allocate its scratch memory")
        return out.reshape(h.shape)

    @staticmethod
    def _kv_format(cache: Cache, layer: int, head_dim: int) -> tuple[int, int, torch.dtype] | None:
        """(C format code, bytes of an entry, stored dtype) of ``layer``'s keys/values in ``cache`` for a bf16 pass,
        or None if the C layer cannot read them: a storage of another name, or of an unexpected layout."""
        storage = cache.layer_storage(layer)
        if storage is None:
            return _KV_FORMATS["bf16"][0], 2 * head_dim, torch.bfloat16
        known = _KV_FORMATS.get(getattr(storage, "name", None))
        if known is None:
            return None
        code, entry_bytes = known[0], known[1](head_dim)
        if storage.width(head_dim) * storage.dtype.itemsize != entry_bytes:
            return None
        return code, entry_bytes, storage.dtype

    def ready(self) -> bool:
        """Whether every layer can run in C (binding to the current weights first if needed)."""
        if self.layers is None or self._stale():
            self._keep = []
            self.layers = self._bind() or []
            self._watched = tuple(zip(*self._bound)) if self._bound else ((), (), ())
            self._layer_refs = [ctypes.byref(layer) for layer in self.layers]
            self._decode_layer = self.kernel.lib.llama4_decode_layer if self.layers else None
        return bool(self.layers)

    def _stale(self) -> bool:
        """Whether a weight the layer structs point into was replaced since they were built (a reload packs
        anew and assigns new norm weights)."""
        wheres, names, bounds = self._watched
        return any(map(is_not, map(dict.get, wheres, names), bounds))

    def _bind(self) -> list[_Layer] | None:
        """One struct per layer, or None if some layer cannot run in C."""
        self._bound = []
        self._watch(*[(norm, "weight") for block in self.model.layers for norm in (block.attn_norm, block.ffn_norm)])
        lib = self.kernel.lib
        if not hasattr(lib, "llama4_decode_layer"):
            return None
        lib.llama4_decode_layer.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(_Step)]
        lib.llama4_decode_layer.restype = ctypes.c_int
        config = self.model.config
        if (config.head_dim % 32 or config.head_dim > 256 or config.num_heads % config.num_kv_heads
                or config.num_heads > 8 * config.num_kv_heads):
            return None  # the C attention takes heads of up to 256 and up to 8 query heads per KV head
        layers = []
        for spec, block in zip(config.layers, self.model.layers):
            attn, ffn = block.attn, block.ffn
            norms = (block.attn_norm.weight, block.ffn_norm.weight)
            if any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in norms):
                return None
            self._watch((block, "attn"), (block, "ffn"), (attn, "qkv"), (attn, "wo"), (attn.qkv, "packed"),
                        (attn.wo, "packed"))
            qkv, wo = _address(getattr(attn.qkv, "packed", None)), _address(getattr(attn.wo, "packed", None))
            layer = _Layer(dim=config.hidden_size, heads=config.num_heads, kv_heads=config.num_kv_heads,
                           head_dim=config.head_dim, use_rope=spec.use_rope, qk_norm=spec.qk_norm,
                           tune_temperature=spec.temperature_tuning, eps=config.rms_norm_eps,
                           attn_norm=norms[0].data_ptr(), ffn_norm=norms[1].data_ptr(), qkv=qkv or 0, wo=wo or 0)
            shared = ffn.shared if isinstance(ffn, MoE) else ffn
            self._watch((shared, "packed"), (shared, "down"), (getattr(shared, "down", None), "packed"))
            shared_gate_up = _address(getattr(shared, "packed", None))
            shared_down = _address(getattr(getattr(shared, "down", None), "packed", None))
            if None in (qkv, wo, shared_gate_up, shared_down):
                return None
            layer.shared_gate_up, layer.shared_down = shared_gate_up, shared_down
            layer.hidden = shared.packed.shape[0] // 2
            if isinstance(ffn, MoE):
                self._watch((ffn, "router"), (ffn, "experts"), (ffn.router, "packed"), (ffn.experts, "gate_up"),
                            (ffn.experts, "down"))
                experts, router = ffn.experts, _address(getattr(ffn.router, "packed", None))
                if (ffn.top_k != 1 or router is None or not getattr(experts, "groups_in_one_call", False)
                        or experts.gate_up[0].shape != shared.packed.shape):
                    return None
                gate_up = (ctypes.c_uint64 * experts.num_experts)(*[w.address for w in experts.gate_up])
                down = (ctypes.c_uint64 * experts.num_experts)(*[w.address for w in experts.down])
                self._keep += [gate_up, down]
                layer.num_experts, layer.router = experts.num_experts, router
                layer.gate_up, layer.down = gate_up, down
            layers.append(layer)
        return layers

    def _watch(self, *places: tuple[object, str]) -> None:
        """Remember what ``owner.name`` holds now, and the dict it lives in (a module's parameters, submodules or
        buffers, or its __dict__), for :meth:`_stale`: a decode step then checks with plain dict lookups, not
        nn.Module.__getattr__. Assigning a parameter or module replaces it in that same dict; an attribute that
        moves to another dict reads as replaced (a rebind, never a missed one)."""
        for owner, name in places:
            self._bound.append((_home(owner, name), name, getattr(owner, name, None)))
