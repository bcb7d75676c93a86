"""Image preprocessing: grid choice, resize, pad, normalise, modes, bad inputs, HF parity."""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from llama4.prompt.images import (
    ImageError,
    best_fit_grid,
    canvas_grids,
    image_token_count,
    load_image,
    normalize,
    preprocess_image,
    preprocess_images,
    resize_target,
    to_rgb_tensor,
)
from llama4.prompt.resize import aa_weights_int16, resize_bilinear_aa, resize_bilinear_aa_reference
from tests.prompt._image_helpers import (
    encode,
    expected_normalized,
    hf_image_processor,
    hf_preprocess,
    png_with_header,
    random_image,
    resize_float64,
)

# (height, width) -> grid (rows, cols), resize target (h, w), tiles incl. global, image tokens.
# The reference sheet's worked examples (§6.1) plus sizes pinned from the transformers oracle.
GRID_TABLE = [
    ((336, 336), (1, 1), (336, 336), 1, 147),
    ((200, 300), (1, 1), (224, 336), 1, 147),
    ((100, 100), (1, 1), (336, 336), 1, 147),
    ((10, 10), (1, 1), (336, 336), 1, 147),
    ((337, 337), (2, 2), (337, 337), 5, 727),
    ((337, 336), (2, 1), (337, 336), 3, 437),
    ((480, 640), (2, 2), (480, 640), 5, 727),
    ((768, 1024), (3, 4), (768, 1024), 13, 1887),
    ((1080, 1920), (3, 5), (945, 1680), 16, 2322),
    ((500, 2000), (2, 6), (500, 2000), 13, 1887),
    ((4000, 3000), (4, 3), (1344, 1008), 13, 1887),
    ((1000, 300), (3, 1), (1000, 300), 4, 582),
    ((300, 1000), (1, 3), (300, 1000), 4, 582),
    ((5000, 100), (15, 1), (5000, 100), 16, 2322),
    ((1, 3000), (1, 9), (1, 3000), 10, 1452),
]


@pytest.mark.parametrize(("size", "grid", "target", "tiles", "tokens"), GRID_TABLE)
def test_grid_table(size, grid, target, tiles, tokens):
    assert best_fit_grid(*size) == grid
    assert resize_target(*size, grid) == target
    assert image_token_count(grid) == tokens
    pixels, got_grid = preprocess_image(random_image(*size, seed=1, kind="constant"))
    assert got_grid == grid
    assert pixels.shape == (tiles, 3, 336, 336) and pixels.dtype == torch.bfloat16


def test_canvas_grids_order_and_count():
    grids = canvas_grids(16)
    assert len(grids) == 50  # sheet §6.1
    # grouped by aspect ratio, groups in first-seen order (16 tiles first), rows ascending inside
    assert grids[:8] == [(1, 16), (2, 8), (1, 4), (4, 4), (3, 3), (2, 2), (1, 1), (8, 2)]
    assert set(grids) == {(r, c) for r in range(1, 17) for c in range(1, 17) if r * c <= 16}
    assert canvas_grids(1) == [(1, 1)]
    assert best_fit_grid(4000, 3000, max_tiles=1) == (1, 1)
    assert best_fit_grid(1000, 3000, max_tiles=4) == (1, 3)


def test_image_token_count_formula():
    for rows in range(1, 5):
        for cols in range(1, 5):
            if rows * cols == 1:
                continue
            layout = 1 + rows * (cols * 144 + (cols - 1) + 1) + 1 + 144 + 1  # explicit walk, §7.3
            assert image_token_count((rows, cols)) == layout
    assert image_token_count((4, 4)) - 3 - 4 * 3 - 4 == 17 * 144  # 2448 patch tokens at most
    with pytest.raises(ValueError):
        image_token_count((0, 1))


def test_image_token_count_agrees_with_the_chat_layout():
    chat = pytest.importorskip("llama4.prompt.chat")
    for grid in canvas_grids(16):
        assert len(chat.image_token_layout(grid)) == image_token_count(grid), grid


