import json

import pytest
import torch

import llama4
from llama4.build import random_model
from llama4.model.moe import MoE
from llama4.train.data import BatchIterator, eval_batches
from llama4.train.objectives import RouterCapture, next_token_loss
from llama4.train.trainer import TrainConfig, train

CFG = dict(batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=3, eval_batches=2,
           checkpoint_every=4, log_every=1, aux_coef=0.01)


def run(config, rows, out, steps, stop_at=None, resume=True, model=None):
    x, y = rows
    model = model if model is not None else random_model(config, seed=0)
    result = train(model, TrainConfig(steps=steps, **CFG), BatchIterator(x, y, 4, seed=0),
                   eval_batches(x[-8:], y[-8:], 4), out, resume=resume, stop_at=stop_at)
    return model, result


def test_training_reduces_loss_on_a_repeated_batch(config, rows, tmp_path):
    x, y = rows
    model = random_model(config, seed=0)
    batch = [(x[:4], y[:4])]
    before = next_token_loss(model(x[:4]), y[:4])[0].item()

    class Same:
        def __next__(self):
            return batch[0]

        def state_dict(self):
            return {}

    cfg = TrainConfig(steps=15, batch_size=4, seq_len=16, lr=1e-2, min_lr=1e-2, warmup=1, eval_every=15,
                      checkpoint_every=100, log_every=5)
    result = train(model, cfg, Same(), batch, tmp_path)
    assert result.train_loss < before - 0.5
    assert result.eval_history[-1]["eval_loss"] < before - 0.5


def test_exact_resume_is_bit_identical(config, rows, tmp_path):
    full, full_result = run(config, rows, tmp_path / "full", steps=7)
    run(config, rows, tmp_path / "split", steps=7, stop_at=3)  # "interrupted" after step 3
    state = json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    resumed, resumed_result = run(config, rows, tmp_path / "split", steps=7)  # fresh model, loads the checkpoint
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert resumed_result.train_loss == full_result.train_loss
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    full_steps = [json.loads(line)["step"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert steps == full_steps


def test_checkpoint_has_no_pickle_and_loads_everywhere(config, rows, tmp_path):
    model, _ = run(config, rows, tmp_path, steps=4)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".png", ".jsonl"}
    for p in files:
        assert not p.read_bytes().startswith(b"\x80")  # pickle protocol header
        assert b"PK\x03\x04" not in p.read_bytes()[:4]  # torch.save zip
    assert (tmp_path / "loss.png").stat().st_size > 0
    loaded = llama4.load_model(tmp_path / "checkpoint" / "model", pack=False)
    x = rows[0][:2]
    with torch.no_grad():
        ours = model(x)
        assert torch.equal(loaded(x), ours)


def test_checkpoint_loads_in_transformers(config, rows, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = run(config, rows, tmp_path, steps=2)
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "checkpoint" / "model", torch_dtype=torch.float32)
    x = rows[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits.float(), model(x), atol=2e-4, rtol=2e-4)


def test_gradients_reach_router_and_every_used_expert(config, rows):
    model = random_model(config, seed=0, std=0.2)
    for p in model.parameters():
        p.requires_grad_(True)
    x, y = rows[0][:4], rows[1][:4]
    with RouterCapture(model) as cap:
        logits = model(x)
    aux, shares = cap.aux_loss()
    (next_token_loss(logits, y)[0] + 0.01 * aux).backward()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe, f in zip(moes, shares):
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
        used = f > 0
        assert used.sum() >= 2
        grad = moe.experts.gate_up.grad.flatten(1).abs().sum(1)
        assert bool((grad[used] > 0).all()) and bool((grad[~used] == 0).all())
        assert bool((moe.experts.down.grad.flatten(1).abs().sum(1)[used] > 0).all())
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_autocast_step_runs(config, rows, tmp_path):
    x, y = rows
    model = random_model(config, seed=0)
    cfg = TrainConfig(steps=2, batch_size=4, seq_len=16, warmup=1, eval_every=2, checkpoint_every=2, bf16=True)
    result = train(model, cfg, BatchIterator(x, y, 4), eval_batches(x[:4], y[:4], 4), tmp_path)
    assert result.step == 2 and all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.tensor(result.train_loss))
