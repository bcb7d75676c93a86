"""Batch invariance of bf16 decode: a row decoded with others gives bit-identical logits to its solo run.

Exact (torch.equal), not a tolerance: greedy decoding of a batched row must pick the tokens its solo run
picks, so one rounding difference anywhere (attention over a padded buffer, a GEMM kernel chosen by the
row count, the router) fails these tests. Attention is batch-invariant always. Products are by
construction wherever they hold: with ``model.set_batch_invariant(True)`` (every product in fixed row tiles,
on any CPU), and without it for packed bf16 models on the CPU kernel (llama4.kernels.cpu computes every row
on its own; the fused C layers take batches of any size). Elsewhere - plain weights, or no kernel, without
invariance - oneDNN picks GEMM kernels by row count and CPU, so there a batched row is held to its solo
run within bf16 rounding only (the model tests run both ways).
"""

from __future__ import annotations

import copy

import pytest
import torch

import llama4
from llama4.kernels.cpu import packed_with
from llama4.kernels.cpu.library import MAX_ROWS
from llama4.kernels.cpu.packing import PackedExperts, PackedLinear, PackedQKV, PackedSwiGLU
from llama4.model import ops
from llama4.model.cache import KVCache
from llama4.model.invariance import ROW_TILE, is_batch_invariant, row_tiled, set_batch_invariant
from llama4.model.moe import Experts, MoE, SwiGLU
from llama4.model.paged_cache import PagedKVCache
from llama4.model.transformer import QKVProjection
from llama4.presets import text_config
from tests.kernel_support import BF16_PACKING, KERNEL
from tests.kernel_support import pack as pack_model

CHUNK = 8


def _config(top_k: int) -> llama4.ModelConfig:
    # 4 layers: RoPE/chunked 0-2 (chunk 8), NoPE/global 3 with temperature tuning (floor_scale 4);
    # every layer MoE over 4 experts, so decode rows spread over experts and each expert's row count
    # depends on the batch.
    return llama4.ModelConfig(text=text_config(
        num_layers=4, vocab_size=211, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=64, intermediate_size_mlp=96, num_experts=4, num_experts_per_tok=top_k,
        attention_chunk_size=CHUNK, floor_scale=4, attn_scale=0.5, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=0))


def _models() -> dict[str, llama4.Llama4Model]:
    out = {}
    for top_k in (1, 2):
        plain = llama4.random_model(_config(top_k), dtype=torch.bfloat16, std=0.3, seed=5 + top_k)
        out[f"top{top_k}-plain"] = plain
        if BF16_PACKING:
            out[f"top{top_k}-packed"] = pack_model(copy.deepcopy(plain))
    return out


MODELS = _models()


@pytest.fixture(scope="module")
def embedded():
    return llama4.load_model(dtype=torch.bfloat16)


def _set_invariance(enabled: bool, *extra) -> None:
    for model in (*MODELS.values(), *extra):
        model.set_batch_invariant(enabled)


@pytest.fixture(params=[False, True], ids=["default", "invariant"])
def invariance(request, embedded):
    """Batch invariance off or on for the test's models (MODELS and the embedded one)."""
    _set_invariance(request.param, embedded)
    yield request.param
    _set_invariance(False, embedded)


@pytest.fixture
def invariant(embedded):
    _set_invariance(True, embedded)
    yield
    _set_invariance(False, embedded)


