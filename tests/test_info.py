"""model_info: parameter counts against the measured figures of the reference sheet (§3), schedules, checkpoints.

All counts are exact integers (measured by instantiating transformers' classes on the meta device).
"""

from __future__ import annotations

import json

import pytest
import torch

import llama4
from llama4.presets import text_config

SCOUT = dict(total=108_641_793_536, active=17_172_894_720, text=107_769_861_120, routed=96_636_764_160,
             active_vision=18_044_827_136)
MAVERICK = dict(total=401_583_781_376, active=17_184_691_200, text=400_711_848_960, routed=386_547_056_640,
                active_vision=18_056_623_616)
VISION_AND_PROJECTOR = 850_960_896 + 20_971_520
EMBEDDING = 1_034_485_760


@pytest.mark.parametrize("name,expected", [("scout", SCOUT), ("maverick", MAVERICK), ("Scout", SCOUT)])
def test_released_model_counts(name, expected):
    info = llama4.model_info(name)
    assert info["total_params"] == expected["total"]
    assert info["active_params"] == expected["active"]
    assert info["text_params"] == expected["text"]
    assert info["routed_expert_params"] == expected["routed"]
    assert info["vision_params"] == VISION_AND_PROJECTOR
    assert info["embedding_params"] == EMBEDDING
    assert info["active_params_with_vision"] == expected["active_vision"]
    assert info["weight_bytes"]["bf16"] == 2 * expected["total"]
    assert info["weight_bytes"]["int4"] == expected["total"] // 2
    assert info["multimodal"] is True and info["assumed"] is False


def test_scout_schedule():
    layers = llama4.model_info("scout")["layers"]
    assert len(layers) == 48
    for layer in layers:
        nope = (layer["index"] + 1) % 4 == 0
        assert layer["attention"] == ("global" if nope else "chunked")
        assert layer["rope"] is (not nope)
        assert layer["qk_norm"] is (not nope)
        assert layer["temperature_tuning"] is nope
        assert layer["ffn"] == "moe"


def test_maverick_schedule():
    info = llama4.model_info("maverick")
    assert info["num_experts"] == 128 and info["experts_per_token"] == 1 and info["attention_chunk_size"] == 8192
    for layer in info["layers"]:
        i = layer["index"]
        assert layer["ffn"] == ("moe" if i % 2 else "dense")
        assert layer["attention"] == ("global" if (i + 1) % 4 == 0 else "chunked")
        assert layer["qk_norm"] is False


def test_behemoth_is_flagged_as_assumed():
    info = llama4.model_info("behemoth")
    assert info["assumed"] is True
    # only the announced headline figures are facts: ~2T total, ~288B active, 16 experts
    assert info["num_experts"] == 16
    assert 1.7e12 < info["total_params"] < 2.3e12
    assert 250e9 < info["active_params"] < 320e9


def test_model_info_on_a_checkpoint_directory(tmp_path):
    cfg = llama4.ModelConfig(text=text_config(
        num_layers=4, moe_step=2, vocab_size=50, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
        intermediate_size=12, intermediate_size_mlp=20, num_experts=4, num_experts_per_tok=1,
        attention_chunk_size=4, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0))
    model = llama4.random_model(cfg)
    llama4.save_model(model, tmp_path)
    info = llama4.model_info(tmp_path)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert info["total_params"] == info["text_params"] == total
    assert info["routed_expert_params"] == routed == 2 * 4 * (16 * 24 + 12 * 16)  # 2 MoE layers x 4 experts
    assert info["active_params"] == total - routed * 3 // 4  # 3 of 4 experts unused per token
    assert info["multimodal"] is False and info["vision_params"] == 0
    assert [layer["ffn"] for layer in info["layers"]] == ["dense", "moe", "dense", "moe"]
    assert str(tmp_path) in info["source"]
    assert llama4.model_info(str(tmp_path))["total_params"] == total
    assert llama4.model_info(cfg)["total_params"] == total


