"""The fused decode layer over quantized KV caches (llama4.quant.kv_cache: int8 / fp8 entries with a bf16 scale):
it takes the steps, writes new entries with exactly the bytes the Python encoder writes, attends over them decoded
as the torch layers decode them, and so agrees with the layers on the same quantized cache as closely as it does on
a bf16 cache (tests/kernels/cpu/test_fused_decode.py's tolerance); batching and paging change no bit. A storage it
does not know declines before touching the cache, and the model's torch layers run the step."""

from __future__ import annotations

import copy

import pytest
import torch

import llama4
from llama4.kernels.cpu import fused_decode
from llama4.model.cache import KVCache
from llama4.model.paged_cache import PagedKVCache
from llama4.quant.kv_cache import KVFormat, kv_storage
from tests.kernel_support import BF16_PACKING, KERNEL, fused_decode_model, pack
from tests.kernels.cpu.test_fused_decode import CHUNK, Counting, rel_err
from tests.model.test_cache_storage import Tagged

pytestmark = pytest.mark.skipif(
    not BF16_PACKING or KERNEL is None,
    reason="no CPU kernel runs on this machine (no AVX2/AVX-512, no C compiler or no oneDNN bf16 packing)")

FORMATS = ["int8", "fp8"]


@pytest.fixture(scope="module")
def plain():
    return fused_decode_model()


@pytest.fixture(scope="module")
def packed(plain):
    model = pack(copy.deepcopy(plain).to(torch.bfloat16), fused_decode=True)
    assert isinstance(model.text.fast_decode, fused_decode.FusedDecode)
    return model


@pytest.fixture(autouse=True)
def _without_batch_invariance(packed):
    packed.set_batch_invariant(False)
    yield
    packed.set_batch_invariant(False)


def storages(config, fmt: str, where: str):
    """``global``: as llama4 stores a quantized cache (the NoPE layers; kv_storage); ``all``: every layer, the
    chunk-local ones (RoPE, QK-norm, chunk turnover) too."""
    return kv_storage(config, fmt, torch.bfloat16) if where == "global" else [KVFormat(fmt)] * config.num_layers