def _prompt(vocab: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _solo(model, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """A prompt decoded alone, greedily: the logits after the prompt and after each of ``steps`` tokens."""
    cache = KVCache(model.config.text)
    logits = [model(prompt, cache=cache, num_logits=1)[:, -1]]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(model(torch.tensor([[tokens[-1]]]), cache=cache)[:, -1])
    return logits, tokens


class _StackedBatch:
    """The generate loop's batching: a row is prefilled in its own KVCache, then stacked into the batch."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def join(self, prompt: torch.Tensor) -> torch.Tensor:
        row = KVCache(self.model.config.text)
        first = self.model(prompt, cache=row, num_logits=1)[:, -1]
        self.cache = row if self.cache is None else KVCache.stack([self.cache, row])
        return first

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, cache=self.cache)[:, -1]

    def keep(self, rows: list[int]) -> None:
        if rows:
            self.cache.keep_rows(rows)
        else:
            self.cache = None


class _PagedBatch:
    """The server's batching: every row a sequence of one PagedKVCache (small blocks, so rows interleave)."""

    def __init__(self, model):
        self.model, self.pool, self.seqs = model, PagedKVCache(model.config.text, block_size=3, initial_blocks=2), []

    def join(self, prompt: torch.Tensor) -> torch.Tensor:
        self.seqs.append(self.pool.sequence())
        return self.model(prompt, cache=self.pool.batch(self.seqs[-1:]), num_logits=1)[:, -1]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, cache=self.pool.batch(self.seqs))[:, -1]

    def keep(self, rows: list[int]) -> None:
        for b, seq in enumerate(self.seqs):
            if b not in rows:
                seq.release()
        self.seqs = [self.seqs[b] for b in rows]


def _exact(model, rows: int) -> bool:
    """Whether batched decode of ``rows`` rows equals solo runs by construction (module docstring): batch
    invariance on, or a packed bf16 model on the CPU kernel with the fused C layers (any batch) or with
    every product of at most a kernel call's rows."""
    if is_batch_invariant(model):
        return True
    if packed_with(model) is None or packed_with(model).kernel() is None:
        return False
    fast_decode = getattr(model, "text", model).fast_decode
    return (fast_decode is not None and fast_decode.ready()) or rows <= MAX_ROWS


def _agree(got: torch.Tensor, solo: torch.Tensor, exact: bool) -> bool:
    """Bit for bit, or within bf16 rounding of the logits (a few bf16 steps of the largest logit)."""
    return torch.equal(got, solo) if exact else bool((got - solo).abs().max() <= solo.abs().max() * 2 ** -4)


def _run_schedule(model, rows: list[tuple[int, int, int]], seed: int = 0, batch_kind=_StackedBatch) -> set[int]:
    """Continuous batching in miniature. ``rows``: (prompt length, step it joins at, steps it decodes).

    Each row is prefilled alone and joins the running batch at its join step; every step decodes all
    running rows together (at their own lengths) and drops finished rows. Each row's logits at every
    step must equal its solo run's (KVCache, batch 1): bit for bit where that holds by construction
    (``_exact``), else within bf16 rounding. Returns the experts that rows of batched decode steps were
    routed to.
    """
    vocab = model.config.text.vocab_size
    prompts = [_prompt(vocab, n, seed + i) for i, (n, _, _) in enumerate(rows)]
    solo = [_solo(model, p, steps) for p, (_, _, steps) in zip(prompts, rows)]
    routed: set[int] = set()  # experts chosen by some row of a batched decode step (any layer)

    def record(moe, inputs, output):
        x = inputs[0]
        if x.shape[0] > 1 and x.shape[1] == 1:
            routed.update(moe.router(x.flatten(0, 1)).topk(moe.top_k, dim=-1).indices.flatten().tolist())

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, MoE)]
    batch, running = batch_kind(model), []  # running: [row index, tokens fed so far]
    last = max(join + steps for _, join, steps in rows)
    exact = _exact(model, len(rows))
    try:
        for step in range(last + 1):
            for i, (_, join, _) in enumerate(rows):
                if join == step:
                    assert torch.equal(batch.join(prompts[i]), solo[i][0][0]), f"row {i}: prefill"
                    running.append([i, 0])
            if not running:
                continue
            logits = batch.step(torch.tensor([[solo[i][1][fed]] for i, fed in running]))
            for b, entry in enumerate(running):
                i, fed = entry
                entry[1] += 1
                assert _agree(logits[b:b + 1], solo[i][0][fed + 1], exact), (
                    f"row {i} (prompt {rows[i][0]}, batch of {len(running)}) differs from its solo run "
                    f"at decode step {fed}: max |diff| {(logits[b:b + 1] - solo[i][0][fed + 1]).abs().max():.3g}")
            keep = [b for b, (i, fed) in enumerate(running) if fed < rows[i][2]]
            if len(keep) < len(running):
                running = [running[b] for b in keep]
                batch.keep(keep)
    finally:
        for h in hooks:
            h.remove()
    return routed


