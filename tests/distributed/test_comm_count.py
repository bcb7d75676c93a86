"""The collectives of a forward on 2 and 4 ranks against docs/DISTRIBUTED.md's "Communication per token per
layer" table, read from the document itself: for every plan, each layer's calls (attention, then its MoE or dense
FFN) and the forward's own, in order, with payloads [N, D] / [N', V / W] in the model's dtype, for a prefill
(N = all tokens) and a decode step (N = one per row); and the per-token figures of the Scout / Maverick table
against the same formulas on the presets.

One spawn of 4 ranks (tests/distributed/workers.py's tiny configs: "a" interleaves dense and MoE layers with an
untied head, in bf16; "b" is all-MoE with a tied head, in fp32); the 2-rank plans run on ranks 0 and 1 in a
subgroup.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
import torch

import llama4

DOC = Path(__file__).resolve().parents[2] / "docs" / "DISTRIBUTED.md"
PLANS = [(2, 1), (1, 2), (2, 2), (4, 4), (4, 2), (4, 1), (1, 4)]
DTYPES = {"a": torch.bfloat16, "b": torch.float32}
ROWS, PROMPT = 2, 5  # a [2, 5] prefill, then one decode step of [2, 1]


def _doc_table() -> dict[str, dict[str, str]]:
    """The first table under '## Communication per token per layer': first cell -> {column: cell}."""
    text = DOC.read_text()
    section = text.split("## Communication per token per layer", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def _per_token_table() -> list[list[str]]:
    """The rows of the second table of that section (model and plan, collectives, payload, ...)."""
    section = DOC.read_text().split("## Communication per token per layer", 1)[1].split("\n## ", 1)[0]
    tables = re.split(r"\n\s*\n", section)
    rows = [t for t in tables if t.lstrip().startswith("| model, plan")][0].splitlines()[2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _elements(shape: str, sizes: dict[str, int]) -> int:
    """Elements of a documented shape such as ``N, D`` or ``N', V / W``."""
    total = 1
    for term in shape.split(","):
        match = re.fullmatch(r"\s*(\w+'?)\s*(?:/\s*(\w+))?\s*", term)
        assert match, f"cannot read the documented shape term {term!r}"
        value = sizes[match[1]]
        if match[2]:
            assert value % sizes[match[2]] == 0
            value //= sizes[match[2]]
        total *= value
    return total


def _calls(cell: str, sizes: dict[str, int], element: int) -> list[tuple[str, int]]:
    """A documented cell ("none", "1 all-reduce [N, D]", "1 all-gather of the logits [N', V / W] per rank") as
    (collective, payload bytes) calls."""
    if cell == "none":
        return []
    found = re.findall(r"(\d+) (all-reduce|all-gather)[^\[]*\[([^\]]+)\]", cell)
    assert found, f"cannot read the documented cell {cell!r}"
    return [(op.replace("-", "_"), _elements(shape, sizes) * element) for count, op, shape in found
            for _ in range(int(count))]


def expected(config: llama4.ModelConfig, tp: int, ep: int, n: int, n_logits: int, element: int
             ) -> list[tuple[str, int]]:
    """The documented calls of one forward of n tokens, layer by layer, then the forward's own."""
    table = _doc_table()
    row = table["tp = W (any ep)"] if tp > 1 else table["tp = 1, ep = W"]
    text = config.text
    sizes = {"N": n, "N'": n_logits, "D": text.hidden_size, "V": text.vocab_size, "W": max(tp, ep)}
    calls = []
    for spec in text.layers:
        calls += _calls(row["attention"], sizes, element)
        calls += _calls(row["MoE layer FFN" if spec.moe else "dense layer FFN"], sizes, element)
    return calls + _calls(row["per forward"], sizes, element)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from llama4.distributed import ParallelPlan, shard_model
    from llama4.model.cache import KVCache
    from tests.distributed.workers import config, counting_collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    pair = dist.new_group([0, 1])
    ids = torch.randint(0, 96, (ROWS, PROMPT + 1), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, dtype in DTYPES.items():
        for tp, ep in PLANS:
            plan = ParallelPlan(tp, ep)
            if plan.world_size == 2 and rank >= 2:
                continue
            model = shard_model(llama4.random_model(config(name), dtype=dtype, seed=2), plan,
                                pair if plan.world_size == 2 else None)
            cache = KVCache(model.config.text)
            prefill: list = []
            decode: list = []
            with torch.inference_mode():
                with counting_collectives(prefill):
                    model(ids[:, :PROMPT], cache=cache)  # logits of every position
                with counting_collectives(decode):
                    model(ids[:, PROMPT:], cache=cache, num_logits=1)
            results[(name, tp, ep)] = {"prefill": prefill, "decode": decode}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("comm_count")
    mp.spawn(_worker, args=(4, str(out / "store"), str(out)), nprocs=4)
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("tp,ep", PLANS)
def test_collectives_per_layer_per_token_are_the_documented_ones(recorded, name, tp, ep):
    from tests.distributed.workers import config

    element = torch.empty((), dtype=DTYPES[name]).element_size()
    cfg = config(name)
    want_prefill = expected(cfg, tp, ep, ROWS * PROMPT, ROWS * PROMPT, element)
    want_decode = expected(cfg, tp, ep, ROWS, ROWS, element)
    assert want_prefill and want_decode  # every plan here communicates (MoE layers at least)
    for rank in range(max(tp, ep)):
        got = recorded[rank][(name, tp, ep)]
        assert got["prefill"] == want_prefill, (rank, got["prefill"])
        assert got["decode"] == want_decode, (rank, got["decode"])
    # per token: a decode step's all-reduce payloads are one [D] row per token
    per_token = {nbytes // ROWS for op, nbytes in want_decode if op == "all_reduce"}
    assert per_token == {cfg.text.hidden_size * element}


def _counts(config: llama4.ModelConfig, tp: int, ep: int) -> tuple[int, int, int, int]:
    """(all-reduces, all-gathers, all-reduce bytes, all-gather bytes) per generated token (N = N' = 1), bf16,
    from the documented per-layer formulas."""
    calls = expected(config, tp, ep, 1, 1, 2)
    reduces = [b for op, b in calls if op == "all_reduce"]
    gathers = [b for op, b in calls if op == "all_gather"]
    return len(reduces), len(gathers), sum(reduces), sum(gathers)


def test_the_per_token_table_follows_the_formulas():
    """Scout / Maverick at W = 8: the collectives and payload per generated token the document quotes equal the
    per-layer formulas applied to the presets (the logits row is the gathered [1, V] in bf16, rounded to KiB)."""
    rows = _per_token_table()
    assert len(rows) == 3
    for model_plan, collectives, payload, _ in rows:
        name = "scout" if model_plan.startswith("Scout") else "maverick"
        tp, ep = (int(v) for v in re.search(r"tp=(\d+) ep=(\d+)", model_plan).groups())
        reduces, gathers, reduce_bytes, gather_bytes = _counts(llama4.preset(name), tp, ep)
        documented = re.fullmatch(r"(\d+) all-reduce(?: \+ (\d+) all-gather)?", collectives)
        assert documented, collectives
        assert (int(documented[1]), int(documented[2] or 0)) == (reduces, gathers), model_plan
        kib = [int(v) for v in re.findall(r"(\d+) KiB", payload)]
        assert reduce_bytes // 1024 in kib, (model_plan, reduce_bytes)
        if gathers:
            # the doc gives the whole gathered logits row [1, V]: the W per-rank parts of V / W
            assert round(gather_bytes * max(tp, ep) / 1024) in kib, (model_plan, gather_bytes)
