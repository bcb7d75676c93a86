"""GPTQ calibration (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): the codes of a weight chosen to keep the layer's *outputs* on real inputs close, not each weight.

Round to nearest (formats.quantize) minimises every weight's own error. GPTQ minimises ||X W^T - X Ŵ^T||^2 over
the calibration inputs X of the layer [n, in], whose second moment is the Hessian H = X^T X [in, in]. It quantizes
a weight's input columns one at a time, left to right; the error each column's rounding leaves is spread over the
columns not yet quantized, in the proportions that cancel it best on inputs distributed like X (the optimal brain
surgeon update, through the inverse Hessian). Implemented as in the paper:

* H is dampened (``percdamp`` x the mean of its diagonal added to the diagonal) so that its inverse exists (and
  the calibration set is not fitted too closely: 0.03 by default, not the paper's 0.01, chosen on the embedded
  model from 0.01 / 0.03 / 0.1 / 0.3 / 1 by the KL on the TinyStories validation text from its token 100,000 on,
  disjoint from the 16,384 tokens bench/quant_quality.py scores: ``int8,head=int8`` 6.4e-5 at 0.01, 3.7e-5 at
  0.03, ``int4-g32,head=int8`` 1.61e-3 and 1.65e-3 (round to nearest: 9.1e-5 and 4.37e-3)); an
  input that is zero on every calibration token ("dead") gets a diagonal of 1 and no cross terms, so it is rounded
  to nearest and moves no other column (its weight is kept, not zeroed: other inputs may reach it);
* the updates go through the upper Cholesky factor U of H^-1 (H^-1 = U^T U): after column j is rounded, the
  columns after it move by -err_j / U[j, j] * U[j, k], which is the sequential inverse-Hessian update (the test
  re-derives it in float64 with the explicit inverses);
* in blocks of ``block`` columns (lazy batch updates): within a block column by column, then the columns after it
  in one product;
* a group's scale (and zero point) is computed from the group's weights *as they are when the group is reached*
  (every earlier column's compensation applied: a block is a whole number of groups), with exactly the rules of
  formats.quantize (absmax / 7 or / 127, asymmetric ranges widened to 0, scales rounded up to their storage
  dtype); codes that the compensation pushes past the range are clipped. So the result is a QuantizedTensor in
  the very layout quantize() writes (int8 per output channel, int4 groups symmetric or asymmetric); with H = I
  it is quantize()'s output bit for bit. NF4 is not calibrated (its levels are not a uniform grid): refused.

:func:`gptq_quantize_model` applies a recipe to a model with GPTQ, sequentially: decoder layer by decoder layer,
each from the hidden states the already-quantized layers before it produce (held for the calibration set, one
layer at a time), and within a layer in the order the layer computes: q / k / v (one Hessian: one input), then
wo, then the shared or dense MLP's gate and up and the routed experts' gate_up, then their down projections, each
from the inputs the quantized modules before it give; the output head last, on the final norm's output. A routed
expert's Hessians come from the tokens routed to it, as the expert multiplies them (the token times its router
score: model/moe.py scales the expert's *input*); an expert that gets fewer tokens than its weight has inputs
(``min_expert_tokens``) is rounded to nearest instead, and reported. The routers, norms and embeddings are never
quantized, as in recipe.py.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4.model.moe import Experts, each_expert_on_its_rows, shared_plus_routed
from llama4.model.transformer import check_token_ids, text_decoder
from llama4.quant.formats import (
    QuantizedTensor,
    WeightFormat,
    _nonzero,
    _stored_scale,
    dequantize,
    pack_int4,
    quantize,
    stack,
)
from llama4.quant.modules import QuantizedExperts, QuantizedLinear
from llama4.quant.recipe import QuantRecipe, Target, checked_targets

PERCDAMP = 0.03
BLOCK = 128


class Hessian:
    """H = sum over calibration rows of x^T x for one weight's inputs x [..., in] (float32 sums), and the count."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.sum.shape[0]).float()
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat,
                  scale_dtype: torch.dtype = torch.float32, *, block: int = BLOCK, percdamp: float = PERCDAMP,
                  dtype: torch.dtype = torch.float32) -> QuantizedTensor:
    """GPTQ codes of ``weight`` [out, in] for inputs whose Hessian (sum of x^T x, any positive scale) is
    ``hessian`` [in, in]; the updates computed in ``dtype`` (the Cholesky factorisation in float64)."""
    if not fmt.is_integer:
        raise ValueError(f"GPTQ calibrates int8 and int4 formats, not {fmt}: quantize it to nearest")
    if weight.dim() != 2 or not weight.is_floating_point() or weight.is_meta:
        raise ValueError(f"gptq_quantize takes a float weight [out, in] with values, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"the Hessian of a weight {tuple(weight.shape)} is [{in_features}, {in_features}], got "
                         f"{tuple(hessian.shape)}")
    if not percdamp > 0:
        raise ValueError(f"percdamp must be > 0, got {percdamp}")
    group = fmt.group or in_features
    if in_features % group:
        raise ValueError(f"{fmt} needs the input dimension to be a multiple of {group}, got a weight "
                         f"{tuple(weight.shape)} (out, in); use a smaller group or int8")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if fmt.group is not None:  # a block holds whole groups: a group's scale sees every earlier column's update
        block = -(-block // group) * group
    # transposed, [in, out]: a column of the weight is a contiguous row here
    w = weight.detach().to(dtype).t().contiguous()
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a weight with inf or nan values")
    u = _inverse_cholesky(hessian, percdamp).to(dtype)

    groups = in_features // group
    codes = torch.empty(in_features, out_features, dtype=torch.int16, device=w.device)
    scales = torch.empty(out_features, groups, dtype=scale_dtype, device=w.device)
    zeros = None if fmt.symmetric else torch.empty(out_features, groups, dtype=torch.uint8, device=w.device)
    qmax = 2 ** (fmt.bits - 1) - 1
    low_code, high_code = (-qmax, qmax) if fmt.symmetric else (0, 15)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        errors = torch.empty(end - start, out_features, dtype=dtype, device=w.device)
        for column in range(start, end):
            if column % group == 0:  # the group starts here: its scale from its weights as they are now
                g = column // group
                current = w[column:column + group]
                if fmt.symmetric:
                    scale = _stored_scale(current.abs().amax(0) / qmax, scale_dtype)
                    zero = torch.zeros((), dtype=dtype, device=w.device)
                else:
                    low, high = current.amin(0).clamp(max=0), current.amax(0).clamp(min=0)
                    scale = _stored_scale((high - low) / 15, scale_dtype)
                    zero_code = torch.round(-low / _nonzero(scale).to(dtype)).clamp(0, 15)
                    zeros[:, g] = zero_code.to(torch.uint8)
                    zero = zero_code.to(dtype)
                scales[:, g] = scale
                step, divisor = scale.to(dtype), _nonzero(scale).to(dtype)
            x = w[column]
            q = torch.round(x / divisor).add_(zero).clamp_(low_code, high_code)
            codes[column] = q
            err = errors[column - start]
            torch.sub(x, q.sub_(zero).mul_(step), out=err).div_(u[column, column])
            if column + 1 < end:  # the rest of the block now, the columns after it once per block
                w[column + 1:end].addr_(u[column, column + 1:end], err, alpha=-1)
        if end < in_features:
            w[end:].addmm_(u[start:end, end:].t(), errors, alpha=-1)
    codes = codes.t()
    if fmt.bits == 8:
        packed = codes.to(torch.int8).contiguous()
    else:
        packed = pack_int4((codes + 8 if fmt.symmetric else codes).to(torch.uint8)).contiguous()
    return QuantizedTensor(fmt, packed, scales, zeros)


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor U of the dampened H^-1 (H^-1 = U^T U), float64; dead inputs (diagonal 0) get a
    diagonal of 1 and no cross terms. If the dampened H is still not positive definite (numerically), the damping
    is raised tenfold, up to three times."""
    h = hessian.detach().to(torch.float64).clone()
    if not torch.isfinite(h).all():
        raise ValueError("the Hessian has inf or nan values (inf or nan activations in the calibration inputs)")
    h = (h + h.t()) / 2
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    mean = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(h + percdamp * 10 ** attempt * mean * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(f"the Hessian is not positive definite even with damping {percdamp * 1000} x its mean diagonal")


# -- a whole model -------------------------------------------------------------------------------------------------


class _CalibrationExperts(nn.Module):
    """Stands in for a layer's routed experts during calibration: computes each expert as the float (or, once
    quantized, the dequantized) experts do, and adds the inputs each expert's gate_up or down multiplies to that
    expert's Hessian. Weights [E, out, in] (nn.Linear's layout, the quantized experts' one)."""

    groups_in_one_call = False

    def __init__(self, experts: Experts):
        super().__init__()
        self.float_dtype = experts.gate_up.dtype
        self.model_batch_invariant = experts.batch_invariant
        self.batch_invariant = False  # never the one-tile path, which runs every expert over every row
        # one layer's experts at a time, [E, out, in] as the quantized experts hold them
        self.gate_up = experts.gate_up.detach().transpose(1, 2).contiguous()
        self.down = experts.down.detach().transpose(1, 2).contiguous()
        self.gate_up_quantized: QuantizedTensor | None = None
        self.record: str | None = None  # "gate_up" or "down": whose inputs are added
        self.hessians: list[Hessian] = []

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.record == "gate_up":
            self.hessians[e].add(x)
        gate, up = F.linear(x, self.gate_up[e].to(x.dtype)).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        if self.record == "down":
            self.hessians[e].add(hidden)
        return F.linear(hidden, self.down[e].to(x.dtype))

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return each_expert_on_its_rows(self, x, counts)

    def with_shared(self, shared: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                    scores: torch.Tensor) -> torch.Tensor:
        return shared_plus_routed(self, shared, x, expert_ids, scores)