@pytest.mark.parametrize("batch_kind", [_StackedBatch, _PagedBatch], ids=["kvcache", "paged"])
@pytest.mark.parametrize("name", list(MODELS))
def test_rows_joining_and_leaving_equal_their_solo_runs_bitwise(name, batch_kind, invariance):
    """Rows of different lengths (two at one length) cross chunk boundaries at different steps, join a
    running batch and leave it; every decode step of every row equals its solo run bit for bit."""
    model = MODELS[name]
    rows = [(5, 0, 14), (13, 0, 6), (2, 0, 10), (13, 2, 9), (21, 3, 12), (1, 5, 7), (8, 9, 6)]
    with torch.inference_mode():
        routed = _run_schedule(model, rows, batch_kind=batch_kind)
    assert len(routed) > 1, "the rows should be routed to different experts"


@pytest.mark.parametrize("batch", [2, 7, 16, 17, 32, 48])
def test_every_batch_size_equals_solo_bitwise(batch, invariance):
    """All rows at once, lengths spread over 1..3 chunks, 3 decode steps: rows beyond one row tile (16),
    and beyond 32 rows."""
    model = MODELS["top1-packed" if BF16_PACKING else "top1-plain"]
    rows = [(1 + (7 * i) % (3 * CHUNK), 0, 3) for i in range(batch)]
    with torch.inference_mode():
        _run_schedule(model, rows, seed=100)


@pytest.mark.parametrize("batch_kind", [_StackedBatch, _PagedBatch], ids=["kvcache", "paged"])
def test_the_embedded_model_decodes_batched_rows_as_it_decodes_them_alone(embedded, batch_kind, invariance):
    rows = [(3, 0, 8), (40, 0, 8), (17, 1, 6), (40, 2, 5)]
    with torch.inference_mode():
        _run_schedule(embedded, rows, seed=7, batch_kind=batch_kind)


def test_bucketed_decode_attention_is_each_rows_solo_step_bitwise_whatever_the_buffer():
    """Rows in three key buckets, in a buffer wider than any row needs, and each row alone in a buffer of
    exactly its keys: the same bits; and close to the masked reference."""
    g = torch.Generator().manual_seed(0)
    b = ops.ATTENTION_BUCKET
    valid = [5, 1, b + 6, b, b + 1, 2 * b + 2, 2, 2 * b]
    q = torch.randn(8, 8, 1, 16, generator=g).bfloat16()
    k = torch.randn(8, 2, 3 * b - 5, 16, generator=g).bfloat16()
    v = torch.randn(8, 2, 3 * b - 5, 16, generator=g).bfloat16()
    got = ops.bucketed_decode_attention(q, k, v, torch.tensor(valid))
    for row, n in enumerate(valid):
        alone = ops.bucketed_decode_attention(q[row:row + 1], k[row:row + 1, :, :n], v[row:row + 1, :, :n], [n])
        assert torch.equal(got[row:row + 1], alone)
    masked = ops.masked_decode_attention(q.float(), k.float(), v.float(), torch.tensor(valid))
    assert (got.float() - masked).abs().max() <= 2e-2  # the same attention, up to bf16 rounding


def test_ragged_decode_attention_is_each_rows_solo_attention_bitwise():
    g = torch.Generator().manual_seed(0)
    valid = [5, 1, 9, 9, 30, 2]
    q = torch.randn(6, 8, 1, 16, generator=g).bfloat16()
    k = torch.randn(6, 2, 32, 16, generator=g).bfloat16()
    v = torch.randn(6, 2, 32, 16, generator=g).bfloat16()
    got = ops.ragged_decode_attention(q, k, v, torch.tensor(valid))
    for b, n in enumerate(valid):
        assert torch.equal(got[b:b + 1], ops.causal_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n]))
    masked = ops.masked_decode_attention(q.float(), k.float(), v.float(), torch.tensor(valid))
    assert (got.float() - masked).abs().max() <= 2e-2  # the same attention, up to bf16 rounding


