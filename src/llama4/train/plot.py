"""A loss-curve PNG drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def plot_curves(path: str | os.PathLike, curves: dict[str, Sequence[tuple[float, float]]],
                title: str = "loss", size: tuple[int, int] = (800, 500)) -> None:
    """Line plot of named (x, y) series on shared axes, with a legend and min/max tick labels."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = [p for series in curves.values() for p in series]
    draw.text((left, 8), title, fill="black")
    if not points:
        img.save(path)
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for y in (y0, (y0 + y1) / 2, y1):
        draw.text((4, at(x0, y)[1] - 6), f"{y:.3g}", fill="black")
    for x in (x0, x1):
        draw.text((at(x, y0)[0] - 10, height - bottom + 6), f"{x:g}", fill="black")
    for i, (name, series) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [at(x, y) for x, y in series]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) < 50 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((width - right - 150, top + 6 + 14 * i), name, fill=colour)
    img.save(path)
