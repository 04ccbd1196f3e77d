"""Tests for colorcore.quantize: the bins against the published table, the table-driven
soft encoding against brute force over all 313 bins.

Legend: N batch, Q = 313 bins, k nearest bins, H, W image size, P pixels, S grid steps,
M = S x S grid points of a window, C comparator-network inputs.
Pixels go last (2, P), (k, P), as soft_encode lays them out, which keeps checks over
millions of pixels fast.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from colorcore import quantize
from colorcore.color import rgb_to_lab
from tests.support import photo_rgb, reference_path

Q = quantize.NUM_AB_BINS
_NO_BIN = 2**62  # key offset of a grid point without a bin: after every bin's key


def _random_ab(*shape: int, low: float = -110.0, high: float = 110.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(*shape, generator=generator)


def _dist2(ab_2P: torch.Tensor, index_kP: torch.Tensor) -> torch.Tensor:
    """fp32 (a - a_q)^2 + (b - b_q)^2 for the bins q = index_kP: the definition, in the
    order that makes equal distances bitwise equal (torch.cdist rounds through a sqrt or
    a matmul, which can merge or split ties)."""
    bins_2Q = quantize.ab_bins().T
    da_kP = ab_2P[0] - _lookup(bins_2Q[0], index_kP)
    db_kP = ab_2P[1] - _lookup(bins_2Q[1], index_kP)
    return da_kP * da_kP + db_kP * db_kP


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table.flatten()[index], as a 1-D index_select (the fastest gather on CPU)."""
    return table.flatten().index_select(0, index.flatten()).view(index.shape)


def _gaussian(dist2_kP: torch.Tensor, sigma: float) -> torch.Tensor:
    weight_kP = torch.exp(-(dist2_kP - dist2_kP[:1]) / (2 * sigma**2))
    return weight_kP / weight_kP.sum(dim=0, keepdim=True)


def _brute_force(ab_2P: torch.Tensor, k: int, sigma: float = 5.0):
    """All 313 distances, a stable sort (ties to the lower index), the first k."""
    every_QP = torch.arange(Q)[:, None].expand(Q, ab_2P.shape[1])
    dist2_QP, index_QP = _dist2(ab_2P.float(), every_QP).sort(dim=0, stable=True)
    return index_QP[:k], _gaussian(dist2_QP[:k], sigma)


def _encode_pixels(ab_2P: torch.Tensor, k: int, sigma: float = 5.0):
    """soft_encode on the pixels as one (1, 2, 1, P) image, returned as (k, P)."""
    bins_NkHW, weights_NkHW = quantize.soft_encode(ab_2P[None, :, None], k=k, sigma=sigma)
    assert bins_NkHW.dtype == torch.int64 and weights_NkHW.dtype == torch.float32
    return bins_NkHW[0, :, 0], weights_NkHW[0, :, 0]


def _assert_matches_brute_force(ab_2P: torch.Tensor, k: int, sigma: float = 5.0) -> None:
    bins_kP, weights_kP = _encode_pixels(ab_2P, k, sigma)
    expected_bins_kP, expected_weights_kP = _brute_force(ab_2P, k, sigma)
    assert torch.equal(bins_kP, expected_bins_kP)
    assert_close(weights_kP, expected_weights_kP, rtol=0, atol=1e-6)


def test_bins_equal_the_published_table() -> None:
    published_Q2 = np.load(reference_path("pts_in_hull.npy"), allow_pickle=False)
    bins_Q2 = quantize.ab_bins()
    assert bins_Q2.dtype == torch.float32 and bins_Q2.shape == (Q, 2)
    assert np.array_equal(bins_Q2.numpy(), published_Q2)  # same set, same order
    assert bins_Q2[120].tolist() == [0.0, 0.0]  # the grey bin
    bins_Q2[0] = 1e3  # callers get a copy, not the cached table
    assert quantize.ab_bins()[0].tolist() == published_Q2[0].tolist()


