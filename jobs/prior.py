"""Estimate the empirical ab prior of a prepared dataset, in parallel.

``python -m jobs.prior DATASET [--pixel-stride 1] [--sample-fraction 1.0] [--output URL]``

Every shard's colour images are decoded, converted to Lab and their pixels' nearest ab bins
counted (`colorcore.prior.AbHistogram`, one per Ray Data batch, then merged). Grayscale
sources are left out, as training leaves them out, and so are near-gray ones, to which the
training loss gives no weight (`histogram_of`). The result is the raw counts, written as
``DATASET/prior.npz``, so that any lambda and smoothing can be derived later without
another pass over the data; beside it ``prior.png`` plots the smoothed prior over the ab
plane in log scale. ``--pixel-stride`` and ``--sample-fraction`` (a fixed, hash-based subset
of images) give quick estimates.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from colorcore.color import rgb_to_lab
from colorcore.loss import nongray_mask
from colorcore.prior import AbHistogram
from colorcore.quantize import NUM_AB_BINS
from jobs import storage
from jobs.config import cpus_problems, empty_problems
from jobs.dataset import PRIOR_FILE, Manifest
from jobs.images import BadImage, decode_3hw
from jobs.plots import figure_png, pyplot


@dataclass(frozen=True, kw_only=True)
class PriorConfig:
    dataset: str = ""
    """Prepared dataset folder (local path or storage URL)."""
    output: str | None = None
    """Where to write the counts (default: DATASET/prior.npz)."""
    pixel_stride: int = 1
    """Count every n-th pixel along each axis (1 = every pixel)."""
    sample_fraction: float = 1.0
    """Use this fixed fraction of the images (chosen by a hash of their keys)."""
    batch_size: int = 64
    """Images per Ray Data batch (one histogram each)."""
    cpus_per_task: float = 1.0
    """CPUs reserved by each counting task."""
    s3: storage.S3Options = field(default_factory=storage.S3Options)

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("DATASET is required")
        if self.pixel_stride < 1:
            raise ValueError(f"pixel_stride must be >= 1, got {self.pixel_stride}")
        if not 0 < self.sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if problems := cpus_problems(self, "cpus_per_task") + empty_problems(self, "output"):
            raise ValueError("; ".join(problems))
        storage.split_url(self.output_url)  # (a URL it cannot write fails now, not after the count)

    @property
    def output_url(self) -> str:
        return self.output or storage.join(self.dataset, PRIOR_FILE)


def in_sample(key: str, fraction: float) -> bool:
    """A fixed subset of keys: the same keys are chosen on every run and every worker."""
    if fraction >= 1:
        return True
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest < fraction * 2**64


class Counted(NamedTuple):
    histogram: AbHistogram
    images: int
    """The images counted: those neither near-gray nor unreadable."""
    near_gray: int
    unreadable: int


def histogram_of(jpegs: Iterable[bytes], *, pixel_stride: int = 1) -> Counted:
    """Counts of the nearest ab bins of the images' pixels (single process), of those not
    near-gray by the training loss's rule (`colorcore.loss.nongray_mask`, here of the
    counted pixels, there of each crop's targets). A near-gray image, such as a tinted
    black-and-white scan, has no weight in the loss, and counted here it would swell the
    neutral bins of the prior. An image that no longer decodes (a shard damaged since it
    was prepared) is counted as unreadable and left out."""
    histogram, images, near_gray, unreadable = AbHistogram(), 0, 0, 0
    for data in jpegs:  # the pixels counted only: the conversion is per pixel
        try:
            rgb_3HW = decode_3hw(data)
        except BadImage:
            unreadable += 1
            continue
        rgb_13hw = rgb_3HW[None, :, ::pixel_stride, ::pixel_stride].float() / 255
        ab_12hw = rgb_to_lab(rgb_13hw)[:, 1:]
        if nongray_mask(ab_12hw).item():
            histogram.update(ab_12hw)
            images += 1
        else:
            near_gray += 1
    return Counted(histogram, images, near_gray, unreadable)


def _count_batch(batch: dict[str, np.ndarray], cfg: PriorConfig) -> dict[str, np.ndarray]:
    sampled = [in_sample(key, cfg.sample_fraction) for key in batch["key"]]
    keep = [
        data
        for data, gray, chosen in zip(batch["jpeg"], batch["grayscale"], sampled, strict=True)
        if chosen and not gray
    ]
    counted = histogram_of(keep, pixel_stride=cfg.pixel_stride)
    return {
        "counts_Q": counted.histogram.counts_Q.numpy()[None],
        "images": np.array([counted.images]),
        "grayscale": np.array([sum(sampled) - len(keep)]),
        "near_gray": np.array([counted.near_gray]),
        "unreadable": np.array([counted.unreadable]),
    }


def main(cfg: PriorConfig) -> AbHistogram:
    import ray

    from jobs.runtime import check_local_fit, init_ray

    start = time.monotonic()
    manifest = Manifest.load(cfg.dataset, cfg.s3)
    manifest.require_images(cfg.dataset)  # (before Ray, whose reader wants a file)
    fs, root = storage.arrow_filesystem(cfg.dataset, cfg.s3)
    paths = [f"{root}/{s.name}" for s in manifest.shards]
    init_ray(paths=[cfg.dataset, cfg.output_url])  # (the head's disk may go with the cluster)
    check_local_fit(f"prior needs counting tasks of {cfg.cpus_per_task:g} CPUs",
                    {"CPU": cfg.cpus_per_task}, hint="lower --cpus-per-task")  # fmt: skip
    results = (
        ray.data.read_parquet(paths, filesystem=fs, partitioning=None)
        .select_columns(["key", "jpeg", "grayscale"])
        .map_batches(
            _count_batch,
            fn_kwargs={"cfg": cfg},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            num_cpus=cfg.cpus_per_task,
        )
        .take_all()
    )
    counts_Q = sum((r["counts_Q"] for r in results), np.zeros(NUM_AB_BINS, np.int64))
    histogram = AbHistogram(counts_Q)
    images, gray, near_gray, unreadable = (
        int(sum(r[name] for r in results))
        for name in ("images", "grayscale", "near_gray", "unreadable")
    )
    if histogram.num_pixels == 0:  # nothing written: a prior of no pixels is none
        raise ValueError(
            f"{cfg.dataset}: no colour pixel to count ({images + gray + near_gray + unreadable} "
            f"images sampled: {gray} grayscale, {near_gray} near-gray, {unreadable} unreadable)"
            ": sample a larger --sample-fraction, or prepare a dataset of colour photos"
        )
    buffer = io.BytesIO()
    histogram.save(buffer)
    storage.write_bytes(cfg.output_url, buffer.getvalue(), cfg.s3)
    plot_url = posixpath.splitext(cfg.output_url)[0] + ".png"
    storage.write_bytes(plot_url, plot_prior(histogram), cfg.s3)
    print(
        f"prior: {histogram.num_pixels:,} pixels of {images} colour images "
        f"({gray} grayscale, {near_gray} near-gray and {unreadable} unreadable skipped) in "
        f"{time.monotonic() - start:.1f}s; "
        f"{int((histogram.counts_Q > 0).sum())} of 313 bins seen -> {cfg.output_url}, {plot_url}"
    )
    return histogram


def plot_prior(histogram: AbHistogram) -> bytes:
    """PNG of the smoothed prior over the ab plane, log10 scale (as in the paper's Fig. 3)."""
    plt = pyplot()

    from colorcore.quantize import AB_GRID, ab_bins

    bins = ab_bins().numpy()
    p = histogram.smoothed_probabilities().numpy()
    a_idx = ((bins[:, 0] + 110) // AB_GRID).astype(int)
    b_idx = ((bins[:, 1] + 110) // AB_GRID).astype(int)
    grid = np.full((23, 23), np.nan)
    grid[b_idx, a_idx] = np.log10(p)
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=120)
    extent = (-115, 115, -115, 115)
    # Six decades below the peak: the smoothed tails reach 1e-60, which would wash out the rest.
    top = float(np.nanmax(grid))
    shown = ax.imshow(
        grid, origin="lower", extent=extent, cmap="jet", interpolation="nearest",
        vmin=top - 6, vmax=top,
    )  # fmt: skip
    fig.colorbar(shown, ax=ax, label="log10 p(a, b)")
    ax.set(xlabel="a", ylabel="b", title=f"ab prior ({histogram.num_pixels:,} pixels)")
    return figure_png(fig)


if __name__ == "__main__":
    from jobs.config import run_job

    run_job("jobs.prior", "PriorConfig", positionals=("dataset",))
