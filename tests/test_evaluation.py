import math

import pytest
import torch
import torch.nn.functional as F

from llama4 import evaluation
from llama4.build import random_model
from llama4.train.recipe import embedded_config


def test_unigram_perplexity_matches_a_direct_computation():
    train, held = [1, 1, 2, 3], [1, 2, 2, 4]
    vocab = 5
    p = {t: (train.count(t) + 1) / (len(train) + vocab) for t in range(vocab)}
    expected = math.exp(-sum(math.log(p[t]) for t in held[1:]) / 3)
    assert evaluation.unigram_perplexity(train, held, vocab) == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def tok():
    from llama4.prompt import train_tokenizer

    return train_tokenizer(["Once upon a time a dog and a cat played. What colour is the shape? It is red."] * 10, 300)


@pytest.fixture(scope="module")
def model(tok):
    return random_model(embedded_config(tok), seed=0)


def test_perplexity_is_exp_of_the_mean_cross_entropy(model, tok):
    ids = torch.randint(0, tok.vocab_size, (3 * 16 + 1,), generator=torch.Generator().manual_seed(0)).tolist()
    got = evaluation.perplexity(model, ids, window=16, batch_size=2)
    x = torch.tensor(ids[:-1]).view(3, 16)
    y = torch.tensor(ids[1:]).view(3, 16)
    with torch.no_grad():
        ce = F.cross_entropy(model(x).flatten(0, 1).double(), y.flatten())
    assert got["tokens"] == 48
    assert got["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_picture_questions_scoring(model, tok, monkeypatch):
    def answer_truth(_model, _tok, prompts, _new, _bs):
        return ["It is red." for _ in prompts]

    monkeypatch.setattr(evaluation, "_answers", answer_truth)
    report = evaluation.picture_questions(model, tok, count=30, seed=0)
    assert report["colour"]["questions"] == report["shape"]["questions"] == 30
    assert report["shape"]["accuracy"] == 0.0
    assert 0.0 < report["colour"]["accuracy"] < 0.5  # only the red pictures
    assert report["colour"]["chance"] == pytest.approx(1 / 6) and report["shape"]["chance"] == pytest.approx(1 / 5)


def test_picture_questions_run_the_model(model, tok):
    report = evaluation.picture_questions(model, tok, count=2, seed=1, batch_size=4)
    for kind in ("colour", "shape"):
        assert 0.0 <= report[kind]["accuracy"] <= 1.0 and report[kind]["questions"] == 2
        assert all(isinstance(e["reply"], str) for e in report[kind]["examples"])
