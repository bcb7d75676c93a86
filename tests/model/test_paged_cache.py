"""PagedKVCache against the simple KVCache: same logits (fp32, 1e-6) and the same greedy tokens for
sequences that join and leave a running batch, cross chunk boundaries (chunk 4) and reuse freed blocks;
memory held follows actual lengths; prefix copies share blocks without aliasing.
"""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.model.cache import KVCache
from llama4.model.paged_cache import PagedKVCache
from tests.model.test_cache import CHUNK, ids, rel_err, tiny_text

TOL = 1e-6


@pytest.fixture(scope="module")
def model():
    # layers 0-2, 4-6 chunk-local (chunk 4), 3 and 7 global; temperature tuning on (floor_scale 3)
    return llama4.random_model(llama4.ModelConfig(text=tiny_text(num_layers=8, moe_step=2)), std=0.2, seed=3)


def reference_run(model, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """The simple path: prefill the prompt into a KVCache, then decode the rest token by token;
    logits [1 + len - prompt, vocab] (last prompt position, then every decoded one)."""
    cache = KVCache(model.config.text)
    out = [model(tokens[:, :prompt], cache=cache, num_logits=1)[0]]
    out += [model(tokens[:, t:t + 1], cache=cache)[0] for t in range(prompt, tokens.shape[1] - 1)]
    return torch.cat(out)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("pieces", [(1, 3, 4, 5, 1), (9, 2, 7), (4, 4, 4), (13,)])
def test_one_sequence_prefilled_in_pieces_then_decoded_equals_kvcache(model, block_size, pieces):
    x = ids(97, 1, sum(pieces) + 2 * CHUNK + 1, seed=1)
    pool = PagedKVCache(model.config.text, block_size=block_size, initial_blocks=2)  # grows several times
    seq = pool.sequence()
    with torch.no_grad():
        paged_out, ref_out, cache, at = [], [], KVCache(model.config.text, block_size=block_size), 0
        for size in pieces:  # pieces cross chunk boundaries (and end on them)
            paged_out.append(model(x[:, at:at + size], cache=pool.batch([seq])))
            ref_out.append(model(x[:, at:at + size], cache=cache))
            at += size
        for t in range(at, x.shape[1]):
            paged_out.append(model(x[:, t:t + 1], cache=pool.batch([seq])))
            ref_out.append(model(x[:, t:t + 1], cache=cache))
        full = model(x)
    assert seq.length == x.shape[1]
    assert rel_err(torch.cat(paged_out, 1), torch.cat(ref_out, 1)) <= TOL
    assert rel_err(torch.cat(paged_out, 1), full) <= 1e-5


@pytest.fixture
def invariant_products(model):
    """Fixed row-tile products (model.invariance): without them fp32 GEMMs round a row differently at 3
    rows than at 1 (~1e-6 relative over a run), with them a batched row equals its solo run exactly."""
    model.set_batch_invariant(True)
    yield
    model.set_batch_invariant(False)


def test_rows_joining_and_leaving_a_ragged_batch_equal_their_solo_runs(model, invariant_products):
    """Sequences of different lengths decode together; one leaves mid-run and its blocks are reused by
    one that joins (prefilled while the others wait); every row's logits equal its own KVCache run (bit
    for bit, products batch-invariant) and greedy decoding picks the same tokens."""
    cfg = model.config.text
    pool = PagedKVCache(cfg, block_size=3, initial_blocks=2)
    prompts = {"a": 3, "b": 6, "c": 9, "d": 5}
    total = {"a": 20, "b": 30, "c": 23, "d": 17}  # b leaves after 6 steps (unfinished), d joins then
    seqs = {k: ids(97, 1, total[k], seed=20 + i) for i, k in enumerate(prompts)}
    handles, logits = {}, {k: [] for k in prompts}
    with torch.no_grad():
        def join(k):
            handles[k] = pool.sequence()
            logits[k].append(model(seqs[k][:, :prompts[k]], cache=pool.batch([handles[k]]), num_logits=1)[0])

        for k in ("a", "b", "c"):
            join(k)
        step = 0
        while handles:
            if step == 6:
                used = pool.blocks_used()
                total["b"] = handles["b"].length + 1  # the tokens it got to
                handles.pop("b").release()
                assert pool.blocks_used() < used
                capacity = pool.capacity_bytes()
                join("d")  # takes blocks b gave back
                assert pool.capacity_bytes() == capacity
            rows = list(handles)
            step_ids = torch.cat([seqs[k][:, handles[k].length:handles[k].length + 1] for k in rows])
            out = model(step_ids, cache=pool.batch([handles[k] for k in rows]))
            for i, k in enumerate(rows):
                logits[k].append(out[i])
                if handles[k].length == total[k] - 1:
                    handles.pop(k).release()
            step += 1
            for k in handles:  # local layers never hold more than a chunk
                assert len(handles[k].held[1].blocks) <= -(-CHUNK // 3) + 1
    assert pool.blocks_used() == 0 and pool.nbytes() == 0
    for k in prompts:
        got = torch.cat(logits[k])
        ref = reference_run(model, seqs[k][:, :total[k]], prompts[k])
        assert got.shape == ref.shape
        assert rel_err(got, ref) <= TOL, k
        assert torch.equal(got, ref), k
        assert torch.equal(got.argmax(-1), ref.argmax(-1)), k


def test_greedy_generation_matches_generate(model):
    """A greedy loop over a paged batch (rows at different lengths) gives generate()'s tokens."""
    cfg = model.config.text
    prompts = [ids(97, 1, n, seed=40 + n)[0].tolist() for n in (2, 5, 11)]
    new = 3 * CHUNK
    expected = [llama4.generate(model, [p], max_new_tokens=new, stop_tokens=[])[0][len(p):] for p in prompts]
    pool = PagedKVCache(cfg, block_size=2)
    handles, tokens = [pool.sequence() for _ in prompts], [[] for _ in prompts]
    with torch.no_grad():
        for h, p, out in zip(handles, prompts, tokens):
            out.append(int(model(torch.tensor([p]), cache=pool.batch([h]), num_logits=1)[0, -1].argmax()))
        for _ in range(new - 1):
            logits = model(torch.tensor([[t[-1]] for t in tokens]), cache=pool.batch(handles))
            for row, out in enumerate(tokens):
                out.append(int(logits[row, -1].argmax()))
    assert tokens == expected


def test_memory_follows_lengths_and_freed_blocks_are_reused():
    cfg = tiny_text(chunk=8, num_layers=4)  # layers 0-2 local, 3 global
    bs = 3
    pool = PagedKVCache(cfg, block_size=bs, initial_blocks=4)
    k = torch.zeros(1, cfg.num_kv_heads, 1, cfg.head_dim)
    seqs = [pool.sequence() for _ in range(3)]
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # k and v, fp32, per layer
    for n in range(1, 30):
        for s in seqs[:2]:  # two sequences grow one token at a time, interleaved
            batch = pool.batch([s])
            for layer in range(cfg.num_layers):
                batch.update(layer, k, k)
            batch.advance(1)
        local = -(-((n - 1) % 8 + 1) // bs)  # the blocks of the chunk of the last token
        glob = -(-n // bs)
        for s in seqs[:2]:
            assert len(s.held[0].blocks) == glob and len(s.held[1].blocks) == local
            assert s.nbytes() == (glob * 1 + local * 3) * bs * per_token
        assert pool.nbytes() == 2 * (glob * 1 + local * 3) * bs * per_token
    capacity = pool.capacity_bytes()
    held = pool.blocks_used()
    seqs[0].release()
    seqs[0].release()  # idempotent
    assert pool.blocks_used() == held // 2
    batch = pool.batch([seqs[2]])
    for layer in range(cfg.num_layers):
        batch.update(layer, torch.zeros(1, cfg.num_kv_heads, 29, cfg.head_dim), torch.zeros(1, cfg.num_kv_heads, 29,
                                                                                           cfg.head_dim))
    batch.advance(29)
    assert pool.capacity_bytes() == capacity and pool.blocks_used() == held  # reused, no growth
    seqs[1].release()
    seqs[2].release()
    assert pool.blocks_used() == 0
    pool.trim()
    assert pool.capacity_bytes() < capacity


def _kv(start: int, count: int, batch: int = 1, heads: int = 2, dim: int = 8):
    """k/v [B, Hkv, count, d] whose every element is its sequence index (v = -index); row b adds 1000 * b."""
    idx = torch.arange(start, start + count, dtype=torch.float32)
    k = idx[None, None, :, None].expand(batch, heads, count, dim) + 1000 * torch.arange(batch)[:, None, None, None]
    return k.clone(), -k


@pytest.mark.parametrize("bs", [1, 3, 8])
def test_update_returns_exactly_the_keys_each_query_may_see(bs):
    chunk = 8
    cfg = tiny_text(chunk=chunk, num_layers=4)  # d = 8, Hkv = 2
    pool = PagedKVCache(cfg, block_size=bs, initial_blocks=2)
    seq = pool.sequence()
    n = 0
    for size in (5, 6, 1, 13, 7, 1, 1, 1):  # single-row passes, some crossing chunk boundaries
        batch = pool.batch([seq])
        k, v = _kv(n, size)
        for layer, spec in enumerate(cfg.layers):
            k_all, v_all, k_start, valid = batch.update(layer, k, v)
            assert valid is None
            assert k_start == ((n // chunk) * chunk if spec.chunked else 0)
            assert torch.equal(k_all[0, 0, :, 0], torch.arange(k_start, n + size, dtype=torch.float32))
            assert torch.equal(v_all, -k_all)
        batch.advance(size)
        n += size
    others = [pool.sequence() for _ in range(2)]
    for i, other in enumerate(others):  # two more rows at other lengths
        batch = pool.batch([other])
        k, v = _kv(0, 3 + 5 * i)
        for layer in range(cfg.num_layers):
            batch.update(layer, k + 1000 * (i + 1), v - 1000 * (i + 1))
        batch.advance(3 + 5 * i)
    rows = [seq, *others]
    for _ in range(2 * chunk):  # ragged decode: each row sees its own keys only, and all of them
        batch = pool.batch(rows)
        starts = batch.starts(3)
        k = torch.tensor(starts, dtype=torch.float32)[:, None, None, None] + 1000 * torch.arange(3)[:, None, None, None]
        k = k.expand(3, 2, 1, 8).clone()
        for layer, spec in enumerate(cfg.layers):
            k_all, v_all, _, valid = batch.update(layer, k, -k)
            for row, s in enumerate(starts):
                first = (s // chunk) * chunk if spec.chunked else 0
                assert valid[row] == s + 1 - first
                expected = torch.arange(first, s + 1, dtype=torch.float32) + 1000 * row
                assert torch.equal(k_all[row, 0, :valid[row], 0], expected)
                assert torch.equal(v_all[row, 1, :valid[row], 3], -expected)
                assert torch.isfinite(k_all).all()
        batch.advance(1)


def test_prefix_copies_share_full_blocks_and_never_alias(model):
    """copy_prefix shares the full blocks and copies the partial one; the original and the copy then
    continue with different tokens and both equal fresh runs."""
    cfg = model.config.text
    pool = PagedKVCache(cfg, block_size=2, initial_blocks=2)
    x = ids(97, 1, 2 * CHUNK + 3, seed=7)
    y = torch.cat([x[:, :2 * CHUNK + 1], ids(97, 1, 2, seed=8)], dim=1)  # departs after 2 * CHUNK + 1 tokens
    with torch.no_grad():
        src = pool.sequence()
        model(x[:, :2 * CHUNK + 3], cache=pool.batch([src]))
        with pytest.raises(ValueError, match="prefix"):
            src.copy_prefix(CHUNK)  # before the chunk the local layers hold
        used = pool.blocks_used()
        copy = src.copy_prefix(2 * CHUNK + 1)
        assert pool.blocks_used() == used + 2  # one new (partial) block per kind; the rest shared
        assert copy.earliest_cut() == 2 * CHUNK and copy.length == 2 * CHUNK + 1
        got_copy = model(y[:, 2 * CHUNK + 1:], cache=pool.batch([copy]))
        got_src = model(ids(97, 1, 1, seed=9), cache=pool.batch([src]))
        ref_copy = model(y)[:, 2 * CHUNK + 1:]
        ref_src = model(torch.cat([x, ids(97, 1, 1, seed=9)], dim=1))[:, -1:]
    assert rel_err(got_copy, ref_copy) <= 1e-5 and rel_err(got_src, ref_src) <= 1e-5
    src.release()
    copy.release()
    assert pool.blocks_used() == 0


def test_refusals():
    cfg = tiny_text()
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(cfg, block_size=0)
    pool = PagedKVCache(cfg)
    a, b = pool.sequence(), pool.sequence()
    k = torch.zeros(2, cfg.num_kv_heads, 3, cfg.head_dim)
    with pytest.raises(ValueError, match="one sequence at a time"):
        pool.batch([a, b]).update(0, k, k)
    with pytest.raises(ValueError, match="2 sequences but the input has 3"):
        pool.batch([a, b]).starts(3)
    a.release()
    with pytest.raises(ValueError, match="released"):
        pool.batch([a])


def test_a_lone_sequence_is_moved_to_consecutive_blocks_once(model):
    """Grown in a batch, a sequence's blocks interleave with the others'; its first pass alone moves
    them to consecutive blocks (one copy), after which its passes read views and keep extending them."""
    cfg = model.config.text
    pool = PagedKVCache(cfg, block_size=2, initial_blocks=2)
    x, y = ids(97, 1, 6 * CHUNK, seed=11), ids(97, 1, 6 * CHUNK, seed=12)
    with torch.no_grad():
        a, b = pool.sequence(), pool.sequence()
        out = [model(x[:, :3], cache=pool.batch([a]))]
        model(y[:, :3], cache=pool.batch([b]))
        for t in range(3, 3 * CHUNK):
            out.append(model(torch.cat([x[:, t:t + 1], y[:, t:t + 1]]), cache=pool.batch([a, b]))[:1])
        assert not a.held[0].consecutive  # global-layer blocks interleaved with b's
        b.release()
        for t in range(3 * CHUNK, x.shape[1]):
            out.append(model(x[:, t:t + 1], cache=pool.batch([a])))
            assert a.held[0].consecutive and a.held[1].consecutive
        full = model(x)
    assert rel_err(torch.cat(out, dim=1), full) <= 1e-5
    a.release()
    assert pool.blocks_used() == 0


def test_the_free_list_stays_bounded_under_churn():
    cfg = tiny_text(chunk=8, num_layers=4)
    pool = PagedKVCache(cfg, block_size=1, initial_blocks=4)
    k = torch.zeros(1, cfg.num_kv_heads, 1, cfg.head_dim)
    for round_ in range(300):  # sequences come and go, each growing block by block (taken in order)
        seqs = [pool.sequence() for _ in range(3)]
        for _ in range(5):
            for s in seqs:
                batch = pool.batch([s])
                for layer in range(cfg.num_layers):
                    batch.update(layer, k, k)
                batch.advance(1)
        for s in seqs:
            s.release()
    assert pool.blocks_used() == 0
    for kind in pool._kinds:
        assert len(kind.free) <= 2 * kind.capacity + 64
