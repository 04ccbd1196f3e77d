"""Quantisation of the ab plane into the paper's 313 in-gamut bins, and the soft encoding of
ground-truth ab values over them.

Legend: N batch (any number of leading dims is accepted), 2 ab channels at dim -3,
Q = 313 bins, k nearest bins kept by the soft encoding, H, W image size,
P pixels (leading dims, H and W flattened), C candidate bins per lookup cell,
X lookup cells, M pixels outside the lookup table's extent.

Soft encoding looks each pixel's k nearest bins up in a precomputed table over the ab plane
instead of comparing it with all 313 bins: every table cell lists the few bins that can be
among the k nearest of any point in that cell, so a pixel costs C distances, not Q.
"""

from __future__ import annotations

import functools

import torch

NUM_AB_BINS = 313  # paper, Sec. 2.1: Q = 313 in-gamut values on a grid of size 10
AB_GRID = 10
SOFT_ENCODE_K = 10  # released training (the paper's "5" is a typo, per the authors)
SOFT_ENCODE_SIGMA = 5.0  # paper, Sec. 2.1: Gaussian kernel with sigma = 5
TARGET_STRIDE = 4  # released data layer: targets are ab[:, :, ::4, ::4], not an average

# The released bins, as columns of the grid: for each a, the contiguous range of b.
# Source: the 313 bin centres published with the ECCV 2016 release (pts_in_hull.npy).
# No published rule reproduces them, and none of these does (sRGB gamut projected onto the
# ab plane over all L, sampled densely on the cube's faces and at every 8-bit colour):
#   nearest grid point of an in-gamut ab:        262 bins, all released, 51 missing
#   floor/ceil corners of the grid square:       309 bins, all released, 4 missing:
#                                                (40, 90), (100, -90), (100, -10), (100, 0)
#   within Euclidean / Chebyshev / convex-hull distance r of the gamut, or some L with
#   Lab->RGB out of [0, 1] by at most t: no r or t separates the released bins from the rest
#   (some released bins lie 14.9 from the gamut, some left out lie 11.7 from it).
# The floor/ceil rule comes closest; the table is therefore kept as published.
_BIN_COLUMNS = (  # (a, b_min, b_max)
    (-90, 50, 90), (-80, 20, 90), (-70, 0, 90), (-60, -20, 90), (-50, -30, 100),
    (-40, -40, 100), (-30, -50, 100), (-20, -50, 100), (-10, -60, 100), (0, -70, 100),
    (10, -80, 90), (20, -80, 90), (30, -90, 90), (40, -100, 90), (50, -100, 80),
    (60, -110, 80), (70, -110, 80), (80, -110, 70), (90, -110, 70), (100, -90, 0),
)  # fmt: skip

# Lookup table over the ab plane. Its extent covers every ab an sRGB image can produce
# (a in about [-87, 99], b in about [-108, 95]) with margin; ab outside it are searched by
# brute force, so the result is exact everywhere.
_CELL_AB = 2.0  # cell side: C ~ 16 candidates for k = 10, a table of 14,400 cells
_TABLE_LIMIT_AB = 120.0  # the table spans [-limit, limit) in a and b
_CELLS_PER_SIDE = round(2 * _TABLE_LIMIT_AB / _CELL_AB)
# Each cell's guarantee is built for the cell grown by this much, so a pixel that float
# rounding puts in a neighbouring cell, or a distance rounded in fp32, is still covered.
_CELL_MARGIN_AB = 1e-2
_SENTINEL = NUM_AB_BINS  # padding candidate: index Q, placed far from every bin
_SENTINEL_AB = 1e4
# Candidates are ranked by an int64 key: the fp32 squared distance's bits (monotone for
# non-negative floats) above the bin index, so one top-k gives nearest first and, on exact
# ties, the lower bin index first.
_INDEX_BITS = 9
assert _SENTINEL < 2**_INDEX_BITS


@functools.cache
def _ab_bins_cpu() -> torch.Tensor:
    pts = [(a, b) for a, lo, hi in _BIN_COLUMNS for b in range(lo, hi + 1, AB_GRID)]
    bins = torch.tensor(pts, dtype=torch.float32)
    assert bins.shape == (NUM_AB_BINS, 2)
    return bins


def ab_bins(device: torch.device | str | None = None) -> torch.Tensor:
    """The (313, 2) float32 bin centres (a, b), sorted by a then b."""
    return _ab_bins_cpu().to(device) if device is not None else _ab_bins_cpu().clone()


