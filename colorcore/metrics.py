"""Colorization metrics as pure tensor functions: ab AuC (raw and rebalanced) and PSNR.

Legend: N batch, H, W image size, P = H*W pixels, T = max_dist + 1 integer thresholds.
"""

from __future__ import annotations

import math

import torch

AUC_MAX_DIST = 150  # paper, Sec. 3.1: AuC of the ab error curve over thresholds 0..150


def ab_auc(
    pred_ab_N2HW: torch.Tensor,
    true_ab_N2HW: torch.Tensor,
    *,
    pixel_weights: torch.Tensor | None = None,
    max_dist: int = AUC_MAX_DIST,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image area under the curve of pixels within an ab L2 distance; float64 (N,), (N, T).

    curve[n, t] is the fraction of image n's pixels (weighted by ``pixel_weights`` (N, H, W)
    when given) whose ab error is <= t, for t = 0, 1, ..., max_dist. auc is the trapezoid-rule
    area under the curve over [0, max_dist] divided by max_dist, so in [0, 1]. For the paper's
    rebalanced AuC, weight each pixel by the lambda = 0 rebalancing weight of its ground
    truth's nearest bin. An image whose weights are all 0 gets NaN.
    """
    if pred_ab_N2HW.shape != true_ab_N2HW.shape or pred_ab_N2HW.ndim != 4:
        raise ValueError(
            f"pred and true must both have shape (N, 2, H, W), got "
            f"{tuple(pred_ab_N2HW.shape)} and {tuple(true_ab_N2HW.shape)}"
        )
    if pred_ab_N2HW.shape[1] != 2:
        raise ValueError(f"expected 2 ab channels, got {pred_ab_N2HW.shape[1]}")
    return error_auc(
        ab_error(pred_ab_N2HW, true_ab_N2HW), pixel_weights=pixel_weights, max_dist=max_dist
    )


def ab_error(pred_ab_N2HW: torch.Tensor, true_ab_N2HW: torch.Tensor) -> torch.Tensor:
    """Per-pixel ab L2 distance, float64 (N, H, W).

    float64 so that an error of exactly t (e.g. a 3-4-5 triangle) lands on threshold t.
    """
    diff_N2HW = pred_ab_N2HW.double() - true_ab_N2HW.double()
    return torch.hypot(diff_N2HW[:, 0], diff_N2HW[:, 1])


def error_auc(
    err_NHW: torch.Tensor,
    *,
    pixel_weights: torch.Tensor | None = None,
    max_dist: int = AUC_MAX_DIST,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ab_auc` from per-pixel errors (`ab_error`): one error map serves several weightings."""
    if isinstance(max_dist, bool) or not isinstance(max_dist, int) or max_dist < 1:
        raise ValueError(f"max_dist must be a positive int, got {max_dist!r}")
    N, H, W = err_NHW.shape
    weights_NP = _pixel_weights(pixel_weights, N, H, W, err_NHW.device)
    # error <= t  <=>  ceil(error) <= t for integer t; bucket T collects errors beyond max_dist,
    # and NaN errors (a diverged model's output), which are within no threshold.
    err_NP = err_NHW.double().flatten(1).nan_to_num(nan=math.inf)
    bucket_NP = err_NP.ceil().clamp(max=max_dist + 1).long()
    mass_NB = torch.zeros(N, max_dist + 2, dtype=torch.float64, device=err_NHW.device)
    mass_NB.scatter_add_(1, bucket_NP, weights_NP)
    # over the cumulative sum's own total: a curve that ends at most at 1 however its
    # weights round (pixel weights may span 170 orders of magnitude)
    cumulative_NB = mass_NB.cumsum(dim=1)
    curve_NT = cumulative_NB[:, : max_dist + 1] / cumulative_NB[:, -1:]
    auc_N = torch.trapezoid(curve_NT, dx=1.0, dim=1) / max_dist
    return auc_N, curve_NT


def _pixel_weights(
    pixel_weights: torch.Tensor | None, N: int, H: int, W: int, device: torch.device
) -> torch.Tensor:
    """The (N, P) float64 weights, all ones when none are given."""
    if pixel_weights is None:
        return torch.ones(N, H * W, dtype=torch.float64, device=device)
    if pixel_weights.shape != (N, H, W):
        raise ValueError(
            f"pixel_weights must have shape ({N}, {H}, {W}), got {tuple(pixel_weights.shape)}"
        )
    if bool((pixel_weights < 0).any()):
        raise ValueError("pixel_weights must be non-negative")
    return pixel_weights.to(device, torch.float64).flatten(1)


def psnr(pred_N3HW: torch.Tensor, true_N3HW: torch.Tensor, *, max_val: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, 10 log10(max_val^2 / MSE), float64 (N,).

    Identical images give +inf (no epsilon floor, which would make the value depend on an
    arbitrary constant); average MSEs, or drop infinite values, when summarising a dataset.
    """
    if pred_N3HW.shape != true_N3HW.shape or pred_N3HW.ndim != 4:
        raise ValueError(
            f"pred and true must both have shape (N, C, H, W), got "
            f"{tuple(pred_N3HW.shape)} and {tuple(true_N3HW.shape)}"
        )
    if not max_val > 0:
        raise ValueError(f"max_val must be > 0, got {max_val}")
    mse_N = (pred_N3HW.double() - true_N3HW.double()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(max_val**2 / mse_N)
