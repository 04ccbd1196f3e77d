"""The empirical ab prior: mergeable bin histograms, Gaussian smoothing, rebalancing weights.

Legend: N batch, Q = 313 ab bins, H, W image size.

Pipeline (paper Sec. 2.2): count the nearest bin of every training pixel (``AbHistogram``,
one per data shard, merged), normalise, ``smooth`` with a Gaussian of sigma 5 over the ab
plane, then ``rebalance_weights`` mixes with uniform by lambda and inverts.

The ``prior.npz`` file layout (``AbHistogram.save``) has three arrays and no pickled objects:
``counts_Q`` int64 (Q,), ``bins`` float32 (Q, 2) the bin centres the counts refer to, and
``smoothing_sigma`` float64 scalar, the sigma to smooth these counts with.
"""

from __future__ import annotations

import os
from typing import IO, Any

import numpy as np
import torch

from colorcore import quantize

REBALANCE_LAMBDA = 0.5  # paper, Sec. 2.2: weight of the uniform distribution in the mix
PRIOR_SMOOTHING_SIGMA = 5.0  # paper, Sec. 2.2: Gaussian smoothing of the empirical prior
_SUM_TOLERANCE = 1e-6  # how far from 1 a probability vector's sum may drift by rounding


class AbHistogram:
    """Exact int64 counts of pixels per nearest ab bin; histograms of shards add up."""

    def __init__(
        self,
        counts_Q: torch.Tensor | np.ndarray | None = None,
        *,
        smoothing_sigma: float = PRIOR_SMOOTHING_SIGMA,
    ) -> None:
        Q = quantize.NUM_AB_BINS
        if counts_Q is None:
            counts_Q = torch.zeros(Q, dtype=torch.int64)
        counts_Q = torch.as_tensor(counts_Q).cpu()
        if counts_Q.shape != (Q,):
            raise ValueError(f"counts_Q must have shape ({Q},), got {tuple(counts_Q.shape)}")
        if counts_Q.is_floating_point() or counts_Q.is_complex():
            raise ValueError(f"counts_Q must hold integers, got {counts_Q.dtype}")
        if bool((counts_Q < 0).any()):
            raise ValueError("counts_Q must be non-negative")
        if not smoothing_sigma > 0:
            raise ValueError(f"smoothing_sigma must be > 0, got {smoothing_sigma}")
        self._counts_Q = counts_Q.to(torch.int64).clone()
        self.smoothing_sigma = float(smoothing_sigma)

    @property
    def counts_Q(self) -> torch.Tensor:
        """A copy of the int64 (Q,) counts, on the CPU."""
        return self._counts_Q.clone()

    @property
    def num_pixels(self) -> int:
        return int(self._counts_Q.sum())

    def update(self, ab_N2HW: torch.Tensor, *, pixel_stride: int = 1) -> AbHistogram:
        """Counts the nearest bin of every ``pixel_stride``-th pixel along H and W; returns self.

        Runs on the device of ``ab_N2HW``; only the (Q,) counts come back to the CPU.
        """
        if ab_N2HW.ndim != 4 or ab_N2HW.shape[1] != 2:
            raise ValueError(f"ab_N2HW must have shape (N, 2, H, W), got {tuple(ab_N2HW.shape)}")
        if pixel_stride < 1:
            raise ValueError(f"pixel_stride must be >= 1, got {pixel_stride}")
        ab_N2hw = ab_N2HW[:, :, ::pixel_stride, ::pixel_stride]
        bins_Nhw = quantize.nearest_bin(ab_N2hw)
        counts_Q = torch.bincount(bins_Nhw.flatten(), minlength=quantize.NUM_AB_BINS)
        self._counts_Q += counts_Q.cpu()
        return self

    def merge(self, other: AbHistogram) -> AbHistogram:
        """A new histogram holding the counts of both (neither input changes)."""
        if other.smoothing_sigma != self.smoothing_sigma:
            raise ValueError(
                f"cannot merge histograms with smoothing_sigma {self.smoothing_sigma} "
                f"and {other.smoothing_sigma}"
            )
        return AbHistogram(self._counts_Q + other._counts_Q, smoothing_sigma=self.smoothing_sigma)

    def probabilities(self) -> torch.Tensor:
        """The empirical (unsmoothed) float64 (Q,) distribution of the counted pixels."""
        if self.num_pixels == 0:
            raise ValueError("the histogram is empty: no pixels have been counted")
        return self._counts_Q.double() / self.num_pixels

    def smoothed_probabilities(self) -> torch.Tensor:
        """The prior the rebalancing weights are made from: ``smooth`` of the probabilities."""
        return smooth(self.probabilities(), sigma=self.smoothing_sigma)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists and a float), e.g. to return from a Ray task or write as JSON."""
        return {
            "counts_Q": self._counts_Q.tolist(),
            "bins": quantize.ab_bins().tolist(),
            "smoothing_sigma": self.smoothing_sigma,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AbHistogram:
        """Inverse of ``to_dict``; also accepts the numpy arrays of a ``prior.npz`` file."""
        missing = {"counts_Q", "bins", "smoothing_sigma"} - set(data)
        if missing:
            raise ValueError(f"histogram data lacks {sorted(missing)}")
        _check_bins(np.asarray(data["bins"]))
        counts_Q = np.asarray(data["counts_Q"])
        if counts_Q.dtype.kind not in "iu":
            raise ValueError(f"counts_Q must hold integers, got {counts_Q.dtype}")
        return cls(counts_Q.astype(np.int64), smoothing_sigma=float(data["smoothing_sigma"]))

    def save(self, path_or_file: str | os.PathLike | IO[bytes]) -> None:
        """Writes the ``prior.npz`` layout (see the module docstring).

        As with ``np.savez``, a path without the ``.npz`` suffix gets it appended.
        """
        np.savez(
            path_or_file,
            counts_Q=self._counts_Q.numpy(),
            bins=quantize.ab_bins().numpy(),
            smoothing_sigma=np.float64(self.smoothing_sigma),
        )

    @classmethod
    def load(cls, path_or_file: str | os.PathLike | IO[bytes]) -> AbHistogram:
        """Reads a ``prior.npz`` file written by ``save`` (pickled objects are refused)."""
        with np.load(path_or_file, allow_pickle=False) as npz:
            return cls.from_dict({key: npz[key] for key in npz.files})

    def __repr__(self) -> str:
        return f"AbHistogram(num_pixels={self.num_pixels}, smoothing_sigma={self.smoothing_sigma})"


def _check_bins(bins: np.ndarray) -> None:
    """Counts are only meaningful against the bin table they were made with."""
    ours = quantize.ab_bins().numpy()
    if bins.shape != ours.shape or not np.array_equal(bins.astype(np.float32), ours):
        raise ValueError("the histogram was counted over a different ab bin table")


def _as_distribution(p_Q: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """``p_Q`` as a float64 CPU tensor, checked to be a probability vector over the Q bins."""
    Q = quantize.NUM_AB_BINS
    p_Q = torch.as_tensor(p_Q).detach().to("cpu", torch.float64)
    if p_Q.shape != (Q,):
        raise ValueError(f"{name} must have shape ({Q},), got {tuple(p_Q.shape)}")
    if not bool(torch.isfinite(p_Q).all()) or bool((p_Q < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    total = float(p_Q.sum())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"{name} must sum to 1, sums to {total}")
    return p_Q


def smooth(p_Q: torch.Tensor | np.ndarray, sigma: float = PRIOR_SMOOTHING_SIGMA) -> torch.Tensor:
    """Gaussian smoothing of a distribution over the Q bins, in the ab plane; float64 (Q,).

    Exactly: with d_ij the distance between the centres of bins i and j (ab units) and
    K_ij = exp(-d_ij^2 / (2 sigma^2)), bin i's mass is spread over the bins in proportion to
    row i of K, renormalised to sum 1:  out_j = sum_i p_i K_ij / sum_l K_il.
    Only in-gamut bin centres take part, so no mass leaves the gamut and the sum is kept.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    p_Q = _as_distribution(p_Q, "p_Q")
    bins_Q2 = quantize.ab_bins().double()
    kernel_QQ = torch.exp(-torch.cdist(bins_Q2, bins_Q2).square() / (2.0 * sigma**2))
    spread_QQ = kernel_QQ / kernel_QQ.sum(dim=1, keepdim=True)
    return p_Q @ spread_QQ


def rebalance_weights(
    prior_Q: torch.Tensor | np.ndarray, *, lam: float = REBALANCE_LAMBDA
) -> torch.Tensor:
    """Class-rebalancing weights w = 1 / ((1 - lam) p + lam / Q), scaled so sum(p w) = 1.

    ``prior_Q`` is the smoothed prior; float64 (Q,) out. lam = 1 gives all ones (no
    rebalancing); lam = 0 gives 1 / p, used by the rebalanced AuC metric.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    p_Q = _as_distribution(prior_Q, "prior_Q")
    mix_Q = (1.0 - lam) * p_Q + lam / quantize.NUM_AB_BINS
    if empty := int((mix_Q == 0).sum()):
        raise ValueError(
            f"lam = 0 weighs each colour by 1 / its probability, and the prior gives {empty} "
            f"of its {len(mix_Q)} bins none: smooth it, or take one of a broader set of "
            "colours (a narrow set's smoothed prior still underflows far from its colours)"
        )
    w_Q = 1.0 / mix_Q
    return w_Q / (p_Q * w_Q).sum()
