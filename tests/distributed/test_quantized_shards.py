"""Quantized checkpoints loaded sharded (load_sharded over gloo, 2 ranks): compressed-tensors int4 (groups of 32,
asymmetric: packed codes, group scales, zero points packed along the outputs), int8 and FP8, and Meta's
fbgemm_fp8 (fused FP8 experts with a scale per output column). Each rank's logits equal the single-process
quantized model's (fp32, 1e-5 relative: the same codes, only the sums' order differs), greedy tokens are
identical, and each rank reads no more than the bytes it keeps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import llama4
from llama4.distributed import ParallelPlan
from llama4.quant import compressed_tensors as ct
from llama4.quant import quantize_model, save_quantized
from llama4.quant.formats import dequantize
from tests.distributed import workers

PLANS = [(2, 2), (2, 1), (1, 2)]
LOADED = ["int4-g32-asym,head=int8", "int8", "ct-fp8", "fbgemm_fp8"]
FP8 = torch.float8_e4m3fn


def _model() -> llama4.Llama4Model:
    return llama4.random_model(workers.quantized_config(), std=workers.STD, seed=workers.SEED)


def _rows_to_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes [out, in] and float32 scales [out, 1], the largest magnitude of each row at FP8's maximum."""
    scale = (weight.abs().amax(dim=1, keepdim=True).float() / torch.finfo(FP8).max).clamp_min(1e-12)
    return (weight.float() / scale).to(FP8), scale


def _ct_fp8(int8_path: Path, path: Path) -> None:
    """compressed-tensors float-quantized (FP8 per channel) from the int8 checkpoint's weights: ``m.weight`` fp8
    and ``m.weight_scale`` [out, 1] for each of its quantized linears, everything else as it was."""
    path.mkdir()
    config = json.loads((int8_path / "config.json").read_text())
    qc = config["quantization_config"]
    scheme = ct.parse_config(qc).schemes[0]
    tensors = {}
    for file in int8_path.glob("*.safetensors"):
        tensors.update(load_file(file))
    out = {}
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        module = name.removesuffix(".weight_packed")
        parts = {s: tensors.pop(f"{module}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape")}
        values = dequantize(ct.decompress(parts, scheme, module), torch.float32)
        out[f"{module}.weight"], out[f"{module}.weight_scale"] = _rows_to_fp8(values)
    out.update(tensors)
    save_file(out, str(path / "model.safetensors"))
    for group in qc["config_groups"].values():
        group["format"] = ct.FLOAT_QUANTIZED
        group["weights"].update(type="float", num_bits=8, strategy="channel", symmetric=True, group_size=None)
    qc["format"] = ct.FLOAT_QUANTIZED
    (path / "config.json").write_text(json.dumps(config))


