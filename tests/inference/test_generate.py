"""The generation loop: cached decode vs recomputation, stops, batching, seeds, errors."""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.presets import text_config


@pytest.fixture(scope="module")
def model():
    cfg = text_config(num_layers=4, vocab_size=61, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=32, num_experts=4, attention_chunk_size=5, floor_scale=4,
                      attn_scale=0.5, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    return llama4.random_model(llama4.ModelConfig(text=cfg), std=0.3, seed=2)


def recompute_greedy(model, prompt: list[int], new: int) -> list[int]:
    """Slow reference: a full uncached forward over the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


def test_cached_greedy_equals_full_recomputation(model):
    prompt = [5, 9, 33, 12, 7, 40, 3]
    assert llama4.generate(model, [prompt], max_new_tokens=17, stop_tokens=[])[0] == recompute_greedy(model, prompt, 17)


def test_prefill_in_pieces_gives_the_same_tokens(model):
    prompt = list(range(3, 26))
    whole = llama4.generate(model, [prompt], max_new_tokens=8, stop_tokens=[])
    pieces = llama4.generate(model, [prompt], max_new_tokens=8, stop_tokens=[], prefill_chunk=4)
    assert whole == pieces


def test_a_text_prompt_is_embedded_piece_by_piece(model, embed_widths):
    """Activation memory follows the piece: no [T, D] embedding of the whole prompt is ever made."""
    llama4.generate(model, [list(range(3, 26))], max_new_tokens=2, stop_tokens=[], prefill_chunk=4)
    assert max(embed_widths) == 4 and sum(embed_widths) == 23 + 1  # six pieces, then the one decode step


def test_tensor_input_returns_padded_tensor_and_stops_on_eos(model):
    prompt = [5, 9, 33, 12]
    free = llama4.generate(model, [prompt], max_new_tokens=12, stop_tokens=[])[0]
    new = free[len(prompt):]
    at = next(i for i in range(1, len(new)) if new[i] not in new[:i])  # first token not seen before it
    out = llama4.generate(model, torch.tensor([prompt, prompt]), max_new_tokens=12, stop_tokens=[new[at]])
    assert out.shape == (2, len(prompt) + at + 1)
    assert out[0].tolist() == free[:len(prompt) + at + 1]  # the stop token is kept, nothing after it


def test_default_stop_tokens_are_the_configs_eos(model):
    out = llama4.generate(model, [[5, 9]], max_new_tokens=200)
    assert 2 not in out[0][2:-1]  # generation ends at the first eos (if any)


def test_rows_of_a_batch_equal_their_solo_runs_with_sampling(model):
    prompts = [[5, 9, 33], [7, 7, 7, 7, 7, 7, 7, 7, 7], [11]]
    batch = llama4.generate(model, prompts, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3, stop_tokens=[])
    for i, p in enumerate(prompts):
        solo = llama4.generate(model, [p], max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3 + i, stop_tokens=[])
        assert batch[i] == solo[0]


def test_sampling_seed_reproducible(model):
    a = llama4.generate(model, [[5, 9]], max_new_tokens=15, temperature=1.0, seed=11, stop_tokens=[])
    b = llama4.generate(model, [[5, 9]], max_new_tokens=15, temperature=1.0, seed=11, stop_tokens=[])
    c = llama4.generate(model, [[5, 9]], max_new_tokens=15, temperature=1.0, seed=12, stop_tokens=[])
    assert a == b and a != c


def test_top_k_one_is_greedy(model):
    greedy = llama4.generate(model, [[5, 9, 4]], max_new_tokens=10, stop_tokens=[])
    topk = llama4.generate(model, [[5, 9, 4]], max_new_tokens=10, temperature=1.3, top_k=1, seed=0, stop_tokens=[])
    assert greedy == topk


@pytest.mark.parametrize("bad, message", [
    (dict(input_ids=[[]]), "at least one token"),
    (dict(input_ids=[[5, 99]]), r"\[0, 61\)"),
    (dict(input_ids=[[5]], max_new_tokens=-1), "max_new_tokens"),
    (dict(input_ids=[[5]], temperature=-0.5), "temperature"),
])
def test_bad_requests_raise_clear_errors(model, bad, message):
    with pytest.raises(ValueError, match=message):
        llama4.generate(model, **bad)