class _Stop(Exception):
    """Ends a calibration pass through a layer once the inputs it was run for are recorded."""


def _record(hessian: Hessian, _module: nn.Module, args: tuple, stop: bool) -> None:
    hessian.add(args[0])
    if stop:
        raise _Stop


def _stage(target: Target) -> int:
    """When a target is quantized within its layer: 0 q/k/v, 1 wo, 2 gate/up/experts' gate_up, 3 down."""
    if target.kind == "attention":
        return 1 if target.attribute == "wo" else 0
    if target.kind == "experts":
        return 2  # gate_up at stage 2, down at stage 3 (handled together)
    return 3 if target.attribute == "down" else 2


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, recipe: QuantRecipe | str, calibration: torch.Tensor | Iterable[torch.Tensor],
                        *, batch: int = 8, block: int = BLOCK, percdamp: float = PERCDAMP,
                        min_expert_tokens: int | None = None,
                        progress: Callable[[str], None] | None = None) -> nn.Module:
    """:func:`llama4.quant.quantize_model` with GPTQ codes: swap quantized stand-ins in for the weights ``recipe``
    names, in place, each calibrated on ``calibration`` (token ids [N, T], run ``batch`` rows at a time, or an
    iterable of [b, T] batches), and return the model.

    ``model`` is a plain (not packed) float Llama4Model or TextModel (text only: the calibration never sees an
    image). Every format must be int8 or int4 (nf4 is refused). ``min_expert_tokens``: a routed expert with fewer
    calibration tokens than this (default: its weight's input width) is rounded to nearest. ``progress`` gets a
    line per layer (and per expert that fell back to round to nearest). Everything is checked before the first
    module is swapped; a failure later (a Hessian that no damping makes positive definite) leaves the model partly
    quantized: start again from the float model.
    """
    recipe, chosen = checked_targets(model, recipe, "GPTQ calibration")
    text, prefix = text_decoder(model, "GPTQ calibration")
    for target in chosen:
        fmt = recipe.format_for(target.kind)
        if not fmt.is_integer:
            raise ValueError(f"{target.name}: GPTQ calibrates int8 and int4 formats, not {fmt}; quantize nf4 to "
                             "nearest (without calibration)")
    batches = _batches(calibration, batch, text.config.vocab_size)
    if not chosen:
        model.quant_recipe = recipe
        return model
    say = progress or (lambda line: None)
    device = text.embed.weight.device
    hidden = [text.embed(ids.to(device)) for ids in batches]
    tables = [text.position_tables(h, torch.arange(h.shape[1], device=device)[None], None) for h in hidden]
    options = dict(scale_dtype=recipe.scale_dtype, block=block, percdamp=percdamp)
    start = time.perf_counter()
    for i, layer in enumerate(text.layers):
        at = f"{prefix}layers.{i}."
        here = [t for t in chosen if t.name.startswith(at)]
        for stage in range(4):
            targets = [t for t in here if _stage(t) == stage or (t.kind == "experts" and stage == 3)]
            if not targets:
                continue
            recorders, handles, shared_inputs = {}, [], {}
            for t in targets:
                module = getattr(t.parent, t.attribute)
                if t.kind == "experts":
                    recorder = module if isinstance(module, _CalibrationExperts) else _CalibrationExperts(module)
                    recorder.record = "gate_up" if stage == 2 else "down"
                    width = (recorder.gate_up if stage == 2 else recorder.down).shape[2]
                    recorder.hessians = [Hessian(width, device) for _ in range(recorder.num_experts)]
                    setattr(t.parent, t.attribute, recorder)
                    recorders[t.name] = recorder
                elif (id(t.parent), stage) in shared_inputs:  # wk, wv after wq; up after gate: the same input
                    recorders[t.name] = shared_inputs[id(t.parent), stage]
                else:
                    hessian = Hessian(module.in_features, device)
                    shared_inputs[id(t.parent), stage] = recorders[t.name] = hessian
                    # q/k/v, wo: nothing after their inputs is needed (unless the layer tiles its rows)
                    stop = stage < 2 and not t.parent.batch_invariant
                    handles.append(module.register_forward_pre_hook(partial(_record, hessian, stop=stop)))
            for h, tab in zip(hidden, tables):
                try:
                    layer(h, tab, None)
                except _Stop:
                    pass
            for handle in handles:
                handle.remove()
            for t in targets:
                fmt = recipe.format_for(t.kind)
                if t.kind == "experts":
                    _experts_stage(t, recorders[t.name], stage, fmt, options, min_expert_tokens, say)
                else:
                    linear = getattr(t.parent, t.attribute)
                    tensor = gptq_quantize(linear.weight, recorders[t.name].sum, fmt, **options)
                    setattr(t.parent, t.attribute,
                            QuantizedLinear.from_tensor(tensor, linear.bias, float_dtype=linear.weight.dtype))
        say(f"GPTQ layer {i}: {len(here)} modules ({time.perf_counter() - start:.1f} s)")
        if here and here[-1] is chosen[-1]:
            break  # nothing after this layer to calibrate
        hidden = [layer(h, tab, None) for h, tab in zip(hidden, tables)]
    head = [t for t in chosen if t.kind == "head"]
    if head:
        linear = text.output
        hessian = Hessian(linear.in_features, device)
        for h in hidden:
            hessian.add(text.norm(h))
        tensor = gptq_quantize(linear.weight, hessian.sum, recipe.head, **options)
        text.output = QuantizedLinear.from_tensor(tensor, linear.bias, float_dtype=linear.weight.dtype)
        say(f"GPTQ head ({time.perf_counter() - start:.1f} s)")
    model.quant_recipe = recipe
    return model


