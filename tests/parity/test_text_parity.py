"""Our text decoder against transformers' Llama4ForCausalLM on random configs (fp32 1e-5, bf16 stated)."""

from __future__ import annotations

import copy

import pytest
import torch

import llama4
from tests.parity.hf_models import CONFIGS, hf_causal_lm


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = hf_causal_lm(CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, llama4.load_model(path, dtype=torch.float32)


def prompt(vocab: int, batch: int = 3, length: int = 37, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_fp32_logits_match(pair):
    name, hf, ours = pair
    ids = prompt(hf.config.vocab_size)  # several chunks long, past floor_scale
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-5, name


def test_fp32_cached_decode_matches_full_forward(pair):
    """Prefill then token-by-token decode through chunk boundaries equals one full forward."""
    name, hf, ours = pair
    ids = prompt(hf.config.vocab_size, batch=2, length=30, seed=2)
    with torch.no_grad():
        full = ours(ids)
        cache = llama4.KVCache(ours.config.text, block_size=4)
        pieces = [ours(ids[:, :5], cache=cache)]
        pieces.append(ours(ids[:, 5:13], cache=cache))  # a prefill piece that crosses a chunk boundary
        for t in range(13, 30):
            pieces.append(ours(ids[:, t:t + 1], cache=cache))
    assert rel_err(torch.cat(pieces, dim=1), full) <= 1e-5, name


def test_bf16_logits_close(pair, tmp_path):
    """In bf16 both implementations round differently; ours must be as close to the fp32 truth as HF's."""
    name, hf, _ = pair
    hf.save_pretrained(tmp_path)
    ours = llama4.load_model(tmp_path, dtype=torch.bfloat16)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ids = prompt(hf.config.vocab_size, batch=2, length=29, seed=3)
    with torch.no_grad():
        truth = hf(ids).logits
        hf_err = rel_err(hf_bf16(ids).logits.float(), truth)
        our_err = rel_err(ours(ids), truth)
    assert our_err <= max(1.5 * hf_err, 1e-2), (name, our_err, hf_err)


def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    name, hf, ours = pair
    llama4.save_model(ours, tmp_path)
    import transformers

    reloaded = transformers.Llama4ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = prompt(hf.config.vocab_size, batch=2, length=21, seed=4)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits), name
