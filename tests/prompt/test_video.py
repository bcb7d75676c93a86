"""Video preprocessing: uniform frame sampling, animated GIF/WebP, frame lists, limits."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from llama4.prompt.images import ImageError, normalize, preprocess_image
from llama4.prompt.video import preprocess_video, read_animation, sample_frame_indices
from tests.prompt._image_helpers import encode, hf_image_processor, hf_preprocess, random_image


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 12 % 256, 255 - i * 12 % 256, (i * 40) % 256)


def _frames(n: int, size=(64, 48)) -> list[Image.Image]:
    return [Image.new("RGB", size, _colour(i)) for i in range(n)]


def _animation(frames: list[Image.Image], fmt: str) -> bytes:
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, loop=0, **extra)


def _frame_colour(tile: torch.Tensor) -> list[float]:
    return tile[:, 10, 10].float().tolist()  # inside the image (the padding is at the bottom)


@pytest.mark.parametrize(
    ("num_frames", "max_frames", "indices"),
    [
        (20, 8, [1, 3, 6, 8, 11, 13, 16, 18]),
        (5, 8, [0, 1, 2, 3, 4]),
        (8, 8, [0, 1, 2, 3, 4, 5, 6, 7]),
        (9, 8, [0, 1, 2, 3, 5, 6, 7, 8]),
        (100, 3, [16, 50, 83]),
        (1, 8, [0]),
        (7, 1, [3]),
    ],
)
def test_sample_frame_indices_pinned(num_frames, max_frames, indices):
    assert sample_frame_indices(num_frames, max_frames) == indices
    assert indices == [(2 * j + 1) * num_frames // (2 * len(indices)) for j in range(len(indices))]


def test_sample_frame_indices_properties():
    for n in range(1, 60):
        for k in range(1, 12):
            got = sample_frame_indices(n, k)
            assert len(got) == min(n, k) and got == sorted(set(got)) and 0 <= got[0] and got[-1] < n
    with pytest.raises(ValueError):
        sample_frame_indices(0, 8)
    with pytest.raises(ValueError):
        sample_frame_indices(5, 0)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_file_sampled_uniformly(fmt, tmp_path):
    frames = _frames(20)
    data = _animation(frames, fmt)
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(data)
    for source in (data, path):
        pixels, grids = preprocess_video(source, max_frames=8)
        assert pixels.shape == (8, 3, 336, 336) and pixels.dtype == torch.bfloat16
        assert grids == [(1, 1)] * 8
        for tile, index in zip(pixels, sample_frame_indices(20, 8)):
            want = normalize(torch.tensor(_colour(index), dtype=torch.uint8)).float().tolist()
            assert _frame_colour(tile) == want, index


def test_frame_list_of_mixed_sources(tmp_path):
    frames = _frames(6, size=(50, 40))
    path = tmp_path / "f2.png"
    frames[2].save(path)
    sources = [frames[0], encode(frames[1], "PNG"), path, str(path), frames[4], encode(frames[5], "BMP")]
    pixels, grids = preprocess_video(sources, max_frames=3)  # indices 1, 3, 5
    assert grids == [(1, 1)] * 3
    for tile, frame in zip(pixels, [frames[1], frames[2], frames[5]]):
        assert torch.equal(tile[None], preprocess_image(frame, max_tiles=1)[0])


def test_only_sampled_frames_are_decoded():
    frames = [encode(f, "PNG") for f in _frames(4)]
    frames[0] = b"not an image"  # never sampled: indices for 4 -> 2 are [1, 3]
    pixels, grids = preprocess_video(frames, max_frames=2)
    assert len(grids) == 2
    with pytest.raises(ImageError):
        preprocess_video(frames, max_frames=4)


def test_tiles_per_frame():
    frames = [random_image(480, 640, seed=i) for i in range(3)]
    pixels, grids = preprocess_video(frames, tiles_per_frame=4)
    assert grids == [(2, 2)] * 3 and pixels.shape == (15, 3, 336, 336)  # 4 tiles + global each
    want = torch.cat([preprocess_image(f, max_tiles=4)[0] for f in frames])
    assert torch.equal(pixels, want)


def test_frames_match_the_oracle():
    processor = hf_image_processor(max_patches=1)
    frames = [random_image(90, 160, seed=i, kind="gradient") for i in range(3)]
    want, want_grids = hf_preprocess(processor, frames)
    pixels, grids = preprocess_video(frames)
    assert grids == want_grids and torch.equal(pixels, want)


def test_still_image_is_a_one_frame_video():
    pixels, grids = preprocess_video(encode(random_image(30, 40, seed=1), "JPEG"))
    assert pixels.shape == (1, 3, 336, 336) and grids == [(1, 1)]


def test_animated_pil_image_input():
    image = Image.open(io.BytesIO(_animation(_frames(10), "GIF")))
    pixels, grids = preprocess_video(image, max_frames=2)  # frames 2 and 7
    assert len(grids) == 2
    assert _frame_colour(pixels[1]) == normalize(torch.tensor(_colour(7), dtype=torch.uint8)).float().tolist()


def test_animation_frame_cap():
    data = _animation(_frames(12), "GIF")
    with pytest.raises(ImageError, match="12 frames, above the limit of 10"):
        preprocess_video(data, max_animation_frames=10)
    assert len(read_animation(data, 3, max_animation_frames=12)) == 3


def test_bad_animations():
    data = _animation(_frames(20, size=(120, 90)), "GIF")
    with pytest.raises(ImageError, match="corrupt|truncated"):
        preprocess_video(data[: len(data) // 2])
    with pytest.raises(ImageError, match="empty"):
        preprocess_video(b"")
    with pytest.raises(ImageError, match="above the limit"):
        preprocess_video(data, max_pixels=100)
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="unrecognised"):
        preprocess_video(noise)
