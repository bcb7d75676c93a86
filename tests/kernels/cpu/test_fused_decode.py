"""The fused decode layer in C (llama4.kernels.cpu.fused_decode) against the model's layers, which are its reference.

It rounds where the layers round but sums and exponentiates in its own order, so the tolerance is stated
against a float32 evaluation of the same weights: the fused step may not stray from it by more than the
layers' own bf16 step does (x1.25, plus 2e-3 of slack), and the two bf16 paths stay within 3e-2 of each
other (relative L2 over a step's logits). Batching, being row-wise, must not change a row's bits.
"""

from __future__ import annotations

import copy

import pytest
import torch

import llama4
from llama4.kernels import cpu as cpu_kernels
from llama4.kernels.cpu import fused_decode
from llama4.model.cache import KVCache
from llama4.model.paged_cache import PagedKVCache
from tests.kernel_support import BF16_PACKING, FUSED_CHUNK, KERNEL, fused_decode_model, pack

pytestmark = pytest.mark.skipif(
    not BF16_PACKING or KERNEL is None,
    reason="no CPU kernel runs on this machine (no AVX2/AVX-512, no C compiler or no oneDNN bf16 packing)")

CHUNK = FUSED_CHUNK


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


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
    """Each test starts from the packed model without batch invariance (some turn it on)."""
    packed.set_batch_invariant(False)
    yield
    packed.set_batch_invariant(False)


class Counting:
    """Wraps a model's fast_decode, counting the passes it took and the one-token passes it declined."""

    def __init__(self, model):
        self.inner, self.taken, self.declined = model.text.fast_decode, 0, 0

    def __call__(self, h, *args):
        out = self.inner(h, *args)
        if out is not None:
            self.taken += 1
        elif h.shape[1] == 1:
            self.declined += 1
        return out


def _teacher_forced_logits(model, ids: torch.Tensor, prompt: int, fused: bool) -> list[torch.Tensor]:
    """Prefill ``prompt`` tokens, then decode the rest of ``ids`` one token per step; each step's logits."""
    saved = model.text.fast_decode
    model.text.fast_decode = saved if fused else None
    try:
        cache = KVCache(model.config.text)
        with torch.inference_mode():
            model(ids[:, :prompt], cache=cache)
            return [model(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(prompt, ids.shape[1])]
    finally:
        model.text.fast_decode = saved


def test_decode_steps_across_chunk_boundaries_stay_as_close_to_float32_as_the_layers(plain, packed):
    ids = torch.randint(0, 211, (3, 6 + 3 * CHUNK), generator=torch.Generator().manual_seed(1))
    counting = packed.text.fast_decode = Counting(packed)
    try:
        fused = _teacher_forced_logits(packed, ids, 6, fused=True)
    finally:
        packed.text.fast_decode = counting.inner
    assert counting.taken == 3 * CHUNK and counting.declined == 0
    layers = _teacher_forced_logits(packed, ids, 6, fused=False)
    exact = _teacher_forced_logits(copy.deepcopy(plain).float(), ids, 6, fused=False)
    for step, (f, lay, ref) in enumerate(zip(fused, layers, exact)):
        assert rel_err(f, ref) <= 1.25 * rel_err(lay, ref) + 2e-3, step
        assert rel_err(f, lay) <= 3e-2, step


def test_the_cache_ends_as_the_layers_leave_it(packed):
    ids = torch.randint(0, 211, (2, 5 + 2 * CHUNK + 3), generator=torch.Generator().manual_seed(2))
    caches = []
    for fused in (True, False):
        saved = packed.text.fast_decode
        packed.text.fast_decode = saved if fused else None
        cache = KVCache(packed.config.text)
        with torch.inference_mode():
            packed(ids[:, :5], cache=cache)
            for t in range(5, ids.shape[1]):
                packed(ids[:, t:t + 1], cache=cache)
        packed.text.fast_decode = saved
        caches.append(cache)
    a, b = caches
    assert a.lengths == b.lengths and a._len == b._len and a._start == b._start
    for layer in range(len(a._k)):
        n = a._len[layer][0]
        assert a._k[layer].shape == b._k[layer].shape
        assert rel_err(a._k[layer][:, :, :n], b._k[layer][:, :, :n]) <= 3e-2
        assert rel_err(a._v[layer][:, :, :n], b._v[layer][:, :, :n]) <= 3e-2
        assert not a._k[layer][:, :, n:].any()  # nothing written past the valid entries


@pytest.mark.parametrize("lengths", [[5, 11, 19], [7] * 18])  # ragged rows; more rows than one kernel tile
def test_a_row_of_a_batch_equals_its_solo_run_bit_for_bit(packed, lengths):
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in lengths]
    counting = packed.text.fast_decode = Counting(packed)
    try:
        with torch.inference_mode():
            batched = llama4.generate(packed, prompts, max_new_tokens=2 * CHUNK + 2, stop_tokens=[])
            solo = [llama4.generate(packed, [p], max_new_tokens=2 * CHUNK + 2, stop_tokens=[])[0] for p in prompts]
    finally:
        packed.text.fast_decode = counting.inner
    assert counting.taken > 0 and counting.declined == 0
    for row, alone in enumerate(solo):
        assert batched[row] == alone, row


