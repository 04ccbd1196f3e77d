"""Tests for colorcore.prior: histograms against brute force, smoothing, released weights."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from colorcore import prior, quantize
from tests.support import reference_path


def _reference(name: str) -> np.ndarray:
    return np.load(reference_path(name), allow_pickle=False)


def _random_ab(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator) * 220.0 - 110.0


def _brute_force_counts(ab_N2HW: torch.Tensor) -> torch.Tensor:
    ab_P2 = ab_N2HW.permute(0, 2, 3, 1).reshape(-1, 2)
    nearest_P = torch.cdist(ab_P2.double(), quantize.ab_bins().double()).argmin(dim=1)
    return torch.bincount(nearest_P, minlength=quantize.NUM_AB_BINS)


@pytest.mark.parametrize("pixel_stride", [1, 3])
def test_histogram_counts_equal_brute_force_nearest_bin(pixel_stride: int) -> None:
    ab_N2HW = _random_ab(3, 2, 10, 13)
    histogram = prior.AbHistogram().update(ab_N2HW, pixel_stride=pixel_stride)
    expected_Q = _brute_force_counts(ab_N2HW[:, :, ::pixel_stride, ::pixel_stride])
    assert histogram.counts_Q.dtype == torch.int64
    assert torch.equal(histogram.counts_Q, expected_Q)
    assert histogram.num_pixels == 3 * math.ceil(10 / pixel_stride) * math.ceil(13 / pixel_stride)


def test_updates_accumulate_and_merge_equals_counting_both() -> None:
    ab_a, ab_b = _random_ab(2, 2, 6, 6, seed=1), _random_ab(4, 2, 5, 7, seed=2)
    hist_a = prior.AbHistogram().update(ab_a)
    hist_b = prior.AbHistogram().update(ab_b)
    counts_a_before = hist_a.counts_Q
    merged = hist_a.merge(hist_b)
    both = prior.AbHistogram().update(ab_a).update(ab_b)
    assert torch.equal(merged.counts_Q, both.counts_Q)
    assert torch.equal(merged.counts_Q, _brute_force_counts(ab_a) + _brute_force_counts(ab_b))
    assert torch.equal(hist_a.counts_Q, counts_a_before), "merge must not change its inputs"
    with pytest.raises(ValueError, match="smoothing_sigma"):
        hist_a.merge(prior.AbHistogram(smoothing_sigma=2.0))


def test_counts_property_is_a_copy() -> None:
    histogram = prior.AbHistogram()
    histogram.counts_Q[0] = 7
    assert histogram.num_pixels == 0


def test_probabilities_and_validation() -> None:
    histogram = prior.AbHistogram().update(_random_ab(1, 2, 8, 8))
    p_Q = histogram.probabilities()
    assert p_Q.dtype == torch.float64
    assert_close(p_Q.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert_close(p_Q * 64, histogram.counts_Q.double())
    with pytest.raises(ValueError, match="empty"):
        prior.AbHistogram().probabilities()
    with pytest.raises(ValueError, match="shape"):
        prior.AbHistogram().update(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="pixel_stride"):
        prior.AbHistogram().update(torch.zeros(1, 2, 4, 4), pixel_stride=0)
    with pytest.raises(ValueError, match="non-negative"):
        prior.AbHistogram(-torch.ones(quantize.NUM_AB_BINS, dtype=torch.int64))


def _counted_histogram() -> prior.AbHistogram:
    return prior.AbHistogram(smoothing_sigma=4.0).update(_random_ab(2, 2, 9, 9, seed=3))


def test_save_load_round_trip_through_file_object_and_path(tmp_path: Path) -> None:
    histogram = _counted_histogram()
    buffer = io.BytesIO()
    histogram.save(buffer)
    buffer.seek(0)
    from_buffer = prior.AbHistogram.load(buffer)
    histogram.save(tmp_path / "prior.npz")
    from_path = prior.AbHistogram.load(tmp_path / "prior.npz")
    for loaded in (from_buffer, from_path):
        assert torch.equal(loaded.counts_Q, histogram.counts_Q)
        assert loaded.smoothing_sigma == 4.0


def test_npz_layout_is_the_prior_schema(tmp_path: Path) -> None:
    histogram = _counted_histogram()
    histogram.save(tmp_path / "prior.npz")
    with np.load(tmp_path / "prior.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["bins", "counts_Q", "smoothing_sigma"]
        assert npz["counts_Q"].dtype == np.int64 and npz["counts_Q"].shape == (313,)
        assert npz["bins"].shape == (313, 2)
        np.testing.assert_array_equal(npz["bins"], _reference("pts_in_hull.npy"))
        assert npz["smoothing_sigma"].shape == () and float(npz["smoothing_sigma"]) == 4.0


def test_dict_round_trip_is_plain_data_and_checks_the_bin_table() -> None:
    histogram = _counted_histogram()
    data = histogram.to_dict()
    assert isinstance(data["counts_Q"], list) and isinstance(data["bins"], list)
    assert isinstance(data["smoothing_sigma"], float)
    restored = prior.AbHistogram.from_dict(data)
    assert torch.equal(restored.counts_Q, histogram.counts_Q)
    assert restored.smoothing_sigma == histogram.smoothing_sigma
    data["bins"] = data["bins"][::-1]
    with pytest.raises(ValueError, match="bin table"):
        prior.AbHistogram.from_dict(data)
    with pytest.raises(ValueError, match="lacks"):
        prior.AbHistogram.from_dict({"counts_Q": data["counts_Q"]})


def _direct_smooth(p_Q: np.ndarray, sigma: float) -> np.ndarray:
    """The documented formula written out over the reference bin centres."""
    bins_Q2 = _reference("pts_in_hull.npy").astype(np.float64)
    d2_QQ = ((bins_Q2[:, None, :] - bins_Q2[None, :, :]) ** 2).sum(-1)
    kernel_QQ = np.exp(-d2_QQ / (2 * sigma**2))
    return (p_Q[:, None] * kernel_QQ / kernel_QQ.sum(1, keepdims=True)).sum(0)


def test_smooth_matches_direct_computation_and_keeps_the_sum() -> None:
    p_Q = np.random.default_rng(0).random(313) ** 4
    p_Q /= p_Q.sum()
    smoothed_Q = prior.smooth(torch.from_numpy(p_Q), sigma=5.0)
    assert smoothed_Q.dtype == torch.float64
    assert_close(smoothed_Q, torch.from_numpy(_direct_smooth(p_Q, 5.0)), rtol=1e-12, atol=0)
    assert_close(smoothed_Q.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)


def test_smooth_spreads_a_delta_symmetrically_over_the_grid() -> None:
    gray = 120  # bin (0, 0), whose four grid neighbours are all in gamut
    bins_Q2 = quantize.ab_bins()
    assert bins_Q2[gray].tolist() == [0.0, 0.0]
    delta_Q = torch.zeros(313, dtype=torch.float64)
    delta_Q[gray] = 1.0
    smoothed_Q = prior.smooth(delta_Q, sigma=5.0)
    dist_Q = bins_Q2.double().norm(dim=1)
    on_axis = smoothed_Q[(dist_Q - 10.0).abs() < 1e-6]
    diagonal = smoothed_Q[(dist_Q - 200**0.5).abs() < 1e-6]
    assert on_axis.numel() == 4 and diagonal.numel() == 4
    assert_close(on_axis, on_axis[:1].expand(4), rtol=1e-14, atol=0)
    assert_close(on_axis / smoothed_Q[gray], torch.full_like(on_axis, math.exp(-2.0)))
    assert_close(diagonal / smoothed_Q[gray], torch.full_like(diagonal, math.exp(-4.0)))


def test_a_histograms_default_smoothing_is_the_papers_sigma_of_5() -> None:
    """Sec. 3.1 smooths the empirical prior with a Gaussian of sigma 5 (ab units): a histogram
    of gray pixels only gives its on-axis neighbours, 10 away, exp(-10^2 / (2 * 5^2)) =
    exp(-2) of the centre's probability."""
    counts_Q = torch.zeros(313, dtype=torch.int64)
    counts_Q[120] = 1000  # bin (0, 0)
    smoothed_Q = prior.AbHistogram(counts_Q).smoothed_probabilities()
    dist_Q = quantize.ab_bins().double().norm(dim=1)
    on_axis = smoothed_Q[(dist_Q - 10.0).abs() < 1e-6]
    assert_close(on_axis / smoothed_Q[120], torch.full_like(on_axis, math.exp(-2.0)))


