"""The vision tower learns what a picture shows before the language model learns to read it.

Llama 4's vision encoder was pre-trained on its own before it joined the language model; the
embedded model does the same on the synthetic pictures of :mod:`llama4.shapes`. A temporary linear
head on the tower's output (mean- and max-pooled over the picture's tokens) predicts every fact of the
scene at once: shape, colour, count and background. The head is thrown away afterwards; the tower
keeps the features. Trained through the joint language-model loss alone, the tower's 144 tokens stay
one near-constant vector and picture questions stay near chance for shape (see the recipe's history).

Batches have the trainer's ``(inputs, targets, pixel_values)`` form so that the one training loop
(:func:`llama4.train.trainer.train`) runs this stage too: ``inputs`` is a placeholder, ``targets``
holds one class index per attribute, and :class:`AttributeProbe` returns logits ``[N, attributes,
classes]`` where the unused classes of a smaller attribute are masked out.
"""

from __future__ import annotations

import random

import torch
import torch.nn as nn

from llama4.shapes import BACKGROUNDS, COLOURS, SHAPES, draw_scene
from llama4.train.instruct_data import SeededBatches

ATTRIBUTES: dict[str, tuple] = {"shape": SHAPES, "colour": tuple(COLOURS), "count": (1, 2, 3),
                                "background": tuple(BACKGROUNDS)}
MASKED = -1e4  # logit of a class an attribute does not have (exp underflows to 0 in float32)


def scene_labels(scene) -> list[int]:
    """Class index of each attribute of a :class:`llama4.shapes.Scene`, in ``ATTRIBUTES`` order."""
    return [ATTRIBUTES["shape"].index(scene.shape), ATTRIBUTES["colour"].index(scene.colour),
            ATTRIBUTES["count"].index(scene.count), ATTRIBUTES["background"].index(scene.background)]


class AttributeBatches(SeededBatches):
    """Endless batches of fresh pictures and their attribute labels, drawn from ``seed`` and the batch
    index (its whole state, so a resumed run draws the same pictures)."""

    what = "attribute batches"

    def __init__(self, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(seed)
        self.batch_size = batch_size

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from llama4.prompt import preprocess_image

        rng = random.Random(f"attributes:{self.seed}:{self.index}")
        self.index += 1
        tiles, labels = [], []
        for _ in range(self.batch_size):
            image, scene = draw_scene(rng)
            tiles.append(preprocess_image(image)[0])
            labels.append(scene_labels(scene))
        targets = torch.tensor(labels)
        return torch.zeros_like(targets), targets, torch.cat(tiles)


class AttributeProbe(nn.Module):
    """A vision tower (shared, trained in place) and a temporary head over its pooled output.

    ``forward(inputs, pixel_values)`` -> logits [N, len(ATTRIBUTES), max classes]; ``inputs`` is ignored
    (it is there for the trainer's batch form)."""

    def __init__(self, vision: nn.Module, width: int, seed: int = 0):
        super().__init__()
        self.vision = vision
        sizes = [len(classes) for classes in ATTRIBUTES.values()]
        self.width = max(sizes)
        generator = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(2 * width, sum(sizes))
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 0.02)
            self.head.bias.zero_()
        index = torch.full((len(sizes), self.width), -1)
        start = 0
        for a, size in enumerate(sizes):
            index[a, :size] = torch.arange(start, start + size)
            start += size
        self.register_buffer("index", index, persistent=False)

    def forward(self, inputs: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision(pixel_values.to(self.head.weight.dtype))  # [N, tokens, D]
        pooled = torch.cat((features.mean(1), features.amax(1)), dim=-1)
        flat = self.head(pooled)  # [N, sum of classes]
        logits = flat[:, self.index.clamp(min=0)]  # [N, attributes, max classes]
        return logits.masked_fill(self.index < 0, MASKED)


def attribute_accuracy(probe: AttributeProbe, batches) -> dict[str, float]:
    """Share of pictures whose attribute the probe's head gets right, per attribute."""
    right = torch.zeros(len(ATTRIBUTES))
    total = 0
    with torch.no_grad():
        for inputs, targets, pixels in batches:
            right += (probe(inputs, pixels).argmax(-1) == targets).float().sum(0)
            total += targets.shape[0]
    return {name: float(right[a] / max(total, 1)) for a, name in enumerate(ATTRIBUTES)}
