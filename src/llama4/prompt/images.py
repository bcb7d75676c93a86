"""Images in: bytes, paths or PIL images -> normalised 336x336 tiles + the tile grid.

Parity target: transformers 5.23 ``Llama4ImageProcessor`` (reference sheet §6.1). For the same
PIL image the tiles are bit-identical bfloat16 and the grid equals its ``aspect_ratios``:

1. RGB: images with an alpha band or a transparency key are composited onto white.
2. Grid: among the canvases of at most ``max_tiles`` tiles, the one needing the least upscaling,
   else the least downscaling, then the smallest area (``best_fit_grid``).
3. Resize (aspect kept, upscaling capped at one tile) with torchvision's antialiased bilinear on
   uint8 (``resize.resize_bilinear_aa``), pad right/bottom with 0 to the canvas.
4. Rescale and normalise in bfloat16, as HF does; padding becomes -1.0.
5. Tiles row-major, plus a global tile (whole image squashed to one tile) last when the grid
   has more than one tile.

Known difference: the EXIF orientation is always applied. transformers applies it only when it
loads a path or URL itself, never to a PIL image handed to the processor.

Decoding is defensive (untrusted input): only JPEG, PNG, WebP, GIF and BMP are decoded, the
header's pixel count is checked against ``max_pixels`` before any pixel data is read, and
every failure is an ``ImageError`` naming the problem.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

from llama4.prompt.resize import resize_bilinear_aa

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_ALLOWED_TEXT = "JPEG, PNG, WebP, GIF, BMP"
DEFAULT_MAX_PIXELS = 50_000_000
TILE_SIZE = 336
TOKENS_PER_TILE = 144  # (336 / 14) ** 2 patches, pixel-shuffled by 0.5 in each direction

ImageSource = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview]
Grid = tuple[int, int]  # (rows, columns) of tiles


class ImageError(ValueError):
    """An image that cannot be used: unreadable, corrupt, unsupported, empty or too large."""


# --------------------------------------------------------------------------- decoding


_MAGIC = (  # (prefix, offset, name) for the allowed formats, to explain unreadable files
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF8", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"WEBP", 8, "WebP"),
)


def _sniff_refused(head: bytes) -> str | None:
    """Name a few common formats we refuse, so the error says what the file is."""
    text = head.lstrip().lower()
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "a TIFF image"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG (vector) image"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[4:8] == b"ftyp":
        return "a HEIF/AVIF image"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut off by the 512-byte window
            return None
        decoded = head[: e.start].decode("utf-8")
    return "text" if all(ch.isprintable() or ch in "\r\n\t" for ch in decoded) else None


def _unidentified(head: bytes, what: str) -> ImageError:
    """The error for a file PIL could not open with the allowed plugins."""
    for prefix, offset, name in _MAGIC:
        if head[offset : offset + len(prefix)] == prefix:
            if name == "PNG" and len(head) >= 24:
                width, height = struct.unpack(">II", head[16:24])  # IHDR, which PIL refuses at 0
                if width == 0 or height == 0:
                    return ImageError(f"{what} has zero size ({width}x{height})")
            return ImageError(f"{what} starts like a {name} but its header is corrupt or truncated")
    kind = _sniff_refused(head)
    found = f"looks like {kind}, which" if kind else "is in an unrecognised format, which"
    return ImageError(f"{what} {found} is not a supported image format (allowed: {_ALLOWED_TEXT})")


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    return "image" if isinstance(source, Image.Image) else "image data"


def check_size(image: Image.Image, max_pixels: int, what: str = "image") -> None:
    """Refuse zero-size images and images above ``max_pixels`` (from the header alone)."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{what} declares {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (decompression-bomb guard; raise max_pixels to allow it)"
        )


