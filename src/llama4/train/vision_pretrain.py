"""The vision tower learns what a picture shows before the language model learns to read it.

Llama 4's vision encoder was pre-trained on its own before it joined the language model; the
embedded model does the same on the synthetic pictures of :mod:`llama4.train.shapes`. Two temporary linear
heads on the tower's output predict every fact of the scene at once (shape, colour, count,
background): one over the mean- and max-pooled tokens, one over the mean alone. The heads are thrown
away afterwards; the tower keeps the features.

Why two heads: shape is carried by a few tokens (edges and corners), which a max-pooled head finds
quickly but the language model cannot: its attention reads weighted means of the picture's tokens.
The mean head (which alone does not get off the ground from a fresh tower) then spreads shape into
what a mean can read; with it the language model learns picture shapes, without it it stays near
chance even when the pooled head is right on nearly every picture. Shape is the hardest fact, so its
rows count ``WEIGHTS["shape"]`` times in the loss. Trained through the joint language-model loss
alone, the tower's 144 tokens stay one near-constant vector (see the recipe's history).

Batches have the trainer's ``(inputs, targets, pixel_values)`` form so that the one training loop
(:func:`llama4.train.trainer.train`) runs this stage too: ``inputs`` is a placeholder, ``targets``
holds one class index per loss row (``HEADS`` x ``ROWS``: each attribute repeated by its weight, so
the trainer's mean cross-entropy is the weighted loss), and :class:`AttributeProbe` returns logits
``[N, rows, classes]`` where the unused classes of a smaller attribute are masked out.
"""

from __future__ import annotations

import random

import torch
import torch.nn as nn

from llama4.train.instruct_data import SeededBatches
from llama4.train.shapes import BACKGROUNDS, COLOURS, SHAPES, draw_scene

ATTRIBUTES: dict[str, tuple] = {"shape": SHAPES, "colour": tuple(COLOURS), "count": (1, 2, 3),
                                "background": tuple(BACKGROUNDS)}
MASKED = -1e4  # logit of a class an attribute does not have (exp underflows to 0 in float32)
WEIGHTS = {"shape": 3, "colour": 1, "count": 1, "background": 1}  # rows per attribute in the loss
ROWS = tuple(a for a, name in enumerate(ATTRIBUTES) for _ in range(WEIGHTS[name]))  # attribute of each row
HEADS = ("pooled", "mean")  # over mean- and max-pooled tokens; over the mean alone


def scene_labels(scene) -> list[int]:
    """Class index of each attribute of a :class:`llama4.train.shapes.Scene`, in ``ATTRIBUTES`` order."""
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
        targets = torch.tensor(labels)[:, ROWS].repeat(1, len(HEADS))
        return torch.zeros_like(targets), targets, torch.cat(tiles)


class AttributeProbe(nn.Module):
    """A vision tower (shared, trained in place) and temporary heads over its pooled output.

    ``forward(inputs, pixel_values)`` -> logits [N, len(HEADS) * len(ROWS), max classes] (rows in the
    batches' target order); :meth:`facts` -> [N, len(HEADS), len(ATTRIBUTES), max classes]. ``inputs``
    is ignored (it is there for the trainer's batch form)."""

    def __init__(self, vision: nn.Module, width: int, seed: int = 0):
        super().__init__()
        self.vision = vision
        sizes = [len(classes) for classes in ATTRIBUTES.values()]
        self.width = max(sizes)
        generator = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(2 * width, sum(sizes))
        self.mean_head = nn.Linear(width, sum(sizes))
        with torch.no_grad():
            for head in (self.head, self.mean_head):
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
                head.bias.zero_()
        index = torch.full((len(sizes), self.width), -1)
        start = 0
        for a, size in enumerate(sizes):
            index[a, :size] = torch.arange(start, start + size)
            start += size
        self.register_buffer("index", index, persistent=False)

    def facts(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision(pixel_values.to(self.head.weight.dtype))  # [N, tokens, D]
        mean = features.mean(1)
        flat = torch.stack((self.head(torch.cat((mean, features.amax(1)), dim=-1)), self.mean_head(mean)), dim=1)
        logits = flat[:, :, self.index.clamp(min=0)]  # [N, heads, attributes, max classes]
        return logits.masked_fill(self.index < 0, MASKED)

    def forward(self, inputs: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.facts(pixel_values)[:, :, ROWS].flatten(1, 2)


def attribute_accuracy(probe: AttributeProbe, batches) -> dict[str, dict[str, float]]:
    """Share of pictures whose attribute each head gets right: {head: {attribute: share}}."""
    right = torch.zeros(len(HEADS), len(ATTRIBUTES))
    total = 0
    first_rows = [ROWS.index(a) for a in range(len(ATTRIBUTES))]  # a target row of each attribute
    with torch.no_grad():
        for inputs, targets, pixels in batches:
            truth = targets[:, first_rows]  # [N, attributes]
            right += (probe.facts(pixels).argmax(-1) == truth[:, None]).float().sum(0)
            total += targets.shape[0]
    return {head: {name: float(right[h, a] / max(total, 1)) for a, name in enumerate(ATTRIBUTES)}
            for h, head in enumerate(HEADS)}
