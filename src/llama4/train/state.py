"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout of ``<out>/checkpoint/``::

    model/              config.json + model.safetensors (HF layout: llama4.load_model / transformers load it),
                        or, for a module that is not a whole model (e.g. a probe around the vision
                        tower), weights.safetensors with the module's own state-dict names
    state.safetensors   optimizer tensors, named ``opt.<param name>.<key>`` (exp_avg, exp_avg_sq, step)
    state.json          step, data position, optimizer hyper-parameters, train config

A checkpoint is written to ``checkpoint.tmp`` and renamed into place, so an interrupted write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from llama4.build import load_model, save_model

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "weights.safetensors"


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten ``optimizer.state_dict()`` into (safetensors dict, JSON-able rest), keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [p for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, per_param in sd["state"].items():
        name = names[id(order[index])]
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{name}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in sd["param_groups"]]
    params = [[names[id(order[i])] for i in g["params"]] for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "params": params, "scalars": scalars}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   meta: dict) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if [n for group in meta["params"] for n in group] != order:
        raise ValueError("the checkpoint's optimizer covers different parameters than this model's optimizer")
    state: dict[int, dict] = {}
    for index, name in enumerate(order):
        prefix = f"opt.{name}."
        per_param = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        per_param.update(meta["scalars"].get(name, {}))
        if per_param:
            state[index] = per_param
    groups, start = [], 0
    for group, names_in_group in zip(meta["param_groups"], meta["params"]):
        groups.append({**group, "params": list(range(start, start + len(names_in_group)))})
        start += len(names_in_group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        step: int, data_state: dict, extra: dict) -> Path:
    """Write ``<out_dir>/checkpoint`` atomically; returns its path."""
    out_dir = Path(out_dir)
    final, tmp = out_dir / CHECKPOINT_DIR, out_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with torch.no_grad():
        if hasattr(model, "config"):
            save_model(model, tmp / "model")
        else:
            (tmp / "model").mkdir()
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                      str(tmp / "model" / WEIGHTS_FILE))
    tensors, meta = optimizer_tensors(model, optimizer)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "data": data_state, "optimizer": meta, **extra},
                                               indent=1))
    old = out_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore model weights and optimizer state from ``<out_dir>/checkpoint``; returns state.json's dict
    (with ``step`` and ``data``), or None if there is no checkpoint."""
    path = Path(out_dir) / CHECKPOINT_DIR
    if not (path / "state.json").is_file():
        return None
    meta = json.loads((path / "state.json").read_text())
    if (path / "model" / WEIGHTS_FILE).is_file():
        weights = load_file(str(path / "model" / WEIGHTS_FILE))
    else:
        weights = load_model(path / "model", dtype=next(model.parameters()).dtype, pack=False).state_dict()
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
    load_optimizer(model, optimizer, load_file(str(path / "state.safetensors")), meta["optimizer"])
    return meta