def _experts_stage(target: Target, recorder: _CalibrationExperts, stage: int, fmt: WeightFormat, options: dict,
                   min_tokens: int | None, say: Callable[[str], None]) -> None:
    """Stage 2: the experts' gate_up quantized (the recorder then computes with the dequantized ones); stage 3:
    their down, and the QuantizedExperts swapped in for the recorder."""
    name = "gate_up" if stage == 2 else "down"
    weights = recorder.gate_up if stage == 2 else recorder.down
    tensors = []
    for e, (weight, hessian) in enumerate(zip(weights, recorder.hessians)):
        needed = weight.shape[1] if min_tokens is None else min_tokens
        if hessian.count < needed:
            say(f"{target.name} expert {e} {name}: {hessian.count} calibration tokens (< {needed}): round to nearest")
            tensors.append(quantize(weight, fmt, options["scale_dtype"]))
        else:
            tensors.append(gptq_quantize(weight, hessian.sum, fmt, **options))
    quantized = stack(tensors)
    recorder.hessians = []
    if stage == 2:
        recorder.gate_up_quantized = quantized
        recorder.gate_up = dequantize(quantized, recorder.float_dtype)
        return
    module = QuantizedExperts.from_tensors(recorder.gate_up_quantized, quantized, float_dtype=recorder.float_dtype,
                                           batch_invariant=recorder.model_batch_invariant)
    setattr(target.parent, target.attribute, module)