# Row-wise products at a width where the kernels' blocking depends on the row count (oneDNN bf16,
# K = 5120: a row's result at M = 1 differs from M >= 8 plain, M >= 25 packed, measured): computed in
# fixed row tiles, each row equals its one-row product.
K_WIDE = 5120


def _rows_equal_their_solo_products(fn, x: torch.Tensor, counts: list[int] | None = None) -> list[int]:
    """The row counts m (all of 1..rows, or ``counts``) whose first m rows, run together, differ from their solo
    products."""
    solo = torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])
    return [m for m in counts or range(1, x.shape[0] + 1) if not torch.equal(fn(x[:m]), solo[:m])]


def _wide_module(kind: str, packed: bool) -> torch.nn.Module:
    g = torch.Generator().manual_seed(len(kind))
    module = {"linear": lambda: torch.nn.Linear(K_WIDE, 256, bias=False),
              "qkv": lambda: QKVProjection(K_WIDE, 256, 128),
              "swiglu": lambda: SwiGLU(K_WIDE, 256),
              "experts": lambda: Experts(2, K_WIDE, 256)}[kind]().requires_grad_(False)
    for param in module.parameters():
        param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    module = module.bfloat16()
    if packed:
        shell = {"linear": PackedLinear, "qkv": PackedQKV, "swiglu": PackedSwiGLU,
                 "experts": PackedExperts}[kind](module, KERNEL)
        for name, param in module.named_parameters():
            shell.load_tensor(name, param)
        module = shell
    return module


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["linear", "qkv", "swiglu", "experts"])
def test_wide_row_wise_products_are_batch_invariant(kind, packed, invariant):
    """Every product a decode step makes, packed or not, at 1..40 rows of [B, 1, K] input."""
    if packed and not BF16_PACKING:
        pytest.skip("oneDNN bf16 packing unavailable")
    module = _wide_module(kind, packed)
    set_batch_invariant(module, True)
    fn = {"linear": lambda rows: row_tiled(module, rows, True),  # a bare linear is tiled by its caller
          "qkv": lambda rows: torch.cat(module(rows), dim=-1),
          "swiglu": module,
          "experts": lambda rows: module.expert(1, rows[:, 0])}[kind]
    x = torch.randn(40, 1, K_WIDE, generator=torch.Generator().manual_seed(9)).bfloat16()
    around_tiles = [1, 2, 3, ROW_TILE - 1, ROW_TILE, ROW_TILE + 1, 2 * ROW_TILE - 1, 2 * ROW_TILE, 2 * ROW_TILE + 1, 40]
    with torch.inference_mode():
        assert _rows_equal_their_solo_products(fn, x, around_tiles) == []


def test_a_wide_model_decodes_32_rows_as_it_decodes_them_alone(invariant):
    """End to end at K = 5120 (where untiled products are not row-invariant): 32 rows, packed."""
    if not BF16_PACKING:
        pytest.skip("oneDNN bf16 packing unavailable")
    cfg = llama4.ModelConfig(text=text_config(
        num_layers=2, vocab_size=256, hidden_size=K_WIDE, num_heads=4, num_kv_heads=2, head_dim=64,
        intermediate_size=128, intermediate_size_mlp=256, num_experts=4, num_experts_per_tok=1,
        no_rope_layers=(1, 0), attention_chunk_size=CHUNK, floor_scale=4, attn_scale=0.5, bos_token_id=1,
        eos_token_ids=(2,), pad_token_id=0))
    model = pack_model(llama4.random_model(cfg, dtype=torch.bfloat16, std=0.02, seed=11))
    model.set_batch_invariant(True)
    with torch.inference_mode():
        _run_schedule(model, [(1 + (5 * i) % (2 * CHUNK), 0, 2) for i in range(32)], seed=300)