def test_model_info_unknown_name_is_an_error():
    with pytest.raises((llama4.ConfigError, llama4.CheckpointError)):
        llama4.model_info("llama5-ultra")


def test_kv_cache_bytes_match_the_cache_after_decoding():
    """The formula equals KVCache.nbytes() after N one-token steps, below, at and past chunk boundaries."""
    from llama4.info import kv_cache_bytes
    from llama4.model.cache import KVCache
    from llama4.presets import text_config

    text = text_config(num_layers=8, vocab_size=50, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                       intermediate_size=16, num_experts=2, attention_chunk_size=8)
    config = llama4.ModelConfig(text=text)
    cache = KVCache(text, block_size=3)
    k = torch.zeros(2, 1, 1, 8, dtype=torch.bfloat16)
    for n in range(1, 30):
        for layer in range(text.num_layers):
            cache.update(layer, k, k)
        cache.advance(1)
        expected = kv_cache_bytes(config, n, bytes_per_value=2, batch=2, block_size=3)["total_bytes"]
        assert cache.nbytes() == expected, n


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_kv_cache_bytes_match_the_cache_after_decoding(fmt):
    """With the global layers quantized, the formula equals the nbytes of a KVCache storing them so (the chunked
    layers in bf16), and the global layers' part is (head_dim + 2) / (2 head_dim) of bf16's."""
    from llama4.info import kv_cache_bytes
    from llama4.model.cache import KVCache
    from llama4.presets import text_config
    from llama4.quant.kv_cache import kv_storage

    text = text_config(num_layers=8, vocab_size=50, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                       intermediate_size=16, num_experts=2, attention_chunk_size=8)
    config = llama4.ModelConfig(text=text)
    cache = KVCache(text, block_size=3, storage=kv_storage(text, fmt, torch.bfloat16))
    k = torch.randn(2, 1, 1, 8).to(torch.bfloat16)
    for n in range(1, 30):
        for layer in range(text.num_layers):
            cache.update(layer, k, k)
        cache.advance(1)
        kv = kv_cache_bytes(config, n, bytes_per_value=2, batch=2, block_size=3, global_format=fmt)
        bf16 = kv_cache_bytes(config, n, bytes_per_value=2, batch=2, block_size=3)
        assert cache.nbytes() == kv["total_bytes"], n
        assert cache.nbytes(text.global_layers) == kv["global_bytes"] == bf16["global_bytes"] * 10 // 16
        assert kv["local_bytes"] == bf16["local_bytes"]
    with pytest.raises(ValueError, match="int8, fp8"):
        kv_cache_bytes(config, 1, global_format="int4")


def test_scout_kv_cache_is_48_kib_per_token_in_bf16():
    from llama4.info import kv_cache_bytes

    kv = kv_cache_bytes(llama4.preset("scout"), 1_000_000, 2)
    assert kv["bytes_per_token_global"] == 48 * 1024  # 12 global layers x 8 KV heads x 128 x k,v x 2 bytes
    assert kv["local_bytes"] == 36 * 8192 * 2 * 8 * 128 * 2  # one chunk per chunked layer, fixed


# --- memory planner -----------------------------------------------------------------------------------------