def open_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image lazily (header only) after checking its format and declared size.

    PIL images pass through (their format is the caller's business) but are size-checked.
    Bytes and paths must hold one of ``ALLOWED_FORMATS``. Nothing beyond the header is read.
    """
    what = _describe(source)
    if isinstance(source, Image.Image):
        check_size(source, max_pixels, what)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        head, fp = data[:512], io.BytesIO(data)
    elif isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                head = f.read(512)
        except OSError as e:
            raise ImageError(f"cannot read {what}: {e.strerror or e}") from e
        fp = source
    else:
        raise TypeError(f"expected a PIL image, a path or bytes, got {type(source).__name__}")
    if not head:
        raise ImageError(f"{what} is empty (0 bytes)")
    try:
        image = Image.open(fp, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is too large to decode safely (decompression-bomb guard): {e}") from e
    except Image.UnidentifiedImageError as e:
        raise _unidentified(head, what) from e
    except Exception as e:  # corrupt headers surface as many exception types in PIL plugins
        raise ImageError(f"{what} is corrupt: {e}") from e
    try:
        check_size(image, max_pixels, what)
    except ImageError:
        image.close()
        raise
    return image


def decode_frame(image: Image.Image, what: str = "image") -> Image.Image:
    """Decode the current frame and apply its EXIF orientation; returns a new image."""
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as e:  # truncated data: OSError; broken streams: SyntaxError, ValueError...
        raise ImageError(f"{what} is corrupt or truncated: {e}") from e


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image (its first frame; a PIL image's current frame), EXIF orientation applied."""
    image = open_image(source, max_pixels=max_pixels)
    try:
        return decode_frame(image, _describe(source))
    finally:
        if image is not source:
            image.close()


def to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image of any mode -> uint8 [3, H, W], transparency composited onto white.

    As HF's ``convert_to_rgb``: "an alpha band" means a band named "A" (so LAB counts) or a
    ``transparency`` entry (palette or colour key). Other modes use PIL's own conversion, which
    clips 16/32-bit and float values to 0..255 rather than rescaling them.
    """
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert a {image.mode!r} image to RGB: {e}") from e
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()  # [3, H, W]


# --------------------------------------------------------------------------- tile grid


def canvas_grids(max_tiles: int) -> list[Grid]:
    """Candidate grids (rows, cols) in HF's order: grouped by aspect ratio rows/cols, groups in
    order of first appearance while walking tile counts from ``max_tiles`` down and, for each,
    its factorisations by increasing rows."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    groups: dict[float, list[Grid]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in range(1, count + 1):
            if count % rows == 0:
                groups.setdefault(rows / (count // rows), []).append((rows, count // rows))
    return [grid for group in groups.values() for grid in group]


def best_fit_grid(height: int, width: int, max_tiles: int = 16, tile_size: int = TILE_SIZE) -> Grid:
    """The tile grid HF picks for an image of ``height`` x ``width`` pixels.

    Scale factors are float32 (HF divides int64 tensors by ints under the default dtype);
    exact float equality then selects the tied canvases, of which the smallest area wins.
    """
    grids = torch.tensor(canvas_grids(max_tiles), dtype=torch.int64)  # [N, 2]
    canvas = grids * tile_size  # [N, 2] pixels
    scale_h = canvas[:, 0].to(torch.float32) / height
    scale_w = canvas[:, 1].to(torch.float32) / width
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)  # limiting side, [N]
    up = scales[scales >= 1]
    chosen = up.min() if len(up) else scales[scales < 1].max()
    tied = torch.nonzero(scales == chosen).flatten()
    areas = canvas[tied, 0] * canvas[tied, 1]
    best = tied[torch.argmin(areas)]  # argmin returns the first of equal areas
    return int(grids[best, 0]), int(grids[best, 1])


def resize_target(height: int, width: int, grid: Grid, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """The aspect-preserving size HF resizes to before padding to the ``grid`` canvas.

    Upscaling is capped at one tile: the box is min(max(side, tile), canvas side). HF computes
    with a Python int where ``min`` kept the int and a 0-d float32 tensor where it picked the
    canvas side; the float32 paths round differently, so they are reproduced as such.
    """
    canvas_h = torch.tensor(grid[0] * tile_size, dtype=torch.float32)
    canvas_w = torch.tensor(grid[1] * tile_size, dtype=torch.float32)
    box_h = canvas_h if canvas_h < max(height, tile_size) else max(height, tile_size)
    box_w = canvas_w if canvas_w < max(width, tile_size) else max(width, tile_size)
    scale_w, scale_h = box_w / width, box_h / height
    if scale_w < scale_h:
        new_w, new_h = box_w, min(math.floor(height * scale_w), box_h)
    else:
        new_h, new_w = box_h, min(math.floor(width * scale_h), box_w)
    return max(int(new_h), 1), max(int(new_w), 1)


# --------------------------------------------------------------------------- pixels


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 -> bfloat16 ((x / 255) - 0.5) / 0.5, each step rounded to bfloat16 as HF does.

    ``bf16 * 1/255`` is computed in float32 and rounded once; mean and std are bf16 tensors.
    """
    half = torch.tensor(0.5, dtype=torch.bfloat16)
    return (image.to(torch.bfloat16) * (1.0 / 255.0) - half) / half


def tile_rgb(rgb: torch.Tensor, max_tiles: int = 16, tile_size: int = TILE_SIZE) -> tuple[torch.Tensor, Grid]:
    """uint8 [3, H, W] -> (bf16 tiles [rows*cols (+1 global), 3, T, T], (rows, cols))."""
    _, height, width = rgb.shape
    rows, cols = best_fit_grid(height, width, max_tiles, tile_size)
    new_h, new_w = resize_target(height, width, (rows, cols), tile_size)
    canvas = torch.zeros(3, rows * tile_size, cols * tile_size, dtype=torch.uint8)
    canvas[:, :new_h, :new_w] = resize_bilinear_aa(rgb, (new_h, new_w))  # pad right and bottom
    tiles = normalize(canvas).view(3, rows, tile_size, cols, tile_size)
    tiles = tiles.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile_size, tile_size)  # row-major
    if rows * cols > 1:
        whole = normalize(resize_bilinear_aa(rgb, (tile_size, tile_size)))  # [3, T, T], distorted
        tiles = torch.cat([tiles, whole[None]])
    return tiles, (rows, cols)


def preprocess_image(
    image: ImageSource,
    max_tiles: int = 16,
    tile_size: int = TILE_SIZE,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, Grid]:
    """One image -> (pixel_values [N, 3, T, T] bfloat16, grid (rows, cols)).

    N = rows * cols, plus 1 for the global tile (last) when rows * cols > 1. The model expects
    these as they are for bf16 weights; cast them for float32 weights (HF does not cast either).
    Raises ``ImageError`` for unreadable, unsupported, empty or oversized images.
    """
    return tile_rgb(to_rgb_tensor(load_image(image, max_pixels=max_pixels)), max_tiles, tile_size)


def preprocess_images(
    images: Sequence[ImageSource],
    max_tiles: int = 16,
    tile_size: int = TILE_SIZE,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, list[Grid]]:
    """Several images -> (all their tiles concatenated in order, one grid per image)."""
    tiles, grids = [], []
    for image in images:
        pixels, grid = preprocess_image(image, max_tiles, tile_size, max_pixels=max_pixels)
        tiles.append(pixels)
        grids.append(grid)
    if not tiles:
        return torch.empty(0, 3, tile_size, tile_size, dtype=torch.bfloat16), []
    return torch.cat(tiles), grids


def image_token_count(grid: Grid, tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """Tokens one image occupies, ``<|image_start|>`` to ``<|image_end|>`` inclusive (sheet §7.3).

    1x1: start, ``<|image|>``, the tile's patches, end. Otherwise: start, each row's tiles with
    a ``<|tile_x_separator|>`` between tiles and a ``<|tile_y_separator|>`` after the row, then
    ``<|image|>``, the global tile's patches, end.
    """
    rows, cols = grid
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be at least 1x1, got {grid}")
    if rows * cols == 1:
        return tokens_per_tile + 3
    return 3 + tokens_per_tile * (rows * cols + 1) + rows * (cols - 1) + rows
