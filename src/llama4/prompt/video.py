"""Video in: frames (or an animated GIF/WebP/PNG) -> uniformly sampled frames laid out as images.

Llama 4 has no video tokens: a video is a sequence of images. Each sampled frame goes through
``images.tile_rgb`` with ``tiles_per_frame`` as its tile budget (1 by default: 147 tokens a
frame), so ``max_frames`` bounds the token count.

Sampling: with n frames and k = min(n, max_frames), frame j (0-based) is the one at the centre of
the j-th of k equal segments, ``index_j = floor((j + 1/2) * n / k) = (2j + 1) * n // (2k)``
(integers only, so deterministic). All frames are kept when n <= max_frames.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

import torch
from PIL import Image

from llama4.prompt.images import (
    DEFAULT_MAX_PIXELS,
    TILE_SIZE,
    Grid,
    ImageError,
    ImageSource,
    decode_frame,
    load_image,
    open_image,
    tile_rgb,
    to_rgb_tensor,
)

DEFAULT_MAX_ANIMATION_FRAMES = 1000

VideoSource = Union[Sequence[ImageSource], str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


def sample_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Indices of the frames kept: the centres of min(num_frames, max_frames) equal segments."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    k = min(num_frames, max_frames)
    return [(2 * j + 1) * num_frames // (2 * k) for j in range(k)]


def read_animation(
    source: ImageSource,
    max_frames: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_animation_frames: int = DEFAULT_MAX_ANIMATION_FRAMES,
) -> list[Image.Image]:
    """Decode the uniformly sampled frames of an animated image (a still image is one frame).

    Animations declaring more than ``max_animation_frames`` frames are refused: reaching a late
    GIF frame means decoding every frame before it.
    """
    image = open_image(source, max_pixels=max_pixels)
    try:
        try:
            num_frames = getattr(image, "n_frames", 1)
        except Exception as e:  # counting frames walks the whole file
            raise ImageError(f"animation is corrupt or truncated: {e}") from e
        if num_frames > max_animation_frames:
            raise ImageError(
                f"animation has {num_frames} frames, above the limit of {max_animation_frames} "
                "(raise max_animation_frames to allow it)"
            )
        frames = []
        for index in sample_frame_indices(num_frames, max_frames):
            try:
                image.seek(index)
            except Exception as e:
                raise ImageError(f"animation frame {index} is corrupt or truncated: {e}") from e
            frames.append(decode_frame(image, f"animation frame {index}"))
        return frames
    finally:
        if image is not source:
            image.close()


def preprocess_video(
    frames_or_path: VideoSource,
    max_frames: int = 8,
    tiles_per_frame: int = 1,
    tile_size: int = TILE_SIZE,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_animation_frames: int = DEFAULT_MAX_ANIMATION_FRAMES,
) -> tuple[torch.Tensor, list[Grid]]:
    """Frames or an animated image -> (pixel_values [N, 3, T, T] bf16, one grid per kept frame).

    ``frames_or_path``: a list/tuple of frames (each a PIL image, path or bytes; only the
    sampled ones are decoded), or one animated GIF/WebP/PNG as a path, bytes or PIL image.
    Each kept frame is tiled as an image with at most ``tiles_per_frame`` tiles; tiles of all
    frames are concatenated in frame order.
    """
    if isinstance(frames_or_path, (list, tuple)):
        chosen = [frames_or_path[i] for i in sample_frame_indices(len(frames_or_path), max_frames)]
        frames = [load_image(frame, max_pixels=max_pixels) for frame in chosen]
    else:
        frames = read_animation(
            frames_or_path, max_frames, max_pixels=max_pixels, max_animation_frames=max_animation_frames
        )
    tiles, grids = [], []
    for frame in frames:
        pixels, grid = tile_rgb(to_rgb_tensor(frame), tiles_per_frame, tile_size)
        tiles.append(pixels)
        grids.append(grid)
    return torch.cat(tiles), grids
