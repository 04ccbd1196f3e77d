"""Images -> training samples: random crops and flips, then the network's input and targets.

Legend: N batch, H, W crop size, h, w = H/4, W/4 target size, k nearest bins.

Crops and flips run where the images are decoded (CPU workers, or the GPU after nvJPEG);
`make_targets` runs on the training device, so no nearest-neighbour search is on the CPU
data path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from colorcore.color import rgb_to_lab, rgb_to_lightness
from colorcore.loss import nongray_mask
from colorcore.quantize import (
    SOFT_ENCODE_K,
    SOFT_ENCODE_SIGMA,
    TARGET_STRIDE,
    soft_encode,
    soft_encode_in_table,
    subsample_targets,
)

CROP_PX = 176  # released training: random 176 x 176 crops with horizontal flips


def crop_box(
    height: int, width: int, crop_px: int, rng: np.random.Generator | None
) -> tuple[int, int, bool]:
    """(top, left, flip) of a random crop, or of the centre crop (no flip) without `rng`."""
    if rng is None:
        return max(height - crop_px, 0) // 2, max(width - crop_px, 0) // 2, False
    top = int(rng.integers(0, max(height - crop_px, 0) + 1))
    left = int(rng.integers(0, max(width - crop_px, 0) + 1))
    return top, left, bool(rng.random() < 0.5)


def random_crop_flip(
    rgb_3HW: torch.Tensor, crop_px: int, rng: np.random.Generator | None
) -> torch.Tensor:
    """A random `crop_px` square of a (3, H, W) image, flipped left-right half of the time
    (with `rng=None`: the centre crop, unflipped, as validation uses).

    Works on any device. An image whose short side is below `crop_px` is first scaled up to
    it (bilinear, as ``F.interpolate`` to that size), so that small sources still give
    full-size crops; only the crop's pixels of the scaled image are computed, so a sliver
    (a 1 x 20,000 scan would scale to 176 x 3,520,000) costs what a square does.
    """
    height, width = rgb_3HW.shape[-2:]
    if min(height, width) >= crop_px:
        top, left, flip = crop_box(height, width, crop_px, rng)
        crop = rgb_3HW[:, top : top + crop_px, left : left + crop_px]
    else:
        scale = crop_px / min(height, width)
        size = (max(crop_px, round(height * scale)), max(crop_px, round(width * scale)))
        top, left, flip = crop_box(*size, crop_px, rng)
        taps = {
            1: _bilinear_taps(height, size[0], top, crop_px, rgb_3HW.device),
            2: _bilinear_taps(width, size[1], left, crop_px, rgb_3HW.device),
        }
        crop = rgb_3HW.float()
        for dim in sorted(taps, key=lambda d: -crop.shape[d]):  # the long side cut first
            crop = _resampled(crop, taps[dim], dim)
        if not rgb_3HW.is_floating_point():  # uint8 levels stay levels; floats keep [0, 1]
            crop = crop.round_().clamp_(0, 255)
        crop = crop.to(rgb_3HW.dtype)
    return crop.flip(-1) if flip else crop


def _bilinear_taps(
    size_in: int, size_out: int, start: int, count: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first source index, second, second's weight) of outputs start..start+count of a
    bilinear resize of `size_in` samples to `size_out`, as ``F.interpolate`` computes them
    (align_corners=False: a source position (i + 0.5) * size_in / size_out - 0.5, in fp32,
    clamped at the first sample; the second index clamped at the last)."""
    ratio = torch.tensor(size_in / size_out, dtype=torch.float32)
    position = (torch.arange(start, start + count, dtype=torch.float32) + 0.5) * ratio - 0.5
    position = position.clamp_(min=0)
    first = position.long()  # floor: non-negative
    second = (first + 1).clamp_(max=size_in - 1)
    weight = position - first
    return first.to(device), second.to(device), weight.to(device)


def _resampled(
    x_3HW: torch.Tensor, taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dim: int
) -> torch.Tensor:
    """`x_3HW` linearly interpolated along `dim` at the `taps` of `_bilinear_taps`."""
    first, second, weight = taps
    shape = [1, 1, 1]
    shape[dim] = -1
    weight = weight.view(shape)
    return x_3HW.index_select(dim, first) * (1 - weight) + x_3HW.index_select(dim, second) * weight


@dataclass(frozen=True)
class Targets:
    """One training batch on the device: input, sparse soft targets and the gray-image mask."""

    l_N1HW: torch.Tensor
    bins_NkHW: torch.Tensor
    weights_NkHW: torch.Tensor
    nongray_N: torch.Tensor


def lightness_and_target_ab(
    rgb_N3HW: torch.Tensor, stride: int = TARGET_STRIDE
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (or [0, 1] float) RGB crops -> the network's L input (N, 1, H, W) and the ab
    target at every `stride`-th pixel (N, 2, h, w), as released: a pick, not an average.

    Lab is pointwise, so converting only the picked pixels gives the same ab as converting
    the whole crop and picking after; with L computed from luminance alone, the conversion
    costs about a third of a full-resolution `rgb_to_lab`. Elementwise work only, so
    ``torch.compile`` turns it into a couple of fused kernels (the training job does so with
    ``TrainConfig.compile``).
    """
    if not (rgb_N3HW.dtype == torch.uint8 or rgb_N3HW.is_floating_point()):
        raise ValueError(f"expected uint8 crops or floats in [0, 1], got {rgb_N3HW.dtype}")
    rgb = rgb_N3HW.float() / 255 if rgb_N3HW.dtype == torch.uint8 else rgb_N3HW.float()
    ab_N2hw = rgb_to_lab(subsample_targets(rgb, stride))[:, 1:]
    return rgb_to_lightness(rgb), ab_N2hw


def encode_targets(
    l_N1HW: torch.Tensor,
    ab_N2hw: torch.Tensor,
    *,
    k: int = SOFT_ENCODE_K,
    sigma: float = SOFT_ENCODE_SIGMA,
    in_table: bool = False,
) -> Targets:
    """The L input and the subsampled ab target -> a training batch with sparse soft targets.

    `in_table`: the ab are sRGB colours' (as `lightness_and_target_ab` gives them), so the
    encoding is `soft_encode_in_table`: no host sync, traceable whole by ``torch.compile``;
    the way for accelerators. Otherwise `soft_encode`, exact for any ab, fastest on CPU.
    """
    encode = soft_encode_in_table if in_table else soft_encode
    bins, weights = encode(ab_N2hw, k=k, sigma=sigma)
    return Targets(l_N1HW, bins, weights, nongray_mask(ab_N2hw))


def make_targets(
    rgb_N3HW: torch.Tensor,
    *,
    k: int = SOFT_ENCODE_K,
    sigma: float = SOFT_ENCODE_SIGMA,
    stride: int = TARGET_STRIDE,
    in_table: bool = False,
) -> Targets:
    """uint8 (or [0, 1] float) RGB crops -> L input and soft-encoded ab targets, on their device.

    Targets are every `stride`-th ab pixel (as released), matching the network's output size.
    `in_table` as in `encode_targets` (the crops' ab are sRGB colours', so it applies): the
    way for accelerators and ``torch.compile``, which then takes the whole function.
    """
    l_N1HW, ab_N2hw = lightness_and_target_ab(rgb_N3HW, stride)
    return encode_targets(l_N1HW, ab_N2hw, k=k, sigma=sigma, in_table=in_table)
