import random
from dataclasses import replace

import pytest
import torch

from llama4.build import random_model
from llama4.train.objectives import param_groups
from llama4.train.recipe import embedded_config
from llama4.train.shapes import draw_scene
from llama4.train.trainer import TrainConfig, train
from llama4.train.vision_pretrain import (
    ATTRIBUTES,
    HEADS,
    MASKED,
    ROWS,
    WEIGHTS,
    AttributeBatches,
    AttributeProbe,
    attribute_accuracy,
    scene_labels,
)
from tests.train.test_recipe import FAKE_TOKENIZER


def small_config():
    config = embedded_config(FAKE_TOKENIZER)
    return replace(config, vision=replace(config.vision, hidden_size=32, num_layers=1, num_heads=2,
                                          intermediate_size=128, vision_output_dim=32, projector_input_dim=32,
                                          projector_output_dim=32))


def test_labels_name_the_scene():
    _, scene = draw_scene(random.Random(3))
    labels = scene_labels(scene)
    assert [classes[i] for classes, i in zip(ATTRIBUTES.values(), labels)] == [
        scene.shape, scene.colour, scene.count, scene.background]


def test_attribute_batches_are_deterministic_and_resumable():
    a = AttributeBatches(3, seed=5)
    first, second = next(a), next(a)
    b = AttributeBatches(3, seed=5)
    b.load_state_dict({"index": 1, "seed": 5})
    again = next(b)
    assert all(torch.equal(x, y) for x, y in zip(second, again))
    assert not torch.equal(first[2], second[2])
    inputs, targets, pixels = first
    assert targets.shape == (3, len(HEADS) * sum(WEIGHTS.values())) and pixels.shape == (3, 3, 336, 336)
    _, scene = draw_scene(random.Random("attributes:5:0"))  # the first picture of the first batch
    labels = scene_labels(scene)
    rows = [labels[a] for a in ROWS]  # each attribute repeated by its weight, once per head
    assert targets[0].tolist() == rows * len(HEADS) and ROWS.count(0) == WEIGHTS["shape"]
    with pytest.raises(ValueError, match="seed 6"):
        b.load_state_dict({"index": 0, "seed": 6})


def test_probe_masks_the_classes_an_attribute_lacks():
    model = random_model(small_config(), seed=0)
    probe = AttributeProbe(model.vision, 32)
    inputs, targets, pixels = next(AttributeBatches(2, seed=0))
    width = max(len(c) for c in ATTRIBUTES.values())
    facts = probe.facts(pixels)
    assert facts.shape == (2, len(HEADS), len(ATTRIBUTES), width)
    for a, classes in enumerate(ATTRIBUTES.values()):
        assert (facts[:, :, a, len(classes):] == MASKED).all() and (facts[:, :, a, :len(classes)] != MASKED).all()
    logits = probe(inputs, pixels)  # the loss rows, in the targets' order
    assert logits.shape == (*targets.shape, width)
    assert torch.equal(logits[:, len(ROWS) + 1], facts[:, 1, ROWS[1]])
    assert not torch.equal(facts[:, 0], facts[:, 1])  # two heads: mean+max and mean


def test_training_the_probe_trains_the_shared_tower_and_learns(tmp_path):
    """A few steps on repeated pictures: the model's own tower changes and the heads fit the labels.

    The seeds are ones with a wide margin on every arithmetic path measured (oneDNN on AMX, AVX-512 BF16
    and AVX2; MKL on AVX-512 and AVX2): eval loss 0.000-0.006 after 200 steps, every fact right. (Model
    seed 0 with pictures of seed 1 ended at 0.19-0.21 and fit 7 of 8 shapes on an AMD EPYC.)"""
    model = random_model(small_config(), seed=2)
    model.vision.requires_grad_(True)
    before = model.vision.patch_embed.weight.detach().clone()
    probe = AttributeProbe(model.vision, 32)
    batch = next(AttributeBatches(8, seed=3))

    class Repeat(AttributeBatches):
        def __next__(self):
            self.index += 1
            return batch

    cfg = TrainConfig(steps=200, batch_size=8, seq_len=len(HEADS) * len(ROWS), lr=3e-3, min_lr=3e-3, warmup=1,
                      weight_decay=0.0, eval_every=200, eval_batches=1, checkpoint_every=200, aux_coef=0.0)
    result = train(probe, cfg, Repeat(8, seed=3), [batch], tmp_path)
    assert not torch.equal(before, model.vision.patch_embed.weight)
    assert result.eval_history[-1]["eval_loss"] < 0.1  # chance is ~ln 4.4 = 1.5 nats per fact
    accuracy = attribute_accuracy(probe, [batch])
    assert set(accuracy) == set(HEADS) and all(min(head.values()) == 1.0 for head in accuracy.values())


def test_vision_lr_scale_gives_the_tower_its_own_groups():
    model = random_model(small_config(), seed=0).requires_grad_(True)
    plain = param_groups(model, 0.1)
    assert len(plain) == 2 and all(g["lr_scale"] == 1.0 for g in plain)
    scaled = param_groups(model, 0.1, vision_lr_scale=0.1)
    vision = {id(p) for p in model.vision.parameters()}
    for group in scaled:
        ids = {id(p) for p in group["params"]}
        assert ids <= vision if group["lr_scale"] == 0.1 else not ids & vision
    assert sum(len(g["params"]) for g in scaled) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="vision_lr_scale"):
        TrainConfig(vision_lr_scale=-1.0)


def test_trainer_applies_the_vision_lr_scale(tmp_path):
    """With scale 0 the tower does not move while the rest trains."""
    from llama4.prompt import train_tokenizer
    from llama4.train.instruct_data import ImageBatches

    tok = train_tokenizer(["What colour is the shape? It is red."] * 10, 300)
    config = embedded_config(tok)
    config = replace(config, vision=replace(small_config().vision))
    model = random_model(config, seed=0)
    tower = model.vision.patch_embed.weight.detach().clone()
    embed = model.text.embed.weight.detach().clone()
    cfg = TrainConfig(steps=1, batch_size=1, seq_len=256, lr=1e-3, min_lr=1e-4, warmup=1, eval_every=1,
                      eval_batches=1, checkpoint_every=1, vision_lr_scale=0.0)
    train(model, cfg, ImageBatches(tok, 1, 256, seed=0), [next(ImageBatches(tok, 1, 256, seed=9))], tmp_path)
    assert torch.equal(tower, model.vision.patch_embed.weight)
    assert not torch.equal(embed, model.text.embed.weight)


def test_probe_training_resumes_bit_identically(tmp_path):
    """The probe is not a whole model: its checkpoint is plain safetensors and resumes exactly."""
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=len(HEADS) * len(ROWS), lr=1e-3, min_lr=1e-4, warmup=1,
                      weight_decay=0.0, eval_every=2, eval_batches=1, checkpoint_every=1, aux_coef=0.0)
    held_out = [next(AttributeBatches(2, seed=9))]

    def run(out, stop_at=None):
        model = random_model(small_config(), seed=0)
        probe = AttributeProbe(model.vision.requires_grad_(True), 32)
        train(probe, cfg, AttributeBatches(2, seed=1), held_out, out, stop_at=stop_at)
        return probe

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=1)
    resumed = run(tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint" / "model" / "weights.safetensors").is_file()
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