def test_batch_invariance_is_a_setting_of_one_model_off_by_default():
    one, other = (llama4.random_model(_config(1), dtype=torch.bfloat16, seed=5) for _ in range(2))
    if BF16_PACKING:
        pack_model(one)
    assert not is_batch_invariant(one) and not is_batch_invariant(other)
    one.set_batch_invariant(True)
    settings = [m.batch_invariant for m in one.modules() if hasattr(m, "batch_invariant")]
    assert len(settings) > 4 * 3 and all(settings)  # every layer's attention, projections and experts, the head
    assert not is_batch_invariant(other)
    if BF16_PACKING:
        llama4.build.cpu_kernels.unpack(one)  # the plain modules back keep the setting
        assert all(m.batch_invariant for m in one.modules() if hasattr(m, "batch_invariant"))
    calls = []
    x = torch.randn(3, 4)
    row_tiled(lambda rows: calls.append(rows.shape[0]) or rows, x, False)
    row_tiled(lambda rows: calls.append(rows.shape[0]) or rows, x, True)
    assert calls == [3, ROW_TILE]


def test_row_tiled_tiles_every_row_count_and_leaves_empty_inputs_alone():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return x * 2

    x = torch.randn(3 * ROW_TILE + 1, 4)  # a prefill piece's rows: tiled like a decode batch's
    assert torch.equal(row_tiled(fn, x, True), x * 2) and calls == [ROW_TILE] * 4
    calls.clear()
    assert row_tiled(fn, torch.randn(0, 4), True).shape == (0, 4) and calls == [0]
    calls.clear()
    y = torch.randn(3, 6, 4)  # 18 rows: two tiles of ROW_TILE, the second zero-padded
    assert torch.equal(row_tiled(fn, y, True), y * 2) and calls == [ROW_TILE, ROW_TILE]


# Split invariance: with invariance on, a token's keys, values and logits do not depend on the other
# tokens of its pass, so a prompt prefilled in one piece, in any pieces, or one token at a time gives
# the same cache and logits bit for bit (what makes a prefix-cache hit reply as the cold run does).

def _fed_in_pieces(model, prompt: torch.Tensor, cuts: list[int], cache) -> torch.Tensor:
    """Logits of every prompt position, the prompt fed to ``cache`` in pieces ending at ``cuts``."""
    out, at = [], 0
    for end in [*cuts, prompt.shape[1]]:
        if end > at:
            out.append(model(prompt[:, at:end], cache=cache))
            at = end
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_a_prompt_split_anywhere_gives_the_same_logits_bitwise(packed, invariant):
    """3.5 chunks of prompt, split at and across chunk boundaries and fed one token at a time at the
    end: every position's logits equal the one-piece run's (torch.equal)."""
    if packed and not BF16_PACKING:
        pytest.skip("oneDNN bf16 packing unavailable")
    model = MODELS["top2-packed" if packed else "top2-plain"]
    prompt = _prompt(model.config.text.vocab_size, 3 * CHUNK + 4, 40)
    with torch.inference_mode():
        whole = _fed_in_pieces(model, prompt, [], KVCache(model.config.text))
        for cuts in ([1], [CHUNK], [5, 11, 12, 2 * CHUNK + 3], list(range(2 * CHUNK, 3 * CHUNK + 4))):
            got = _fed_in_pieces(model, prompt, cuts, KVCache(model.config.text))
            assert torch.equal(got, whole), f"cut at {cuts}: max |diff| {(got - whole).abs().max():.3g}"


def test_a_split_prompt_in_the_paged_cache_equals_the_unsplit_one_bitwise(embedded, invariant):
    """The server's case on the shipped model: a prompt prefilled in 256-token pieces from the start
    (a cold run) and the same prompt after a cached prefix that ended mid-piece, its last tokens fed as
    decode steps (a prefix-cache hit): same logits at every position, and a next step that reads both
    caches whole gives the same logits (same keys and values)."""
    prompt = _prompt(embedded.config.text.vocab_size, 300, 41)
    pool = PagedKVCache(embedded.config.text, block_size=16)
    cold, warm = pool.sequence(), pool.sequence()
    with torch.inference_mode():
        whole = _fed_in_pieces(embedded, prompt, [256], pool.batch([cold]))
        got = _fed_in_pieces(embedded, prompt, [37, 250, 251, 252], pool.batch([warm]))
        assert torch.equal(got, whole)
        step = torch.tensor([[7]])
        assert torch.equal(embedded(step, cache=pool.batch([cold])), embedded(step, cache=pool.batch([warm])))