def _fbgemm(float_path: Path, path: Path) -> None:
    """Meta's fbgemm_fp8 layout from a float checkpoint: every linear but the head and the routers FP8 with row
    scales; the fused experts [E, in, out] FP8 with a scale per expert and output column ([E, 1, 2I] for
    gate_up, [E, D, 1] for down)."""
    path.mkdir()
    tensors = load_file(str(float_path / "model.safetensors"))
    out = {}
    for name, value in tensors.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            per_column = [_rows_to_fp8(expert.t()) for expert in value]  # [out, in] per expert
            out[name] = torch.stack([codes.t() for codes, _ in per_column])
            scales = torch.stack([scale for _, scale in per_column])  # [E, out, 1]
            out[name + "_scale"] = scales.transpose(1, 2).contiguous() if "gate_up" in name else scales
        elif name.endswith(".weight") and value.dim() == 2 and "router" not in name and "embed" not in name \
                and not name.startswith("lm_head"):
            out[name], out[name + "_scale"] = _rows_to_fp8(value)
        else:
            out[name] = value
    save_file(out, str(path / "model.safetensors"))
    config = json.loads((float_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                     "modules_to_not_convert": ["lm_head", "feed_forward.router"]}
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("quantized")
    paths = {}
    for recipe in ("int4-g32-asym,head=int8", "int8"):
        paths[recipe] = root / recipe.replace(",", "_").replace("=", "-")
        save_quantized(quantize_model(_model(), recipe), paths[recipe])
    paths["ct-fp8"] = root / "ct-fp8"
    _ct_fp8(paths["int8"], paths["ct-fp8"])
    paths["float"] = root / "float"
    llama4.save_model(_model(), paths["float"])
    paths["fbgemm_fp8"] = root / "fbgemm"
    _fbgemm(paths["float"], paths["fbgemm_fp8"])
    # workers.config("a"): the attention output has 32 inputs, 16 per rank at tp=2, inside one group of 32
    paths["split_group"] = root / "split_group"
    model = llama4.random_model(workers.config("a"), std=workers.STD, seed=workers.SEED)
    save_quantized(quantize_model(model, "attention=int4-g32"), paths["split_group"])
    return {name: str(path) for name, path in paths.items()}


def _spawn(tmp_path_factory, world: int, checkpoints: dict[str, str]) -> list[dict]:
    out = tmp_path_factory.mktemp(f"quantized_ranks{world}")
    mp.spawn(workers.run_quantized, args=(world, str(out / "store"), str(out), checkpoints), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, checkpoints) -> list[dict]:
    return _spawn(tmp_path_factory, 2, checkpoints)


@pytest.mark.parametrize("name", LOADED)
@pytest.mark.parametrize("tp,ep", PLANS)
def test_sharded_quantized_logits_and_tokens_equal_one_process(ranks, name, tp, ep):
    for rank, results in enumerate(ranks):
        entry = results["loads"][(name, tp, ep)]
        assert entry["rel_err"] <= 1e-5, (rank, entry["rel_err"])
        assert entry["tokens"] == entry["want_tokens"], rank  # generated at tp=2 ep=2 only
        assert entry["recipe"] == entry["want_recipe"] != "None"


@pytest.mark.parametrize("name", LOADED)
@pytest.mark.parametrize("tp,ep", PLANS)
def test_each_rank_reads_no_more_than_it_keeps(ranks, name, tp, ep):
    """Bytes read from the files <= bytes held (codes and scales read as stored; zero points are read packed,
    8 rows to a word, and held one per byte; FP8 becomes int8 of the same size; the weight_shape pairs add 16
    bytes per packed linear). Every rank keeps well under the whole model at tp=2, ep=2."""
    for rank, results in enumerate(ranks):
        entry = results["loads"][(name, tp, ep)]
        read = sum(nbytes for _, nbytes in entry["reads"])
        shapes = sum(nbytes for tensor, nbytes in entry["reads"] if tensor.endswith("weight_shape"))
        assert read - shapes <= entry["local_bytes"], (rank, read, entry["local_bytes"])
        if (tp, ep) == (2, 2):
            assert entry["local_bytes"] < 0.6 * entry["full_bytes"], rank


@pytest.mark.parametrize("recipe", workers.QUANTIZE_RECIPES)
@pytest.mark.parametrize("tp,ep", PLANS)
def test_quantize_sharded_equals_quantizing_the_whole_model(ranks, recipe, tp, ep):
    """Each rank's part quantized to the whole model's codes (int8 rows split at tp=2 take the whole rows' maxima;
    int4 / NF4 groups of 32 fall within each part): logits within 1e-5 of quantize_model's."""
    for rank, results in enumerate(ranks):
        entry = results["quantize"][(recipe, tp, ep)]
        assert entry["rel_err"] <= 1e-5, (rank, entry["rel_err"])
        assert entry["recipe"] == str(llama4.quant.QuantRecipe.parse(recipe))


@pytest.mark.parametrize("recipe", workers.QUANTIZE_RECIPES)
@pytest.mark.parametrize("tp,ep", PLANS)
def test_the_per_device_planner_counts_what_quantize_sharded_holds(ranks, recipe, tp, ep):
    """`llama4 info --tp --ep --quant` (info.weight_bytes with a plan) against the bytes each rank holds (fp32)."""
    from llama4.info import weight_bytes

    for rank, results in enumerate(ranks):
        planned = weight_bytes(workers.quantized_config(), recipe, torch.float32, ParallelPlan(tp, ep), rank)
        assert planned["total_bytes"] == results["quantize"][(recipe, tp, ep)]["bytes"], rank


def test_quantize_sharded_int8_rows_split_within_expert_blocks(tmp_path_factory, checkpoints):
    """4 ranks, tp=4, ep=2: each expert's down rows are split over the 2 ranks of its block (their maxima only)."""
    for rank, results in enumerate(_spawn(tmp_path_factory, 4, {"float": checkpoints["float"]})):
        for plan, entry in results["quantize"].items():
            assert entry["rel_err"] <= 1e-5, (rank, plan, entry["rel_err"])


def test_a_plan_that_splits_an_int4_group_is_refused(ranks):
    pattern = (r"CheckpointError: .*: model\.layers\.0\.self_attn\.o_proj: inputs (0:16|16:32) of \[32, 32\] do not "
               r"fall on the groups of 32 inputs: a part must hold whole groups")
    for results in ranks:
        assert re.match(pattern, results["split_group"]), results["split_group"]