def forced_logits(model, ids: torch.Tensor, prompt: int, cache, fused: bool) -> list[torch.Tensor]:
    """Prefill ``prompt`` tokens into ``cache``, then decode the rest of ``ids`` one token per step (the fused
    layer on or off); each step's logits."""
    saved = model.text.fast_decode
    model.text.fast_decode = saved if fused else None
    try:
        with torch.inference_mode():
            model(ids[:, :prompt], cache=cache)
            return [model(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(prompt, ids.shape[1])]
    finally:
        model.text.fast_decode = saved


@pytest.mark.parametrize("where", ["global", "all"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_steps_are_taken_and_stay_as_close_to_float32_as_the_layers(plain, packed, fmt, where):
    """Against the same quantized cache on the torch layers: the fused steps stray from a float32 evaluation
    (plain cache) by no more than the layers' own do (x1.25 + 2e-3), and the paths stay within 3e-2."""
    config = packed.config.text
    ids = torch.randint(0, 211, (3, 6 + 3 * CHUNK), generator=torch.Generator().manual_seed(1))
    counting = packed.text.fast_decode = Counting(packed)
    try:
        fused = forced_logits(packed, ids, 6, KVCache(config, storage=storages(config, fmt, where)), fused=True)
    finally:
        packed.text.fast_decode = counting.inner
    assert counting.taken == 3 * CHUNK and counting.declined == 0
    layers = forced_logits(packed, ids, 6, KVCache(config, storage=storages(config, fmt, where)), fused=False)
    exact = forced_logits(copy.deepcopy(plain).float(), ids, 6, KVCache(config), fused=False)
    for step, (f, lay, ref) in enumerate(zip(fused, layers, exact)):
        assert rel_err(f, ref) <= 1.25 * rel_err(lay, ref) + 2e-3, step
        assert rel_err(f, lay) <= 3e-2, step


@pytest.mark.parametrize("layer", [0, 3])  # RoPE + QK-norm + chunked; NoPE + temperature tuning (global)
@pytest.mark.parametrize("fmt", FORMATS)
def test_steps_write_the_bytes_the_python_encoder_writes(packed, fmt, layer):
    """Only ``layer`` quantized: the layers below it are bf16 either way, so its keys and values are the same bf16
    rows whether the cache stores them as bf16 or quantized - and the quantized cache must hold exactly
    KVFormat.encode of the bf16 one's entries, the C steps' among them."""
    config = packed.config.text
    ids = torch.randint(0, 211, (2, 5 + 2 * CHUNK + 3), generator=torch.Generator().manual_seed(2))
    storage = [KVFormat(fmt) if i == layer else None for i in range(config.num_layers)]
    quantized, plain_cache = KVCache(config, storage=storage), KVCache(config)
    counting = packed.text.fast_decode = Counting(packed)
    try:
        forced_logits(packed, ids, 5, quantized, fused=True)
        forced_logits(packed, ids, 5, plain_cache, fused=True)
    finally:
        packed.text.fast_decode = counting.inner
    assert counting.taken == 2 * (2 * CHUNK + 3) and counting.declined == 0
    assert quantized._len == plain_cache._len
    n = quantized._len[layer][0]
    for stored, entries in ((quantized._k[layer], plain_cache._k[layer]), (quantized._v[layer], plain_cache._v[layer])):
        assert stored.dtype == torch.uint8
        assert torch.equal(stored[:, :, :n], KVFormat(fmt).encode(entries[:, :, :n]))
        assert not stored[:, :, n:].any()


@pytest.fixture(scope="module")
def identity(plain):
    """Layer 0's key and value projections the identity (hidden size = KV heads x head_dim): its values are the
    normed input itself, so a test chooses what the C encoder sees (wide ranges: fp8 subnormal codes, int8 zeros)."""
    model = copy.deepcopy(plain)
    with torch.no_grad():
        for w in (model.text.layers[0].attn.qkv.wk.weight, model.text.layers[0].attn.qkv.wv.weight):
            w.copy_(torch.eye(*w.shape))
    return pack(model.to(torch.bfloat16), fused_decode=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_c_encoder_matches_the_python_encoder_over_wide_ranges(identity, fmt):
    config = identity.config.text
    g = torch.Generator().manual_seed(4)
    rows = 12
    h = torch.randn(rows, 1, config.hidden_size, generator=g) * 2.0 ** torch.randint(-30, 6, (rows, 1, 64), generator=g)
    h[0] = 0  # stored zeros: codes 0, scale 0
    h[1] = torch.linspace(-127, 127, 64)  # evenly spread
    h[2, :, 1:] = 1e-30  # one large value, the rest far below the smallest code
    h = h.to(torch.bfloat16)
    fast, caches = identity.text.fast_decode, []
    with torch.inference_mode():
        for storage in ([KVFormat(fmt)] + [None] * 3, None):
            cache = KVCache(config, storage=storage)
            identity(torch.zeros(rows, 3, dtype=torch.long), cache=cache)
            tables = identity.text.position_tables(h, torch.full((rows, 1), 3), cache)
            assert fast(h, tables, cache) is not None
            cache.advance(1)
            caches.append(cache)
    quantized, plain_cache = caches
    for stored, entries in ((quantized._k[0], plain_cache._k[0]), (quantized._v[0], plain_cache._v[0])):
        assert torch.equal(stored[:, :, :4], KVFormat(fmt).encode(entries[:, :, :4]))
    codes = quantized._v[0][:, :, 3, :config.head_dim]
    if fmt == "fp8":
        assert ((codes & 0x78) == 0).logical_and(codes & 0x7 != 0).any()  # subnormal codes were written
    assert not quantized._v[0][0, :, 3].any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_row_of_a_batch_equals_its_solo_run_bit_for_bit(packed, fmt):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (5, 11, 19)]
    counting = packed.text.fast_decode = Counting(packed)
    try:
        with torch.inference_mode():
            batched = llama4.generate(packed, prompts, max_new_tokens=2 * CHUNK + 2, stop_tokens=[], kv_cache=fmt)
            solo = [llama4.generate(packed, [p], max_new_tokens=2 * CHUNK + 2, stop_tokens=[], kv_cache=fmt)[0]
                    for p in prompts]
    finally:
        packed.text.fast_decode = counting.inner
    assert counting.taken > 0 and counting.declined == 0
    for row, alone in enumerate(solo):
        assert batched[row] == alone, row


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_servers_paged_cache_decodes_rows_as_their_solo_runs_bit_for_bit(packed, fmt):
    """A paged pool with the quantized global layers (small blocks: the rows' blocks interleave): each row's
    logits equal its solo KVCache run's (the same storage), every step on the fused layer."""
    config = packed.config.text
    storage = kv_storage(config, fmt, torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 211, (1, n), generator=g) for n in (4, 13)]
    steps = 2 * CHUNK + 1
    follow = torch.randint(0, 211, (2, steps), generator=g)
    solo = [forced_logits(packed, torch.cat((p, follow[r:r + 1]), dim=1), p.shape[1],
                          KVCache(config, storage=storage), fused=True) for r, p in enumerate(prompts)]
    pool = PagedKVCache(config, block_size=3, initial_blocks=2, storage=storage)
    seqs = [pool.sequence() for _ in prompts]
    counting = packed.text.fast_decode = Counting(packed)
    try:
        with torch.inference_mode():
            for seq, prompt in zip(seqs, prompts):
                packed(prompt, cache=pool.batch([seq]))
            for t in range(steps):
                logits = packed(follow[:, t:t + 1], cache=pool.batch(seqs))[:, -1]
                for row in range(2):
                    assert torch.equal(logits[row], solo[row][t][0]), (row, t)
    finally:
        packed.text.fast_decode = counting.inner
    assert counting.taken == steps and counting.declined == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_with_batch_invariance_quantized_prefill_pieces_compute_what_decode_steps_compute(packed, fmt):
    config = packed.config.text
    ids = torch.randint(0, 211, (1, 2 * CHUNK + 7), generator=torch.Generator().manual_seed(11))
    packed.set_batch_invariant(True)
    counting = packed.text.fast_decode = Counting(packed)
    try:
        with torch.inference_mode():
            pieces = KVCache(config, storage=kv_storage(config, fmt, torch.bfloat16))
            first = packed(ids[:, :CHUNK + 3], cache=pieces)[:, -1]  # a piece over a chunk boundary
            rest = [packed(ids[:, t:t + 1], cache=pieces)[:, -1] for t in range(CHUNK + 3, ids.shape[1])]
            single = KVCache(config, storage=kv_storage(config, fmt, torch.bfloat16))
            reference = [packed(ids[:, t:t + 1], cache=single)[:, -1] for t in range(ids.shape[1])]
    finally:
        packed.text.fast_decode = counting.inner
    assert counting.declined == 0 and counting.taken == 1 + len(rest) + ids.shape[1]
    assert torch.equal(first, reference[CHUNK + 2])
    for t, got in zip(range(CHUNK + 3, ids.shape[1]), rest):
        assert torch.equal(got, reference[t]), t
    for layer in range(config.num_layers):
        assert torch.equal(pieces._k[layer], single._k[layer]) and torch.equal(pieces._v[layer], single._v[layer])


def test_a_storage_it_does_not_know_runs_the_layers(packed):
    """A KVStorage of another name (a lossless float64 toy) declines every step before touching the cache: the
    torch layers run them, exactly as with the fused layer off."""
    config = packed.config.text
    storage = [Tagged()] * config.num_layers
    ids = torch.randint(0, 211, (2, 5 + CHUNK), generator=torch.Generator().manual_seed(3))
    counting = packed.text.fast_decode = Counting(packed)
    try:
        fused = forced_logits(packed, ids, 5, KVCache(config, storage=storage), fused=True)
    finally:
        packed.text.fast_decode = counting.inner
    assert counting.taken == 0 and counting.declined == CHUNK
    layers = forced_logits(packed, ids, 5, KVCache(config, storage=storage), fused=False)
    assert all(torch.equal(f, lay) for f, lay in zip(fused, layers))