SMALL = dict(num_layers=4, moe_step=2, vocab_size=256, hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64,
             intermediate_size=128, intermediate_size_mlp=256, num_experts=4, num_experts_per_tok=1,
             attention_chunk_size=8, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


@pytest.mark.parametrize("recipe", ["int8", "int4", "int4-g128-asym",
                                    "experts=int4-g32,attention=int8,shared=int4-g64-asym,head=int8,scales=bf16"])
def test_weight_bytes_equal_the_quantized_model(recipe):
    """weight_bytes (meta device, shapes only) == quantized_bytes + the float parameters left after quantize_model."""
    from llama4.info import weight_bytes
    from llama4.quant import quantize_model, quantized_bytes

    config = llama4.ModelConfig(text=text_config(**SMALL))
    model = quantize_model(llama4.random_model(config, dtype=torch.bfloat16), recipe)
    measured = quantized_bytes(model) + sum(p.numel() * p.element_size() for p in model.parameters())
    planned = weight_bytes(config, recipe)
    assert planned["total_bytes"] == measured
    assert planned["params"] == sum(p.numel() for p in llama4.random_model(config).parameters())
    float_planned = weight_bytes(config, None, dtype=torch.float32)
    assert float_planned["total_bytes"] == 4 * planned["params"]


def test_weight_bytes_refuses_what_quantize_refuses():
    from llama4.info import weight_bytes

    config = llama4.ModelConfig(text=text_config(**(SMALL | dict(hidden_size=96, head_dim=48))))
    with pytest.raises(ValueError, match="multiple of 64"):
        weight_bytes(config, "int4-g64")
    tied = llama4.ModelConfig(text=text_config(**(SMALL | dict(tie_word_embeddings=True))))
    with pytest.raises(ValueError, match="tied"):
        weight_bytes(tied, "int8,head=int8")


def test_scout_weight_figures():
    from llama4.info import weight_bytes

    scout = llama4.preset("scout")
    bf16 = weight_bytes(scout)
    assert bf16["total_bytes"] == 2 * SCOUT["total"]  # ~202.4 GiB
    assert 202 * 2**30 < bf16["total_bytes"] < 203 * 2**30
    int4 = weight_bytes(scout, "int4")
    experts = int4["kinds"]["experts"]
    assert experts["format"] == "int4-g32" and experts["params"] == SCOUT["routed"]
    assert experts["bytes"] == SCOUT["routed"] // 2 + SCOUT["routed"] // 32 * 4  # codes + one fp32 scale / 32
    assert int4["kinds"]["head"]["format"] == "bf16" and int4["kinds"]["vision"]["format"] == "bf16"
    assert bf16["total_bytes"] / 4 < int4["total_bytes"] < bf16["total_bytes"] / 2.9  # a quarter plus scales
    assert weight_bytes(scout, "int4,scales=bf16")["total_bytes"] < int4["total_bytes"]
    int8 = weight_bytes(scout, "int8")["kinds"]["attention"]
    assert int8["bytes"] == int8["params"] + 4 * 48 * (5120 + 1024 + 1024 + 5120)  # + a scale per output channel


@pytest.mark.parametrize("text,size", [("80GiB", 80 * 2**30), ("24GB", 24 * 10**9), ("512MiB", 512 * 2**20),
                                       ("1000", 1000), (" 1.5 TiB ", int(1.5 * 2**40)), ("64kb", 64000)])
def test_parse_size(text, size):
    from llama4.info import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "80 GiBs", "lots", "-5GB", "12 PB", "GiB"])
def test_parse_size_errors(text):
    from llama4.info import parse_size

    with pytest.raises(ValueError, match="memory size"):
        parse_size(text)


@pytest.mark.parametrize("memory,recipe", [("80GiB", "int4"), ("24GiB", "experts=int4-g32,attention=int8"),
                                           ("300GiB", None), ("100GB", "int8")])
def test_largest_context_is_the_edge_of_the_kv_cache(memory, recipe):
    from llama4.info import KV_BLOCK, kv_cache_bytes, memory_plan, parse_size

    scout = llama4.preset("scout")
    plan = memory_plan(scout, recipe, memory=memory)
    budget = parse_size(memory)
    fixed = plan["weights"]["total_bytes"] + plan["activations"]["total_bytes"]
    n = plan["max_context"]
    if not plan["fits"]:
        assert n == -1 and fixed > budget
        return
    assert n > 0 and n % KV_BLOCK == 0
    assert fixed + kv_cache_bytes(scout, n)["total_bytes"] <= budget == plan["memory_bytes"]
    assert fixed + kv_cache_bytes(scout, n + KV_BLOCK)["total_bytes"] > budget
    assert plan["context"] == n and plan["total_bytes"] <= budget
    assert plan["max_context_kv_bytes"] == plan["kv_cache"]["total_bytes"]