def test_steps_it_does_not_take_run_the_layers(plain, packed, monkeypatch):
    fast = packed.text.fast_decode
    config = packed.config.text
    h = torch.zeros(2, 1, config.hidden_size, dtype=torch.bfloat16)
    cache = KVCache(config)
    with torch.inference_mode():
        packed(torch.zeros(2, 3, dtype=torch.long), cache=cache)
        tables = packed.text.position_tables(h, torch.tensor([[3], [3]]), cache)
        assert fast(h, tables, cache) is not None  # the control: it takes this step
        cache = KVCache(config)
        packed(torch.zeros(2, 3, dtype=torch.long), cache=cache)
        assert fast(h.float(), tables, cache) is None  # not bf16
        assert fast(torch.zeros(2, 2, config.hidden_size, dtype=torch.bfloat16), tables, cache) is None  # 2 tokens
        assert fast(h.clone().requires_grad_(), tables, cache) is None  # autograd cannot see into C
        two = torch.zeros(2, 2, config.hidden_size, dtype=torch.bfloat16)
        packed.set_batch_invariant(True)  # prefill pieces of one row are taken then, of several rows not
        assert fast(two, packed.text.position_tables(two, torch.tensor([[3, 4]]), cache), cache) is None
    float_model = pack(copy.deepcopy(plain), fused_decode=True)
    counting = float_model.text.fast_decode = Counting(float_model)
    with torch.inference_mode():
        llama4.generate(float_model, torch.randint(0, 211, (1, 4)), max_new_tokens=3, stop_tokens=[])
    assert counting.declined == 2 and counting.taken == 0  # float32: the layers run
    cpu_kernels.unpack(float_model)
    assert float_model.text.fast_decode is None
    assert pack(copy.deepcopy(plain).to(torch.bfloat16), fused_decode=False).text.fast_decode is None


def test_the_embedded_model_writes_the_same_greedy_text_either_way():
    model = llama4.load_model(dtype=torch.bfloat16)
    tok = llama4.load_tokenizer()
    ids = torch.tensor([tok.encode("Once upon a time, in a small village by the sea,", bos=True)])
    with torch.inference_mode():
        fused = llama4.generate(model, ids, max_new_tokens=40, stop_tokens=[])
        model.text.fast_decode = None
        layers = llama4.generate(model, ids, max_new_tokens=40, stop_tokens=[])
    assert torch.equal(fused, layers)


def test_weights_loaded_after_the_first_step_are_the_ones_used(plain):
    model = pack(copy.deepcopy(plain).to(torch.bfloat16), fused_decode=True)
    ids = torch.randint(0, 211, (1, 9 + 4), generator=torch.Generator().manual_seed(5))
    _teacher_forced_logits(model, ids, 9, fused=True)  # binds to the weights as they are
    wo = model.text.layers[1].attn.wo
    wo.load_tensor("weight", wo.packed.to_dense() * 3)
    with torch.no_grad():
        model.text.layers[2].ffn_norm.weight.mul_(2)  # in place: read where it lies
    norm = model.text.layers[3].attn_norm
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 0.5, requires_grad=False)  # a new tensor
    fused = _teacher_forced_logits(model, ids, 9, fused=True)
    layers = _teacher_forced_logits(model, ids, 9, fused=False)
    for f, lay in zip(fused, layers):
        assert rel_err(f, lay) <= 3e-2


