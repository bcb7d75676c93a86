"""Antialiased bilinear resize of uint8 images, bit-identical to torchvision.

The HF Llama 4 image processor (the parity target) resizes uint8 CHW tensors with
``torchvision.transforms.v2.functional.resize(img, size, BILINEAR, antialias=True)``.
What torchvision then runs depends on the machine (``resize_image`` in
``torchvision/transforms/v2/functional/_geometry.py``):

* x86 CPUs with AVX2/AVX512, and ARM CPUs: ``torch.nn.functional.interpolate`` straight on
  the uint8 tensor (``aten::_upsample_bilinear2d_aa``). Torch's uint8 kernel is a fixed-point
  port of Pillow's resampler: per axis, triangle-filter weights are computed in float64,
  normalised, rounded to int16 at the largest precision that keeps the biggest weight below
  2**15, and every output value is ``clamp((2**(p-1) + sum(w * x)) >> p, 0, 255)``; the
  width pass runs first and its uint8 result feeds the height pass.
* other CPUs (and GPUs): the tensor is cast to float32, interpolated, rounded, cast back.

``resize_bilinear_aa`` follows the same dispatch, so it equals torchvision on the machine it
runs on without importing it. ``resize_bilinear_aa_reference`` re-derives the fixed-point
kernel with plain tensor ops (slow, for tests and for readers).
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F


def native_uint8_kernel_is_used() -> bool:
    """Whether torchvision would hand a CPU uint8 tensor to torch's uint8 kernel.

    Mirrors ``torchvision.transforms.v2.functional._geometry._do_native_uint8_resize_on_cpu``
    for bilinear (eager mode).
    """
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def resize_bilinear_aa(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a uint8 image [..., C, H, W] to ``size`` = (height, width); uint8 out.

    Bilinear, antialiased, half-pixel centres (align_corners=False). Returns the input itself
    when the size is unchanged, as torchvision does.
    """
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {size}")
    *lead, c, h, w = image.shape
    if (out_h, out_w) == (h, w):
        return image
    batch = image.reshape(-1, c, h, w)  # [B, C, H, W]
    if (out_h, out_w) == (1, 1):
        # torch's AVX uint8 kernel trips an internal assert when a 1x1 output (both contiguous
        # and channels-last) comes from a taller input; the reference gives the kernel's values.
        out = resize_bilinear_aa_reference(batch, (1, 1))
    elif image.device.type == "cpu" and native_uint8_kernel_is_used():
        out = F.interpolate(batch, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(
            batch.float(), size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True
        )
        out = out.round_().to(torch.uint8)
    return out.reshape(*lead, c, out_h, out_w)


def aa_weights_int16(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Torch's uint8 antialiased-bilinear taps for one axis.

    Returns (first [out] int64: first source index of each output sample,
    weights [out, taps] int64 fixed-point (zero past each sample's support), precision bits).
    Follows ``_compute_indices_min_size_weights_aa`` and ``_compute_index_ranges_int16_weights``
    in aten/src/ATen/native/cpu/UpSampleKernel.cpp, in float64 and in the same operation order
    (the weight sum is accumulated tap by tap, as the C++ loop does).
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # bilinear: interp_size 2 -> half-width 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    centre = scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)  # [out]
    # C++ casts to int64 truncate toward zero; both arguments are > -1 here, so trunc is exact.
    first = torch.trunc(centre - support + 0.5).to(torch.int64).clamp_(min=0)
    last = torch.trunc(centre + support + 0.5).to(torch.int64).clamp_(max=in_size)
    count = (last - first).clamp_(0, taps)  # [out]
    j = torch.arange(taps, dtype=torch.int64)  # [taps]
    x = ((j[None, :] + first[:, None]).to(torch.float64) - centre[:, None] + 0.5) * invscale
    w = (1.0 - x.abs()).clamp_(min=0.0)  # triangle filter, [out, taps]
    w = torch.where(j[None, :] < count[:, None], w, torch.zeros((), dtype=torch.float64))
    total = torch.zeros(out_size, dtype=torch.float64)
    for k in range(taps):  # sequential sum: same rounding as the C++ loop
        total = total + w[:, k]
    w = torch.where(total[:, None] != 0.0, w / total[:, None], w)
    wt_max = float(w.max())
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    fixed = torch.floor(0.5 + w * (1 << precision)).to(torch.int64)  # weights are >= 0
    return first, fixed, precision


def _resample_axis(image: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One fixed-point pass of the reference resize along ``dim`` (uint8 in, uint8 out)."""
    in_size = image.shape[dim]
    first, weights, precision = aa_weights_int16(in_size, out_size)
    src = image.movedim(dim, -1).to(torch.int64)  # [..., in]
    acc = torch.full((*src.shape[:-1], out_size), 1 << (precision - 1), dtype=torch.int64)
    for k in range(weights.shape[1]):
        idx = (first + k).clamp_(max=in_size - 1)  # taps past the support have weight 0
        acc += src[..., idx] * weights[:, k]
    out = (acc >> precision).clamp_(0, 255).to(torch.uint8)
    return out.movedim(-1, dim)


def resize_bilinear_aa_reference(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Slow re-derivation of torch's uint8 antialiased bilinear kernel [..., C, H, W] -> uint8.

    Width first, then height, each pass rounding to uint8, and a pass only where the size
    changes, exactly as ``upsample_avx_bilinear_bicubic_uint8`` and the generic
    ``separable_upsample_generic_Nd_kernel_impl`` do.
    """
    out_h, out_w = int(size[0]), int(size[1])
    out = image
    if out_w != image.shape[-1]:
        out = _resample_axis(out, out_w, dim=-1)
    if out_h != image.shape[-2]:
        out = _resample_axis(out, out_h, dim=-2)
    return out
