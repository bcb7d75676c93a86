"""Parameter counts, weight memory and the layer schedule of a model, computed on the meta device."""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from llama4.build import build_meta
from llama4.checkpoint.io import read_config
from llama4.config import ModelConfig
from llama4.distributed.context import ContextPlan
from llama4.distributed.plan import ParallelPlan, layout_shape, local_kv_heads, shard_layouts
from llama4.distributed.shard import EMBED, TIED_HEAD
from llama4.model.moe import Experts
from llama4.presets import ASSUMED_PRESETS, PRESETS, preset
from llama4.quant import QuantRecipe, WeightFormat, quantize
from llama4.quant.kv_cache import QUANTIZED_KV_FORMATS, KVFormat
from llama4.quant.recipe import quantizable_modules

# Bytes per parameter of the weight formats `info` reports (weights only: no quantisation scales).
WEIGHT_FORMATS = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}


KV_DTYPES = {"bf16": 2, "fp32": 4}
# quantized KV caches (llama4.quant.kv_cache): the global layers in the format, the chunked layers in bf16
KV_FORMATS = {**KV_DTYPES, **{fmt: KV_DTYPES["bf16"] for fmt in QUANTIZED_KV_FORMATS}}


def kv_cache_bytes(config: ModelConfig, context: int, bytes_per_value: int = 2, batch: int = 1,
                   block_size: int = 256, global_format: str | None = None, kv_heads: int | None = None) -> dict:
    """KV cache memory of :class:`~llama4.model.cache.KVCache` after decoding ``context`` tokens.

    Global (NoPE) layers hold every token, rounded up to the allocation block; chunked layers hold at
    most one chunk, so their part stops growing at ``attention_chunk_size`` tokens. ``global_format``
    (``int8`` or ``fp8``): the global layers' entries quantized, each costing what
    :class:`llama4.quant.kv_cache.KVFormat` stores for it (codes and a bf16 scale per token and KV head).
    ``kv_heads``: the KV heads one device caches under a parallel plan (:func:`parallel_kv_heads`; default all).
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    text = config.text
    heads = text.num_kv_heads if kv_heads is None else kv_heads
    per_entry = 2 * heads * text.head_dim * bytes_per_value * batch  # keys and values
    global_entry = per_entry
    if global_format is not None:
        if global_format not in QUANTIZED_KV_FORMATS:
            raise ValueError(f"global_format must be one of {', '.join(QUANTIZED_KV_FORMATS)} (or None), "
                             f"got {global_format!r}")
        global_entry = 2 * heads * KVFormat(global_format).entry_bytes(text.head_dim) * batch

    def blocks(n: int) -> int:
        return -(-n // block_size) * block_size

    global_entries = len(text.global_layers) * blocks(context)
    local_entries = len(text.local_layers) * min(blocks(min(context, text.attention_chunk_size)),
                                                 text.attention_chunk_size)
    return {
        "context": context,
        "global_format": global_format,
        "global_bytes": global_entries * global_entry,
        "local_bytes": local_entries * per_entry,
        "total_bytes": global_entries * global_entry + local_entries * per_entry,
        "bytes_per_token_global": len(text.global_layers) * global_entry,
    }


def _grown(capacity: int, need: int, block: int, limit: int | None = None) -> int:
    """The capacity of a context-parallel cache buffer (llama4.distributed.context._Entries) that held
    ``capacity`` entries after one-entry appends up to ``need``: each time it is full it grows to
    max(need, 1.5 x capacity) rounded up to whole blocks (at most ``limit``: a chunked layer's chunk)."""
    while capacity < need:
        grown = -(-max(capacity + 1, capacity + capacity // 2) // block) * block
        capacity = grown if limit is None else min(grown, max(limit, capacity + 1))
    return capacity


def context_kv_bytes(config: ModelConfig, prompt: int, cp: int, decode: int = 0, bytes_per_value: int = 2,
                     block_size: int = 256, global_format: str | None = None,
                     kv_heads: int | None = None) -> dict:
    """KV memory of the fullest rank's :class:`~llama4.distributed.context.ContextParallelCache` after a
    context-parallel prefill of ``prompt`` tokens over ``cp`` ranks and ``decode`` one-token passes (batch 1).

    What the cache really allocates: a global layer keeps the rank's prefill slice (``ContextPlan.slices``: sizes
    differing by one, the later ranks taking the extra) in a buffer rounded up to whole blocks, plus the decode
    entries it owns (sequence index n on rank n mod cp), its buffer growing by half when full; a chunked layer
    keeps the prompt's unfinished last chunk on every rank, growing to at most one chunk while decoding.
    ``global_format`` (int8 / fp8): the global entries at that format's cost (the cache's ``storage``: --kv-cache).
    ``kv_heads``: per device under tp.
    """
    if prompt < 0 or decode < 0:
        raise ValueError(f"prompt and decode must be >= 0, got {prompt} and {decode}")
    text, plan = config.text, ContextPlan(cp)
    heads = text.num_kv_heads if kv_heads is None else kv_heads
    per_entry = 2 * heads * text.head_dim * bytes_per_value
    global_entry = per_entry if global_format is None else 2 * heads * KVFormat(global_format).entry_bytes(
        text.head_dim)

    def blocks(n: int) -> int:
        return -(-n // block_size) * block_size

    held, allocated = 0, 0  # the fullest rank's global entries and buffer capacity (per global layer)
    if prompt:
        end = prompt + decode
        for r, (start, stop) in enumerate(plan.slices(prompt)):
            owned = max(0, (end - r + cp - 1) // cp) - max(0, (prompt - r + cp - 1) // cp)  # n = r mod cp in range
            capacity = _grown(blocks(stop - start), stop - start + owned, block_size)
            if capacity > allocated or (capacity == allocated and stop - start + owned > held):
                held, allocated = stop - start + owned, capacity
    chunk = text.attention_chunk_size
    local = 0
    if prompt:
        tail_start = prompt // chunk * chunk
        tail = prompt - tail_start
        fill = tail + decode if tail + decode <= chunk else chunk  # the fullest chunk the layer keeps
        if fill:
            first = min(blocks(tail), max(chunk, tail)) if tail else min(blocks(1), chunk)
            local = _grown(first, fill, block_size, chunk)
    global_layers, local_layers = len(text.global_layers), len(text.local_layers)
    return {
        "context": prompt + decode, "cp": cp, "global_format": global_format,
        "global_entries_per_layer": held, "global_capacity_per_layer": allocated,
        "global_bytes": global_layers * allocated * global_entry,
        "local_bytes": local_layers * local * per_entry,
        "total_bytes": global_layers * allocated * global_entry + local_layers * local * per_entry,
        "bytes_per_token_global": global_layers * global_entry,
        # the first decode entry past a full buffer: +half of it per global layer (and a copy while it grows)
        "growth_bytes": global_layers * (_grown(allocated, allocated + 1, block_size) - allocated) * global_entry
        if allocated else 0,
    }


def context_activation_bytes(config: ModelConfig, slice_tokens: int, parallel: ParallelPlan | None = None,
                             bytes_per_value: int = 2, piece: int | None = None) -> dict:
    """Transient memory of one rank's context-parallel prefill pass (llama4.distributed.context), whose slice of
    ``slice_tokens`` runs layer by layer in pieces of at most ``piece`` tokens (None: the whole slice at once):
    the slice's residual stream, kept between layers in the model's dtype (the one part that grows with the
    slice); per piece, the hidden states, q / k / v and the feed-forward rows (fp32, as :func:`activation_bytes`
    counts them); a global layer's ring (three K/V blocks of at most a piece's entries in the model's dtype: the
    one attended and forwarded, the one arriving, the previous one still being sent, or this rank's own block
    stacked into a message; and three fp32 partial outputs with their log-sum-exps: the result so far, this
    block's part and their merge); a chunked layer's view (the piece's K/V with up to a chunk before it,
    concatenated), the part of the chunk it keeps for the next piece, and what it keeps for and receives from the
    other ranks (at most two chunks each); the last position's logits."""
    text = config.text
    parallel = parallel or ParallelPlan()
    tp, n = parallel.tp, slice_tokens
    p = n if piece is None else min(piece, n)
    kv_heads, heads = local_kv_heads(text, parallel, 0)[1], text.num_heads // tp
    routed = text.intermediate_size // parallel.expert_tp
    moe_width = text.intermediate_size // tp + text.num_experts_per_tok * routed if text.moe_layers else 0
    dense_width = text.intermediate_size_mlp // tp if len(text.moe_layers) < text.num_layers else 0
    block = 2 * kv_heads * text.head_dim * bytes_per_value  # one token's keys and values
    chunk = text.attention_chunk_size
    parts = {
        "logits": (text.vocab_size + (text.vocab_size // tp if tp > 1 else 0)) * 4,
        "residual": n * text.hidden_size * bytes_per_value,
        "hidden": 4 * p * text.hidden_size * 4,
        "attention": p * (heads + 2 * kv_heads) * text.head_dim * 4,
        "ffn": p * 3 * max(moe_width, dense_width) * 4,
        "ring": 3 * p * block + 3 * p * heads * (text.head_dim + 1) * 4 if text.global_layers else 0,
        "chunk_view": (2 * (p + chunk) + 4 * chunk) * block if text.local_layers else 0,
    }
    return parts | {"slice_tokens": n, "piece": p, "total": sum(parts.values())}


def resolve_config(name_or_path: str | os.PathLike | ModelConfig) -> tuple[ModelConfig, str]:
    if isinstance(name_or_path, ModelConfig):
        return name_or_path, "config"
    text = str(name_or_path)
    if text.lower() in PRESETS and not Path(text).exists():
        return preset(text), f"preset {text.lower()}"
    return read_config(text), text


def model_info(name_or_path: str | os.PathLike | ModelConfig) -> dict:
    """Counts for a preset name, a checkpoint directory or a config.

    ``active_params`` follows Meta's "17B active" definition: text parameters (embedding and LM head
    included) minus the routed experts a token does not use.
    """
    config, source = resolve_config(name_or_path)
    model = build_meta(config)
    text_cfg = config.text
    counts = {"text": 0, "vision": 0, "projector": 0, "routed_experts": 0, "embedding": 0}
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        counts[part] += p.numel()
        if ".experts." in name:
            counts["routed_experts"] += p.numel()
        if name.startswith("text.embed."):
            counts["embedding"] += p.numel()
    unused_share = ((text_cfg.num_experts - text_cfg.num_experts_per_tok) / text_cfg.num_experts
                    if text_cfg.num_experts else 0.0)
    active = counts["text"] - round(counts["routed_experts"] * unused_share)
    total = counts["text"] + counts["vision"] + counts["projector"]
    return {
        "source": source,
        "assumed": str(name_or_path).lower() in ASSUMED_PRESETS,
        "total_params": total,
        "text_params": counts["text"],
        "vision_params": counts["vision"] + counts["projector"],
        "active_params": active,
        "active_params_with_vision": active + counts["vision"] + counts["projector"],
        "routed_expert_params": counts["routed_experts"],
        "embedding_params": counts["embedding"],
        "weight_bytes": {fmt: int(total * b) for fmt, b in WEIGHT_FORMATS.items()},
        "layers": [
            {"index": s.index, "attention": "chunked" if s.chunked else "global", "rope": s.use_rope,
             "qk_norm": s.qk_norm, "temperature_tuning": s.temperature_tuning, "ffn": "moe" if s.moe else "dense"}
            for s in text_cfg.layers
        ],
        "num_experts": text_cfg.num_experts,
        "experts_per_token": text_cfg.num_experts_per_tok,
        "attention_chunk_size": text_cfg.attention_chunk_size,
        "multimodal": config.multimodal,
    }


# ---------------------------------------------------------------------------------------------------------------
# Memory planner: weights under a quantization recipe, KV cache, activations, and the largest context that fits.

PREFILL_CHUNK = 256  # llama4.inference: prompt tokens per prefill piece (EngineConfig.prefill_chunk's default)
KV_BLOCK = 256  # kv_cache_bytes' default allocation block
_FLOAT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]i?b|b)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``80GiB``, ``24GB``, ``512MiB``, ``1.5TiB`` or plain bytes (``1000000``); GB is 10^9, GiB 2^30."""
    match = _SIZE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(f"cannot read the memory size {text!r}: expected a number of bytes or a number with a "
                         f"unit, e.g. 80GiB, 24GB, 512MiB")
    return int(float(match["number"]) * _UNITS[(match["unit"] or "b").lower()])


def _parse_recipe(recipe: QuantRecipe | str | None) -> QuantRecipe | None:
    """``fp8`` plans an FP8 checkpoint as it runs here: llama4.quant.fp8 turns its weights into int8 per output
    channel at load (the same bytes per weight, plus a scale per channel)."""
    if isinstance(recipe, str):
        name = recipe.strip().lower()
        if name == "fp8":
            return QuantRecipe.parse("int8")
        return None if name in ("none", "bf16") else QuantRecipe.parse(recipe)
    return recipe


@functools.lru_cache(maxsize=None)
def _row_bytes(fmt: WeightFormat, scale_dtype: torch.dtype, in_features: int) -> int:
    """Bytes of ONE output channel of ``in_features`` inputs in ``fmt`` (codes, scales, zero points), read off
    :func:`llama4.quant.quantize` itself: every output channel is quantized on its own, so a weight [..., out,
    in] costs rows x this. Raises quantize's ValueError when ``in_features`` is not a multiple of the group."""
    return quantize(torch.zeros(1, in_features), fmt, scale_dtype).nbytes


def _quantized_parameters(module: nn.Module, shape: Callable[[str], tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """The parameters :func:`llama4.quant.quantize_model` turns into codes, as name -> (rows, in_features) in the
    quantized layout [..., out, in]: a linear's ``weight`` [out, in]; the routed experts' ``gate_up`` [E, D, 2I]
    and ``down`` [E, I, D], multiplied as x @ W, are stored transposed (QuantizedExperts). ``shape(name)``: the
    parameter's shape (a rank's slice of it under a parallel plan)."""
    if isinstance(module, Experts):
        return {name: (shape(name)[0] * shape(name)[2], shape(name)[1]) for name in ("gate_up", "down")}
    return {"weight": (shape("weight")[0], shape("weight")[1])}


def parallel_shapes(config: ModelConfig, parallel: ParallelPlan, rank: int = 0) -> dict[str, tuple[int, ...]]:
    """Every parameter a rank holds under ``parallel`` (name -> the rank's shape), from the slicing rules
    shard_model and load_sharded apply (:func:`llama4.distributed.plan.shard_layouts`). A tied output head under
    tp > 1 appears as ``text.output.weight`` (the vocabulary-parallel head's rows, sliced from the embedding,
    which every rank also keeps whole)."""
    parallel.check(config.text)
    model = build_meta(config)
    full = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if model.text.output is None and parallel.tp > 1:
        full[TIED_HEAD] = full[EMBED]
    layouts = shard_layouts(full, config.text, parallel, rank)
    return {name: full[name] if layout is None else layout_shape(layout) for name, layout in layouts.items()}


def parallel_kv_heads(config: ModelConfig, parallel: ParallelPlan, rank: int = 0) -> int:
    """KV heads one rank caches: num_kv_heads / tp, or 1 where there are fewer KV heads than tp ranks (each head
    replicated over the ranks whose query heads read it)."""
    return local_kv_heads(config.text, parallel, rank)[1]


def weight_bytes(config: ModelConfig, recipe: QuantRecipe | str | None = None,
                 dtype: torch.dtype = torch.bfloat16, parallel: ParallelPlan | None = None, rank: int = 0) -> dict:
    """Weight memory of the model under ``recipe`` (None: all float), computed on the meta device.

    Per kind of weight (the recipe's kinds: experts, shared, attention, head; and the ones it never quantizes:
    router, norms, embeddings, vision = tower + projector, other), the parameter count, the format and the bytes.
    A quantized matrix costs exactly what :func:`llama4.quant.quantize` stores for it (codes, a scale per group in
    the recipe's scale dtype, a zero point per group if asymmetric); everything else (biases of quantized linears
    included) costs ``dtype``'s size per parameter. Equals :func:`llama4.quant.quantized_bytes` plus the float
    parameters left after :func:`llama4.quant.quantize_model` on the real model.

    ``parallel``: what one rank (``rank``) holds under that plan instead: split weights as its slices
    (:func:`parallel_shapes`), replicated ones (embeddings, norms, routers, vision, and under tp = 1 attention,
    shared expert and head) whole; each kind says whether it is ``split``. A quantized slice costs what quantize
    stores for the slice (a column split leaves fewer inputs per output channel, so its groups must still fit).
    """
    recipe = _parse_recipe(recipe)
    model = build_meta(config)
    local = parallel_shapes(config, parallel, rank) if parallel is not None else None
    float_size = torch.empty((), dtype=dtype).element_size()
    float_name = _FLOAT_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if recipe is not None and recipe.head is not None and model.text.output is None:
        raise ValueError("the output head is tied to the embeddings (tie_word_embeddings), and embeddings "
                         "quantization is not supported yet: leave head unset for this model")
    kinds: dict[str, dict] = {}

    def add(kind: str, fmt: str, params: int, size: int, split: bool = False) -> None:
        row = kinds.setdefault(kind, {"params": 0, "formats": [], "bytes": 0, "split": False})
        row["params"] += params
        row["bytes"] += size
        row["split"] |= split
        if fmt not in row["formats"]:
            row["formats"].append(fmt)

    def shape(name: str, p: torch.Tensor) -> tuple[int, ...]:
        return tuple(p.shape) if local is None else local[name]

    seen: set[int] = set()
    for target in quantizable_modules(model):
        module = getattr(target.parent, target.attribute)
        fmt = recipe.format_for(target.kind) if recipe is not None else None
        params = dict(module.named_parameters())
        quantized = (_quantized_parameters(module, lambda n: shape(f"{target.name}.{n}", params[n]))
                     if fmt is not None else {})
        for name, p in params.items():
            seen.add(id(p))
            held = shape(f"{target.name}.{name}", p)
            numel, split = math.prod(held), held != tuple(p.shape)
            if name in quantized:
                rows, in_features = quantized[name]
                try:
                    size = rows * _row_bytes(fmt, recipe.scale_dtype, in_features)
                except ValueError as e:
                    raise ValueError(f"{target.name}: {e}") from None
                add(target.kind, fmt.name, numel, size, split)
            else:
                add(target.kind, float_name, numel, numel * float_size, split)
    if local is not None and TIED_HEAD in local and model.text.output is None:  # vocabulary-parallel tied head
        numel = math.prod(local[TIED_HEAD])
        add("head", float_name, numel, numel * float_size, True)
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        if not name.startswith("text."):
            kind = "vision"
        elif name.startswith("text.embed."):
            kind = "embeddings"
        elif ".router." in name:
            kind = "router"
        elif name.endswith("norm.weight") or ".norm" in name:
            kind = "norms"
        else:
            kind = "other"
        held = shape(name, p)
        add(kind, float_name, math.prod(held), math.prod(held) * float_size, held != tuple(p.shape))
    for row in kinds.values():
        row["format"] = "+".join(row.pop("formats"))
        if local is None:
            del row["split"]
    return {
        "recipe": str(recipe) if recipe is not None else "none",
        "dtype": float_name,
        "scale_dtype": _FLOAT_NAMES[recipe.scale_dtype] if recipe is not None else None,
        "kinds": kinds,
        "params": sum(row["params"] for row in kinds.values()),
        "total_bytes": sum(row["bytes"] for row in kinds.values()),
    }


def activation_bytes(config: ModelConfig, recipe: QuantRecipe | str | None = None, chunk: int = PREFILL_CHUNK,
                     dtype: torch.dtype = torch.bfloat16, parallel: ParallelPlan | None = None) -> dict:
    """A rough upper estimate of the transient memory of one forward step of one sequence (batch 1), independent
    of the context (attention runs in fused SDPA kernels, which never hold the T x T scores).

    For a step of ``n`` tokens (a prefill piece: n = ``chunk``; a decode step: n = 1), all in fp32 (4 bytes):

    * logits: vocab x n x 4;
    * hidden states: 4 copies of n x hidden x 4 (residual, normed input, attention and FFN output);
    * attention: n x (heads + 2 kv_heads) x head_dim x 4 (q, k, v);
    * feed-forward: n x 3 x width x 4 (gate, up and their product), width = the dense MLP's or, for MoE layers,
      (1 + experts_per_token) x the expert width (the shared expert and the routed rows);

    plus, for a quantized model (the reference path dequantizes a weight when it is used), the largest single
    dequantized matrix in ``dtype``: one expert's gate_up (2I x D), the head (vocab x D), wq, or a shared gate.
    The step's figure is the larger of prefill and decode (prefill, for any chunk >= 1). Images (the vision
    tower's activations) are not included.

    Under a ``parallel`` plan, per device: the hidden states stay whole (replicated between blocks), attention
    and the shared / dense FFN hold the rank's heads and columns, the routed experts their hidden slice (I / (W /
    ep); every assignment may land on the rank's experts), and the logits are the rank's V / tp rows plus the
    gathered [n, V]; a dequantized weight is the rank's slice.
    """
    recipe = _parse_recipe(recipe)
    text = config.text
    parallel = parallel or ParallelPlan()
    tp, expert_tp = parallel.tp, parallel.expert_tp
    kv_heads = local_kv_heads(text, parallel, 0)[1]
    routed = text.intermediate_size // expert_tp
    moe_width = text.intermediate_size // tp + text.num_experts_per_tok * routed if text.moe_layers else 0
    dense_width = text.intermediate_size_mlp // tp if len(text.moe_layers) < text.num_layers else 0
    width = max(moe_width, dense_width)
    vocab = text.vocab_size + (text.vocab_size // tp if tp > 1 else 0)

    def step(n: int) -> dict:
        parts = {
            "logits": vocab * n * 4,
            "hidden": 4 * n * text.hidden_size * 4,
            "attention": n * (text.num_heads // tp + 2 * kv_heads) * text.head_dim * 4,
            "ffn": n * 3 * width * 4,
        }
        return parts | {"total": sum(parts.values())}

    size = torch.empty((), dtype=dtype).element_size()
    candidates = {"experts": 2 * routed * text.hidden_size if text.moe_layers else 0,
                  "shared": max(text.intermediate_size, text.intermediate_size_mlp) // tp * text.hidden_size,
                  "attention": text.num_heads // tp * text.head_dim * text.hidden_size,
                  "head": text.vocab_size // tp * text.hidden_size}
    dequantized = max((elements * size for kind, elements in candidates.items()
                       if recipe is not None and recipe.format_for(kind) is not None), default=0)
    prefill, decode = step(chunk), step(1)
    return {"prefill_chunk": chunk, "prefill": prefill, "decode": decode, "dequantized_weight": dequantized,
            "total_bytes": max(prefill["total"], decode["total"]) + dequantized}


def largest_context(config: ModelConfig, budget: int, fixed_bytes: int, bytes_per_value: int = 2,
                    block_size: int = KV_BLOCK, limit: int = 2**40, global_format: str | None = None,
                    kv_heads: int | None = None) -> int | None:
    """The largest context whose KV cache (:func:`kv_cache_bytes`) fits ``budget`` - ``fixed_bytes`` (weights and
    activations), by binary search: -1 when not even an empty cache fits, None when every context up to ``limit``
    fits (no global layers: the chunked layers' cache stops growing at one chunk). The answer is a multiple of
    ``block_size`` (the cache grows by blocks) unless it is capped by ``limit``."""

    def fits(n: int) -> bool:
        kv = kv_cache_bytes(config, n, bytes_per_value, block_size=block_size, global_format=global_format,
                            kv_heads=kv_heads)
        return fixed_bytes + kv["total_bytes"] <= budget

    if not fits(0):
        return -1
    if fits(limit):
        return None
    low, high = 0, limit  # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def memory_plan(config: ModelConfig, recipe: QuantRecipe | str | None = None, kv: str = "bf16",
                context: int | None = None, memory: int | str | None = None, dtype: torch.dtype = torch.bfloat16,
                chunk: int | None = None, block_size: int = KV_BLOCK, parallel: ParallelPlan | None = None,
                cp: int = 1) -> dict:
    """Weights (:func:`weight_bytes`), KV cache at ``context`` tokens in ``kv`` (a :data:`KV_FORMATS` name: bf16,
    fp32, or int8 / fp8 for the global layers quantized and the chunked ones in bf16),
    activations (:func:`activation_bytes`) and their total; with ``memory`` (bytes or a size string), the largest
    context that fits in it (``max_context``: None = any, as the cache stops growing; -1 = does not fit).
    Without ``context``, the KV cache is given at that largest context (or 0).

    ``parallel`` (a :class:`~llama4.distributed.ParallelPlan`): every figure is per device (``memory`` is one
    device's) under that plan: the rank's weights (:func:`weight_bytes`), its KV heads (:func:`parallel_kv_heads`)
    and activations. The plan splits evenly (``ParallelPlan.check``), so every rank holds the same bytes; rank 0's
    are given, and ``parallel`` says how the plan splits.

    ``cp`` > 1: context parallelism over cp groups of that plan (cp x max(tp, ep) devices), ``context`` being a
    prompt prefilled context-parallel: the fullest rank's KV cache (:func:`context_kv_bytes`) and its prefill
    pass in pieces (:func:`context_activation_bytes`), see :func:`_context_plan`.

    ``chunk``: the prefill piece in tokens; default :data:`PREFILL_CHUNK` (the engine's) in one process, the
    attention chunk size with ``cp`` > 1 (``generate --cp``'s default)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"the prefill piece must be >= 1 token, got {chunk}")
    if cp != 1:
        return _context_plan(config, recipe, kv, context, memory, dtype, parallel, cp,
                             chunk or config.text.attention_chunk_size)
    chunk = chunk or PREFILL_CHUNK
    if kv not in KV_FORMATS:
        raise ValueError(f"unknown KV cache dtype {kv!r}: expected one of {', '.join(KV_FORMATS)}")
    kv_heads = parallel_kv_heads(config, parallel) if parallel is not None else None
    kv_args = dict(bytes_per_value=KV_FORMATS[kv], block_size=block_size,
                   global_format=kv if kv in QUANTIZED_KV_FORMATS else None, kv_heads=kv_heads)
    if context is not None and context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    recipe = _parse_recipe(recipe)
    weights = weight_bytes(config, recipe, dtype, parallel)
    activations = activation_bytes(config, recipe, chunk, dtype, parallel)
    fixed = weights["total_bytes"] + activations["total_bytes"]
    plan: dict = {"kv_dtype": kv, "weights": weights, "activations": activations}
    if parallel is not None:
        text = config.text
        plan["parallel"] = {"tp": parallel.tp, "ep": parallel.ep, "devices": parallel.world_size,
                            "kv_heads_per_device": kv_heads, "kv_heads_replicated": text.num_kv_heads < parallel.tp,
                            "experts_per_device": text.num_experts // parallel.ep if text.moe_layers else 0,
                            "expert_hidden_per_device": text.intermediate_size // parallel.expert_tp,
                            "all_devices_weight_bytes": weights["total_bytes"] * parallel.world_size}
    if memory is not None:
        budget = parse_size(memory) if isinstance(memory, str) else int(memory)
        found = largest_context(config, budget, fixed, **kv_args)
        plan |= {"memory_bytes": budget, "fits": found != -1, "max_context": found,
                 "max_context_kv_bytes": None if found in (None, -1) else
                 kv_cache_bytes(config, found, **kv_args)["total_bytes"]}
        if context is None and found is not None and found > 0:
            context = found
    context = context or 0
    cache = kv_cache_bytes(config, context, **kv_args)
    plan |= {"context": context, "kv_cache": cache,
             "total_bytes": fixed + cache["total_bytes"]}
    return plan


def _context_plan(config: ModelConfig, recipe, kv: str, context: int | None, memory: int | str | None,
                  dtype: torch.dtype, parallel: ParallelPlan | None, cp: int, piece: int) -> dict:
    """:func:`memory_plan` with context parallelism: per device of cp x max(tp, ep), each rank's slice prefilled in
    pieces of ``piece`` tokens."""
    if kv not in KV_FORMATS:
        raise ValueError(f"unknown KV cache dtype {kv!r}: expected one of {', '.join(KV_FORMATS)}")
    if context is not None and context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    ContextPlan(cp)
    inner = parallel or ParallelPlan()
    kv_heads = parallel_kv_heads(config, inner)
    quantized = kv if kv in QUANTIZED_KV_FORMATS else None
    kv_args = dict(bytes_per_value=KV_FORMATS[kv], global_format=quantized, kv_heads=kv_heads)
    size = torch.empty((), dtype=dtype).element_size()
    recipe = _parse_recipe(recipe)
    weights = weight_bytes(config, recipe, dtype, parallel)
    steps = activation_bytes(config, recipe, PREFILL_CHUNK, dtype, parallel)  # its decode step and dequantized
    # weight; the prefill is the slice's own pass, in pieces

    def activations(n: int) -> dict:
        prefill = context_activation_bytes(config, -(-n // cp), inner, size, piece)
        return {"prefill_chunk": prefill["piece"], "slice_tokens": -(-n // cp), "prefill": prefill,
                "decode": steps["decode"],
                "dequantized_weight": steps["dequantized_weight"], "context_parallel": True,
                "total_bytes": max(prefill["total"], steps["decode"]["total"]) + steps["dequantized_weight"]}

    def total(n: int) -> int:
        return (weights["total_bytes"] + activations(n)["total_bytes"]
                + context_kv_bytes(config, n, cp, **kv_args)["total_bytes"])

    plan: dict = {"kv_dtype": kv, "weights": weights, "context_parallel": {
        "cp": cp, "devices": inner.world_size * cp, "kv_heads_per_device": kv_heads,
        "quantized_kv_supported": False}}
    if parallel is not None:
        text = config.text
        plan["parallel"] = {"tp": parallel.tp, "ep": parallel.ep, "devices": parallel.world_size * cp,
                            "kv_heads_per_device": kv_heads, "kv_heads_replicated": text.num_kv_heads < parallel.tp,
                            "experts_per_device": text.num_experts // parallel.ep if text.moe_layers else 0,
                            "expert_hidden_per_device": text.intermediate_size // parallel.expert_tp,
                            "all_devices_weight_bytes": weights["total_bytes"] * parallel.world_size * cp}
    if memory is not None:
        budget = parse_size(memory) if isinstance(memory, str) else int(memory)
        if total(cp) > budget:
            found = -1
        else:  # the largest prompt whose per-device total fits: binary search (every part grows with it)
            low, high = cp, 2**40
            if total(high) <= budget:
                low = high
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if total(mid) <= budget else (low, mid)
            found = low
        plan |= {"memory_bytes": budget, "fits": found != -1, "max_context": found,
                 "max_context_kv_bytes": None if found == -1 else
                 context_kv_bytes(config, found, cp, **kv_args)["total_bytes"]}
        if context is None and found > 0:
            context = found
    context = context or 0
    cache = context_kv_bytes(config, context, cp, **kv_args)
    acts = activations(max(context, cp))
    plan |= {"context": context, "kv_cache": cache, "activations": acts,
             "total_bytes": weights["total_bytes"] + acts["total_bytes"] + cache["total_bytes"]}
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning on one device: frozen base, adapters with their gradients and AdamW states, activations kept for
# the backward pass.

FINETUNE_METHODS = {"lora": None, "qlora": "int4"}  # the frozen base: float, or this recipe (int4 = int4-g32)


def adapter_params(config: ModelConfig, rank: int, targets: tuple[str, ...]) -> dict[str, int]:
    """Adapter parameters apply_lora adds for ``targets`` at ``rank``, per target kind: r x (in + out) per adapted
    linear, per expert for the routed experts' tensors (llama4.lora.transform.candidates decides what matches)."""
    from llama4.lora import LoraConfig
    from llama4.lora.transform import _matches, candidates

    lora = LoraConfig(rank=rank, targets=targets)
    counts: dict[str, int] = {}
    for candidate in candidates(build_meta(config)):
        if not any(_matches(candidate, t) for t in lora.targets):
            continue
        module = getattr(candidate.parent, candidate.attribute)
        if candidate.tensor is not None:  # fused experts [E, D, 2I] / [E, I, D], multiplied as x @ W
            experts, fan_in, fan_out = getattr(module, candidate.tensor).shape
            n = experts * rank * (fan_in + fan_out)
        else:
            fan_out, fan_in = module.weight.shape
            n = rank * (fan_in + fan_out)
        kind = min(candidate.kinds, key=len)
        counts[kind] = counts.get(kind, 0) + n
    return counts


def training_activation_bytes(config: ModelConfig, context: int, checkpointing: bool,
                              dtype: torch.dtype = torch.bfloat16, adapted: bool = True) -> dict:
    """What one training step of one sequence of ``context`` tokens keeps for backward (batch 1), from the shapes.

    Per decoder layer, in ``dtype`` (T tokens, D hidden, H / Hkv heads of d, k routed experts of width I, a shared
    expert of width I_s): the two norms' inputs and outputs (4 T D), q / k / v before and after RoPE and QK-norm
    and the attention output with its log-sum-exp (2 T (H + 2 Hkv) d + T H d), wo's input (T H d); the MoE's
    router scores (T E, fp32), the routed rows gathered (k T D), their gate_up product, gate activation and
    SwiGLU product (k T 4 I), the shared expert's the same (T 4 I_s) and the weighted sum (T D); with adapters,
    their inputs' dropout masks (one T x in per adapted input, bool) are counted as one T D per layer.
    With gradient checkpointing a layer keeps only its input (T D) and one layer's full set exists again while
    its backward runs. The head: the logits [T, V] in ``dtype`` plus in fp32 (cross-entropy upcasts) and the
    log-softmax output kept for backward in fp32.
    """
    text = config.text
    t, s = context, torch.empty((), dtype=dtype).element_size()
    d, h, hkv, hd = text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim

    def layer(moe: bool) -> int:
        attention = 4 * t * d + 2 * t * (h + 2 * hkv) * hd + 2 * t * h * hd
        if moe:
            ffn = (t * text.num_experts * 4 // s + text.num_experts_per_tok * t * (d + 4 * text.intermediate_size)
                   + t * 4 * text.intermediate_size + t * d)
        else:
            ffn = t * 4 * text.intermediate_size_mlp
        return (attention + ffn + (t * d // s if adapted else 0)) * s

    layers = [layer(spec.moe) for spec in text.layers]
    head = t * text.vocab_size * (s + 4 + 4)
    kept = len(layers) * t * d * s + max(layers) if checkpointing else sum(layers)
    return {"layers": kept, "per_layer": max(layers), "head": head, "total": kept + head}


def finetune_plan(config: ModelConfig, method: str = "qlora", context: int = 4096, rank: int | None = None,
                  targets: tuple[str, ...] | None = None, recipe: QuantRecipe | str | None = None,
                  dtype: torch.dtype = torch.bfloat16, memory: int | str | None = None) -> dict:
    """Memory of fine-tuning ``config`` on one device, batch 1 at ``context`` tokens: the frozen base
    (:func:`weight_bytes`: ``dtype`` for lora, ``recipe`` or int4-g32 for qlora), the adapters (llama4.lora's
    defaults: rank 8 on attention, as ``llama4 finetune``) in ``dtype`` (apply_lora makes them in the model's
    dtype) with their gradients and torch AdamW's two moments in the same dtype (the project's trainer keeps no
    separate fp32 master copy: weights and optimizer are in the model's dtype), and the activations kept for
    backward with and without gradient checkpointing (:func:`training_activation_bytes`)."""
    from llama4.lora import LoraConfig

    if method not in FINETUNE_METHODS:
        raise ValueError(f"--finetune must be one of {', '.join(FINETUNE_METHODS)}, got {method!r}")
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    defaults = LoraConfig()
    rank = defaults.rank if rank is None else rank
    targets = defaults.targets if targets is None else tuple(targets)
    if recipe is None:
        recipe = FINETUNE_METHODS[method]
    elif method == "lora":
        raise ValueError("--quant is for --finetune qlora (a lora base stays float)")
    size = torch.empty((), dtype=dtype).element_size()
    weights = weight_bytes(config, recipe, dtype)
    adapters = adapter_params(config, rank, targets)
    n = sum(adapters.values())
    if not n:
        raise ValueError(f"--lora-targets {','.join(targets)} matches no module of this model")
    trainable = {"params": n, "by_kind": adapters, "weights": n * size, "gradients": n * size,
                 "adamw_states": 2 * n * size}
    trainable["total"] = trainable["weights"] + trainable["gradients"] + trainable["adamw_states"]
    with_ckpt = training_activation_bytes(config, context, True, dtype)
    without = training_activation_bytes(config, context, False, dtype)
    plan = {"method": method, "context": context, "rank": rank, "targets": list(targets),
            "base": weights, "adapters": trainable,
            "activations": {"checkpointing": with_ckpt, "no_checkpointing": without},
            "total_checkpointing": weights["total_bytes"] + trainable["total"] + with_ckpt["total"],
            "total_no_checkpointing": weights["total_bytes"] + trainable["total"] + without["total"]}
    if memory is not None:
        budget = parse_size(memory) if isinstance(memory, str) else int(memory)
        plan["memory_bytes"] = budget
        for key, ckpt in (("max_context_checkpointing", True), ("max_context_no_checkpointing", False)):
            fixed = weights["total_bytes"] + trainable["total"]

            def fits(t: int, ckpt: bool = ckpt) -> bool:
                return fixed + training_activation_bytes(config, t, ckpt, dtype)["total"] <= budget

            low, high = 0, 2**30
            if fits(high):
                low = high
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if fits(mid) else (low, mid)
            plan[key] = low
    return plan