def test_memory_plan_at_a_context_and_without_global_layers():
    from llama4.info import kv_cache_bytes, memory_plan

    scout = llama4.preset("scout")
    plan = memory_plan(scout, "int4", kv="fp32", context=100_000)
    assert plan["kv_cache"] == kv_cache_bytes(scout, 100_000, 4)
    assert plan["total_bytes"] == (plan["weights"]["total_bytes"] + plan["activations"]["total_bytes"]
                                   + plan["kv_cache"]["total_bytes"])
    assert plan["activations"]["prefill"]["logits"] == 202048 * 256 * 4
    assert plan["activations"]["dequantized_weight"] == 16384 * 5120 * 2  # one expert's gate_up in bf16
    assert memory_plan(scout, None)["activations"]["dequantized_weight"] == 0
    with pytest.raises(ValueError, match="expected one of bf16, fp32, int8, fp8"):
        memory_plan(scout, kv="int4")
    local_only = llama4.ModelConfig(text=text_config(**(SMALL | dict(no_rope_layers=(1, 1, 1, 1),
                                                                     chunked_layers=(True,) * 4))))
    assert memory_plan(local_only, memory="1GiB")["max_context"] is None  # the cache stops growing


# ---------------------------------------------------------------------------------------------------------------
# Per-device plans (--tp / --ep): the planner's bytes against what shard_model allocates on real ranks.

PARALLEL_PLANS = [(4, 4), (4, 2), (4, 1), (1, 4), (2, 2), (2, 1), (1, 2)]
# past one 256-token KV block (the global layers' block rounding counts) and inside a chunk: the chunked layers
# then hold a whole chunk, as the planner counts them (at a chunk's end they hold none)
PARALLEL_CONTEXT = 299


def _parallel_worker(rank: int, world: int, store: str, out: str) -> None:
    """Rank ``rank`` of 4: shard_model under every plan (2-rank plans on ranks 0 and 1 in a subgroup), then a
    prefill of PARALLEL_CONTEXT tokens into a KVCache; writes each plan's parameter and cache bytes."""
    import datetime

    import torch.distributed as dist

    from llama4.distributed import ParallelPlan, shard_model
    from llama4.model.cache import KVCache
    from llama4.quant.kv_cache import kv_storage
    from tests.distributed.workers import config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    pair = dist.new_group([0, 1])
    results = {}
    ids = torch.randint(0, 96, (1, PARALLEL_CONTEXT), generator=torch.Generator().manual_seed(0))
    for name in ("a", "b"):
        for tp, ep in PARALLEL_PLANS:
            plan = ParallelPlan(tp, ep)
            if plan.world_size == 2 and rank >= 2:
                continue
            model = shard_model(llama4.random_model(config(name), dtype=torch.bfloat16, seed=1), plan,
                                pair if plan.world_size == 2 else None)
            entry = {"weights": sum(p.numel() * p.element_size() for p in model.parameters())}
            for kv in ("auto", "int8"):
                text = model.config.text
                cache = KVCache(text, storage=kv_storage(text, kv, torch.bfloat16))
                with torch.inference_mode():
                    model(ids, cache=cache, num_logits=1)
                entry[kv] = cache.nbytes()
            results[(name, tp, ep)] = entry
    results["cp"] = _context_parallel_bytes(rank)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


# (prompt, decode steps, block size): slices inside a chunk and on its edge, buffers grown while decoding (small
# blocks), and the default 256-token block; cp=4 over all ranks, and cp=2 around tp=2 groups (context_mesh)
CP_CASES = {4: [(11, 0, 4), (11, 7, 4), (299, 2, 256)], 2: [(11, 5, 4), (8, 0, 4), (13, 3, 256)]}


