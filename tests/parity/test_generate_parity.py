"""Greedy generation is token-identical to transformers' generate(do_sample=False)."""

from __future__ import annotations

import pytest
import torch

import llama4
from tests.parity.hf_models import CONFIGS, hf_causal_lm


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = hf_causal_lm(CONFIGS[request.param], seed=5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, llama4.load_model(path)


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt: list[int], new: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0].tolist()


def test_greedy_batch_one_crosses_chunk_boundaries(pair):
    hf, ours = pair
    (prompt,) = prompts(hf.config.vocab_size, [11])
    new = 4 * hf.config.attention_chunk_size  # decode crosses four chunk boundaries
    expected = hf_greedy(hf, prompt, new)
    got = llama4.generate(ours, torch.tensor([prompt]), max_new_tokens=new, stop_tokens=[])
    assert got[0].tolist() == expected


def test_greedy_batched_prompts_of_different_lengths_equal_solo_runs(pair):
    hf, ours = pair
    batch = prompts(hf.config.vocab_size, [3, 17, 9, 12], seed=1)
    new = 2 * hf.config.attention_chunk_size + 3
    got = llama4.generate(ours, batch, max_new_tokens=new, stop_tokens=[])
    for prompt, row in zip(batch, got):
        assert row == hf_greedy(hf, prompt, new)


def test_same_length_batch_matches_transformers_batch(pair):
    hf, ours = pair
    ids = torch.tensor(prompts(hf.config.vocab_size, [13, 13, 13], seed=2))
    new = 20
    expected = hf.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(ids))
    assert torch.equal(llama4.generate(ours, ids, max_new_tokens=new, stop_tokens=[]), expected)
