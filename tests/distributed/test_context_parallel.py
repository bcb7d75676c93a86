"""Context parallelism on CPU over gloo: 2 and 4 ranks spawned with torch.multiprocessing.

Each group size is spawned once (module fixtures); every rank runs all its checks (the ``_rank_*`` functions
below, which the children import from this module) and writes what it measured to ``rank{r}.pt``; the tests judge
the numbers. Tiny configs with attention_chunk_size 4 and floor_scale 3 (temperature tuning changes every three
tokens), prompt lengths chosen so that slice boundaries fall inside chunks, on chunk boundaries, past a whole
slice of one chunk (a rank needing pieces from two earlier ranks) and with lengths not divisible by cp.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import llama4
from llama4.distributed import ParallelPlan, PlanError, shard_model
from llama4.distributed.context import (
    ContextParallelCache,
    ContextPlan,
    attention_lse,
    context_mesh,
    context_parallel,
    generate,
    merge_partials,
    prefill,
    prefill_logits,
)
from llama4.model.cache import KVCache
from tests.distributed import workers

SEED, STD, CHUNK = workers.SEED, workers.STD, 4
NEW_TOKENS = 6
# world -> (config, rows, prompt length) of the checks. At 2 ranks: 11 = 5 | 6 (a slice boundary inside chunk
# [4, 8), the unfinished last chunk [8, 11) on rank 1), 16 = 8 | 8 (on a chunk boundary, no unfinished chunk),
# 3 = 1 | 2. At 4 ranks: 13 = 3 | 3 | 3 | 4, 7 = 1 | 2 | 2 | 2 (rank 2's chunk starts on rank 0: pieces from two
# ranks), 10 = 2 | 3 | 2 | 3 (not divisible by 4).
# The last number is the prefill piece (None: each slice at once). Pieces smaller than the chunk (2, 3), equal to
# it (4) and larger (5), over slices they do not divide: 11 = 5 | 6 in pieces of 2 (3 pieces each, the last ones
# 1 and 2 tokens), 16 = 8 | 8 in pieces of 4 (on chunk edges), 11 in pieces of 5 (rank 0: one piece, rank 1: two,
# so rank 0 runs an idle ring round); at 4 ranks 23 = 5 | 6 | 6 | 6 in pieces of 3, 4 and 5, 13 in pieces of 2.
CASES = {2: [("a", 2, 11, None), ("a", 1, 16, None), ("a", 1, 3, None), ("b", 2, 11, None),
             ("a", 2, 11, 2), ("a", 1, 16, 4), ("b", 2, 11, 5)],
         4: [("a", 2, 13, None), ("a", 1, 7, None), ("a", 1, 10, None), ("b", 1, 10, None),
             ("a", 2, 13, 2), ("a", 1, 23, 3), ("a", 1, 23, 4), ("b", 1, 23, 5)]}
COUNTED = {2: [(2, 11, None), (2, 11, 2)], 4: [(1, 7, None), (1, 23, 3)]}


def config(name: str) -> llama4.ModelConfig:
    """The parallel tests' configs (tests/distributed/workers.py), "a" with 8 layers: global layers 3 and 7."""
    return workers.config(name, a_layers=8)


def reference(name: str) -> llama4.Llama4Model:
    return llama4.random_model(config(name), std=STD, seed=SEED)


def prompt(rows: int, length: int) -> torch.Tensor:
    return torch.randint(3, 96, (rows, length), generator=torch.Generator().manual_seed(length))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------------------
# What the ranks run
# ----------------------------------------------------------------------------------------------------