# --------------------------------------------------------------------------- pixels


def test_normalize_all_uint8_values_stepwise_bf16():
    x = torch.arange(256, dtype=torch.uint8)
    got = normalize(x).double().numpy()
    assert normalize(x).dtype == torch.bfloat16
    np.testing.assert_array_equal(got, expected_normalized(np.arange(256)))
    assert got[0] == -1.0 and got[255] == 1.0
    assert np.abs(got - (np.arange(256) / 255 - 0.5) / 0.5).max() <= 2**-7  # within a bf16 ulp near 1


def test_padding_is_minus_one_and_content_is_the_resized_image():
    image = random_image(200, 300, seed=3)  # -> 224 x 336 inside one 336 x 336 tile
    pixels, grid = preprocess_image(image)
    assert grid == (1, 1)
    assert torch.all(pixels[0, :, 224:, :] == -1.0)
    resized = resize_bilinear_aa(to_rgb_tensor(image), (224, 336))
    assert torch.equal(pixels[0, :, :224, :], normalize(resized))


def test_tiles_row_major_and_global_tile_last():
    image = random_image(500, 900, seed=4)  # 2 x 3 canvas, image fills 500 x 900 of 672 x 1008
    pixels, grid = preprocess_image(image)
    assert grid == (2, 3) and pixels.shape[0] == 7
    rgb = to_rgb_tensor(image)
    canvas = torch.full((3, 672, 1008), -1.0, dtype=torch.bfloat16)
    canvas[:, :500, :900] = normalize(rgb)  # 500 x 900 is not resized: the grid holds it
    for r in range(2):
        for c in range(3):
            tile = canvas[:, r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336]
            assert torch.equal(pixels[r * 3 + c], tile), (r, c)
    assert torch.equal(pixels[6], normalize(resize_bilinear_aa(rgb, (336, 336))))


@pytest.mark.parametrize(
    ("size", "out"),
    [((40, 50), (336, 336)), ((300, 700), (91, 200)), ((1000, 37), (336, 336)), ((333, 334), (336, 335)),
     ((17, 900), (5, 336)), ((1, 1), (7, 3))],
)
def test_resize_within_one_level_of_float64(size, out):
    image = to_rgb_tensor(random_image(*size, seed=sum(size), kind="gradient"))
    got = resize_bilinear_aa(image, out).numpy().astype(np.float64)
    assert np.abs(got - resize_float64(image, out)).max() <= 1
    noise = to_rgb_tensor(random_image(*size, seed=7))
    got = resize_bilinear_aa(noise, out).numpy().astype(np.float64)
    assert np.abs(got - resize_float64(noise, out)).max() <= 1


def test_resize_fast_path_equals_fixed_point_reference():
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 300, 4))
        if rng.random() < 0.3:
            oh = h  # one axis unchanged: a single pass
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        assert torch.equal(resize_bilinear_aa(image, (oh, ow)), resize_bilinear_aa_reference(image, (oh, ow)))
    image = torch.randint(0, 256, (3, 2, 2), dtype=torch.uint8, generator=gen)
    assert resize_bilinear_aa(image, (1, 1)).shape == (3, 1, 1)  # torch's AVX kernel asserts here
    assert resize_bilinear_aa(image, (2, 2)) is image


def test_fixed_point_weights_sum_to_one():
    for in_size, out_size in [(1000, 336), (336, 1000), (7, 7 * 40), (5000, 3)]:
        first, weights, precision = aa_weights_int16(in_size, out_size)
        assert torch.all((weights.sum(1) - (1 << precision)).abs() <= weights.shape[1])
        assert int(weights.max()) < 1 << 15 and torch.all(first >= 0)


# --------------------------------------------------------------------------- modes

