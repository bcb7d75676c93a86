"""KVCache: cached decoding and chunked prefill equal one full forward; memory follows the iRoPE shape.

Tolerance: fp32 logits <= 1e-5 relative (Frobenius) against the uncached full forward of the same model.
"""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.model.cache import KVCache
from llama4.presets import text_config

CHUNK = 4


def tiny_text(chunk: int = CHUNK, num_layers: int = 4, moe_step: int = 1, **kw):
    fields = dict(
        vocab_size=97, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=32,
        intermediate_size_mlp=48, num_experts=4, num_experts_per_tok=1, attention_chunk_size=chunk,
        floor_scale=3, attn_scale=0.5, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    )
    fields.update(kw)
    return text_config(num_layers=num_layers, moe_step=moe_step, **fields)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def model():
    # 8 layers: RoPE/chunked 0,1,2,4,5,6 and NoPE/global 3,7; dense + MoE interleaved; temperature
    # tuning active (floor_scale 3) so the sequence index of every token matters.
    cfg = llama4.ModelConfig(text=tiny_text(num_layers=8, moe_step=2))
    return llama4.random_model(cfg, std=0.2, seed=3)


def ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_model_really_depends_on_the_chunk_mask(model):
    """Sanity: past the first chunk, logits differ from full causal attention (so a cache bug shows)."""
    x = ids(97, 1, 3 * CHUNK, seed=0)
    unchunked_cfg = llama4.ModelConfig(text=tiny_text(chunk=10_000, num_layers=8, moe_step=2))
    unchunked = llama4.random_model(unchunked_cfg, std=0.2, seed=3)
    with torch.no_grad():
        a, b = model(x), unchunked(x)
    assert rel_err(a[:, :CHUNK], b[:, :CHUNK]) <= 1e-6
    assert rel_err(a[:, CHUNK:], b[:, CHUNK:]) > 1e-3


@pytest.mark.parametrize("block_size", [1, 3, 256])
def test_token_by_token_decode_through_several_chunk_boundaries(model, block_size):
    x = ids(97, 2, 4 * CHUNK + 3, seed=1)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config.text, block_size=block_size)
        steps = [model(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])]
    assert cache.seq_len == x.shape[1]
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("order", [
    (1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 2),
    (3 * CHUNK + 2, CHUNK + 1, CHUNK, CHUNK - 1, 1),
    (CHUNK + 1, 1, 3 * CHUNK + 2, CHUNK - 1, CHUNK),
    (CHUNK - 1, CHUNK, 1, CHUNK + 1, 3 * CHUNK + 2),
])
def test_chunked_prefill_pieces_equal_full_forward(model, order):
    x = ids(97, 2, sum(order), seed=2)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config.text, block_size=3)
        pieces, at = [], 0
        for size in order:
            pieces.append(model(x[:, at:at + size], cache=cache))
            at += size
    assert rel_err(torch.cat(pieces, dim=1), full) <= 1e-5


def test_prefill_then_decode_with_num_logits(model):
    x = ids(97, 1, 3 * CHUNK + 1, seed=4)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config.text, block_size=2)
        last = model(x[:, :2 * CHUNK + 1], cache=cache, num_logits=1)
        rest = [model(x[:, t:t + 1], cache=cache) for t in range(2 * CHUNK + 1, x.shape[1])]
    assert last.shape == (1, 1, 97)
    assert rel_err(last, full[:, 2 * CHUNK:2 * CHUNK + 1]) <= 1e-5
    assert rel_err(torch.cat(rest, dim=1), full[:, 2 * CHUNK + 1:]) <= 1e-5


# ----------------------------------------------------------------------------------------------------
# Memory and contents, driven through KVCache.update directly with keys that encode their index.
# ----------------------------------------------------------------------------------------------------


