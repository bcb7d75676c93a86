"""What each spawned rank runs (imported by the child processes: no pytest here, so they start fast).

Every rank builds the single-process reference itself (random weights from a seed), applies the plans and
writes what it measured to ``out/rank{r}.pt``; the tests in test_parallel.py judge the numbers.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from pathlib import Path

import torch
import torch.distributed as dist

import llama4
from llama4.distributed import ParallelPlan, load_sharded, shard_model
from llama4.distributed import shard as shard_module
from llama4.presets import text_config

SEED, STD = 3, 0.2
PROMPTS = [[5, 17, 33, 2, 90, 41, 8], [60, 3, 12, 71]]  # ragged: the decode steps run rows at two lengths


def config(name: str, a_layers: int = 4) -> llama4.ModelConfig:
    """"a": ``a_layers`` layers (a global layer every 4th), untied head, top-1, dense and MoE layers interleaved, KV
    heads split at tp=2 and replicated at tp=4. "b": 4 layers, tied head, top-2, every layer MoE, one KV head
    (replicated at any tp). Attention chunks of 4 tokens."""
    fields = dict(vocab_size=96, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=32,
                  intermediate_size_mlp=48, num_experts=4, num_experts_per_tok=1, attention_chunk_size=4,
                  floor_scale=3, attn_scale=0.5, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,),
                  pad_token_id=0)
    if name == "a":
        return llama4.ModelConfig(text=text_config(num_layers=a_layers, moe_step=2, **fields))
    fields.update(num_kv_heads=1, num_experts_per_tok=2, tie_word_embeddings=True)
    return llama4.ModelConfig(text=text_config(num_layers=4, moe_step=1, **fields))


def reference(name: str) -> llama4.Llama4Model:
    return llama4.random_model(config(name), std=STD, seed=SEED)


def input_ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _init(rank: int, world: int, store: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


@contextlib.contextmanager
def counting_collectives(log: list[tuple[str, int]]):
    """Record (collective, payload bytes) of every all_reduce / all_gather / all_to_all this process calls."""
    names = ("all_reduce", "all_gather", "all_to_all", "all_to_all_single", "broadcast", "reduce_scatter")
    saved = {name: getattr(dist, name) for name in names}

    def wrap(name):
        def counted(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            log.append((name, tensor.numel() * tensor.element_size()))
            return saved[name](*args, **kwargs)
        return counted

    for name in names:
        setattr(dist, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


class _CountingSlice:
    def __init__(self, inner, log: list[tuple[str, int]], name: str):
        self.inner, self.log, self.name = inner, log, name

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        piece = self.inner[index]
        self.log.append((self.name, piece.numel() * piece.element_size()))
        return piece


class _CountingFile:
    """A safe_open handle that records the bytes each get_slice read returns; whole-tensor reads are refused."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_slice(self, name):
        return _CountingSlice(self.inner.get_slice(name), self.log, name)

    def get_tensor(self, name):
        raise AssertionError(f"load_sharded read {name} whole")


def _plan_checks(rank: int, world: int, plans: list[tuple[int, int]], generate: bool) -> dict:
    results = {}
    ids = input_ids()
    for name in ("a", "b"):
        ref = reference(name)
        want = ref(ids)
        want_tokens = llama4.generate(ref, PROMPTS, max_new_tokens=6, stop_tokens=[]) if generate else None
        for tp, ep in plans:
            start = time.perf_counter()
            model = shard_model(reference(name), ParallelPlan(tp, ep))
            entry = {"rel_err": rel_err(model(ids), want),
                     "local_params": sum(p.numel() for p in model.parameters()),
                     "full_params": sum(p.numel() for p in ref.parameters())}
            if generate:
                entry["tokens"] = llama4.generate(model, PROMPTS, max_new_tokens=6, stop_tokens=[])
                entry["want_tokens"] = want_tokens
            entry["seconds"] = time.perf_counter() - start
            results[(name, tp, ep)] = entry
    return results


def _count_checks() -> dict:
    results = {}
    ids = input_ids()[:, :5]
    for tp, ep in ((2, 1), (1, 2), (2, 2)):
        model = shard_model(reference("a"), ParallelPlan(tp, ep))
        log: list[tuple[str, int]] = []
        with counting_collectives(log), torch.inference_mode():
            model(ids)
        results[(tp, ep)] = log
    return results