def test_the_servers_paged_cache_decodes_rows_as_their_solo_runs_bit_for_bit(packed):
    """Rows of a paged batch (small blocks, so rows' blocks interleave) read their keys through block
    tables; each row's logits equal its solo KVCache run's, and every step took the fused layer."""
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 211, (1, n), generator=g) for n in (4, 13)]
    steps = 2 * CHUNK + 1
    follow = torch.randint(0, 211, (2, steps), generator=g)
    solo = []
    for row, prompt in enumerate(prompts):
        ids = torch.cat((prompt, follow[row:row + 1]), dim=1)
        solo.append(_teacher_forced_logits(packed, ids, prompt.shape[1], fused=True))
    pool = PagedKVCache(packed.config.text, block_size=3, initial_blocks=2)
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
    assert counting.taken == steps


@pytest.mark.parametrize("pieces", [[23], [5, 18], [3, 7, 13], [1] * 23])
def test_with_batch_invariance_prefill_pieces_compute_what_decode_steps_compute(packed, pieces):
    """With batch invariance a prompt may be prefilled in any pieces (crossing chunk boundaries) or fed
    token by token: the fused layers take every pass and give the same logits and cache, bit for bit."""
    ids = torch.randint(0, 211, (1, sum(pieces) + 3), generator=torch.Generator().manual_seed(11))
    counting = packed.text.fast_decode = Counting(packed)
    packed.set_batch_invariant(True)
    try:
        cache = KVCache(packed.config.text)
        with torch.inference_mode():
            at = 0
            for n in pieces:
                last = packed(ids[:, at:at + n], cache=cache)[:, -1]
                at += n
            steps = [packed(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(at, ids.shape[1])]
    finally:
        packed.text.fast_decode = counting.inner
    assert counting.taken == len(pieces) + 3 and counting.declined == 0
    reference = _token_by_token(packed, ids)
    assert torch.equal(last, reference[sum(pieces) - 1])
    for step, expected in zip(steps, reference[sum(pieces):]):
        assert torch.equal(step, expected)


def _token_by_token(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every position's logits, one decode step per token (batch invariance on, the fused layers)."""
    model.set_batch_invariant(True)
    cache = KVCache(model.config.text)
    with torch.inference_mode():
        return [model(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(ids.shape[1])]


def test_with_batch_invariance_the_paged_cache_prefills_as_the_kv_cache(packed):
    ids = torch.randint(0, 211, (1, 2 * CHUNK + 5), generator=torch.Generator().manual_seed(12))
    reference = _token_by_token(packed, ids)
    pool = PagedKVCache(packed.config.text, block_size=3, initial_blocks=2)
    seq = pool.sequence()
    with torch.inference_mode():
        first = packed(ids[:, :CHUNK + 3], cache=pool.batch([seq]))[:, -1]  # a piece over a chunk boundary
        rest = [packed(ids[:, t:t + 1], cache=pool.batch([seq]))[:, -1] for t in range(CHUNK + 3, ids.shape[1])]
    assert torch.equal(first, reference[CHUNK + 2])
    for t, got in zip(range(CHUNK + 3, ids.shape[1]), rest):
        assert torch.equal(got, reference[t]), t


def test_without_the_kernel_library_the_layers_decode(plain):
    """No compiled library (no compiler, no AVX2, LLAMA4_CPU_KERNEL=off): no fused layer, and the packed
    model decodes on the torch layers."""
    model = pack(copy.deepcopy(plain).to(torch.bfloat16), variant="off")
    assert model.text.fast_decode is None
    with torch.inference_mode():
        out = llama4.generate(model, torch.randint(0, 211, (2, 5)), max_new_tokens=4, stop_tokens=[])
    assert out.shape == (2, 9)


def test_slots_over_a_chunk_boundary_are_refused_before_the_cache_changes(packed):
    config = packed.config.text
    local = next(i for i, spec in enumerate(config.layers) if spec.chunked)
    pool = PagedKVCache(config, block_size=3, initial_blocks=2)
    seq = pool.sequence()
    cache = KVCache(config)
    with torch.inference_mode():
        packed(torch.zeros(1, CHUNK - 2, dtype=torch.long), cache=pool.batch([seq]))
        packed(torch.zeros(1, CHUNK - 2, dtype=torch.long), cache=cache)
    blocks = [list(held.blocks) for held in seq.held]
    lens = [list(n) for n in cache._len]
    for slots_of in (pool.batch([seq]).decode_slots, cache.decode_slots):
        with pytest.raises(ValueError, match="cross a chunk boundary"):
            slots_of(local, 1, config.num_kv_heads, config.head_dim, torch.bfloat16, torch.device("cpu"), tokens=4)
    assert [list(held.blocks) for held in seq.held] == blocks and [list(n) for n in cache._len] == lens
