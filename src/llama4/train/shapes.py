"""Synthetic pictures made in code, with questions and answers about them.

A scene is 1-3 copies of one shape in one colour on a plain background, drawn at random sizes and
places. The facts (shape, colour, count, position, background) are known exactly, so the image stage
can teach the vision tower without any downloaded images, and ``llama4 eval`` can measure the answers
on pictures the model has never seen. Everything is drawn from an explicit ``random.Random``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 336  # one tile: no resizing, one 144-token tile per picture
SHAPES = ("circle", "square", "triangle", "star", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds"}
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 70, 220), "yellow": (240, 210, 20),
           "purple": (140, 40, 170), "orange": (245, 130, 20)}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (150, 150, 150), "black": (15, 15, 15)}
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    background: str
    position: str | None  # for a single shape: left, right, top, bottom or middle


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        return [(cx + r * math.cos(a + turn), cy + r * math.sin(a + turn)) for a in corners]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(-math.pi / 2 + k * 2 * math.pi / 3),
                 cy + r * math.sin(-math.pi / 2 + k * 2 * math.pi / 3))
                for k in range(3)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    raise ValueError(f"unknown shape {shape!r}")


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - SIZE / 2, cy - SIZE / 2
    if max(abs(dx), abs(dy)) < SIZE / 8:
        return "middle"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def draw_scene(rng: random.Random) -> tuple[Image.Image, Scene]:
    """A random picture and its facts."""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    background = rng.choice(list(BACKGROUNDS))
    count = rng.choice((1, 1, 2, 3))
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []
    radius_min, radius_max = (45, 100) if count == 1 else (35, 58)
    while len(placed) < count:
        r = rng.uniform(radius_min, radius_max)
        cx, cy = rng.uniform(r + 4, SIZE - r - 4), rng.uniform(r + 4, SIZE - r - 4)
        if all(math.hypot(cx - x, cy - y) > r + s + 8 for x, y, s in placed):
            placed.append((cx, cy, r))
    fill = COLOURS[colour]
    for cx, cy, r in placed:
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.15, 0.15)), fill=fill)
    position = _position(placed[0][0], placed[0][1]) if count == 1 else None
    return image, Scene(shape, colour, count, background, position)


COLOUR_QUESTIONS = ("What colour is the shape?", "What color is it?", "Which colour is the shape in the picture?")
SHAPE_QUESTIONS = ("What shape is it?", "What shape is in the picture?", "Which shape do you see?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes do you see?")
POSITION_QUESTIONS = ("Where is the shape?",)
BACKGROUND_QUESTIONS = ("What colour is the background?",)
DESCRIBE_QUESTIONS = ("What is in the picture?", "Describe the picture.")


def describe(scene: Scene) -> str:
    if scene.count == 1:
        where = "in the middle" if scene.position == "middle" else f"at the {scene.position}"
        return f"I see a {scene.colour} {scene.shape} {where}, on a {scene.background} background."
    return (f"I see {NUMBERS[scene.count]} {scene.colour} {PLURALS[scene.shape]} "
            f"on a {scene.background} background.")


def answers(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Question/answer pairs about the scene, in random order (colour and shape always among them)."""
    many = scene.count > 1
    shape = f"They are {PLURALS[scene.shape]}." if many else f"It is a {scene.shape}."
    colour = f"They are {scene.colour}." if many else f"It is {scene.colour}."
    pairs = [(rng.choice(COLOUR_QUESTIONS), colour), (rng.choice(SHAPE_QUESTIONS), shape),
             (rng.choice(COUNT_QUESTIONS), f"There {'are' if many else 'is'} {NUMBERS[scene.count]}."),
             (rng.choice(BACKGROUND_QUESTIONS), f"The background is {scene.background}."),
             (rng.choice(DESCRIBE_QUESTIONS), describe(scene))]
    if scene.position is not None:
        where = "in the middle" if scene.position == "middle" else f"at the {scene.position}"
        pairs.append((rng.choice(POSITION_QUESTIONS), f"It is {where}."))
    rng.shuffle(pairs)
    return pairs


def words_in(text: str, vocabulary) -> set[str]:
    """Which of ``vocabulary``'s words (or their plurals) occur in ``text`` (lower-cased, whole words)."""
    tokens = {w.strip(".,!?;:\"'").lower() for w in text.split()}
    return {word for word in vocabulary if word in tokens or PLURALS.get(word) in tokens}
