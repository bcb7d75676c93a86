"""Sampling parameters and the logits pipeline against direct re-derivations."""

from __future__ import annotations

import pytest
import torch

from llama4.inference.sampling import Sampler, SamplingParams, apply_penalties, greedy_shortcut, truncate


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-1),
                                 dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(repetition_penalty=0),
                                 dict(frequency_penalty=3), dict(presence_penalty=-3), dict(logprobs=21),
                                 dict(logit_bias=((5, 101.0),)), dict(logit_bias=((-1, 1.0),)),
                                 dict(logit_bias=(("x", 1.0),))])
def test_invalid_params_are_rejected_with_the_field_named(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = truncate(logits, SamplingParams(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = truncate(probs.log(), SamplingParams(temperature=1.0, top_p=0.8)).isfinite()
    assert kept.tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    kept = truncate(probs.log(), SamplingParams(temperature=1.0, top_p=0.81)).isfinite()
    assert kept.tolist() == [True, True, True, False]


def test_min_p_is_relative_to_the_most_likely_token():
    probs = torch.tensor([0.6, 0.3, 0.07, 0.03])
    kept = truncate(probs.log(), SamplingParams(temperature=1.0, min_p=0.1)).isfinite()
    assert kept.tolist() == [True, True, True, False]  # threshold 0.06


def test_temperature_divides_logits():
    logits = torch.tensor([1.0, 2.0, 4.0])
    tempered = truncate(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(tempered - tempered.max(), logits * 2 - 8)  # (shifted: softmax is the same)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1e-60), SamplingParams(temperature=1e-308),
                                    SamplingParams(temperature=1.0, top_p=5e-324)])
def test_extreme_temperature_and_top_p_leave_the_most_likely_token(params):
    """Values the API allows: a tiny temperature must not overflow the logits into NaN probabilities."""
    logits = torch.tensor([1.0, 2.0, 4.0, -3.0])
    if not params.greedy:
        assert truncate(logits, params).softmax(-1).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert Sampler(params, 4).choose(logits).token == 2


def test_penalties_follow_their_definitions():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = torch.tensor([True, True, False, False])
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), seen, counts)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]  # positive divided, negative multiplied, unseen untouched
    out = apply_penalties(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), seen, counts)
    assert torch.allclose(out, torch.tensor([2.0, -2.0 - 1.0 - 0.25, 1.0 - 0.5 - 0.25, 0.5]))


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))

    def draw(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), 50)
        return [sampler.choose(logits).token for _ in range(40)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), 3)
    draws = torch.tensor([sampler.choose(probs.log()).token for _ in range(4000)])
    freq = torch.bincount(draws, minlength=3) / 4000
    assert torch.allclose(freq, probs, atol=0.03)  # 4000 draws: 3-sigma ~ 0.022


def test_logprobs_are_the_models_log_softmax():
    logits = torch.randn(20, generator=torch.Generator().manual_seed(1))
    choice = Sampler(SamplingParams(temperature=0.7, top_k=3, seed=1, logprobs=4), 20).choose(logits)
    ref = logits.double().log_softmax(-1)
    assert abs(choice.logprob - ref[choice.token].item()) < 1e-5
    assert [t for t, _ in choice.top] == ref.topk(4).indices.tolist()


def test_logit_bias_is_added_to_the_models_logits_before_everything_else():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    banned = Sampler(SamplingParams(logit_bias=[[1, -100]]), vocab_size=4)  # pairs as JSON gives them
    assert banned.params.logit_bias == ((1, -100.0),) and not banned.plain_greedy
    assert banned.choose(logits).token == 3
    assert Sampler(SamplingParams(logit_bias=((0, 100),)), vocab_size=4).choose(logits).token == 0
    nudged = Sampler(SamplingParams(logit_bias=((2, 2.5),), presence_penalty=2.0, logprobs=0), vocab_size=4)
    first = nudged.choose(logits)
    assert first.token == 2 and first.logprob == pytest.approx(float(logits.log_softmax(-1)[2]))  # raw logprobs
    assert nudged.choose(logits).token == 1  # then the penalty: 1 + 2.5 - 2 = 1.5 < 3
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 4\), got \[4\]"):
        Sampler(SamplingParams(logit_bias=((4, 1.0),)), vocab_size=4)


def test_the_greedy_shortcut_is_the_plain_greedy_samplers_choice():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    samplers = [Sampler(SamplingParams(), 50), Sampler(SamplingParams(temperature=0.7, seed=1), 50),
                Sampler(SamplingParams(logprobs=2), 50), Sampler(SamplingParams(), 50)]
    assert [s.plain_greedy for s in samplers] == [True, False, False, True]
    shortcut = greedy_shortcut(logits, [s.plain_greedy for s in samplers])
    assert shortcut[1] is None and shortcut[2] is None
    assert [shortcut[i] for i in (0, 3)] == [samplers[i].choose(logits[i]).token for i in (0, 3)]
    assert greedy_shortcut(logits, [False] * 4) == [None] * 4