def test_smooth_with_a_tiny_sigma_is_the_identity_and_validates() -> None:
    p_Q = torch.from_numpy(_reference("prior_probs.npy"))
    assert_close(prior.smooth(p_Q, sigma=0.1), p_Q, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="sigma"):
        prior.smooth(p_Q, sigma=0.0)
    with pytest.raises(ValueError, match="sum to 1"):
        prior.smooth(p_Q * 2)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_rebalance_weights_reproduce_the_released_weights(lam: float) -> None:
    p_Q = _reference("prior_probs.npy")
    expected_Q = torch.from_numpy(_reference(f"rebalance_weights_lambda{lam}.npy"))
    w_Q = prior.rebalance_weights(p_Q, lam=lam)
    assert w_Q.dtype == torch.float64
    assert_close(w_Q, expected_Q, rtol=1e-9, atol=0)
    assert_close((torch.from_numpy(p_Q) * w_Q).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_rebalance_weights_accept_float32_and_default_to_the_paper_lambda() -> None:
    p_Q = _reference("prior_probs.npy")
    expected_Q = torch.from_numpy(_reference("rebalance_weights_lambda0.5.npy"))
    w_Q = prior.rebalance_weights(torch.from_numpy(p_Q).float())
    assert w_Q.dtype == torch.float64
    assert_close(w_Q, expected_Q, rtol=1e-6, atol=0)


def test_rebalance_weights_validate_their_inputs() -> None:
    p_Q = torch.from_numpy(_reference("prior_probs.npy"))
    for lam in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            prior.rebalance_weights(p_Q, lam=lam)
    with pytest.raises(ValueError, match="sum to 1"):
        prior.rebalance_weights(p_Q * 0.5)
    negative_Q = p_Q.clone()
    negative_Q[[0, 1]] = torch.tensor([-0.01, p_Q[1] + p_Q[0] + 0.01])
    with pytest.raises(ValueError, match="non-negative"):
        prior.rebalance_weights(negative_Q)
    with pytest.raises(ValueError, match="shape"):
        prior.rebalance_weights(p_Q[:-1] / p_Q[:-1].sum())
    empty_bin_Q = p_Q.clone()
    empty_bin_Q[[0, 1]] = torch.tensor([0.0, p_Q[0] + p_Q[1]])
    with pytest.raises(ValueError, match="smooth"):
        prior.rebalance_weights(empty_bin_Q, lam=0.0)


def test_histogram_to_weights_pipeline() -> None:
    histogram = prior.AbHistogram().update(_random_ab(2, 2, 16, 16, seed=4))
    smoothed_Q = histogram.smoothed_probabilities()
    p_Q = histogram.probabilities().numpy()
    assert_close(smoothed_Q, torch.from_numpy(_direct_smooth(p_Q, 5.0)), rtol=1e-12, atol=0)
    # a histogram's own sigma, not the default
    narrow = prior.AbHistogram(histogram.counts_Q, smoothing_sigma=2.0).smoothed_probabilities()
    assert_close(narrow, torch.from_numpy(_direct_smooth(p_Q, 2.0)), rtol=1e-12, atol=0)
    assert not torch.allclose(narrow, smoothed_Q)
    w_Q = prior.rebalance_weights(smoothed_Q, lam=prior.REBALANCE_LAMBDA)
    assert bool(torch.isfinite(w_Q).all()) and bool((w_Q > 0).all())
    assert_close((smoothed_Q * w_Q).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_the_prior_counts_the_images_the_loss_weighs() -> None:
    """A tinted black-and-white scan (R, G and B apart, so not grayscale, yet |a|, |b| <= 5
    everywhere) has no weight in the loss (`nongray_mask`) and no count in the prior."""
    from colorcore.color import rgb_to_lab
    from jobs.images import decode_3hw
    from jobs.prior import histogram_of
    from tests.support import encode, photo_rgb

    gray = photo_rgb("astronaut", size=48).mean(axis=2, keepdims=True)
    sepia = np.clip(gray * np.array([1.0, 0.985, 0.96]), 0, 255).astype(np.uint8)
    colour = [encode(photo_rgb(name, size=48)) for name in ("astronaut", "coffee")]
    tinted = encode(sepia)
    ab = rgb_to_lab(decode_3hw(tinted)[None].float() / 255)[:, 1:]
    spread = sepia.astype(int).max(axis=2) - sepia.astype(int).min(axis=2)
    assert spread.max() > 2 and ab.abs().max() <= 5  # not grayscale, yet near-gray

    counted = histogram_of([colour[0], tinted, colour[1], b"", colour[0][:50]], pixel_stride=2)
    expected = histogram_of(colour, pixel_stride=2).histogram
    assert (counted.images, counted.near_gray, counted.unreadable) == (2, 1, 2)
    histogram = counted.histogram
    assert torch.equal(histogram.counts_Q, expected.counts_Q)
    assert histogram.num_pixels == 2 * 24 * 24


def test_the_prior_job_counts_the_pixels_colours_as_an_independent_reading() -> None:
    """`histogram_of` against scikit-image's Lab of the pictures as they were written (PNG:
    no decoder of its own to differ) and the nearest of the published bins: a channel order
    or a conversion of its own would move most pixels to other bins."""
    from skimage.color import rgb2lab

    from jobs.prior import histogram_of
    from tests.support import encode, photo_rgb

    pictures = [photo_rgb(name, size=40) for name in ("astronaut", "coffee", "chelsea")]
    counted = histogram_of([encode(p, "PNG") for p in pictures], pixel_stride=3)
    ab_P2 = np.concatenate([rgb2lab(p[::3, ::3] / 255.0)[..., 1:].reshape(-1, 2) for p in pictures])
    bins_Q2 = _reference("pts_in_hull.npy").astype(np.float64)
    nearest_P = ((ab_P2[:, None] - bins_Q2[None]) ** 2).sum(-1).argmin(1)
    expected_Q = np.bincount(nearest_P, minlength=len(bins_Q2))
    assert counted.images == 3 and counted.histogram.num_pixels == len(ab_P2) == 3 * 14 * 14
    moved = np.abs(counted.histogram.counts_Q.numpy() - expected_Q).sum() / 2
    assert moved <= 0.005 * len(ab_P2)  # float32 against float64 at a bin's edge at most


def test_a_batch_counts_its_colour_rows_in_the_fixed_sample() -> None:
    """Rows flagged grayscale by `jobs.prepare` are not decoded or counted; a fraction
    keeps the keys `in_sample` chooses, the same on every call."""
    from jobs.prior import PriorConfig, _count_batch, histogram_of, in_sample
    from tests.support import encode, photo_rgb

    names = ("astronaut", "coffee", "chelsea", "rocket")
    jpegs = [encode(photo_rgb(name, size=32)) for name in names]
    batch = {
        "key": np.array([f"c/{i}" for i in range(4)], dtype=object),
        "jpeg": np.array(jpegs, dtype=object),
        "grayscale": np.array([False, True, False, False]),
    }
    whole = _count_batch(batch, PriorConfig(dataset="d"))
    expected = histogram_of([jpegs[0], jpegs[2], jpegs[3]]).histogram
    assert whole["images"].tolist() == [3] and whole["near_gray"].tolist() == [0]
    assert whole["grayscale"].tolist() == [1]
    assert np.array_equal(whole["counts_Q"][0], expected.counts_Q.numpy())

    keys = [f"c/{i}" for i in range(200)]
    chosen = [k for k in keys if in_sample(k, 0.25)]
    assert 30 < len(chosen) < 70 and chosen == [k for k in keys if in_sample(k, 0.25)]
    kept = [i for i in (0, 2, 3) if in_sample(f"c/{i}", 0.5)]
    half = _count_batch(batch, PriorConfig(dataset="d", sample_fraction=0.5))
    expected = histogram_of([jpegs[i] for i in kept]).histogram
    assert half["images"].tolist() == [len(kept)]
    assert half["grayscale"].tolist() == [int(in_sample("c/1", 0.5))]  # of the sample only
    assert np.array_equal(half["counts_Q"][0], expected.counts_Q.numpy())


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"cpus_per_task": 1e-9}, "cpus_per_task must be finite and >= 0.0001"),
        ({"output": ""}, "output is empty: give a path or URL"),
        ({"output": "ftp://host/prior.npz"}, "unsupported storage URL"),  # not after the count
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ],
)
def test_bad_configs_fail_before_any_work(fields, message) -> None:
    from jobs.prior import PriorConfig

    with pytest.raises(ValueError, match=message):
        PriorConfig(dataset="d", **fields)