def _kv(start: int, count: int, batch: int = 2, heads: int = 2, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """k/v [B, Hkv, count, d] whose every element equals its sequence index (v = -index)."""
    idx = torch.arange(start, start + count, dtype=torch.float32)
    k = idx[None, None, :, None].expand(batch, heads, count, dim).clone()
    return k, -k


def _feed(cache: KVCache, num_layers: int, start: int, count: int):
    k, v = _kv(start, count)
    results = [cache.update(layer, k, v) for layer in range(num_layers)]
    cache.advance(count)
    return results


def _held(cache: KVCache, layer: int) -> tuple[int, int]:
    """(valid entries, sequence index of entry 0) of a layer whose rows are all at one length."""
    lens, starts = cache._len[layer], cache._start[layer]
    assert len(set(lens)) == 1 and len(set(starts)) == 1, (lens, starts)
    return lens[0], starts[0]


def _check_cache(cache: KVCache, cfg, n: int, block: int, chunk: int, results, q_start: int):
    for layer, spec in enumerate(cfg.layers):
        held, start = _held(cache, layer)
        capacity = cache._k[layer].shape[2]
        k_all, v_all, k_start, ragged = results[layer]
        assert ragged is None  # all rows aligned
        # What the layer's queries got: keys covering [k_start, n) -- from their chunk start (local)
        # or from 0 (global), and exactly the values that were written.
        assert k_all.shape[2] == n - k_start
        assert torch.equal(k_all[0, 0, :, 0], torch.arange(k_start, n, dtype=torch.float32))
        assert torch.equal(v_all, -k_all)
        if spec.chunked:
            assert k_start == (q_start // chunk) * chunk
            # never more than one chunk held, and only the chunk of the latest tokens
            assert capacity <= chunk, (layer, n, capacity)
            assert held <= chunk
            assert start % chunk == 0 and start + held == n
            assert (n - 1) // chunk * chunk <= start <= n // chunk * chunk
            assert torch.equal(cache._k[layer][0, 0, :held, 0], torch.arange(start, n, dtype=torch.float32))
            # capacity is the block-rounded need, capped at the chunk
            assert capacity >= held
        else:
            assert k_start == 0
            assert held == n and start == 0
            assert capacity == -(-n // block) * block  # N rounded up to the block size, no more
            assert torch.equal(cache._k[layer][0, 0, :n, 0], torch.arange(n, dtype=torch.float32))


@pytest.mark.parametrize("block", [1, 3, 4, 16])
def test_decode_memory_local_layers_hold_one_chunk_global_layers_grow_in_blocks(block):
    chunk = 8
    cfg = tiny_text(chunk=chunk, num_layers=4)  # layers 0-2 local, 3 global
    cache = KVCache(cfg, block_size=block)
    for n in range(1, 4 * chunk + 3):  # below, at and past four chunk boundaries
        results = _feed(cache, cfg.num_layers, n - 1, 1)
        _check_cache(cache, cfg, n, block, chunk, results, q_start=n - 1)
        local = [_held(cache, i)[0] for i in cfg.local_layers]
        # one token at a time: the local layers hold the tokens of the chunk of token n-1
        assert local == [(n - 1) % chunk + 1] * 3
        per_entry = 2 * 2 * 3 * 4 * 2  # k and v, B=2, Hkv=2, d=3, fp32
        local_cap = sum(cache._k[i].shape[2] for i in cfg.local_layers)
        global_cap = -(-n // block) * block
        assert cache.nbytes() == (local_cap + global_cap) * per_entry
        assert local_cap <= 3 * chunk


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 23, 24, 25])
@pytest.mark.parametrize("block", [3, 8])
def test_prefill_memory_after_n_tokens(n, block):
    chunk = 8
    cfg = tiny_text(chunk=chunk, num_layers=4)
    cache = KVCache(cfg, block_size=block)
    results = _feed(cache, cfg.num_layers, 0, n)
    _check_cache(cache, cfg, n, block, chunk, results, q_start=0)
    for i in cfg.local_layers:
        # one prefill: the whole prompt if it fits in the first chunk, else only the last partial chunk
        assert _held(cache, i)[0] == (n if n <= chunk else n % chunk)


@pytest.mark.parametrize("pieces", [(5, 5, 5, 5, 5, 2), (7, 1, 8, 9, 1), (3, 13, 1, 2, 8)])
def test_piecewise_prefill_memory(pieces):
    chunk, block = 8, 3
    cfg = tiny_text(chunk=chunk, num_layers=4)
    cache = KVCache(cfg, block_size=block)
    n = 0
    for size in pieces:
        results = _feed(cache, cfg.num_layers, n, size)
        q_start, n = n, n + size
        _check_cache(cache, cfg, n, block, chunk, results, q_start=q_start)


def test_model_cache_memory_after_long_decode(model):
    cfg = model.config.text
    x = ids(97, 1, 5 * CHUNK + 1, seed=5)
    cache = KVCache(cfg, block_size=2)
    with torch.no_grad():
        for t in range(x.shape[1]):
            model(x[:, t:t + 1], cache=cache)
            n = t + 1
            for i in cfg.local_layers:
                assert cache._k[i].shape[2] <= CHUNK and _held(cache, i)[0] == (n - 1) % CHUNK + 1
            for i in cfg.global_layers:
                assert _held(cache, i)[0] == n and cache._k[i].shape[2] == -(-n // 2) * 2
    entry = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # k + v, fp32
    n = x.shape[1]
    assert cache.nbytes() <= (len(cfg.local_layers) * CHUNK + len(cfg.global_layers) * (n + 1)) * entry


def test_ragged_decode_rows_equal_their_solo_full_forward(model):
    """Prompts of different lengths prefilled apart, stacked, then decoded together: each row's logits
    equal its own full forward (fp32 1e-5), with the rows crossing chunk boundaries at different steps."""
    lengths, steps = (3, 6, 9), 2 * CHUNK + 1
    seqs = [ids(97, 1, n + steps, seed=10 + n) for n in lengths]
    with torch.no_grad():
        caches, firsts = [], []
        for seq, n in zip(seqs, lengths):
            cache = KVCache(model.config.text, block_size=3)
            firsts.append(model(seq[:, :n], cache=cache, num_logits=1))
            caches.append(cache)
        batch = KVCache.stack(caches)
        assert batch.lengths == list(lengths)
        decoded = []
        for s in range(steps - 1):
            step_ids = torch.cat([seq[:, n + s:n + s + 1] for seq, n in zip(seqs, lengths)])
            decoded.append(model(step_ids, cache=batch))
            for i in model.config.text.local_layers:  # still at most one chunk per local layer
                assert batch._k[i].shape[2] <= CHUNK and max(batch._len[i]) <= CHUNK
        decoded = torch.cat(decoded, dim=1)  # [3, steps - 1, vocab]
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            full = model(seq)
            assert rel_err(firsts[row], full[:, n - 1:n]) <= 1e-5
            assert rel_err(decoded[row], full[0, n:n + steps - 1]) <= 1e-5, row
    assert batch.lengths == [n + steps - 1 for n in lengths]


@pytest.mark.parametrize("block_size", [0, -1, -256])
def test_invalid_block_size_raises(block_size):
    with pytest.raises(ValueError, match="block_size"):
        KVCache(tiny_text(), block_size=block_size)


@pytest.mark.parametrize("total,cut", [(11, 9), (11, 8), (7, 5), (3, 1), (12, 12)])
def test_truncate_equals_running_only_the_prefix(model, total, cut):
    """Cut a cache back inside the chunk its chunked layers hold: the continuation is the same as after
    running only the first ``cut`` tokens (fp32 1e-5)."""
    x = ids(97, 1, total, seed=20)
    more = ids(97, 1, 6, seed=21)
    with torch.no_grad():
        reference = KVCache(model.config.text)
        model(x[:, :cut], cache=reference)
        expected = model(more, cache=reference)
        cache = KVCache(model.config.text)
        model(x, cache=cache)
        assert cache.earliest_cut() == (total // CHUNK) * CHUNK  # one prefill pass: the last chunk is held
        cache.truncate(cut)
        assert cache.lengths == [cut]
        got = model(more, cache=cache)
    assert rel_err(got, expected) <= 1e-5


def test_truncate_refuses_cuts_before_the_held_chunk(model):
    cache = KVCache(model.config.text)
    with torch.no_grad():
        model(ids(97, 1, 2 * CHUNK + 1, seed=22), cache=cache)
    assert cache.earliest_cut() == 2 * CHUNK
    with pytest.raises(ValueError, match="starts at 8"):
        cache.truncate(2 * CHUNK - 1)
    with pytest.raises(ValueError, match="0..9"):
        cache.truncate(10)
    assert cache.lengths == [2 * CHUNK + 1]  # refused cuts change nothing