def _batches(calibration: torch.Tensor | Iterable[torch.Tensor], batch: int, vocab: int) -> list[torch.Tensor]:
    """The calibration as a list of [b, T] LongTensors, checked."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if isinstance(calibration, torch.Tensor):
        calibration = list(calibration.split(batch)) if calibration.dim() == 2 else [calibration]
    batches = list(calibration)
    if not batches:
        raise ValueError("GPTQ needs calibration tokens: got none")
    for ids in batches:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            what = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"calibration token ids are integer tensors [batch, tokens], got {what}")
        if ids.numel() == 0:
            raise ValueError(f"empty calibration batch {tuple(ids.shape)}")
        check_token_ids(ids, vocab, "calibration token ids")
    return [ids.long() for ids in batches]


def token_windows(ids: list[int], tokens: int, length: int) -> torch.Tensor:
    """The first ``tokens`` of a token stream as windows [tokens // length, length] (fewer if the stream is
    shorter, at least one)."""
    if length < 2:
        raise ValueError(f"calibration windows need at least 2 tokens, got a length of {length}")
    if tokens < length:
        raise ValueError(f"{tokens} calibration tokens do not fill one window of {length}")
    count = min(tokens, len(ids)) // length
    if count < 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)


def calibration_windows(path: str | os.PathLike, tokenizer, tokens: int, length: int,
                        separator: int | None = None) -> torch.Tensor:
    """Calibration token windows [N, length] from a text file: ``.txt`` (one text) or ``.jsonl`` (one record a line,
    its ``"text"``), either gzipped (``.gz``). Records are tokenized in order, ``separator`` (e.g. the end-of-text
    id) between them, until ``tokens`` tokens are read; see :func:`token_windows`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {path} not found: give a .txt, .txt.gz, .jsonl or .jsonl.gz file")
    name = path.name.removesuffix(".gz")
    if not name.endswith((".txt", ".jsonl")):
        raise ValueError(f"calibration text {path}: expected a .txt, .txt.gz, .jsonl or .jsonl.gz file")
    ids: list[int] = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        records = (f.read(),) if name.endswith(".txt") else f
        for number, record in enumerate(records, 1):
            if len(ids) >= tokens:
                break
            if name.endswith(".jsonl"):
                if not record.strip():
                    continue
                try:
                    record = json.loads(record)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"calibration text {path}, line {number}: not a JSON object with a \"text\" "
                                     f"string ({type(e).__name__}: {e})") from None
                if not isinstance(record, str):
                    raise ValueError(f"calibration text {path}, line {number}: \"text\" is not a string")
            if ids and separator is not None:
                ids.append(separator)
            ids += tokenizer.encode(record)
    return token_windows(ids, tokens, length)


__all__ = ["Hessian", "calibration_windows", "gptq_quantize", "gptq_quantize_model", "token_windows"]
