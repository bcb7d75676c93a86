"""The caches' storage hook (model.cache.KVStorage) with a lossless toy storage: entries kept as float64 plus one
extra element (a width that is not head_dim, a dtype that is not the attention's). Every cache path must then
compute exactly what the plain cache computes (bit for bit): writes, views, chunk turnover, ragged rows, stacking,
truncation, paged blocks, relocation, prefix copies, trimming and decode slots."""

from __future__ import annotations

import torch

import llama4
from llama4.model.cache import KVCache
from llama4.model.paged_cache import PagedKVCache
from tests.model.test_cache import CHUNK, ids, tiny_text


class Tagged:
    """A lossless KVStorage: x as float64 and a trailing 1 (zero rows stay zero rows but for the tag)."""

    dtype = torch.float64

    def width(self, head_dim: int) -> int:
        return head_dim + 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x.double(), torch.ones(*x.shape[:-1], 1, dtype=torch.float64)), dim=-1)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return stored[..., :-1].to(dtype)


def every_layer(text):
    return [Tagged()] * text.num_layers


def model_and_text():
    text = tiny_text(num_layers=8, moe_step=2)
    return llama4.random_model(llama4.ModelConfig(text=text), std=0.2, seed=3), text


def test_kvcache_with_a_storage_computes_what_the_plain_cache_computes():
    model, text = model_and_text()
    x = ids(97, 2, 4 * CHUNK + 3, seed=5)
    outs = {}
    with torch.no_grad():
        for name, storage in (("plain", None), ("stored", every_layer(text))):
            cache = KVCache(text, block_size=3, storage=storage)
            out = [model(x[:, :CHUNK + 2], cache=cache)]
            out += [model(x[:, t:t + 1], cache=cache) for t in range(CHUNK + 2, x.shape[1])]
            cut = cache.copy_rows([1])
            cut.truncate(cut.earliest_cut() + 1)
            out.append(model(x[1:, cut.seq_len:cut.seq_len + 1], cache=cut))
            rows = [KVCache(text, storage=storage) for _ in range(2)]
            for r, n in zip(rows, (3, CHUNK + 1)):
                out.append(model(x[:1, :n], cache=r))
            stacked = KVCache.stack(rows)
            out.append(model(x[:, :1], cache=stacked))  # a ragged step
            stacked.keep_rows([1])
            out.append(model(x[:1, :1], cache=stacked))
            slots = cache.decode_slots(3, 2, text.num_kv_heads, text.head_dim, torch.float32, x.device)
            outs[name] = (torch.cat([o.reshape(-1) for o in out]), cache, slots)
    assert torch.equal(outs["stored"][0], outs["plain"][0])
    stored, plain = outs["stored"][1], outs["plain"][1]
    assert stored._k[3].dtype == torch.float64 and stored._k[3].shape[-1] == text.head_dim + 1
    assert stored.nbytes() == plain.nbytes() * 2 * (text.head_dim + 1) // text.head_dim
    slots = outs["stored"][2]
    assert slots.keys.dtype == torch.float64 and slots.head_stride == slots.keys.shape[2] * (text.head_dim + 1)
    assert stored.stored_dtype(3, torch.float32) == torch.float64
    assert plain.stored_dtype(3, torch.float32) == torch.float32


def test_the_paged_cache_with_a_storage_computes_what_the_plain_pool_computes():
    model, text = model_and_text()
    x = ids(97, 3, 3 * CHUNK + 4, seed=6)
    outs = {}
    with torch.no_grad():
        for name, storage in (("plain", None), ("stored", every_layer(text))):
            pool = PagedKVCache(text, block_size=3, initial_blocks=2, storage=storage)
            seqs = [pool.sequence() for _ in range(3)]
            out = [model(x[b:b + 1, :2 + b], cache=pool.batch([seqs[b]])) for b in range(3)]
            for t in range(4, x.shape[1] - 4):  # rows at different lengths, blocks interleaved, the pool grows
                step = torch.cat([x[b:b + 1, seqs[b].length:seqs[b].length + 1] for b in range(3)])
                out.append(model(step, cache=pool.batch(seqs)))
            copy = seqs[0].copy_prefix(seqs[0].length - 2)
            seqs[1].release()
            for t in range(2):  # alone: moved to consecutive blocks once, then views
                out.append(model(x[:1, seqs[0].length:seqs[0].length + 1], cache=pool.batch([seqs[0]])))
            out.append(model(x[:1, copy.length:copy.length + 2], cache=pool.batch([copy])))
            pool.trim()
            out.append(model(x[2:, seqs[2].length:seqs[2].length + 1], cache=pool.batch([seqs[2]])))
            outs[name] = (torch.cat([o.reshape(-1) for o in out]), pool)
    assert torch.equal(outs["stored"][0], outs["plain"][0])
    stored, plain = outs["stored"][1], outs["plain"][1]
    assert stored.nbytes() == plain.nbytes() * 2 * (text.head_dim + 1) // text.head_dim
    assert stored.capacity_bytes() == sum(t.nbytes for t in (*stored._k, *stored._v) if t is not None)
    assert stored.stored_dtype(0, torch.float32) == torch.float64