class _Counting:
    """Records (kind, payload bytes) of every collective and point-to-point call of this process, with a
    ("layer", i) marker where decoder layer i starts."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "isend", "irecv", "send", "recv", "all_to_all",
             "all_to_all_single", "reduce_scatter", "batch_isend_irecv")

    def __init__(self, model: llama4.Llama4Model):
        self.model, self.log = model, []

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in self.NAMES}
        for name in self.NAMES:
            setattr(dist, name, self._wrap(name))
        self.hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: self.log.append(("layer", i)))
                      for i, layer in enumerate(self.model.text.layers)]
        return self.log

    def _wrap(self, name):
        def counted(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            if isinstance(tensor, torch.Tensor):
                self.log.append((name, tensor.numel() * tensor.element_size()))
            else:
                self.log.append((name, -1))
            return self.saved[name](*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)
        for hook in self.hooks:
            hook.remove()


def _decode_against_reference(model, ref, ids: torch.Tensor, cache: ContextParallelCache) -> dict:
    """Teacher-forced: NEW_TOKENS one-token passes, then one 3-token pass, against the reference's forward over
    the whole sequence (and the held entries afterwards)."""
    b, t = ids.shape
    more = torch.randint(3, 96, (b, NEW_TOKENS + 3), generator=torch.Generator().manual_seed(100 + t))
    want = ref(torch.cat((ids, more), dim=1))
    errors = []
    for i in range(NEW_TOKENS):
        errors.append(rel_err(model(more[:, i:i + 1], cache=cache)[:, -1], want[:, t + i]))
    errors.append(rel_err(model(more[:, NEW_TOKENS:], cache=cache), want[:, t + NEW_TOKENS:]))
    return {"decode_errs": errors, "held": [cache.held(i) for i in range(len(model.text.layers))],
            "length": cache.seq_len}


def _cases(rank: int, world: int) -> dict:
    results = {}
    plan = ContextPlan(world)
    models = {}
    for name, rows, length, piece in CASES[world]:
        if name not in models:
            models[name] = reference(name), context_parallel(reference(name))
        ref, model = models[name]
        ids = prompt(rows, length)
        want = ref(ids)
        start, stop = plan.slices(length)[rank]
        cache = ContextParallelCache(model.config.text, plan)
        with torch.inference_mode():
            entry = {"prefill_err": rel_err(prefill_logits(model, ids, cache, piece), want[:, start:stop]),
                     "prefill_held": [cache.held(i) for i in range(len(model.text.layers))]}
            entry.update(_decode_against_reference(model, ref, ids, cache))
            entry["tokens"] = generate(model, ids, plan, NEW_TOKENS, stop_tokens=[], piece=piece)
        entry["want_tokens"] = llama4.generate(ref, ids.tolist(), max_new_tokens=NEW_TOKENS, stop_tokens=[])
        results[(name, rows, length, piece)] = entry
    return results


def _stops(rank: int, world: int) -> dict:
    """Two rows where one stops early (the cache drops it) against llama4.generate with the same stop token."""
    ref, model = reference("a"), context_parallel(reference("a"))
    ids = prompt(2, 9)
    free = llama4.generate(ref, ids.tolist(), max_new_tokens=NEW_TOKENS, stop_tokens=[])
    stop = free[0][9 + 1]  # row 0's second new token
    want = llama4.generate(ref, ids.tolist(), max_new_tokens=NEW_TOKENS, stop_tokens=[stop])
    got = generate(model, [row for row in ids.tolist()], ContextPlan(world), NEW_TOKENS, stop_tokens=[stop])
    return {"got": got, "want": want, "stop": stop}


def _counts(rank: int, world: int) -> dict:
    model, out = context_parallel(reference("a")), {}
    for rows, length, piece in COUNTED[world]:
        cache = ContextParallelCache(model.config.text, ContextPlan(world))
        ids = prompt(rows, length)
        with torch.inference_mode():
            with _Counting(model) as prefill_log:
                prefill(model, ids, cache, piece)
            with _Counting(model) as decode_log:
                model(ids[:, :1], cache=cache)
        out[(rows, length, piece)] = {"prefill": prefill_log, "decode": decode_log}
    return out


def _errors(rank: int, world: int) -> dict:
    """The messages of misuse, each caught on every rank alike (no collective is left half done)."""
    messages = {}
    ids = prompt(1, 6)

    def catch(key, fn):
        try:
            fn()
        except (PlanError, ValueError, TypeError) as error:
            messages[key] = f"{type(error).__name__}: {error}"

    plain = reference("a")
    text, plan = plain.config.text, ContextPlan(world)
    catch("plain_model", lambda: prefill_logits(plain, ids, ContextParallelCache(text, plan)))
    model = context_parallel(reference("a"))
    catch("no_cache", lambda: model(ids))
    catch("kv_cache", lambda: model(ids, cache=KVCache(text)))
    catch("before_prefill", lambda: model(ids[:, :1], cache=ContextParallelCache(text, plan)))
    catch("twice", lambda: context_parallel(model))
    catch("group_size", lambda: ContextParallelCache(text, ContextPlan(world + 1)))
    catch("short_prompt", lambda: prefill(model, ids[:, :world - 1], ContextParallelCache(text, plan)))
    catch("bad_piece", lambda: prefill(model, ids, ContextParallelCache(text, plan), piece=0))
    cache = ContextParallelCache(text, plan)
    prefill(model, ids, cache)
    catch("second_prefill", lambda: prefill(model, ids, cache))
    catch("rows", lambda: model(prompt(2, 1), cache=cache))
    return messages


def _tensor_and_context(rank: int, world: int) -> dict:
    """tp=2 (ep=2) inside each context group of 2: 4 ranks as a 2 x 2 grid."""
    inner, context = context_mesh(2, 2)
    results = {}
    for name in ("a", "b"):
        ref = reference(name)
        model = context_parallel(shard_model(reference(name), ParallelPlan(tp=2, ep=2), group=inner))
        plan = ContextPlan(2)
        ids = prompt(2, 11)
        start, stop = plan.slices(11)[dist.get_rank(context)]
        cache = ContextParallelCache(model.config.text, plan, group=context)
        with torch.inference_mode():
            entry = {"prefill_err": rel_err(prefill_logits(model, ids, cache), ref(ids)[:, start:stop])}
            entry.update(_decode_against_reference(model, ref, ids, cache))
            entry["tokens"] = generate(model, ids, plan, NEW_TOKENS, stop_tokens=[], group=context)
        entry["want_tokens"] = llama4.generate(ref, ids.tolist(), max_new_tokens=NEW_TOKENS, stop_tokens=[])
        results[name] = entry
    return results


def _quantized_kv(rank: int, world: int) -> dict:
    """The global layers' shards stored int8 / fp8 (llama4.quant.kv_storage) against one process whose KVCache
    stores them the same way: prefill logits of the rank's slice, teacher-forced decode steps, greedy tokens; and
    the bytes of the global layers' buffers against the float shards'."""
    from llama4.quant.kv_cache import kv_storage

    ref, model = reference("a"), context_parallel(reference("a"))
    text, plan = model.config.text, ContextPlan(world)
    ids = prompt(1, 13)
    start, stop = plan.slices(13)[rank]
    more = torch.randint(3, 96, (1, NEW_TOKENS), generator=torch.Generator().manual_seed(7))
    results = {}
    for kv in ("auto", "int8", "fp8"):
        storage = kv_storage(text, kv, torch.float32)
        ref_cache = KVCache(text, storage=storage)
        cache = ContextParallelCache(text, plan, storage=storage)
        with torch.inference_mode():
            want = ref(ids, cache=ref_cache)
            errors = [rel_err(prefill_logits(model, ids, cache, 5), want[:, start:stop])]
            for i in range(NEW_TOKENS):
                step = more[:, i:i + 1]
                errors.append(rel_err(model(step, cache=cache)[:, -1], ref(step, cache=ref_cache)[:, -1]))
        results[kv] = {
            "errors": errors,
            "bytes": sum(e.k.nbytes + e.v.nbytes for i, e in enumerate(cache._entries) if not text.layers[i].chunked),
            "tokens": generate(model, ids, plan, NEW_TOKENS, stop_tokens=[], kv_cache=kv),
            "want_tokens": llama4.generate(ref, ids.tolist(), max_new_tokens=NEW_TOKENS, stop_tokens=[],
                                           kv_cache=kv)}
    return results


def run_world(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {"cases": _cases(rank, world), "counts": _counts(rank, world)}
        if world == 2:
            results.update(stops=_stops(rank, world), errors=_errors(rank, world), kv=_quantized_kv(rank, world))
        else:
            results["tp_cp"] = _tensor_and_context(rank, world)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------


def _spawn(tmp_path_factory, world: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"context{world}")
    mp.spawn(run_world, args=(world, str(out / "store"), str(out)), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, 4)


def _worlds(world2, world4, world):
    return world2 if world == 2 else world4


CASE_IDS = [(world, *case) for world in (2, 4) for case in CASES[world]]


@pytest.mark.parametrize("world,name,rows,length,piece", CASE_IDS)
def test_prefill_decode_and_greedy_tokens_equal_one_process(world2, world4, world, name, rows, length, piece):
    for rank, results in enumerate(_worlds(world2, world4, world)):
        entry = results["cases"][(name, rows, length, piece)]
        assert entry["prefill_err"] <= 1e-5, (rank, entry["prefill_err"])
        assert max(entry["decode_errs"]) <= 1e-5, (rank, entry["decode_errs"])
        assert entry["tokens"] == entry["want_tokens"], rank


@pytest.mark.parametrize("world,name,rows,length,piece", CASE_IDS)
def test_each_rank_holds_its_slice_of_the_global_layers(world2, world4, world, name, rows, length, piece):
    """After the prefill: a global layer holds the rank's slice, a chunked one the prompt's unfinished chunk.
    After the decode passes (one token at n = T .. T+5, then three at once at T+6): each pass on rank n mod cp."""
    spec = config(name).text
    slices = ContextPlan(world).slices(length)
    passes = [(length + i, 1) for i in range(NEW_TOKENS)] + [(length + NEW_TOKENS, 3)]
    end = length + NEW_TOKENS + 3
    last_chunk = (length + NEW_TOKENS) // CHUNK * CHUNK  # the chunk of the 3-token pass's first token
    chunk_held = end - last_chunk if end <= last_chunk + CHUNK else end % CHUNK  # a chunk ends when the next begins
    for rank, results in enumerate(_worlds(world2, world4, world)):
        entry = results["cases"][(name, rows, length, piece)]
        start, stop = slices[rank]
        owned = sum(count for n, count in passes if n % world == rank)
        assert entry["length"] == end
        for layer in spec.layers:
            if layer.chunked:
                assert entry["prefill_held"][layer.index] == length % CHUNK
                assert entry["held"][layer.index] == chunk_held
            else:
                assert entry["prefill_held"][layer.index] == stop - start
                assert entry["held"][layer.index] == stop - start + owned
    # every global entry is held once over the ranks
    totals = [sum(r["cases"][(name, rows, length, piece)]["held"][i] for r in _worlds(world2, world4, world))
              for i in spec.global_layers]
    assert totals == [end] * len(totals)


def test_a_row_that_stops_early_is_dropped_as_llama4_generate_drops_it(world2):
    for results in world2:
        entry = results["stops"]
        assert entry["got"] == entry["want"]
        assert len(entry["got"][0]) < len(entry["got"][1])  # row 0 stopped, row 1 went on


def _expected(world: int, rank: int, rows: int, length: int, piece: int | None) -> dict:
    """docs/DISTRIBUTED.md, "Context parallelism": what rank r sends and receives per layer (bytes, messages).

    Slices [s_q, e_q) of a T-token prompt, chunk C, entry bytes E = 2 (key + value) * B * Hkv * d * 4 (fp32).
    Chunked layer: rank q wants [floor(s_q / C) * C, s_q) and [max(floor(T / C) * C, e_q), T); every rank sends
    each other rank what its slice holds of that, one message per pair, once per layer. Global layer (causal ring):
    R rounds, R = the most pieces of P tokens any slice has (P = the longest slice without pieces: R = 1); in each,
    rank r receives the slices of ranks 0..r-1 (s_r entries) in blocks of at most P entries, ceil((e_q - s_q) / P)
    messages for rank q's, and, unless last, sends its own slice's blocks and forwards those (e_r entries). A
    decode step: each global layer one all-gather of [B, H, 1, d + 1] float32, chunked layers nothing.
    """
    spec = config("a").text
    entry = 2 * rows * spec.num_kv_heads * spec.head_dim * 4
    slices = ContextPlan(world).slices(length)
    size = piece or max(e - s for s, e in slices)
    rounds = max(-(-(e - s) // size) for s, e in slices)
    blocks = [-(-(e - s) // size) for s, e in slices]
    tail = length // CHUNK * CHUNK
    wants = [[(a, b) for a, b in ((s // CHUNK * CHUNK, s), (max(tail, e), length)) if a < b] for s, e in slices]

    def held(ranges, bounds):
        return sum(max(0, min(b, bounds[1]) - max(a, bounds[0])) for a, b in ranges)

    prefill, decode = {}, {}
    s_r, e_r = slices[rank]
    for layer in spec.layers:
        if layer.chunked:
            received = [held(wants[rank], slices[q]) for q in range(world) if q != rank]
            sent = [held(wants[q], slices[rank]) for q in range(world) if q != rank]
            prefill[layer.index] = {"recv": (sum(received) * entry, sum(1 for n in received if n)),
                                    "send": (sum(sent) * entry, sum(1 for n in sent if n))}
            decode[layer.index] = []
        else:
            last = rank == world - 1
            before = sum(blocks[:rank])
            sends = (0, 0) if last else (rounds * e_r * entry, rounds * (before + blocks[rank]))
            prefill[layer.index] = {"recv": (rounds * s_r * entry, rounds * before), "send": sends}
            decode[layer.index] = [("all_gather", rows * spec.num_heads * (spec.head_dim + 1) * 4)]
    return {"prefill": prefill, "decode": decode, "logits": rows * spec.vocab_size * 4}


def _per_layer(log: list) -> tuple[dict[int, list], list]:
    layers, before, current = {}, [], None
    for kind, value in log:
        if kind == "layer":
            current = layers.setdefault(value, [])
        else:
            (before if current is None else current).append((kind, value))
    return layers, before


COUNTED_IDS = [(world, *case) for world in (2, 4) for case in COUNTED[world]]


@pytest.mark.parametrize("world,rows,length,piece", COUNTED_IDS)
def test_bytes_each_collective_moves_match_the_documented_formula(world2, world4, world, rows, length, piece):
    for rank, results in enumerate(_worlds(world2, world4, world)):
        expected = _expected(world, rank, rows, length, piece)
        counts = results["counts"][(rows, length, piece)]
        layers, before = _per_layer(counts["prefill"])
        assert before == []
        last = max(layers)
        *last_calls, broadcast = layers[last]  # the logits' broadcast follows the last layer
        layers[last] = last_calls
        assert broadcast == ("broadcast", expected["logits"])
        for index, calls in layers.items():
            assert {kind for kind, _ in calls} <= {"isend", "irecv"}, (index, calls)
            sends = [nbytes for kind, nbytes in calls if kind == "isend"]
            recvs = [nbytes for kind, nbytes in calls if kind == "irecv"]
            want = expected["prefill"][index]
            assert (sum(recvs), len(recvs)) == want["recv"], (rank, index, calls)
            assert (sum(sends), len(sends)) == want["send"], (rank, index, calls)
        layers, before = _per_layer(counts["decode"])
        assert before == []
        assert layers == expected["decode"]


def test_the_exchange_is_exactly_what_is_needed_over_all_ranks(world2, world4):
    """Summed over ranks, bytes sent equal bytes received (every message matched), per layer."""
    for results, counted in ((world2, COUNTED[2]), (world4, COUNTED[4])):
        for case in counted:
            sums: dict[int, list[int]] = {}
            for rank_results in results:
                layers, _ = _per_layer(rank_results["counts"][case]["prefill"])
                for index, calls in layers.items():
                    total = sums.setdefault(index, [0, 0])
                    total[0] += sum(n for kind, n in calls if kind == "isend")
                    total[1] += sum(n for kind, n in calls if kind == "irecv")
            assert all(sent == got for sent, got in sums.values()), (case, sums)


@pytest.mark.parametrize("name", ["a", "b"])
def test_tensor_parallel_inside_context_groups(world4, name):
    for rank, results in enumerate(world4):
        entry = results["tp_cp"][name]
        assert entry["prefill_err"] <= 1e-5, (rank, entry["prefill_err"])
        assert max(entry["decode_errs"]) <= 1e-5, (rank, entry["decode_errs"])
        assert entry["tokens"] == entry["want_tokens"], rank


@pytest.mark.parametrize("key,pattern", [
    ("plain_model", r"PlanError: layer 3 is a global layer.*context_parallel"),
    ("no_cache", r"PlanError: .*ContextParallelCache.*got NoneType"),
    ("kv_cache", r"PlanError: .*ContextParallelCache.*got KVCache"),
    ("before_prefill", r"ValueError: .*starts with a prefill"),
    ("twice", r"PlanError: context_parallel was already applied"),
    ("group_size", r"PlanError: plan cp=3 needs a group of 3 ranks, the group has 2"),
    ("short_prompt", r"PlanError: a 1-token prompt cannot be split over cp=2 ranks"),
    ("second_prefill", r"ValueError: .*takes one prefill"),
    ("bad_piece", r"ValueError: the prefill piece must be a positive number of tokens, got 0"),
    ("rows", r"ValueError: the cache holds 1 rows but the input has 2"),
])
def test_misuse_is_refused_with_a_specific_error(world2, key, pattern):
    import re

    for results in world2:
        assert re.search(pattern, results["errors"][key]), results["errors"].get(key)


# ----------------------------------------------------------------------------------------------------
# In process: the plan and the attention merge
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cp,message", [(0, "positive integer"), (True, "positive integer"), (1.0, "positive")])
def test_bad_plans_are_refused(cp, message):
    with pytest.raises(PlanError, match=message):
        ContextPlan(cp)


def test_slices_are_contiguous_and_balanced():
    assert ContextPlan(4).slices(10) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert ContextPlan(2).slices(2) == [(0, 1), (1, 2)]
    with pytest.raises(PlanError, match="3-token prompt cannot be split over cp=4"):
        ContextPlan(4).slices(3)


def test_a_cache_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(PlanError, match="not initialised"):
        ContextParallelCache(config("a").text, ContextPlan(2))


def test_partial_attentions_merge_to_the_whole():
    """Keys split in three parts (one empty), merged by their log-sum-exps = one attention over all (GQA)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8,
                                                                                                      generator=g)
    whole, whole_lse = attention_lse(q, k, v, causal=False)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert rel_err(whole, want) < 1e-6
    parts = [attention_lse(q, k[:, :, a:b], v[:, :, a:b], causal=False) for a, b in ((0, 4), (4, 4), (4, 10))]
    merged, lse = merge_partials(parts)
    assert rel_err(merged, want) < 1e-6
    assert torch.allclose(lse, whole_lse, atol=1e-5)
    causal, _ = attention_lse(q, k[:, :, 7:], v[:, :, 7:], causal=True)
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, 7:].repeat_interleave(2, 1),
                                                            v[:, :, 7:].repeat_interleave(2, 1), attn_mask=mask)
    assert rel_err(causal, want) < 1e-6


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_kv_shards_compute_what_one_quantized_cache_computes(world2, kv):
    """fp32, 13-token prompt in pieces of 5 at cp=2, then 6 decode steps: within 1e-5 of one process whose KVCache
    stores the global layers the same way (the codes of an entry depend only on its values); greedy tokens equal;
    the global layers' buffers (10 bytes an entry: head_dim 8 codes and a 2-byte scale) against fp32's 32."""
    for rank, results in enumerate(world2):
        entry, plain = results["kv"][kv], results["kv"]["auto"]
        assert max(entry["errors"]) <= 1e-5, (rank, entry["errors"])
        assert entry["tokens"] == entry["want_tokens"], rank
        assert entry["bytes"] * 32 == plain["bytes"] * 10, (rank, entry["bytes"], plain["bytes"])
    assert max(world2[0]["kv"]["auto"]["errors"]) <= 1e-5