def _context_parallel_bytes(rank: int) -> dict:
    """Bytes each rank's ContextParallelCache allocates (its buffers' nbytes) after each CP_CASES prefill + decode."""
    import torch.distributed as dist

    from llama4.distributed import ContextParallelCache, ContextPlan, ParallelPlan, context_parallel, shard_model
    from llama4.distributed.context import context_mesh, prefill
    from llama4.quant.kv_cache import kv_storage
    from tests.distributed.workers import config

    inner, context = context_mesh(2, 2)
    out = {}
    for cp, group in ((4, None), (2, context)):
        model = llama4.random_model(config("a"), dtype=torch.bfloat16, seed=1)
        if cp == 2:
            model = shard_model(model, ParallelPlan(2, 1), inner)
        model = context_parallel(model)
        for prompt, decode, block in CP_CASES[cp]:
            cache = ContextParallelCache(model.config.text, ContextPlan(cp), group, block_size=block)
            ids = torch.randint(3, 96, (1, prompt + decode), generator=torch.Generator().manual_seed(prompt))
            with torch.inference_mode():
                prefill(model, ids[:, :prompt], cache)
                for n in range(prompt, prompt + decode):
                    model(ids[:, n:n + 1], cache=cache)
            out[(cp, prompt, decode, block)] = sum(e.k.nbytes + e.v.nbytes for e in cache._entries if e.k is not None)
        if cp == 4:  # the global layers' shards in int8 (one scale per entry), as --kv int8 plans them
            storage = kv_storage(model.config.text, "int8", torch.bfloat16)
            cache = ContextParallelCache(model.config.text, ContextPlan(cp), group, block_size=4, storage=storage)
            ids = torch.randint(3, 96, (1, 18), generator=torch.Generator().manual_seed(11))
            with torch.inference_mode():
                prefill(model, ids[:, :11], cache)
                for n in range(11, 18):
                    model(ids[:, n:n + 1], cache=cache)
            out["int8"] = sum(e.k.nbytes + e.v.nbytes for e in cache._entries if e.k is not None)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def sharded_ranks(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("parallel_plan")
    mp.spawn(_parallel_worker, args=(4, str(out / "store"), str(out)), nprocs=4)
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("tp,ep", PARALLEL_PLANS)
def test_per_device_plan_equals_what_shard_model_allocates(sharded_ranks, name, tp, ep):
    """Config "a": untied head, dense and MoE layers, 2 KV heads (split at tp=2, replicated at tp=4); "b": tied
    head (the vocabulary-parallel head slices the embedding), one KV head replicated on every rank."""
    from llama4.distributed import ParallelPlan
    from llama4.info import memory_plan, weight_bytes
    from tests.distributed.workers import config

    plan = ParallelPlan(tp, ep)
    for kv, kv_name in (("bf16", "auto"), ("int8", "int8")):
        planned = memory_plan(config(name), None, kv, context=PARALLEL_CONTEXT, parallel=plan)
        for rank in range(plan.world_size):
            real = sharded_ranks[rank][(name, tp, ep)]
            assert weight_bytes(config(name), None, torch.bfloat16, plan, rank)["total_bytes"] == real["weights"]
            assert planned["weights"]["total_bytes"] == real["weights"], rank
            assert planned["kv_cache"]["total_bytes"] == real[kv_name], (kv, rank)
    whole = memory_plan(config(name), None, "int8", context=PARALLEL_CONTEXT)  # as the last planned
    assert planned["weights"]["total_bytes"] < whole["weights"]["total_bytes"]
    kv_heads = config(name).text.num_kv_heads
    share = 1 if tp == 1 else min(tp, kv_heads)  # a device caches 1 / share of the KV heads
    assert planned["kv_cache"]["total_bytes"] * share == whole["kv_cache"]["total_bytes"]


def test_maverick_per_device_plan():
    """Maverick on 8 devices, tp=8 ep=8: the routed experts, attention, shared experts and head are 1/8 each;
    embeddings, norms, routers and vision stay whole; 8 KV heads over 8 ranks: one per device."""
    from llama4.distributed import ParallelPlan
    from llama4.info import memory_plan, weight_bytes

    maverick = llama4.preset("maverick")
    whole = weight_bytes(maverick, "int4")
    plan = memory_plan(maverick, "int4", "int8", memory="80GiB", parallel=ParallelPlan(8, 8))
    kinds = plan["weights"]["kinds"]
    for kind in ("experts", "attention", "shared", "head"):
        assert kinds[kind]["split"] and kinds[kind]["bytes"] * 8 == whole["kinds"][kind]["bytes"], kind
    for kind in ("embeddings", "norms", "router", "vision"):
        assert not kinds[kind]["split"] and kinds[kind]["bytes"] == whole["kinds"][kind]["bytes"], kind
    assert plan["parallel"]["kv_heads_per_device"] == 1 and not plan["parallel"]["kv_heads_replicated"]
    assert plan["weights"]["total_bytes"] < 80 * 2**30 < whole["total_bytes"]
    n = plan["max_context"]
    assert n > 1_000_000 and plan["total_bytes"] <= 80 * 2**30
    single = memory_plan(maverick, "int4", "int8", context=n)
    assert plan["kv_cache"]["total_bytes"] * 8 == single["kv_cache"]["total_bytes"]
    over = memory_plan(maverick, "int4", "int8", context=n + 256, parallel=ParallelPlan(8, 8))
    assert over["total_bytes"] > 80 * 2**30
    fp8 = memory_plan(maverick, "fp8", parallel=ParallelPlan(8, 8))["weights"]  # FP8 checkpoints load as int8
    assert fp8 == memory_plan(maverick, "int8", parallel=ParallelPlan(8, 8))["weights"]
    # int4 groups of 32 along the input: wo's input split 8 ways still holds whole groups; one that does not is refused
    with pytest.raises(ValueError, match="not divisible|does not fit"):
        memory_plan(maverick, "int4", parallel=ParallelPlan(3, 3))


def test_info_command_prints_the_per_device_plan(capsys):
    from llama4.cli import main

    assert main(["info", "--preset", "maverick", "--tp", "8", "--ep", "8", "--quant", "int4", "--kv", "int8",
                 "--memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "PER DEVICE: tp=8, ep=8 on 8 devices; 16 routed experts x hidden 8192 per device; 1 KV head(s)" in out
    assert "experts     int4-g32" in out and "split" in out and "replicated" in out
    assert "in 80.0 GiB: largest context" in out
    assert main(["info", "--preset", "scout", "--tp", "16", "--ep", "16"]) == 2
    assert "num_heads 40 is not divisible by tp=16" in capsys.readouterr().err


@pytest.mark.parametrize("cp", sorted(CP_CASES))
def test_context_parallel_kv_per_device_equals_what_the_cache_allocates(sharded_ranks, cp):
    """The planner's KV figure is the fullest rank's allocation: slices, round-robin decode entries, buffers
    grown by half, the current chunk on every rank; at cp=2 each rank holds its tp=2 share of the KV heads."""
    from llama4.distributed import ParallelPlan
    from llama4.info import context_kv_bytes, memory_plan
    from tests.distributed.workers import config

    parallel = ParallelPlan(2, 1) if cp == 2 else None
    heads = 1 if cp == 2 else None  # 2 KV heads over tp=2
    for prompt, decode, block in CP_CASES[cp]:
        real = [sharded_ranks[r]["cp"][(cp, prompt, decode, block)] for r in range(4)]
        planned = context_kv_bytes(config("a"), prompt, cp, decode, block_size=block, kv_heads=heads)
        assert planned["total_bytes"] == max(real), (prompt, decode, block, real)
        if decode == 0 and block == 256:
            via_plan = memory_plan(config("a"), None, "bf16", context=prompt, parallel=parallel, cp=cp)
            assert via_plan["kv_cache"]["total_bytes"] == max(real)
        if prompt % 4 == 0 and decode == 0:
            assert planned["local_bytes"] == 0  # the prompt ends on a chunk edge: no current chunk kept yet
    if cp == 4:  # quantized shards: the int8 figure is what the cache holds
        planned = context_kv_bytes(config("a"), 11, 4, 7, block_size=4, global_format="int8")
        assert planned["total_bytes"] == max(sharded_ranks[r]["cp"]["int8"] for r in range(4))


def test_scout_at_10m_tokens_with_context_parallelism(capsys):
    """Scout, int4 weights, 10M tokens over cp=8: each device keeps 1/8 of the global layers' entries (int8:
    8 KV heads x 2 x (128 + 2) bytes x 12 layers per token) and one chunk of each chunked layer; the slice's
    prefill runs in pieces of a chunk (8192 tokens): the slice's residual stream (bf16) is the only activation that
    grows with it, and the largest context is where the whole plan fits."""
    from llama4.cli import main
    from llama4.distributed import ParallelPlan
    from llama4.info import memory_plan

    scout = llama4.preset("scout")
    plan = memory_plan(scout, "int4", "int8", context=10_000_000, memory="80GiB", cp=8)
    kv = plan["kv_cache"]
    assert kv["global_entries_per_layer"] == 1_250_000 and kv["global_capacity_per_layer"] == 1_250_048
    assert kv["global_bytes"] == 12 * 1_250_048 * 2 * 8 * 130
    assert kv["local_bytes"] == 36 * 5888 * 2 * 8 * 128 * 2  # 10M mod 8192 = 5760 entries, in 256-blocks
    acts = plan["activations"]
    assert acts["prefill_chunk"] == 8192 and acts["slice_tokens"] == 1_250_000
    assert acts["prefill"]["residual"] == 1_250_000 * 5120 * 2
    assert acts["prefill"]["ffn"] == 8192 * 3 * (8192 + 8192) * 4  # one piece's rows: shared + top-1 expert
    assert acts["prefill"]["total"] - acts["prefill"]["residual"] < 4 * 2**30  # per piece: a few GiB, not 449
    whole = memory_plan(scout, "int4", "int8", context=10_000_000, cp=8, chunk=2_000_000)["activations"]
    assert whole["prefill_chunk"] == 1_250_000 and whole["total_bytes"] > 400 * 2**30  # the slice at once
    found = plan["max_context"]
    edge = memory_plan(scout, "int4", "int8", context=found, cp=8)["total_bytes"]
    over = memory_plan(scout, "int4", "int8", context=found + 1, cp=8)["total_bytes"]
    assert edge <= 80 * 2**30 < over
    wide = memory_plan(scout, "int4", "int8", context=10_000_000, memory="80GiB", cp=8,
                       parallel=ParallelPlan(8, 8))
    assert wide["kv_cache"]["global_bytes"] == kv["global_bytes"] // 8  # one KV head per device at tp=8
    assert wide["max_context"] > found
    assert main(["info", "--preset", "scout", "--quant", "int4", "--kv", "int8", "--cp", "8", "--context",
                 "10000000", "--memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "cp=8 x 1 tp/ep rank(s) = 8 devices" in out and f"largest context {found:,} tokens" in out
    assert "1,250,000 tokens each of this rank's slice" in out
    assert "slices of 1,250,000 tokens (each in pieces of 8,192)" in out and "residual stream 11.9 GiB" in out
    assert main(["info", "--preset", "scout", "--cp", "8", "--context", "10000000", "--prefill-chunk", "1024",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["activations"]["prefill_chunk"] == 1024


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning plans (--finetune): adapters and AdamW against what apply_lora and torch.optim.AdamW allocate;
# activations against the tensors autograd really saves for backward.

FT_CONFIG = dict(num_layers=4, moe_step=2, vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=64, intermediate_size_mlp=128, num_experts=4, num_experts_per_tok=1,
                 attention_chunk_size=64, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


@pytest.mark.parametrize("targets", [("attention",), ("attention", "experts", "shared"), ("wq", "router")])
def test_adapter_and_adamw_bytes_equal_what_training_allocates(targets):
    from llama4.info import finetune_plan
    from llama4.lora import LoraConfig, apply_lora

    cfg = llama4.ModelConfig(text=text_config(**FT_CONFIG))
    model = apply_lora(llama4.random_model(cfg, dtype=torch.bfloat16, seed=0), LoraConfig(rank=4, targets=targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model(torch.randint(3, 512, (1, 16))).float().square().mean().backward()
    optimizer.step()
    plan = finetune_plan(cfg, "lora", 16, rank=4, targets=targets)["adapters"]
    assert plan["params"] == sum(p.numel() for p in trainable)
    assert plan["weights"] == sum(p.nbytes for p in trainable)
    assert plan["gradients"] == sum(p.grad.nbytes for p in trainable)
    moments = sum(s[k].nbytes for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert plan["adamw_states"] == moments  # (plus AdamW's 4-byte step counter per tensor)


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training step (parameters excluded)."""
    storages = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad) and not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("tokens", [64, 256])
def test_activation_figure_is_within_a_factor_of_what_autograd_saves(tokens):
    """Stated factor: the planner's no-checkpointing activations are within 1.5x either way of the bytes autograd
    saves (measured 0.72x at 64 tokens, where small per-call tensors weigh more, and 0.94x at 256)."""
    from llama4.info import training_activation_bytes
    from llama4.lora import LoraConfig, apply_lora

    cfg = llama4.ModelConfig(text=text_config(**FT_CONFIG))
    model = apply_lora(llama4.random_model(cfg, dtype=torch.bfloat16, seed=0), LoraConfig(rank=4, dropout=0.05))
    model.train()
    real = _saved_bytes(model, torch.randint(3, 512, (1, tokens), generator=torch.Generator().manual_seed(0)))
    planned = training_activation_bytes(cfg, tokens, False, torch.bfloat16)
    assert real / 1.5 <= planned["total"] <= real * 1.5, (planned["total"], real)


def test_scout_qlora_plan_and_the_command(capsys):
    """Scout QLoRA at 4k: int4-g32 base 67.0 GiB, 12.6M attention adapters; with checkpointing the logits and loss
    (202048 x 4096 in bf16, fp32 and the fp32 log-softmax) are the largest activation."""
    from llama4.cli import main
    from llama4.info import finetune_plan, weight_bytes

    scout = llama4.preset("scout")
    plan = finetune_plan(scout, "qlora", 4096)
    assert plan["base"]["total_bytes"] == weight_bytes(scout, "int4")["total_bytes"]
    assert plan["adapters"]["params"] == 48 * 8 * ((5120 + 5120) + 2 * (5120 + 1024) + (5120 + 5120))
    acts = plan["activations"]
    assert acts["checkpointing"]["head"] == 4096 * 202048 * 10
    assert acts["checkpointing"]["total"] < acts["no_checkpointing"]["total"]
    assert finetune_plan(scout, "lora", 4096)["base"]["total_bytes"] == weight_bytes(scout, None)["total_bytes"]
    with pytest.raises(ValueError, match="matches no module"):
        finetune_plan(scout, "lora", 16, targets=("projector.nothing",))
    assert main(["info", "--preset", "scout", "--finetune", "qlora", "--context", "4096", "--memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "adapters 12.58M params" in out and "largest context" in out


def test_info_dtype_fp8_is_the_fp8_checkpoint_plan(capsys):
    """`llama4 info --preset maverick --tp 8 --ep 8 --dtype fp8` (the issue's spelling) plans what --quant fp8 does;
    --dtype fp32 doubles the float weights; --dtype fp8 with another --quant is refused."""
    import json

    from llama4.cli import main

    def plan(*flags):
        assert main(["info", "--preset", "maverick", "--tp", "8", "--ep", "8", "--context", "100000", "--json",
                     *flags]) == 0
        return json.loads(capsys.readouterr().out)["memory"]

    assert plan("--dtype", "fp8") == plan("--quant", "fp8")
    bf16, fp32 = plan(), plan("--dtype", "fp32")
    assert fp32["weights"]["kinds"]["embeddings"]["bytes"] == 2 * bf16["weights"]["kinds"]["embeddings"]["bytes"]
    assert main(["info", "--preset", "maverick", "--dtype", "fp8", "--quant", "int4"]) == 2
    assert "--dtype fp8 plans an FP8 checkpoint (--quant fp8)" in capsys.readouterr().err