def _axis_distances(centres_Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per table row (or column) of cells, the min and max distance along one axis from the
    (grown) cell to each bin centre: (cells per side, Q) each, fp64."""
    lo = -_TABLE_LIMIT_AB + _CELL_AB * torch.arange(_CELLS_PER_SIDE, dtype=torch.float64)
    lo, hi = lo - _CELL_MARGIN_AB, lo + _CELL_AB + _CELL_MARGIN_AB
    to_lo = centres_Q[None, :] - lo[:, None]
    to_hi = centres_Q[None, :] - hi[:, None]
    near = torch.where(to_lo < 0, -to_lo, torch.clamp(to_hi, min=0.0))
    far = torch.maximum(to_lo.abs(), to_hi.abs())
    return near, far


@functools.lru_cache(maxsize=32)
def _candidate_table(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, C, 2) fp32 candidate centres and (X, C) int64 candidate indices, ascending.

    A bin can be among the k nearest of a point in a cell only if its distance to the cell
    is at most the k-th smallest distance from the cell's farthest corner to any bin: the k
    bins attaining those farthest distances are at least that close to every point in the
    cell. Ties at the k-th distance are inside the bound, so all of them are candidates.
    """
    bins_Q2 = _ab_bins_cpu().double()
    near_a, far_a = _axis_distances(bins_Q2[:, 0])
    near_b, far_b = _axis_distances(bins_Q2[:, 1])
    near2_XQ = (near_a[:, None, :] ** 2 + near_b[None, :, :] ** 2).reshape(-1, NUM_AB_BINS)
    far2_XQ = (far_a[:, None, :] ** 2 + far_b[None, :, :] ** 2).reshape(-1, NUM_AB_BINS)
    bound2_X = far2_XQ.kthvalue(k, dim=1).values
    is_candidate_XQ = near2_XQ <= bound2_X[:, None]
    width = int(is_candidate_XQ.sum(dim=1).max())
    # A stable sort of the "not a candidate" flags lists each cell's candidates first, in
    # ascending bin index (which the tie-breaking relies on).
    order_XQ = torch.sort((~is_candidate_XQ).to(torch.uint8), dim=1, stable=True).indices
    index_XC = order_XQ[:, :width]
    index_XC = torch.where(is_candidate_XQ.gather(1, index_XC), index_XC, _SENTINEL)
    padded_Q2 = torch.cat([_ab_bins_cpu(), torch.full((1, 2), _SENTINEL_AB)])
    return padded_Q2[index_XC].to(device), index_XC.to(device)


def candidate_width(k: int = SOFT_ENCODE_K) -> int:
    """C: how many candidate bins each lookup cell holds for this k (padding included)."""
    _check_k(k)
    return _candidate_table(k, torch.device("cpu"))[1].shape[1]


def _check_k(k: int) -> None:
    if not 1 <= k <= NUM_AB_BINS:
        raise ValueError(f"k must be in [1, {NUM_AB_BINS}], got {k}")


def _pixels(ab_N2HW: torch.Tensor) -> torch.Tensor:
    """(P, 2) fp32 ab values, pixel-major."""
    if ab_N2HW.ndim < 3 or ab_N2HW.shape[-3] != 2:
        raise ValueError(f"expected ab of shape (..., 2, H, W), got {tuple(ab_N2HW.shape)}")
    return ab_N2HW.movedim(-3, -1).reshape(-1, 2).float()


def _rank_keys(ab_P2: torch.Tensor, centres_PC2: torch.Tensor, index_PC: torch.Tensor, k: int):
    """Top-k keys (P, k), smallest first; see _INDEX_BITS for the key layout."""
    # Written out as (a - a_q)^2 + (b - b_q)^2 in fp32, the definition of the distance,
    # so that bins at exactly equal distance produce bitwise equal keys.
    da_PC = ab_P2[:, 0:1] - centres_PC2[..., 0]
    db_PC = ab_P2[:, 1:2] - centres_PC2[..., 1]
    dist2_PC = da_PC * da_PC + db_PC * db_PC
    key_PC = (dist2_PC.view(torch.int32).long() << _INDEX_BITS) | index_PC
    return key_PC.topk(k, dim=1, largest=False, sorted=True).values


def _nearest_keys(ab_P2: torch.Tensor, k: int) -> torch.Tensor:
    """(P, k) keys of each pixel's k nearest bins, exact for any ab."""
    centres_XC2, index_XC = _candidate_table(k, ab_P2.device)
    scaled_P2 = torch.floor((ab_P2 + _TABLE_LIMIT_AB) / _CELL_AB)
    inside_P = ((scaled_P2 >= 0) & (scaled_P2 < _CELLS_PER_SIDE)).all(dim=1)
    cell_P = scaled_P2.clamp(0, _CELLS_PER_SIDE - 1).long()
    cell_P = cell_P[:, 0] * _CELLS_PER_SIDE + cell_P[:, 1]
    keys_Pk = _rank_keys(ab_P2, centres_XC2[cell_P], index_XC[cell_P], k)
    outside_M = (~inside_P).nonzero().squeeze(1)
    if outside_M.numel():  # rare: ab beyond any sRGB colour; compare with every bin
        bins_Q2 = ab_bins(ab_P2.device)
        index_MQ = torch.arange(NUM_AB_BINS, device=ab_P2.device).expand(len(outside_M), -1)
        keys_Pk[outside_M] = _rank_keys(ab_P2[outside_M], bins_Q2[None], index_MQ, k)
    return keys_Pk


def _split_keys(keys_Pk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys -> (bin indices int64, squared distances fp32)."""
    index_Pk = keys_Pk & (2**_INDEX_BITS - 1)
    dist2_Pk = (keys_Pk >> _INDEX_BITS).int().view(torch.float32)
    return index_Pk, dist2_Pk


def _unflatten(values_PK: torch.Tensor, ab_N2HW: torch.Tensor) -> torch.Tensor:
    """(P, K) -> (..., K, H, W) following ab's leading dims."""
    shape = (*ab_N2HW.shape[:-3], *ab_N2HW.shape[-2:], values_PK.shape[1])
    return values_PK.reshape(shape).movedim(-1, -3).contiguous()


def nearest_bin(ab_N2HW: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin per pixel, int64 (N, H, W); ties go to the lower index."""
    index_P1, _ = _split_keys(_nearest_keys(_pixels(ab_N2HW), 1))
    return index_P1.reshape(*ab_N2HW.shape[:-3], *ab_N2HW.shape[-2:])


def soft_encode(
    ab_N2HW: torch.Tensor, *, k: int = SOFT_ENCODE_K, sigma: float = SOFT_ENCODE_SIGMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse soft encoding of ground-truth ab: the k nearest bins per pixel, nearest first
    (exact ties: lower bin index first), with Gaussian weights exp(-d^2 / 2 sigma^2)
    normalised to sum 1.

    Returns (bins_NkHW int64, weights_NkHW float32); `to_dense` gives the (N, Q, H, W) form.
    """
    _check_k(k)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    index_Pk, dist2_Pk = _split_keys(_nearest_keys(_pixels(ab_N2HW), k))
    # Relative to the nearest bin, so far-away ab (all exponents hugely negative) still
    # normalise: the nearest bin's term is exactly 1.
    weight_Pk = torch.exp((dist2_Pk[:, :1] - dist2_Pk) / (2.0 * sigma * sigma))
    weight_Pk = weight_Pk / weight_Pk.sum(dim=1, keepdim=True)
    return _unflatten(index_Pk, ab_N2HW), _unflatten(weight_Pk, ab_N2HW)


def to_dense(
    bins_NkHW: torch.Tensor, weights_NkHW: torch.Tensor, num_bins: int = NUM_AB_BINS
) -> torch.Tensor:
    """The (N, num_bins, H, W) distribution that a sparse soft encoding stands for."""
    if bins_NkHW.shape != weights_NkHW.shape or bins_NkHW.ndim < 3:
        raise ValueError(
            f"bins and weights must share a (..., k, H, W) shape, got "
            f"{tuple(bins_NkHW.shape)} and {tuple(weights_NkHW.shape)}"
        )
    shape = (*bins_NkHW.shape[:-3], num_bins, *bins_NkHW.shape[-2:])
    dense = torch.zeros(shape, dtype=weights_NkHW.dtype, device=weights_NkHW.device)
    return dense.scatter_add_(-3, bins_NkHW, weights_NkHW)


def subsample_targets(ab_N2HW: torch.Tensor, stride: int = TARGET_STRIDE) -> torch.Tensor:
    """Every stride-th pixel in H and W, starting at [0, 0], as the released data layer takes
    its targets (a pick, not an average): (N, 2, ceil(H / stride), ceil(W / stride))."""
    if ab_N2HW.ndim < 2:
        raise ValueError(f"expected (..., H, W), got shape {tuple(ab_N2HW.shape)}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    return ab_N2HW[..., ::stride, ::stride]
