"""Tests for colorcore.metrics: AuC on constructed errors and against brute force, PSNR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from colorcore import metrics

MAX = metrics.AUC_MAX_DIST


def _pair_with_offset(a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random true ab and a prediction off by exactly (a, b) at every pixel."""
    true_N2HW = torch.rand(1, 2, 4, 5, generator=torch.Generator().manual_seed(0)) * 100 - 50
    true_N2HW = true_N2HW.double()
    return true_N2HW + torch.tensor([a, b], dtype=torch.float64)[None, :, None, None], true_N2HW


def _closed_form_auc(error: float, max_dist: int = MAX) -> float:
    """Curve is 0 below ceil(error) and 1 from it on; the step's interval contributes 1/2."""
    step = math.ceil(error)
    if step > max_dist:
        return 0.0
    return (max_dist - step + (0.5 if step > 0 else 0.0)) / max_dist


@pytest.mark.parametrize(
    ("offset", "error"),
    [
        ((0.0, 0.0), 0.0),
        ((1.0, 0.0), 1.0),
        ((3.0, -4.0), 5.0),
        ((0.0, 7.0), 7.0),
        ((2.5, 0.0), 2.5),
        ((-37.25, 0.0), 37.25),
        ((90.0, 120.0), 150.0),
        ((0.0, 150.5), 150.5),
        ((-120.0, 160.0), 200.0),
    ],
)
def test_constant_error_gives_the_closed_form(offset: tuple[float, float], error: float) -> None:
    auc_N, curve_NT = metrics.ab_auc(*_pair_with_offset(*offset))
    assert curve_NT.shape == (1, MAX + 1)
    expected_T = (torch.arange(MAX + 1) >= math.ceil(error)).double()
    assert_close(curve_NT[0], expected_T)
    assert auc_N.item() == pytest.approx(_closed_form_auc(error), abs=1e-12)


def test_the_curve_has_the_papers_thresholds_0_to_150() -> None:
    """Sec. 3.1: the AuC of the ab error curve over thresholds 0 to 150 (151 of them)."""
    _, curve_NT = metrics.ab_auc(*_pair_with_offset(0.0, 0.0))
    assert curve_NT.shape == (1, 151)


def test_exact_cases_zero_error_and_error_beyond_the_range() -> None:
    assert metrics.ab_auc(*_pair_with_offset(0.0, 0.0))[0].item() == 1.0
    assert metrics.ab_auc(*_pair_with_offset(MAX + 0.125, 0.0))[0].item() == 0.0
    small_auc = metrics.ab_auc(*_pair_with_offset(0.0, 4.0), max_dist=10)[0].item()
    assert small_auc == pytest.approx(6.5 / 10, abs=1e-12)
    assert _closed_form_auc(4.0, 10) == pytest.approx(0.65)


def test_nan_predictions_are_within_no_threshold() -> None:
    """A diverged model's NaN ab scores like an error beyond the range, image by image."""
    pred_N2HW, true_N2HW = _pair_with_offset(0.0, 0.0)
    pred_N2HW = torch.cat([pred_N2HW, pred_N2HW])
    pred_N2HW[1, :, 0] = math.nan  # the second image's first row
    auc_N, _ = metrics.ab_auc(pred_N2HW, torch.cat([true_N2HW, true_N2HW]))
    H = pred_N2HW.shape[2]
    assert auc_N.tolist() == [1.0, pytest.approx(1 - 1 / H)]


def _half_good_half_bad() -> tuple[torch.Tensor, torch.Tensor]:
    true_N2HW = torch.zeros(1, 2, 2, 4)
    pred_N2HW = true_N2HW.clone()
    pred_N2HW[:, 0, 1, :] = 200.0  # bottom row far beyond the range
    return pred_N2HW, true_N2HW


def test_pixel_weights_count_pixels_in_proportion() -> None:
    pred_N2HW, true_N2HW = _half_good_half_bad()
    assert metrics.ab_auc(pred_N2HW, true_N2HW)[0].item() == pytest.approx(0.5)
    weights_NHW = torch.ones(1, 2, 4)
    weights_NHW[:, 1] = 0.0
    assert metrics.ab_auc(pred_N2HW, true_N2HW, pixel_weights=weights_NHW)[0].item() == 1.0
    weights_NHW[:, 0], weights_NHW[:, 1] = 3.0, 1.0
    auc_N, curve_NT = metrics.ab_auc(pred_N2HW, true_N2HW, pixel_weights=weights_NHW)
    assert_close(curve_NT, torch.full((1, MAX + 1), 0.75, dtype=torch.float64))
    assert auc_N.item() == pytest.approx(0.75)


def test_images_are_scored_independently_and_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(1)
    true_N2HW = torch.rand(4, 2, 6, 7, generator=generator) * 200 - 100
    pred_N2HW = torch.rand(4, 2, 6, 7, generator=generator) * 200 - 100
    weights_NHW = torch.rand(4, 6, 7, generator=generator)
    auc_N, curve_NT = metrics.ab_auc(pred_N2HW, true_N2HW, pixel_weights=weights_NHW)
    for n in range(4):
        auc_1, curve_1T = metrics.ab_auc(
            pred_N2HW[n : n + 1], true_N2HW[n : n + 1], pixel_weights=weights_NHW[n : n + 1]
        )
        assert_close(auc_1, auc_N[n : n + 1])
        assert_close(curve_1T, curve_NT[n : n + 1])
    err_NP = (pred_N2HW - true_N2HW).double().norm(dim=1).flatten(1).numpy()
    within_NPT = err_NP[:, :, None] <= np.arange(MAX + 1)[None, None, :]
    w_NP = weights_NHW.double().flatten(1).numpy()
    brute_NT = (within_NPT * w_NP[:, :, None]).sum(1) / w_NP.sum(1, keepdims=True)
    assert_close(curve_NT, torch.from_numpy(brute_NT))
    brute_N = ((brute_NT[:, 1:] + brute_NT[:, :-1]) / 2).sum(1) / MAX
    assert_close(auc_N, torch.from_numpy(brute_N))


def test_ab_auc_validates_its_inputs() -> None:
    pred_N2HW, true_N2HW = _half_good_half_bad()
    with pytest.raises(ValueError, match="shape"):
        metrics.ab_auc(pred_N2HW, true_N2HW[:, :, :1])
    with pytest.raises(ValueError, match="ab channels"):
        metrics.ab_auc(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="pixel_weights"):
        metrics.ab_auc(pred_N2HW, true_N2HW, pixel_weights=torch.ones(1, 4, 2))
    with pytest.raises(ValueError, match="non-negative"):
        metrics.ab_auc(pred_N2HW, true_N2HW, pixel_weights=-torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match="max_dist"):
        metrics.ab_auc(pred_N2HW, true_N2HW, max_dist=0)


def test_psnr_of_known_mse_per_image() -> None:
    generator = torch.Generator().manual_seed(2)
    true_N3HW = torch.rand(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    offsets_N = torch.tensor([0.1, 0.01, 0.0], dtype=torch.float64)
    pred_N3HW = true_N3HW + offsets_N[:, None, None, None]
    psnr_N = metrics.psnr(pred_N3HW, true_N3HW)
    assert psnr_N.dtype == torch.float64
    assert_close(psnr_N[:2], torch.tensor([20.0, 40.0], dtype=torch.float64))
    assert psnr_N[2].item() == math.inf
    scaled = metrics.psnr(255 * pred_N3HW[:1], 255 * true_N3HW[:1], max_val=255)
    assert_close(scaled, torch.tensor([20.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(pred_N3HW, true_N3HW[:2])