def _load_checks(rank: int, checkpoints: dict[str, str]) -> dict:
    results = {}
    ids = input_ids()
    real_open = shard_module.safe_open
    for name, path in checkpoints.items():
        want = reference(name)(ids)
        for tp, ep in ((2, 2), (2, 1), (1, 2)):
            log: list[tuple[str, int]] = []
            shard_module.safe_open = lambda file, framework, log=log: _CountingFile(real_open(file, framework), log)
            try:
                model = load_sharded(path, ParallelPlan(tp, ep))
            finally:
                shard_module.safe_open = real_open
            results[(name, tp, ep)] = {"rel_err": rel_err(model(ids), want), "reads": log,
                                       "local_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    return results


def run_world(rank: int, world: int, store: str, out: str, checkpoints: dict[str, str]) -> None:
    """All checks of one group size; plans with every tp / ep this size allows."""
    _init(rank, world, store, timeout_s=60)
    try:
        if world == 2:
            plans = [(2, 1), (1, 2), (2, 2)]
            results = {"plans": _plan_checks(rank, world, plans, generate=True), "counts": _count_checks(),
                       "loads": _load_checks(rank, checkpoints)}
        else:
            results = {"plans": _plan_checks(rank, world, [(4, 2), (1, 4)], generate=False)}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_stalled(rank: int, world: int, store: str) -> None:
    """Rank 1 stops taking part (it sleeps past the timeout): rank 0's all-reduce must fail, not wait forever."""
    _init(rank, world, store, timeout_s=2)
    if rank == 1:
        time.sleep(8)
        return
    dist.all_reduce(torch.ones(4))


# ---------------------------------------------------------------- quantized checkpoints, sharded


def quantized_config() -> llama4.ModelConfig:
    """Like "a", with sizes whose row-parallel splits at tp = 2 fall on int4 groups of 32 inputs (attention output
    64 / 2, shared expert 64 / 2, dense MLP 128 / 2, each expert's hidden 64 / 2)."""
    fields = dict(vocab_size=96, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                  intermediate_size_mlp=128, num_experts=4, num_experts_per_tok=1, attention_chunk_size=4,
                  floor_scale=3, attn_scale=0.5, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,),
                  pad_token_id=0)
    return llama4.ModelConfig(text=text_config(num_layers=4, moe_step=2, **fields))


def _counting_open(real_open, log: list[tuple[str, int]]):
    """safe_open whose handles count the bytes of every read; whole-tensor reads too (quantized loaders read the
    tiny ``weight_shape`` tensors whole)."""
    class File(_CountingFile):
        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            self.log.append((name, tensor.numel() * tensor.element_size()))
            return tensor

    return lambda file, framework: File(real_open(file, framework), log)


def _quantized_checks(checkpoints: dict[str, str]) -> dict:
    from llama4.quant import checkpoint as quant_checkpoint

    results = {}
    ids = input_ids()
    saved = shard_module.safe_open, quant_checkpoint.safe_open
    for name, path in checkpoints.items():
        single = llama4.load_model(path, pack=False)
        want = single(ids)
        want_tokens = llama4.generate(single, PROMPTS, max_new_tokens=6, stop_tokens=[])
        for tp, ep in ((2, 2), (2, 1), (1, 2)):
            log: list[tuple[str, int]] = []
            shard_module.safe_open = quant_checkpoint.safe_open = _counting_open(saved[0], log)
            try:
                model = load_sharded(path, ParallelPlan(tp, ep))
            finally:
                shard_module.safe_open, quant_checkpoint.safe_open = saved
            tensors = list(model.parameters()) + list(model.buffers())
            results[(name, tp, ep)] = {
                "rel_err": rel_err(model(ids), want), "reads": log,
                "local_bytes": sum(t.numel() * t.element_size() for t in tensors),
                "full_bytes": sum(t.numel() * t.element_size() for t in [*single.parameters(), *single.buffers()]),
                "tokens": llama4.generate(model, PROMPTS, max_new_tokens=6, stop_tokens=[]) if tp == ep else None,
                "want_tokens": want_tokens if tp == ep else None,
                "recipe": str(getattr(model, "quant_recipe", None)), "want_recipe": str(single.quant_recipe)}
    return results


def _refusal(load) -> str:
    """The error ``load()`` raises (every rank raises it at the same place, before any collective is left open)."""
    try:
        load()
    except Exception as error:  # noqa: BLE001 - the test reads it
        return f"{type(error).__name__}: {error}"
    return "no error"


QUANTIZE_RECIPES = ("int8,head=int8", "int4-g32-asym,head=int8", "nf4-g32")


def quantize_checks(float_path: str, plans: list[tuple[int, int]], recipes=QUANTIZE_RECIPES) -> dict:
    """quantize_sharded of each plan's float shards against quantize_model of the whole model."""
    from llama4.distributed import quantize_sharded
    from llama4.quant import quantize_model

    results = {}
    ids = input_ids()
    for recipe in recipes:
        want = quantize_model(llama4.load_model(float_path, pack=False), recipe)(ids)
        for tp, ep in plans:
            model = quantize_sharded(load_sharded(float_path, ParallelPlan(tp, ep)), recipe, ParallelPlan(tp, ep))
            from llama4.quant.modules import QuantizedWeight

            tensors = [*model.parameters(), *(b for m in model.modules() if isinstance(m, QuantizedWeight)
                                              for b in m.buffers())]  # not the RoPE tables
            results[(recipe, tp, ep)] = {"rel_err": rel_err(model(ids), want), "recipe": str(model.quant_recipe),
                                         "bytes": sum(t.numel() * t.element_size() for t in tensors)}
    return results


def run_quantized(rank: int, world: int, store: str, out: str, checkpoints: dict[str, str]) -> None:
    _init(rank, world, store, timeout_s=60)
    try:
        if world == 2:
            loads = {k: v for k, v in checkpoints.items() if k not in ("float", "split_group")}
            results = {"loads": _quantized_checks(loads),
                       "quantize": quantize_checks(checkpoints["float"], [(2, 2), (2, 1), (1, 2)]),
                       "split_group": _refusal(lambda: load_sharded(checkpoints["split_group"], ParallelPlan(2, 1)))}
        else:  # int8 rows split over the 2 ranks of each expert block (tp=4, ep=2)
            results = {"quantize": quantize_checks(checkpoints["float"], [(4, 2)], ["int8,head=int8"])}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