def test_the_prior_job_counts_every_colour_row_of_its_dataset(ci_config) -> None:
    """The `ci` dataset's prior.npz (written by `jobs.prior` on Ray when the session made
    the sample data) holds the counts of all its rows, counted here in one process."""
    import pyarrow.parquet as pq

    from jobs import storage
    from jobs.dataset import Manifest
    from jobs.prior import histogram_of

    manifest = Manifest.load(ci_config.data)
    fs, root = storage.arrow_filesystem(ci_config.data)
    jpegs = [
        data
        for shard in manifest.shards
        for data, gray in zip(
            *pq.read_table(f"{root}/{shard.name}", filesystem=fs, columns=["jpeg", "grayscale"])
            .to_pydict()
            .values(),
            strict=True,
        )
        if not gray
    ]
    expected, images, *_ = histogram_of(jpegs)
    written = prior.AbHistogram.load(io.BytesIO(storage.read_bytes(ci_config.prior_url)))
    assert images == manifest.num_rows - manifest.num_grayscale > 100
    assert torch.equal(written.counts_Q, expected.counts_Q)


def test_a_dataset_without_a_colour_pixel_gets_no_prior(tmp_path, ray_session) -> None:
    """Nothing to count (every image grayscale) is an error that says so, and leaves no
    prior.npz behind for training to find."""
    from jobs import prior as prior_job
    from tests.support import write_dataset

    root = tmp_path / "gray"
    write_dataset(str(root), gray_rows=range(100))
    with pytest.raises(ValueError, match=r"no colour pixel .*: 23 grayscale, 0 near-gray"):
        prior_job.main(prior_job.PriorConfig(dataset=str(root), cpus_per_task=0.5))
    assert not (root / "prior.npz").exists() and not (root / "prior.png").exists()


def test_a_dataset_of_no_images_is_said_to_be_before_ray_starts(tmp_path) -> None:
    """Every input failed to prepare: the job says so, where Ray's reader of no files would
    have failed on its own terms."""
    from jobs import prior as prior_job
    from jobs.dataset import Manifest

    Manifest(classes=("a",), shards=(), num_inputs=3, num_errors=3).save(str(tmp_path))
    with pytest.raises(ValueError, match=r"holds no images \(3 of its 3 inputs failed"):
        prior_job.main(prior_job.PriorConfig(dataset=str(tmp_path)))