@functools.cache  # (about 2.5 s; its callers only read it)
def _every_srgb_ab() -> torch.Tensor:
    """(2, 256^3) ab of every 8-bit sRGB colour."""
    levels = torch.arange(256, dtype=torch.float32) / 255
    rgb_3RGB = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij"))
    ab_2P = torch.empty(2, 256**3)
    reds = 16  # per conversion: bounds its temporaries
    chunks = zip(rgb_3RGB.split(reds, 1), ab_2P.split(reds * 256**2, 1), strict=True)
    for rgb_3rGB, out_2P in chunks:
        lab_r3GB = rgb_to_lab(rgb_3rGB.movedim(0, 1))
        out_2P.copy_(lab_r3GB[:, 1:].movedim(1, 0).flatten(1))
    return ab_2P


def _keys(dist2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(squared distance, bin index) in lexicographic order as one int64 (dist2 >= 0)."""
    return (dist2.view(torch.int32).long() << 31) | offset


def _grid_offsets(margin: int) -> tuple[torch.Tensor, int]:
    """Key offset of every grid point (its bin's index, or _NO_BIN) from `margin` grid
    steps before the first bin to `margin` past the last, in a and b; and the first grid
    coordinate."""
    grid_Q2 = (quantize.ab_bins() / quantize.AB_GRID).round().long()
    origin = int(grid_Q2.min()) - margin
    side = int(grid_Q2.max()) + margin + 1 - origin
    offsets = torch.full((side, side), _NO_BIN, dtype=torch.int64)
    offsets[grid_Q2[:, 0] - origin, grid_Q2[:, 1] - origin] = torch.arange(Q)
    return offsets, origin


def _assert_weights(ab_2P, index_kP, weight_kP, sigma: float) -> torch.Tensor:
    """Checks the weights against the Gaussian of the answer's distances; returns those."""
    dist2_kP = _dist2(ab_2P, index_kP)
    error = float((weight_kP - _gaussian(dist2_kP, sigma)).abs().max())
    assert error <= 1e-6, f"weights off by {error}"
    return dist2_kP


def _assert_exact_k_nearest(ab_2P, index_kP, weight_kP, sigma: float) -> None:
    """Checks a k-nearest answer without a 313-wide search per pixel: it must be sorted by
    (distance, index) with the right weights, and no bin may precede its k-th bin in that
    order. Only bins within the largest k-th distance R can, and a square of S x S grid
    points wide enough to hold every point within R of the pixel holds them all; its
    squared distances are sums of per-axis squares, bitwise as in _dist2."""
    dist2_kP = _assert_weights(ab_2P, index_kP, weight_kP, sigma)
    keys_kP = _keys(dist2_kP, index_kP)
    assert bool((keys_kP[1:] > keys_kP[:-1]).all()), "not in (distance, index) order"
    radius = 1e-3 + float(dist2_kP[-1].max().sqrt())
    steps = math.floor(2 * radius / quantize.AB_GRID) + 1
    offsets, origin = _grid_offsets(margin=10)
    first_2P = torch.ceil((ab_2P - radius) / quantize.AB_GRID).long()
    assert int(first_2P.min()) >= origin and int(first_2P.max()) + steps <= origin + len(offsets)
    grid_2SP = first_2P[:, None] + torch.arange(steps)[:, None]
    delta_2SP = ab_2P[:, None] - quantize.AB_GRID * grid_2SP.float()
    square_2SP = delta_2SP * delta_2SP
    dist2_SSP = square_2SP[0, :, None] + square_2SP[1, None, :]
    cell_2SP = grid_2SP - origin
    flat_SSP = cell_2SP[0, :, None] * len(offsets) + cell_2SP[1, None, :]
    window_keys_MP = _keys(dist2_SSP, _lookup(offsets, flat_SSP)).flatten(0, 1)
    preceding_P = torch.count_nonzero(window_keys_MP <= keys_kP[-1], dim=0)
    assert bool((preceding_P == len(index_kP)).all()), "a nearer bin was left out"


def test_soft_encode_is_exact_for_every_8bit_srgb_colour() -> None:
    """k = 10 (released), 5 (paper) and 1 over the ab of all 16.7M 8-bit sRGB colours."""
    sigma = quantize.SOFT_ENCODE_SIGMA
    ab_2P = _every_srgb_ab()
    for chunk_2P in ab_2P.split(2**14, dim=1):  # temporaries small enough to reuse memory
        index_10P, weight_10P = _encode_pixels(chunk_2P, 10)
        _assert_exact_k_nearest(chunk_2P, index_10P, weight_10P, sigma)
        for k in (5, 1):  # the k nearest are the first k of the 10 nearest
            index_kP, weight_kP = _encode_pixels(chunk_2P, k)
            assert torch.equal(index_kP, index_10P[:k])
            _assert_weights(chunk_2P, index_kP, weight_kP, sigma)
    # The window check's own sanity: it agrees with a full brute force where both run.
    shuffle = torch.randperm(ab_2P.shape[1], generator=torch.Generator().manual_seed(0))
    for k in (10, 5, 1):
        _assert_matches_brute_force(ab_2P[:, shuffle[:20_000]], k)


def test_exact_k_nearest_check_catches_a_wrong_answer() -> None:
    ab_2P = _random_ab(2, 500, low=-80, high=80)
    index_kP, weight_kP = _brute_force(ab_2P, 10)
    _assert_exact_k_nearest(ab_2P, index_kP, weight_kP, 5.0)
    wrong_kP = index_kP.clone()
    wrong_kP[-1, 7] = _brute_force(ab_2P[:, 7:8], 11)[0][-1, 0]  # the 11th, not the 10th
    with pytest.raises(AssertionError, match="nearer bin"):
        _assert_exact_k_nearest(ab_2P, wrong_kP, _gaussian(_dist2(ab_2P, wrong_kP), 5.0), 5.0)
    swap = [0, 1, 2, 3, 4, 5, 6, 7, 9, 8]
    with pytest.raises(AssertionError, match="order"):
        _assert_exact_k_nearest(ab_2P, index_kP[swap], weight_kP[swap], 5.0)


@pytest.mark.parametrize("k", [1, 5, 10, 16, 313])
def test_soft_encode_equals_brute_force_with_exact_ties(k: int) -> None:
    """Integer and half-integer ab put many pixels exactly between bins (ties), across the
    whole table and beyond its edge (|a|, |b| > 120: searched without the table)."""
    axis = torch.arange(-140.0, 140.5, 2.5)
    _assert_matches_brute_force(torch.cartesian_prod(axis, axis).T, k)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_soft_encode_equals_brute_force_far_outside_the_table(k: int) -> None:
    far_2P = _random_ab(2, 3000, low=-1000, high=1000, seed=1)
    far_2P[0, :1000] = 120.0 + far_2P[0, :1000].abs() / 100  # just past the table's edge
    _assert_matches_brute_force(far_2P, k)
    # Mixed with in-table pixels in one call, in every layout position.
    mixed_2P = torch.cat([far_2P, _random_ab(2, 3000, seed=2)], dim=1)
    order = torch.randperm(6000, generator=torch.Generator().manual_seed(3))
    _assert_matches_brute_force(mixed_2P[:, order], k)


def test_soft_encode_matches_the_published_examples() -> None:
    references = json.loads(reference_path("reference_values.json").read_text())
    examples = references["soft_encoding_examples"]
    assert {example["k"] for example in examples} == {5, 10}
    for example in examples:
        ab_2P = torch.tensor(example["ab"])[:, None]
        bins_kP, weights_kP = _encode_pixels(ab_2P, example["k"], example["sigma"])
        assert bins_kP[:, 0].tolist() == example["bins"]
        expected_k = torch.tensor(example["weights"], dtype=torch.float32)
        assert_close(weights_kP[:, 0], expected_k, rtol=0, atol=1e-6)


def test_soft_encode_on_a_photo_with_other_sigma_and_layouts() -> None:
    rgb = torch.tensor(photo_rgb("coffee", size=48)).permute(2, 0, 1).float() / 255
    ab_2HW = rgb_to_lab(rgb)[1:]
    for sigma in (1.0, 5.0, 12.5):
        _assert_matches_brute_force(ab_2HW.flatten(1), 10, sigma)
    bins_kHW, weights_kHW = quantize.soft_encode(ab_2HW)  # no batch dim
    bins_NkHW, weights_NkHW = quantize.soft_encode(ab_2HW[None])
    assert bins_kHW.shape == weights_kHW.shape == (10, 48, 48)
    assert torch.equal(bins_kHW, bins_NkHW[0]) and torch.equal(weights_kHW, weights_NkHW[0])
    ab_AB2HW = torch.stack([ab_2HW, ab_2HW.flip(-1)]).expand(3, 2, 2, 48, 48)
    bins_ABkHW, _ = quantize.soft_encode(ab_AB2HW)
    assert bins_ABkHW.shape == (3, 2, 10, 48, 48)
    assert torch.equal(bins_ABkHW[2, 1], quantize.soft_encode(ab_2HW.flip(-1))[0])
    for dtype in (torch.float64, torch.float16):  # computed in fp32 from the input's values
        converted = ab_2HW.to(dtype)
        assert torch.equal(
            quantize.soft_encode(converted)[0], quantize.soft_encode(converted.float())[0]
        )


def test_nearest_bin_equals_brute_force_argmin() -> None:
    axis = torch.arange(-130.0, 130.5, 2.5)  # exact ties: argmin keeps the lower index
    grid_2P = torch.cartesian_prod(axis, axis).T
    ab_2P = torch.cat([grid_2P, _random_ab(2, 4975, low=-150, high=150)], dim=1)
    every_QP = torch.arange(Q)[:, None].expand(Q, ab_2P.shape[1])
    expected_P = _dist2(ab_2P, every_QP).argmin(dim=0)
    nearest_NHW = quantize.nearest_bin(ab_2P.reshape(2, 10, 40, 40).movedim(0, 1))
    assert nearest_NHW.dtype == torch.int64
    assert torch.equal(nearest_NHW, expected_P.reshape(10, 40, 40))
    assert torch.equal(quantize.nearest_bin(ab_2P[:, None]), expected_P[None])  # (2, H, W)


def test_to_dense_is_the_truncated_normalised_gaussian() -> None:
    ab_N2HW = _random_ab(2, 2, 5, 7, low=-90, high=90)
    bins_NkHW, weights_NkHW = quantize.soft_encode(ab_N2HW, k=10)
    dense_NQHW = quantize.to_dense(bins_NkHW, weights_NkHW)
    assert dense_NQHW.shape == (2, Q, 5, 7)
    assert_close(dense_NQHW.sum(dim=1), torch.ones(2, 5, 7))
    assert torch.equal((dense_NQHW > 0).sum(dim=1), torch.full((2, 5, 7), 10))
    # Independently: the Gaussian of every bin, kept for the 10 nearest, renormalised.
    ab_2P = ab_N2HW.movedim(1, 0).flatten(1)
    dist2_QP = _dist2(ab_2P, torch.arange(Q)[:, None].expand(Q, ab_2P.shape[1]))
    rank_QP = dist2_QP.sort(dim=0, stable=True).indices.argsort(dim=0)
    gauss_QP = torch.exp(-(dist2_QP - dist2_QP.min(dim=0).values) / 50.0)
    gauss_QP = torch.where(rank_QP < 10, gauss_QP, 0.0)
    expected_QP = gauss_QP / gauss_QP.sum(dim=0)
    assert_close(dense_NQHW.movedim(1, 0).flatten(1), expected_QP, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        quantize.to_dense(bins_NkHW, weights_NkHW[:, :5])


def test_subsample_targets_picks_every_4th_pixel() -> None:
    assert quantize.TARGET_STRIDE == 4
    ab_N2HW = torch.arange(2 * 2 * 10 * 13, dtype=torch.float32).reshape(2, 2, 10, 13)
    picked = quantize.subsample_targets(ab_N2HW)
    assert picked.shape == (2, 2, 3, 4)
    for i, row in enumerate((0, 4, 8)):
        for j, col in enumerate((0, 4, 8, 12)):
            assert torch.equal(picked[:, :, i, j], ab_N2HW[:, :, row, col])
    assert torch.equal(quantize.subsample_targets(ab_N2HW, stride=1), ab_N2HW)
    for stride in (0, -4, 2.0, True):
        with pytest.raises(ValueError, match="stride"):
            quantize.subsample_targets(ab_N2HW, stride=stride)


@pytest.mark.parametrize(
    ("kwargs", "shape", "message"),
    [
        ({"k": 0}, (1, 2, 3, 3), "k must be"),
        ({"k": Q + 1}, (1, 2, 3, 3), "k must be"),
        ({"k": 2.0}, (1, 2, 3, 3), "k must be"),
        ({"sigma": 0.0}, (1, 2, 3, 3), "sigma"),
        ({"sigma": -5.0}, (1, 2, 3, 3), "sigma"),
        ({"sigma": float("nan")}, (1, 2, 3, 3), "sigma"),
        ({}, (1, 3, 3, 3), r"\(\.\.\., 2, H, W\)"),
        ({}, (2, 3), r"\(\.\.\., 2, H, W\)"),
    ],
)
def test_soft_encode_rejects_bad_arguments(kwargs: dict, shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize.soft_encode(torch.zeros(shape), **kwargs)


def test_nearest_bin_rejects_a_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="2, H, W"):
        quantize.nearest_bin(torch.zeros(1, 3, 4, 4))


def test_candidate_tables_are_narrow() -> None:
    """The point of the table: each pixel ranks a few candidates, not all 313."""
    widths = {k: quantize.candidate_width(k) for k in (1, 5, 10)}
    assert widths[1] >= 1 and widths[5] >= 5 and widths[10] >= 10
    assert widths[1] <= 4 and widths[5] <= 12 and widths[10] <= 16, widths


@pytest.mark.parametrize("width", range(1, 17))
def test_selection_network_sorts_every_binary_input(width: int) -> None:
    """0-1 principle: a comparator network that puts the k smallest of every 0/1 input in
    order does so for every input. Covers the table widths in use (4, 12, 16)."""
    codes = torch.arange(2**width)
    inputs_CP = (codes[None, :] >> torch.arange(width)[:, None]) & 1
    expected_CP = inputs_CP.sort(dim=0).values
    for k in range(1, width + 1):
        smallest_kP = quantize._smallest(inputs_CP.clone(), inputs_CP.new_empty(k, 2**width))
        assert torch.equal(smallest_kP, expected_CP[:k]), (width, k)


@pytest.mark.parametrize("width", [17, 23, 28, 32])
def test_selection_network_on_wider_inputs(width: int) -> None:
    generator = torch.Generator().manual_seed(width)
    inputs_CP = torch.randint(0, 2, (width, 50_000), generator=generator)
    inputs_CP[:, :25_000] = torch.randint(0, 10**6, (width, 25_000), generator=generator)
    expected_CP = inputs_CP.sort(dim=0).values
    for k in (1, width // 2, width):
        smallest_kP = quantize._smallest(inputs_CP.clone(), inputs_CP.new_empty(k, 50_000))
        assert torch.equal(smallest_kP, expected_CP[:k]), (width, k)


@pytest.mark.parametrize("k", [1, 10])
def test_accelerator_lookup_equals_the_cpu_lookup(k: int) -> None:
    """GPUs gather with one index_select and sort each pixel's candidates instead of running
    the comparator network; run here on CPU, both ways give the same keys: ab in the sRGB
    range, exact ties on the grid, and ab beyond the table (brute force) in one call."""
    axis = torch.arange(-140.0, 140.5, 2.5)
    ab_2P = torch.cat(
        [
            _random_ab(2, 50_000, seed=k),
            torch.cartesian_prod(axis, axis).T,
            _random_ab(2, 1000, low=-1000, high=1000, seed=k),
        ],
        dim=1,
    )
    ab_N2L = ab_2P[:, : ab_2P.shape[1] // 4 * 4].reshape(2, 4, -1).movedim(1, 0)
    expected_NkL = quantize._nearest_keys(ab_N2L, k, cpu_kernels=True)
    assert torch.equal(quantize._nearest_keys(ab_N2L, k, cpu_kernels=False), expected_NkL)


@pytest.mark.parametrize("k", [1, 10])
def test_in_table_encoding_equals_soft_encode_on_srgb_ab(k: int) -> None:
    """The training step's traceable encoding: the same bins (ties included) and weights as
    `soft_encode` for ab of sRGB colours and exact ties across the table; eager, and traced
    whole by torch.compile."""
    shuffle = torch.randperm(256**3, generator=torch.Generator().manual_seed(k))[:100_000]
    axis = torch.arange(-115.0, 115.5, 2.5)
    ab_2P = torch.cat([_every_srgb_ab()[:, shuffle], torch.cartesian_prod(axis, axis).T], dim=1)
    ab_N2HW = ab_2P[:, : ab_2P.shape[1] // 60 * 60].reshape(2, 3, 4, -1, 5).movedim(0, 2)
    bins, weights = quantize.soft_encode(ab_N2HW, k=k, sigma=4.0)
    # k must stay a constant for the tables (dynamic=False: not traced as a symbol after the
    # second k; the training step passes its k as a constant of the compiled function).
    compiled = torch.compile(
        quantize.soft_encode_in_table, backend="aot_eager", fullgraph=True, dynamic=False
    )
    for encode in (quantize.soft_encode_in_table, compiled):
        bins_in_table, weights_in_table = encode(ab_N2HW, k=k, sigma=4.0)
        assert bins_in_table.shape == bins.shape == (3, 4, k, ab_N2HW.shape[-2], 5)
        assert torch.equal(bins_in_table, bins)
        assert_close(weights_in_table, weights, rtol=0, atol=1e-6)


def test_in_table_encoding_marks_ab_beyond_the_table_with_nan_weights() -> None:
    ab_N2HW = _random_ab(2, 2, 4, 5, low=-100, high=100)
    ab_N2HW[0, 0, 1, 1], ab_N2HW[1, 1, 2, 3], ab_N2HW[1, 0, 0, 0] = 121.0, -500.0, float("nan")
    bins_NkHW, weights_NkHW = quantize.soft_encode_in_table(ab_N2HW)
    nan_NHW = weights_NkHW.isnan().any(dim=1)
    assert nan_NHW.sum() == 3 and nan_NHW[0, 1, 1] and nan_NHW[1, 2, 3] and nan_NHW[1, 0, 0]
    assert weights_NkHW.isnan().all(dim=1).sum() == 3
    inside = ~nan_NHW[:, None].expand_as(bins_NkHW)
    assert torch.equal(bins_NkHW[inside], quantize.soft_encode(ab_N2HW)[0][inside])
    with pytest.raises(ValueError, match="sigma"):
        quantize.soft_encode_in_table(ab_N2HW, sigma=0.0)


def test_soft_encode_passes_nan_through_and_takes_empty_inputs() -> None:
    ab_N2HW = _random_ab(2, 2, 4, 5)
    ab_N2HW[1, 0, 2, 3] = float("nan")
    bins_NkHW, weights_NkHW = quantize.soft_encode(ab_N2HW)
    assert weights_NkHW[1, :, 2, 3].isnan().all()
    assert not weights_NkHW[0].isnan().any()
    assert torch.equal(bins_NkHW[0], quantize.soft_encode(ab_N2HW[:1])[0][0])
    for shape in [(0, 2, 4, 4), (3, 2, 0, 4)]:
        bins, weights = quantize.soft_encode(torch.zeros(shape))
        assert bins.shape == weights.shape == (shape[0], 10, *shape[2:])
        assert quantize.nearest_bin(torch.zeros(shape)).shape == (shape[0], *shape[2:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_soft_encode_on_gpu_equals_cpu() -> None:
    ab_N2HW = _random_ab(16, 2, 44, 44, low=-130, high=130)
    bins_cpu, weights_cpu = quantize.soft_encode(ab_N2HW)
    bins_gpu, weights_gpu = quantize.soft_encode(ab_N2HW.cuda())
    assert torch.equal(bins_gpu.cpu(), bins_cpu)
    assert_close(weights_gpu.cpu(), weights_cpu, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_in_table_encoding_on_gpu_eager_and_compiled_equals_cpu() -> None:
    """The training step's encoding on the GPU: eager it equals the CPU's exactly; compiled
    (Inductor), fused multiply-adds may round a distance differently and swap bins tied at
    exactly equal distance, so only those may differ."""
    ab_N2HW = _random_ab(16, 2, 44, 44, low=-100, high=100)
    bins_cpu, weights_cpu = quantize.soft_encode(ab_N2HW)
    bins, weights = quantize.soft_encode_in_table(ab_N2HW.cuda())
    assert torch.equal(bins.cpu(), bins_cpu)
    assert_close(weights.cpu(), weights_cpu, rtol=0, atol=1e-6)
    compiled = torch.compile(quantize.soft_encode_in_table, fullgraph=True)
    bins, weights = compiled(ab_N2HW.cuda())
    assert (bins.cpu() != bins_cpu).float().mean() < 1e-4
    assert_close(weights.cpu(), weights_cpu, rtol=0, atol=1e-5)
