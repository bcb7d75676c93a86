"""Shared helpers for the image and video preprocessing tests.

Independent re-derivations (float64 resize, bf16 rounding from float32 bits), builders of
good and bad image files, and the transformers oracle (skipped cleanly when unavailable).
"""

from __future__ import annotations

import io
import struct
import sys
import types
import zlib

import numpy as np
import pytest
import torch
from PIL import Image


def hf_image_processor(**kwargs):
    """transformers' Llama4ImageProcessor, or skip the test when it cannot be imported.

    It needs torchvision, installed for the tests with ``pip install --no-deps
    torchvision==0.28.0``; its compiled detection ops do not load against the CPU torch wheel,
    so an empty ``torchvision._meta_registrations`` stands in (resize/normalise never use them).
    """
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or a broken binary wheel
        pytest.skip(f"torchvision is needed for the transformers image-processor oracle: {e}")
    try:
        from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
    except Exception as e:
        pytest.skip(f"transformers' Llama4ImageProcessor is not importable: {e}")
    return Llama4ImageProcessor(**kwargs)


def hf_preprocess(processor, images):
    """(pixel_values bf16 [N, 3, 336, 336], aspect_ratios as a list of (rows, cols))."""
    out = processor(images, return_tensors="pt")
    return out["pixel_values"], [tuple(int(v) for v in row) for row in out["aspect_ratios"].reshape(-1, 2)]


def random_image(height: int, width: int, seed: int, kind: str = "noise") -> Image.Image:
    """An RGB PIL image: uniform noise, a smooth gradient, or a constant colour."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    elif kind == "gradient":
        y = np.linspace(0, 255, height)[:, None, None]
        x = np.linspace(0, 255, width)[None, :, None]
        arr = ((y * rng.random(3) + x * rng.random(3)) / 2).astype(np.uint8)
        arr = np.broadcast_to(arr, (height, width, 3)).copy()
    else:
        arr = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (height, width, 3)).copy()
    return Image.fromarray(arr, "RGB")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels, with a token IDAT.

    Nothing of that size is allocated: only the header is built.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32-representable values to bfloat16 (nearest, ties to even); float64 out."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def expected_normalized(x: np.ndarray) -> np.ndarray:
    """The reference's bf16 normalisation of uint8 values, derived step by step.

    HF: ``bf16(x) * (1/255)`` (float32 product, rounded to bf16), then ``- bf16(0.5)`` and
    ``/ bf16(0.5)``, each rounded to bf16. The float64 products and differences are exact, so
    rounding them to float32 then bf16 is what the float32 kernels do.
    """
    step = round_to_bf16(np.float32(x.astype(np.float64) * float(np.float32(1 / 255))))
    step = round_to_bf16(np.float32(step - 0.5))
    return round_to_bf16(np.float32(step / 0.5))


def _triangle_weights(in_size: int, out_size: int) -> np.ndarray:
    """Dense [out, in] antialiased-bilinear weights in float64 (Pillow's definition).

    Output sample i is centred at (i + 1/2) * in/out in input coordinates; the triangle filter is
    stretched by the downscale factor (never narrower than one input pixel) and normalised.
    """
    scale = in_size / out_size
    support = max(scale, 1.0)
    centre = (np.arange(out_size) + 0.5)[:, None] * scale
    weights = np.maximum(0.0, 1.0 - np.abs((np.arange(in_size)[None, :] + 0.5 - centre) / support))
    return weights / weights.sum(axis=1, keepdims=True)


def resize_float64(image: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of uint8 [C, H, W] in float64, rounded once at the end."""
    arr = image.numpy().astype(np.float64)
    wy = _triangle_weights(arr.shape[1], size[0])
    wx = _triangle_weights(arr.shape[2], size[1])
    out = wy[None] @ arr @ wx.T[None]  # [C, out_h, out_w]
    return np.clip(np.floor(out + 0.5), 0, 255)