# mode, fill value, expected RGB (as HF's PIL conversion does: alpha onto white, clipping).
MODE_TABLE = [
    ("RGB", (10, 20, 30), (10, 20, 30)),
    ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("RGBA", (10, 20, 30, 128), (132, 137, 142)),
    ("LA", (100, 0), (255, 255, 255)),
    ("LA", (100, 255), (100, 100, 100)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("1", 0, (0, 0, 0)),
    ("CMYK", (0, 255, 0, 0), (255, 0, 255)),
    ("I;16", 200, (200, 200, 200)),
    ("I;16", 1000, (255, 255, 255)),  # PIL clips 16-bit values (HF does the same)
    ("I", 70000, (255, 255, 255)),
    ("I", -5, (0, 0, 0)),
    ("F", 100.7, (100, 100, 100)),
    ("F", 300.0, (255, 255, 255)),
]


@pytest.mark.parametrize(("mode", "fill", "rgb"), MODE_TABLE)
def test_mode_to_rgb(mode, fill, rgb):
    image = Image.new(mode, (5, 4), fill)
    got = to_rgb_tensor(image)
    assert got.shape == (3, 4, 5) and got.dtype == torch.uint8
    assert got[:, 0, 0].tolist() == list(rgb)
    assert torch.all(got == got[:, :1, :1])


def test_rgba_half_alpha_is_close_to_float_compositing():
    got = to_rgb_tensor(Image.new("RGBA", (1, 1), (10, 20, 30, 128)))[:, 0, 0].double()
    exact = torch.tensor([10.0, 20, 30]) * 128 / 255 + 255 * (1 - 128 / 255)
    assert torch.all((got - exact).abs() <= 1)


def _palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # 0 red, 1 blue
    image.putpixel((1, 0), 1)
    if transparent:
        image.info["transparency"] = 1
    return image


def test_palette_modes():
    plain = to_rgb_tensor(_palette_image(False))
    assert plain[:, 0, 0].tolist() == [255, 0, 0] and plain[:, 0, 1].tolist() == [0, 0, 255]
    keyed = to_rgb_tensor(_palette_image(True))
    assert keyed[:, 0, 0].tolist() == [255, 0, 0] and keyed[:, 0, 1].tolist() == [255, 255, 255]
    # the transparency survives a PNG round trip and decoding
    decoded = to_rgb_tensor(load_image(encode(_palette_image(True), "PNG")))
    assert torch.equal(decoded, keyed)


@pytest.mark.parametrize(("mode", "fmt"), [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"),
                                           ("1", "BMP"), ("CMYK", "JPEG"), ("RGBA", "WEBP"), ("P", "GIF")])
def test_modes_through_files(mode, fmt):
    source = random_image(20, 30, seed=5, kind="gradient").convert(mode)
    pixels, grid = preprocess_image(encode(source, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert grid == (1, 1) and pixels.shape == (1, 3, 336, 336)


def test_all_modes_match_the_oracle():
    processor = hf_image_processor()
    images = [Image.new(mode, (45, 30), fill) for mode, fill, _ in MODE_TABLE]
    images += [_palette_image(False), _palette_image(True)]
    for image in images:
        want, want_grid = hf_preprocess(processor, image)
        got, grid = preprocess_image(image)
        assert [grid] == want_grid and torch.equal(got, want), image.mode


# --------------------------------------------------------------------------- sources, EXIF


def test_sources_path_bytes_pil(tmp_path):
    image = random_image(120, 90, seed=6)
    data = encode(image, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    want, _ = preprocess_image(image)
    for source in (data, bytearray(data), memoryview(data), path, str(path), Image.open(io.BytesIO(data))):
        got, grid = preprocess_image(source)
        assert grid == (1, 1) and torch.equal(got, want)
    with pytest.raises(TypeError):
        preprocess_image(12345)


def test_exif_orientation_is_applied():
    image = random_image(60, 100, seed=8)  # stored 100 wide, 60 high
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(image, "PNG", exif=exif)
    upright = load_image(data)
    assert upright.size == (60, 100)
    assert np.array_equal(np.array(upright), np.array(image.transpose(Image.Transpose.ROTATE_270)))
    got, _ = preprocess_image(data)
    want, _ = preprocess_image(image.transpose(Image.Transpose.ROTATE_270))
    assert torch.equal(got, want)


def test_exif_difference_from_transformers():
    """HF ignores EXIF for a PIL image it is handed; we rotate. Same result once upright."""
    processor = hf_image_processor()
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(random_image(200, 500, seed=9), "PNG", exif=exif)
    ours, grid = preprocess_image(data)
    hf_raw, hf_raw_grid = hf_preprocess(processor, Image.open(io.BytesIO(data)))
    assert hf_raw_grid == [(1, 2)] and grid == (2, 1)
    hf_upright, _ = hf_preprocess(processor, ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert torch.equal(ours, hf_upright)


# --------------------------------------------------------------------------- bad images


def _bad_cases():
    jpeg, png = encode(random_image(200, 150, 0), "JPEG"), encode(random_image(200, 150, 0), "PNG")
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'
    return {
        "empty": (b"", "empty"),
        "text": (b"hello, this is not an image\n", "text"),
        "svg": (svg, "SVG"),
        "tiff": (encode(random_image(20, 20, 0), "TIFF"), "TIFF"),
        "garbage": (bytes(range(256)) * 4, "unrecognised format"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 3], "corrupt"),
        "jpeg_header_only": (jpeg[:20], "JPEG"),
        "truncated_png": (png[: len(png) // 2], "truncated"),
        "truncated_webp": (encode(random_image(200, 150, 0), "WEBP")[:200], "corrupt"),
        "truncated_bmp": (encode(random_image(200, 150, 0), "BMP")[:500], "truncated"),
        "truncated_gif": (encode(random_image(200, 150, 0), "GIF")[:600], "GIF"),
        "zero_size_png": (png_with_header(0, 0), "zero size"),
        "over_cap_png": (png_with_header(8000, 8000), "above the limit of 50000000"),
        "bomb_png": (png_with_header(100_000, 100_000), "decompression-bomb"),
        "png_without_pixels": (png_with_header(10, 10), "truncated"),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_bad_images_raise_image_error(name, tmp_path):
    data, words = _bad_cases()[name]
    with pytest.raises(ImageError, match=words):
        preprocess_image(data)
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=words) as info:
        preprocess_image(path)
    assert "bad.bin" in str(info.value)


def test_unsupported_format_message_lists_the_allowed_ones():
    with pytest.raises(ImageError, match=r"allowed: JPEG, PNG, WebP, GIF, BMP"):
        preprocess_image(encode(random_image(8, 8, 0), "TIFF"))


def test_pixel_cap_is_a_parameter_and_pil_global_untouched():
    before = Image.MAX_IMAGE_PIXELS
    data = encode(random_image(100, 100, 0), "PNG")
    with pytest.raises(ImageError, match="10000 pixels, above the limit of 9999"):
        preprocess_image(data, max_pixels=9999)
    with pytest.raises(ImageError, match="above the limit"):
        preprocess_image(random_image(100, 100, 0), max_pixels=9999)  # PIL images are checked too
    assert preprocess_image(data, max_pixels=10_000)[1] == (1, 1)
    assert Image.MAX_IMAGE_PIXELS == before


def test_missing_file_and_zero_size_pil():
    with pytest.raises(ImageError, match="cannot read"):
        preprocess_image("/nonexistent/really/not/here.png")
    with pytest.raises(ImageError, match="zero size"):
        preprocess_image(Image.new("RGB", (0, 0)))


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


# --------------------------------------------------------------------------- oracle parity


def test_oracle_grid_table_exact():
    processor = hf_image_processor()
    for (h, w), grid, *_ in GRID_TABLE:
        image = random_image(h, w, seed=h * 7 + w, kind="noise")
        want, want_grids = hf_preprocess(processor, image)
        got, got_grid = preprocess_image(image)
        assert want_grids == [grid] and got_grid == grid
        assert torch.equal(got, want), (h, w)


_side = st.one_of(st.integers(1, 64), st.integers(65, 700), st.integers(701, 1600))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=_side,
    width=_side,
    max_tiles=st.sampled_from([16, 16, 1, 4, 6, 9]),
    kind=st.sampled_from(["noise", "gradient", "constant"]),
    seed=st.integers(0, 2**31),
)
def test_oracle_random_sizes(height, width, max_tiles, kind, seed):
    processor = hf_image_processor(max_patches=max_tiles)
    image = random_image(height, width, seed, kind)
    want, want_grids = hf_preprocess(processor, image)
    got, grid = preprocess_image(image, max_tiles=max_tiles)
    assert [grid] == want_grids
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_oracle_large_and_extreme_images():
    processor = hf_image_processor()
    rng = np.random.default_rng(11)
    sizes = [tuple(int(v) for v in rng.integers(1000, 4200, 2)) for _ in range(6)]
    sizes += [(int(rng.integers(1, 120)), int(rng.integers(2000, 6000))) for _ in range(3)]
    sizes += [(h, w) for w, h in sizes[-3:]]
    for h, w in sizes:
        image = random_image(h, w, seed=h + w)
        want, want_grids = hf_preprocess(processor, image)
        got, grid = preprocess_image(image)
        assert [grid] == want_grids and torch.equal(got, want), (h, w)


def test_oracle_several_images_in_one_call():
    processor = hf_image_processor()
    images = [random_image(480, 640, 1), random_image(50, 70, 2, "gradient"), random_image(1500, 400, 3),
              random_image(480, 640, 4)]  # two of one shape: HF groups by shape on other devices
    want, want_grids = hf_preprocess(processor, images)
    got, grids = preprocess_images(images)
    assert grids == want_grids == [(2, 2), (1, 1), (5, 2), (2, 2)]
    assert torch.equal(got, want)
    empty, no_grids = preprocess_images([])
    assert empty.shape == (0, 3, 336, 336) and no_grids == []


def test_resize_equals_torchvision_many_sizes():
    hf_image_processor()  # skips unless torchvision imports
    from torchvision.transforms.v2 import functional as tvF

    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    sizes = [((1, 1), (336, 336)), ((3000, 20), (1008, 7)), ((2, 5000), (1, 336)), ((700, 3), (9, 700))]
    sizes += [(tuple(rng.integers(1, 500, 2)), tuple(rng.integers(2, 500, 2))) for _ in range(150)]
    for (h, w), (oh, ow) in sizes:
        image = torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=gen)
        want = tvF.resize(image, [int(oh), int(ow)], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
        assert torch.equal(resize_bilinear_aa(image, (int(oh), int(ow))), want), ((h, w), (oh, ow))


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ATEN_CPU_CAPABILITY is an x86 switch")
def test_resize_on_cpus_without_avx2():
    """With torch forced to its portable kernels, torchvision takes its float32 path; so do we,
    and the reference still equals torch's portable uint8 kernel."""
    hf_image_processor()
    code = (
        "import sys, types, torch\n"
        "sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('m'))\n"
        "from torchvision.transforms.v2 import functional as tvF\n"
        "from llama4.prompt.resize import resize_bilinear_aa, resize_bilinear_aa_reference as ref\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "g = torch.Generator().manual_seed(2)\n"
        "for h, w, oh, ow in [(300, 200, 336, 336), (1000, 37, 336, 12), (5, 900, 80, 336), (64, 64, 64, 9)]:\n"
        "    x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)\n"
        "    tv = tvF.resize(x, [oh, ow], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)\n"
        "    assert torch.equal(resize_bilinear_aa(x, (oh, ow)), tv)\n"
        "    u8 = torch.nn.functional.interpolate(x[None], size=(oh, ow), mode='bilinear', antialias=True)[0]\n"
        "    assert torch.equal(ref(x, (oh, ow)), u8)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