def test_rowwise_attention_is_each_querys_decode_step_and_the_masked_reference(monkeypatch):
    """Queries whose key counts cross key buckets, against one decode step each."""
    g = torch.Generator().manual_seed(1)
    bucket = ops.ATTENTION_BUCKET
    start, count = bucket - 20, bucket + 40  # queries at start..start + count - 1: three buckets of keys
    q = torch.randn(2, 4, count, 16, generator=g).bfloat16()  # two rows
    k = torch.randn(2, 2, start + count, 16, generator=g).bfloat16()
    v = torch.randn(2, 2, start + count, 16, generator=g).bfloat16()
    for chunk, k_start in ((None, 0), (bucket + 30, 0), (50, 50)):  # keys from k_start up to the last query
        got = ops.rowwise_causal_attention(q, k[:, :, k_start:], v[:, :, k_start:], start, k_start, chunk)
        for i in range(count):
            first = (start + i) // chunk * chunk if chunk else 0
            keys = slice(first, start + i + 1)
            for row in range(2):
                step = ops.bucketed_decode_attention(q[row:row + 1, :, i:i + 1], k[row:row + 1, :, keys],
                                                     v[row:row + 1, :, keys], [start + i + 1 - first])
                assert torch.equal(got[row:row + 1, :, i:i + 1], step)
        reference = ops.masked_attention(q.float(), k.float(), v.float(), q_start=start, k_start=0, chunk=chunk)
        assert (got.float() - reference).abs().max() <= 2e-2  # the same attention, up to bf16 rounding
        with monkeypatch.context() as patch:  # calls of a few queries each (as at very long context): same bits
            patch.setattr(ops, "MASK_ELEMENTS", 3 * ops.ATTENTION_BUCKET)
            assert torch.equal(ops.rowwise_causal_attention(q, k[:, :, k_start:], v[:, :, k_start:], start, k_start,
                                                            chunk), got)
    with pytest.raises(ValueError, match="keys start at 7"):
        ops.rowwise_causal_attention(q[:, :, :10], k[:, :, 7:16], v[:, :, 7:16], 6, 7, chunk=4)


def test_the_paged_cache_hands_invariant_attention_whole_key_buckets(embedded, invariance):
    """With invariance on, a decode step reads a view as wide as its key bucket (one row) or gathers that
    wide (rows), so attention pads nothing; off, exactly the valid keys (the longest row's)."""
    config = embedded.config.text
    pool = PagedKVCache(config, block_size=16, initial_blocks=64)
    first, second = pool.sequence(), pool.sequence()
    widths = []
    with torch.inference_mode():
        embedded(_prompt(config.vocab_size, 40, 3), cache=pool.batch([first]))
        embedded(_prompt(config.vocab_size, 20, 4), cache=pool.batch([second]))
        for sequences in ([first], [first, second]):
            batch = pool.batch(sequences)
            k = torch.zeros(len(sequences), config.num_kv_heads, 1, config.head_dim, dtype=torch.bfloat16)
            keys = batch.update(0, k, k.clone(), bucketed=invariance).keys
            widths.append(keys.shape[2])
    expected = [ops.ATTENTION_BUCKET] * 2 if invariance else [41, 41]
    assert widths == expected


def test_the_key_index_is_one_shared_arange_whatever_the_widths():
    """Decode at a growing context asks for ever wider key indices: one arange serves them all (memory
    follows the widest, not the sum of all widths)."""
    cpu = torch.device("cpu")
    for width in range(ops.ATTENTION_BUCKET, 40 * ops.ATTENTION_BUCKET + 1, ops.ATTENTION_BUCKET):
        assert torch.equal(ops._key_index(width, cpu), torch.arange(width))
    assert len(ops._KEY_INDEX[cpu]) < 2 * 40 * ops.ATTENTION_BUCKET
