"""The fused decode layer declines caches that store keys/values other than in bf16 (a quantized KV cache): it
returns None before touching the cache, and the model's torch layers run the step, exactly as they run it with the
fused layer switched off."""

from __future__ import annotations

import copy

import pytest
import torch

import llama4
from llama4.kernels.cpu import fused_decode
from llama4.model.cache import KVCache
from llama4.model.paged_cache import PagedKVCache
from llama4.presets import text_config
from llama4.quant.kv_cache import kv_storage
from tests.kernel_support import BF16_PACKING, KERNEL, pack

pytestmark = pytest.mark.skipif(
    not BF16_PACKING or KERNEL is None,
    reason="no CPU kernel runs on this machine (no AVX2/AVX-512, no C compiler or no oneDNN bf16 packing)")


@pytest.fixture(scope="module")
def packed():
    cfg = text_config(num_layers=4, moe_step=2, vocab_size=211, hidden_size=64, num_heads=4, num_kv_heads=2,
                      head_dim=32, intermediate_size=64, intermediate_size_mlp=96, num_experts=4,
                      attention_chunk_size=8, floor_scale=4)
    plain = llama4.random_model(llama4.ModelConfig(text=cfg), std=0.15, seed=7)
    model = pack(copy.deepcopy(plain).to(torch.bfloat16), fused_decode=True)
    assert isinstance(model.text.fast_decode, fused_decode.FusedDecode)
    return model


def run(model, ids: torch.Tensor, cache) -> torch.Tensor:
    with torch.inference_mode():
        out = [model(ids[:, :5], cache=cache)[:, -1]]
        out += [model(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(5, ids.shape[1])]
    return torch.cat(out)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_a_quantized_cache_runs_the_layers(packed, fmt):
    config = packed.config.text
    storage = kv_storage(config, fmt, torch.bfloat16)
    ids = torch.randint(0, 211, (2, 21), generator=torch.Generator().manual_seed(3))
    fast, calls = packed.text.fast_decode, []

    def counting(h, tables, cache):
        calls.append(fast(h, tables, cache))
        return calls[-1]

    packed.text.fast_decode = counting
    try:
        quantized = run(packed, ids, KVCache(config, storage=storage))
        assert len(calls) == 1 + 21 - 5 and all(out is None for out in calls)  # the prefill pass, then every step
        calls.clear()
        run(packed, ids, KVCache(config))
        assert calls[0] is None and all(out is not None for out in calls[1:])  # the control: bf16 steps are taken
        packed.text.fast_decode = None
        layers = run(packed, ids, KVCache(config, storage=storage))
        pool = PagedKVCache(config, block_size=4, storage=storage)
        seqs = [pool.sequence(), pool.sequence()]
        with torch.inference_mode():
            for b in range(2):
                packed(ids[b:b + 1, :5], cache=pool.batch([seqs[b]]))
            packed.text.fast_decode = counting
            calls.clear()
            packed(ids[:, 5:6], cache=pool.batch(seqs))
        assert calls == [None] and [s.length for s in seqs] == [6, 6]
    finally:
        packed.text.fast_decode = fast
    assert torch.equal(quantized, layers)
