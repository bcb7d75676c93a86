"""Hugging Face checkpoint directories: config.json + safetensors (single file or sharded with an index).

Loading is lazy and strict: tensors are read one at a time from memory-mapped files and converted to
the target dtype, so peak memory stays near one copy of the model; any missing, unexpected or
mis-shaped tensor is reported in one error. Pickle-based formats (.bin, .pt, .pth) are never opened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama4.checkpoint.hf_config import model_config_from_hf, model_config_to_hf
from llama4.checkpoint.mapping import from_hf_name, to_hf_name
from llama4.config import ConfigError, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_SHARD_BYTES = 5 * 1024**3
QUANTIZATION_KEY = "quantization_config"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message says what is wrong."""


def _read_config_json(path: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(path)
    file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a folder with config.json)")
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    return file, raw


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The model a checkpoint holds. A ``quantization_config`` describes how its weights are stored, not the
    model: it is left to :func:`read_quantization_config` and whoever loads such weights (llama4.build)."""
    file, raw = _read_config_json(path)
    raw.pop(QUANTIZATION_KEY, None)
    try:
        return model_config_from_hf(raw)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def read_quantization_config(path: str | os.PathLike) -> dict | None:
    """The checkpoint's ``quantization_config`` (how its weights are stored), or None for float weights."""
    file, raw = _read_config_json(path)
    value = raw.get(QUANTIZATION_KEY)
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(f"{file}: quantization_config must be a JSON object, got {type(value).__name__}")
    return value


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle-based weights {pickles}; they are never loaded because unpickling can run "
            "arbitrary code. Convert them to safetensors (e.g. with transformers' save_pretrained) first."
        )
    raise CheckpointError(f"{path} has no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


def iter_checkpoint(path: str | os.PathLike) -> Iterator[tuple[str, Path, object]]:
    """(tensor name, file, open handle) for every tensor; each file is opened (mmap) once."""
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    yield name, file, handle
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a valid safetensors file (truncated or corrupt?): {e}") from None


def load_weights(model: torch.nn.Module, path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str,
                 progress: Callable[[int, int], None] | None = None,
                 shapes: dict[str, torch.Size] | None = None, handled: Collection[str] = ()) -> None:
    """Fill ``model``'s parameters (typically on the meta device) from the checkpoint, strictly.

    Every header is checked first (nothing is read if any tensor is missing, unexpected or mis-shaped);
    tensors are then read largest first, so the transient memory of reading one tensor is highest
    while little else is resident and peak memory stays near the finished model.
    ``shapes`` (default: the model's parameters) lists every tensor expected by our name; a module
    with a ``load_tensor(name, tensor)`` method (e.g. a packed linear) receives its tensors through it.
    ``progress(done, total)`` is called after each tensor. ``handled``: HF names that another loader reads (a
    quantized checkpoint's codes and scales), neither read here nor reported as unexpected.
    """
    expected = dict(shapes) if shapes is not None else {n: p.shape for n, p in model.named_parameters()}
    found = locate_tensors(path, expected, model.config.multimodal, model.config.text.tie_word_embeddings,
                           handled)
    for done, (ours, (hf_name, file, _)) in enumerate(sorted(found.items(), key=lambda item: -item[1][2]), 1):
        _load_tensor(model, ours, file, hf_name, dtype, device)
        _return_freed_memory()
        if progress is not None:
            progress(done, len(found))


def locate_tensors(path: str | os.PathLike, expected: dict[str, torch.Size], multimodal: bool, tied: bool,
                   handled: Collection[str] = ()) -> dict[str, tuple[str, Path, int]]:
    """Where each expected tensor (our name -> shape) is: our name -> (HF name, file, number of elements),
    from the headers alone (no tensor data is read). Strict: one CheckpointError lists every missing,
    unexpected or mis-shaped tensor. ``tied``: an ``lm_head.weight`` is tolerated and ignored; ``handled``: HF
    names another loader reads."""
    found: dict[str, tuple[str, Path, int]] = {}  # our name -> (HF name, file, number of elements)
    unexpected, misshaped = [], []
    for hf_name, file, handle in iter_checkpoint(path):
        if hf_name in handled:
            continue
        ours = from_hf_name(hf_name, multimodal)
        if ours is None or ours not in expected:
            if not (tied and ours == "text.output.weight"):
                unexpected.append(hf_name)
            continue
        shape = tuple(handle.get_slice(hf_name).get_shape())
        found[ours] = (hf_name, file, math.prod(shape))
        if shape != tuple(expected[ours]):
            misshaped.append(f"{hf_name}: checkpoint {list(shape)}, model {list(expected[ours])}")
    missing = [to_hf_name(n, multimodal) for n in expected if n not in found]
    if missing or unexpected or misshaped:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                problems.append(f"  {len(items)} {label}:\n    {shown}")
        raise CheckpointError(f"checkpoint {path} does not match its config.json:\n" + "\n".join(problems))
    return found


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Give the transient buffers of the last tensor back to the OS (glibc keeps freed heap pages, and
    interleaved with the weights already loaded they would add ~30% to resident memory)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The module that takes tensor ``name`` and the name relative to it: the parameter's own module,
    or the nearest ancestor that accepts its tensors through ``load_tensor`` (e.g. a packed fusion)."""
    parts = name.split(".")
    module, depth = model, 0
    for depth, part in enumerate(parts[:-1]):
        if hasattr(module, "load_tensor"):
            break
        child = getattr(module, part, None)
        if not isinstance(child, torch.nn.Module):
            break
        module = child
    else:
        depth = len(parts) - 1
    return module, ".".join(parts[depth:])


def _load_tensor(model: torch.nn.Module, name: str, file: Path, hf_name: str, dtype: torch.dtype,
                 device: torch.device | str) -> None:
    """Read one tensor through its own short-lived mapping of the file and hand it to its module.

    safetensors returns tensors backed by the file's memory map, whose resident pages live as long as
    the map. Each tensor is therefore converted or copied (or packed, by modules with ``load_tensor``)
    while the map is open, and the map is closed at once: resident memory is the model being built,
    never model + file.
    """
    module, attr = _owner(model, name)
    try:
        with safe_open(file, framework="pt") as handle:
            tensor = handle.get_tensor(hf_name)
            target = dtype if tensor.is_floating_point() else tensor.dtype
            converted = tensor.to(device=device, dtype=target)  # the mapped tensor itself if nothing changes
            if hasattr(module, "load_tensor"):
                module.load_tensor(attr, converted)
            else:
                owned = converted.clone() if converted.data_ptr() == tensor.data_ptr() else converted
                module._parameters[attr] = torch.nn.Parameter(owned, requires_grad=False)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: cannot read {hf_name}: {e}") from None


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write config.json and safetensors in the HF layout (sharded above ``max_shard_bytes``)."""
    config: ModelConfig = model.config
    tensors = {to_hf_name(name, config.multimodal): p.detach() for name, p in model.named_parameters()}
    write_checkpoint(path, model_config_to_hf(config, dtype_name(tensors.values())), tensors, max_shard_bytes)


def dtype_name(tensors: Iterable[torch.Tensor]) -> str:
    """The ``dtype`` a config.json states for these float tensors: theirs if they share one, else float32."""
    dtypes = {t.dtype for t in tensors}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"


def write_checkpoint(path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write ``config`` (the config.json document) and ``tensors`` (HF name -> tensor, in this order) as
    safetensors, sharded above ``max_shard_bytes`` with an index.

    Tensors may be views (a transpose, a row slice): each is made contiguous only while its shard is written,
    so the transient memory is one shard. New files are written under temporary names and renamed into
    place; weight files of an earlier save in the same directory are removed only after the new ones are
    complete.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    written = []
    for shard, name in zip(shards, names):
        tmp = path / (name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, str(tmp), metadata={"format": "pt"})
        written.append((tmp, path / name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for shard, name in zip(shards, names) for k in shard}}
        tmp = path / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append((tmp, path / INDEX_FILE))
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    written.append((tmp, path / "config.json"))
    for tmp, final in written:
        os.replace(tmp, final)
    keep = {final.name for _, final in written}
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        if stale.name not in keep and stale.exists():
            stale.unlink()
