"""Quantisation of the ab plane into the paper's 313 in-gamut bins, and the soft encoding of
ground-truth ab values over them.

Legend: N batch (any number of leading dims is accepted), 2 ab channels at dim -3,
Q = 313 bins, k nearest bins kept by the soft encoding, H, W image size, L = H x W,
P pixels in general, b = n x l pixels of a block (n images, l pixels of each),
C candidate bins per lookup cell, X lookup cells, M pixels outside the lookup table.

Soft encoding looks each pixel's k nearest bins up in a precomputed table over the ab plane
instead of comparing it with all 313 bins: every table cell lists the few bins that can be
among the k nearest of any point in that cell, so a pixel costs C distances, not Q. The
result is exact: the same bins, in the same order, as ranking all 313 fp32 squared
distances with ties to the lower bin index.
"""

from __future__ import annotations

import functools
import math
import sys

import torch

from colorcore.color import compile_constant

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
# Restricting L only removes bins, and the released set already holds every bin of these
# rules over all L. The floor/ceil rule comes closest; the table is kept as published.
_BIN_COLUMNS = (  # (a, b_min, b_max)
    (-90, 50, 90), (-80, 20, 90), (-70, 0, 90), (-60, -20, 90), (-50, -30, 100),
    (-40, -40, 100), (-30, -50, 100), (-20, -50, 100), (-10, -60, 100), (0, -70, 100),
    (10, -80, 90), (20, -80, 90), (30, -90, 90), (40, -100, 90), (50, -100, 80),
    (60, -110, 80), (70, -110, 80), (80, -110, 70), (90, -110, 70), (100, -90, 0),
)  # fmt: skip

# Lookup table over the ab plane. Its extent covers every ab an sRGB image can produce
# (a in about [-87, 99], b in about [-108, 95]) with margin; ab outside it are searched by
# brute force, so the result is exact everywhere.
_CELL_AB = 2.0  # cell side: C = 16 candidates for k = 10 over 14,400 cells
_TABLE_LIMIT_AB = 120.0  # the table spans [-limit, limit) in a and b
_CELLS_PER_SIDE = round(2 * _TABLE_LIMIT_AB / _CELL_AB)
# Each cell's guarantee is built for the cell grown by this much, so a pixel that float
# rounding puts in a neighbouring cell, or a distance rounded in fp32, is still covered.
_CELL_MARGIN_AB = 1e-2
_SENTINEL = NUM_AB_BINS  # padding candidate: index Q, placed far from every bin
_SENTINEL_AB = 1e4
# Candidates are ranked by an int64 key: the bin index in the low 32 bits, the fp32 squared
# distance's bits (monotone for non-negative floats) in the high 32, so the smallest keys
# are the nearest bins and, on exact ties, the lower bin index comes first. The distance is
# written straight into the high halves, which sit second in memory on little-endian hosts.
_KEY_HIGH_HALF = 1 if sys.byteorder == "little" else 0
# On CPU, up to this many candidates a comparator network ranks them (elementwise min/max over
# whole rows of pixels, several times faster on CPU than a per-pixel top-k over a short row);
# wider sets (large k) use top-k. Accelerators sort each pixel's candidates (`_table_keys`).
_NETWORK_MAX_WIDTH = 32
_BRUTE_FORCE_CHUNK = 4096  # pixels outside the table compared with all Q bins at once
_CPU_BLOCK_PIXELS = 2**15  # pixels ranked at once on CPU (see _nearest_keys)


@functools.cache
def _ab_bins_cpu() -> torch.Tensor:
    pts = [(a, b) for a, lo, hi in _BIN_COLUMNS for b in range(lo, hi + 1, AB_GRID)]
    bins = torch.tensor(pts, dtype=torch.float32)
    assert bins.shape == (NUM_AB_BINS, 2)
    return bins


def ab_bins(device: torch.device | str | None = None) -> torch.Tensor:
    """The (313, 2) float32 bin centres (a, b), sorted by a then b: a copy of one's own without
    a device; with one, a copy kept there for every caller (read-only), so that decoding on
    an accelerator does not copy the bins over, and wait for the copy, at every call."""
    return _ab_bins_on(torch.device(device)) if device is not None else _ab_bins_cpu().clone()


@compile_constant
def _ab_bins_on(device: torch.device) -> torch.Tensor:
    return _ab_bins_cpu().to(device)


def _axis_distances(centres_Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per table row (or column) of cells, the least and greatest distance along one axis
    from the grown cell to each bin centre: two (cells per side, Q) fp64 tensors."""
    lo = -_TABLE_LIMIT_AB + _CELL_AB * torch.arange(_CELLS_PER_SIDE, dtype=torch.float64)
    lo, hi = lo - _CELL_MARGIN_AB, lo + _CELL_AB + _CELL_MARGIN_AB
    to_lo = centres_Q[None, :] - lo[:, None]
    to_hi = centres_Q[None, :] - hi[:, None]
    near = torch.where(to_lo < 0, -to_lo, torch.clamp(to_hi, min=0.0))
    far = torch.maximum(to_lo.abs(), to_hi.abs())
    return near, far


@functools.lru_cache(maxsize=32)
def _candidate_table(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, X, 2) fp32 candidate centres and (C, X) int64 candidate bin indices; each cell's
    candidates in ascending bin index, padded with the sentinel.

    A bin can be among the k nearest of a point in a cell only if its distance to the cell
    is at most the k-th smallest distance from the cell's farthest point to any bin: the k
    bins attaining those farthest distances are at least that close to every point in the
    cell. Bins tied at the k-th distance are within the bound, so all of them are candidates.
    """
    bins_Q2 = _ab_bins_cpu().double()
    near_a, far_a = _axis_distances(bins_Q2[:, 0])
    near_b, far_b = _axis_distances(bins_Q2[:, 1])
    near2_XQ = (near_a[:, None, :] ** 2 + near_b[None, :, :] ** 2).reshape(-1, NUM_AB_BINS)
    far2_XQ = (far_a[:, None, :] ** 2 + far_b[None, :, :] ** 2).reshape(-1, NUM_AB_BINS)
    bound2_X = far2_XQ.kthvalue(k, dim=1).values
    is_candidate_XQ = near2_XQ <= bound2_X[:, None]
    width = int(is_candidate_XQ.sum(dim=1).max())
    # The sentinel (index Q) sorts after every candidate. The order of candidates is free:
    # the ranking keys carry the bin index.
    index_XQ = torch.where(is_candidate_XQ, torch.arange(NUM_AB_BINS), _SENTINEL)
    index_XC = index_XQ.sort(dim=1).values[:, :width]
    padded_Q2 = torch.cat([_ab_bins_cpu(), torch.full((1, 2), _SENTINEL_AB)])
    index_CX = index_XC.T.contiguous()
    return padded_Q2[index_CX].to(device), index_CX.to(device)


@compile_constant
def _candidate_rows(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`_candidate_table` with a row per cell: (X, C, 2) centres and (X, C) bin indices."""
    centres_CX2, index_CX = _candidate_table(k, device)
    return centres_CX2.movedim(0, 1).contiguous(), index_CX.T.contiguous()


def candidate_width(k: int = SOFT_ENCODE_K) -> int:
    """C: how many candidate bins each lookup cell holds for this k (padding included)."""
    _check_k(k)
    return _candidate_table(k, torch.device("cpu"))[1].shape[0]


@functools.cache
def _selection_network(width: int, k: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Comparators (i, j, keep_min, keep_max) that leave the k smallest of `width` values,
    in order, on wires 0..k-1.

    Batcher's odd-even merge sort over the next power of two, less the comparators that
    touch wires past `width` (read as +inf, which a comparator never moves) and the outputs
    that no kept wire depends on.
    """
    n = 1 << (width - 1).bit_length()
    comparators = []
    p = 1
    while p < n:
        step = p
        while step >= 1:
            for j in range(step % p, n - step, 2 * step):
                for i in range(min(step, n - j - step)):
                    if (i + j) // (2 * p) == (i + j + step) // (2 * p):
                        comparators.append((i + j, i + j + step))
            step //= 2
        p *= 2
    needed, kept = set(range(k)), []
    for i, j in reversed(comparators):
        if j < width and (i in needed or j in needed):
            kept.append((i, j, i in needed, j in needed))
            needed |= {i, j}
    return tuple(reversed(kept))


def _smallest(key_CP: torch.Tensor, out_kP: torch.Tensor) -> torch.Tensor:
    """Writes each column's k smallest keys, ascending, into out_kP and returns it; out_kP
    is (k, P) or any (k, ...) view holding P values per row. Overwrites key_CP. CPU code:
    whole rows of pixels at a time."""
    width, k = key_CP.shape[0], out_kP.shape[0]
    if width > _NETWORK_MAX_WIDTH:
        smallest_kP = key_CP.topk(k, dim=0, largest=False, sorted=True).values
        return out_kP.copy_(smallest_kP.view(out_kP.shape))
    wires = list(key_CP.unbind(0))
    spare = torch.empty_like(wires[0])
    for i, j, keep_min, keep_max in _selection_network(width, k):
        lo, hi = wires[i], wires[j]
        if keep_min:
            torch.minimum(lo, hi, out=spare)
        if keep_max:
            torch.maximum(lo, hi, out=hi)
        if keep_min:
            wires[i], spare = spare, lo
    for wire, out_P in zip(wires, out_kP, strict=False):
        out_P.copy_(wire.view(out_P.shape))
    return out_kP


def _halves(key_KP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the keys' bin indices (int32) and squared distances (fp32)."""
    halves_KP2 = key_KP.view(torch.int32).unflatten(-1, (-1, 2))
    return halves_KP2[..., 1 - _KEY_HIGH_HALF], halves_KP2[..., _KEY_HIGH_HALF].view(torch.float32)


def _keys(ab_2P: torch.Tensor, centres_CP2: torch.Tensor, key_CP: torch.Tensor) -> torch.Tensor:
    """Completes key_CP, which holds the candidates' bin indices, with their squared
    distances to the pixels (see _KEY_HIGH_HALF). Overwrites centres_CP2."""
    # (a_q - a)^2 + (b_q - b)^2 in fp32, term by term as in the definition, so that bins at
    # exactly equal distance get bitwise equal squared distances.
    da2_CP = centres_CP2[..., 0].sub_(ab_2P[0]).square_()
    db2_CP = centres_CP2[..., 1].sub_(ab_2P[1]).square_()
    torch.add(da2_CP, db2_CP, out=_halves(key_CP)[1])
    return key_CP


def _cells(ab_2P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) int64 lookup cell of each pixel (clamped into the table) and (P,) bool: whether
    the pixel lies inside the table. NaN ab count as outside; their cell is any valid one."""
    scaled_2P = torch.floor((ab_2P + _TABLE_LIMIT_AB) / _CELL_AB)
    inside_P = ((scaled_2P >= 0) & (scaled_2P < _CELLS_PER_SIDE)).all(dim=0)
    cell_2P = scaled_2P.nan_to_num_(0.0).clamp_(0, _CELLS_PER_SIDE - 1).long()
    return cell_2P[0] * _CELLS_PER_SIDE + cell_2P[1], inside_P


def _table_keys(ab_2P: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, k) keys of each pixel's k nearest candidates of its cell, nearest first, and (P,)
    whether the pixel lies inside the table (where those are its k nearest bins of all).

    The accelerators' way: one gather of each pixel's row of candidates and one sort per
    pixel (the comparator network's hundred-odd small kernels would cost more in launches).
    Data-independent shapes throughout, so ``torch.compile(fullgraph=True)`` takes it whole.
    """
    centres_XC2, index_XC = _candidate_rows(k, ab_2P.device)
    cell_P, inside_P = _cells(ab_2P)
    centres_PC2 = centres_XC2[cell_P]
    # Squared distances as in _keys (same terms, same order); their bits above the index.
    da2_PC = (centres_PC2[..., 0] - ab_2P[0, :, None]).square()
    db2_PC = (centres_PC2[..., 1] - ab_2P[1, :, None]).square()
    dist2_bits_PC = (da2_PC + db2_PC).view(torch.int32).long()
    keys_PC = dist2_bits_PC.bitwise_left_shift(32).bitwise_or_(index_XC[cell_P])
    return keys_PC.sort(dim=1).values[:, :k], inside_P


def _brute_force_keys(ab_2M: torch.Tensor, k: int) -> torch.Tensor:
    """(k, M) keys of the k nearest of all Q bins: for the rare ab beyond every sRGB colour."""
    num_pixels = ab_2M.shape[1]
    centres_QM2 = ab_bins(ab_2M.device)[:, None, :].repeat(1, num_pixels, 1)
    index_QM = torch.arange(NUM_AB_BINS, device=ab_2M.device)[:, None].repeat(1, num_pixels)
    keys_QM = _keys(ab_2M, centres_QM2, index_QM)
    return keys_QM.topk(k, dim=0, largest=False, sorted=True).values


def _outside(inside_P: torch.Tensor):
    """Indices of the pixels outside the table, in chunks that bound the brute force's memory."""
    return (~inside_P).nonzero().squeeze(1).split(_BRUTE_FORCE_CHUNK)


def _gather_cells(table_CX: torch.Tensor, cell_P: torch.Tensor, out_CP: torch.Tensor):
    """out_CP = table_CX[:, cell_P], one row at a time: on CPU a 1-D gather from a small table
    is several times faster than one gather with a broadcast index."""
    for row_X, out_P in zip(table_CX, out_CP, strict=True):
        torch.index_select(row_X, 0, cell_P, out=out_P)
    return out_CP


def _blocks(num_images: int, length: int, block: int):
    """(images, pixels) slices that cover N images of L pixels in blocks of at most `block`
    pixels: whole images where they fit, else pieces of one image."""
    if length >= block:
        for n in range(num_images):
            for start in range(0, length, block):
                yield slice(n, n + 1), slice(start, start + block)
    else:
        per_block = block // length
        for n in range(0, num_images, per_block):
            yield slice(n, n + per_block), slice(None)


def _nearest_keys(ab_N2L: torch.Tensor, k: int, *, cpu_kernels: bool | None = None) -> torch.Tensor:
    """(N, k, L) keys of each pixel's k nearest bins, nearest first; exact for any ab.

    `cpu_kernels` picks the CPU way (row-wise gathers, comparator network) or the
    accelerators' (`_table_keys`); default: by the device. Both give the same keys."""
    (num_images, _, length) = ab_N2L.shape
    if num_images * length == 0:
        return ab_N2L.new_empty((num_images, k, length), dtype=torch.int64)
    if cpu_kernels is None:
        cpu_kernels = ab_N2L.device.type == "cpu"
    if not cpu_kernels:
        ab_2P = ab_N2L.movedim(1, 0).reshape(2, -1)
        keys_Pk, inside_P = _table_keys(ab_2P, k)
        for outside_M in _outside(inside_P):
            keys_Pk[outside_M] = _brute_force_keys(ab_2P[:, outside_M], k).T
        return keys_Pk.view(num_images, length, k).transpose(1, 2).contiguous()
    table = _candidate_table(k, ab_N2L.device)
    keys_NkL = ab_N2L.new_empty((num_images, k, length), dtype=torch.int64)
    # Blocks of pixels keep the comparator network's rows in cache (a 1M-pixel batch in one
    # piece runs 3x slower per pixel), and every block reuses one set of buffers (fresh
    # multi-MB buffers cost more in page faults than the work done in them).
    block = min(_CPU_BLOCK_PIXELS, num_images * length)
    centres_CB = ab_N2L.new_empty((table[1].shape[0], block), dtype=torch.int64)
    keys_CB = torch.empty_like(centres_CB)
    for images, pixels in _blocks(num_images, length, block):
        ab_2b = ab_N2L[images, :, pixels].movedim(1, 0).reshape(2, -1)
        b = ab_2b.shape[1]
        out_knl = keys_NkL[images, :, pixels].movedim(1, 0)
        _block_keys(ab_2b, table, centres_CB[:, :b], keys_CB[:, :b], out_knl)
    return keys_NkL


def _block_keys(
    ab_2b: torch.Tensor,
    table: tuple[torch.Tensor, torch.Tensor],
    centres_Cb: torch.Tensor,
    keys_Cb: torch.Tensor,
    out_knl: torch.Tensor,
) -> None:
    """Writes the keys of the k nearest bins of a block of b = n x l pixels into out_knl,
    using centres_Cb and keys_Cb (int64) as scratch space (CPU)."""
    centres_CX2, index_CX = table
    cell_b, inside_b = _cells(ab_2b)
    # Both centres of a candidate travel as one 8-byte item: half the gathers.
    _gather_cells(centres_CX2.view(torch.int64)[..., 0], cell_b, centres_Cb)
    _gather_cells(index_CX, cell_b, keys_Cb)
    keys_Cb = _keys(ab_2b, centres_Cb[..., None].view(torch.float32), keys_Cb)
    _smallest(keys_Cb, out_knl)
    for outside_M in _outside(inside_b):
        image_M, pixel_M = outside_M // out_knl.shape[2], outside_M % out_knl.shape[2]
        out_knl[:, image_M, pixel_M] = _brute_force_keys(ab_2b[:, outside_M], len(out_knl))


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= NUM_AB_BINS:
        raise ValueError(f"k must be an int in [1, {NUM_AB_BINS}], got {k!r}")


def _check_k_and_sigma(k: int, sigma: float) -> None:
    _check_k(k)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")


def _images(ab_N2HW: torch.Tensor) -> torch.Tensor:
    """(N, 2, L) fp32, all leading dims as N and H x W as L."""
    if ab_N2HW.ndim < 3 or ab_N2HW.shape[-3] != 2:
        raise ValueError(f"expected ab of shape (..., 2, H, W), got {tuple(ab_N2HW.shape)}")
    num_images, length = math.prod(ab_N2HW.shape[:-3]), math.prod(ab_N2HW.shape[-2:])
    return ab_N2HW.reshape(num_images, 2, length).float()


def _bin_indices(keys_NkL: torch.Tensor, ab_N2HW: torch.Tensor) -> torch.Tensor:
    """The keys' bin indices, in place, as int64 (..., k, H, W) following ab's shape."""
    shape = (*ab_N2HW.shape[:-3], keys_NkL.shape[1], *ab_N2HW.shape[-2:])
    return keys_NkL.bitwise_and_(2**32 - 1).view(shape)


def nearest_bin(ab_N2HW: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin per pixel, int64 (N, H, W); ties go to the lower index."""
    return _bin_indices(_nearest_keys(_images(ab_N2HW), 1), ab_N2HW).squeeze(-3)


def soft_encode(
    ab_N2HW: torch.Tensor, *, k: int = SOFT_ENCODE_K, sigma: float = SOFT_ENCODE_SIGMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse soft encoding of ground-truth ab (any real dtype; computed in fp32): the k
    nearest bins per pixel, nearest first (exact ties: lower bin index first), with Gaussian
    weights exp(-d^2 / 2 sigma^2) normalised to sum 1.

    Returns (bins_NkHW int64, weights_NkHW float32); `to_dense` gives the (N, Q, H, W) form.
    """
    _check_k_and_sigma(k, sigma)
    keys_NkL = _nearest_keys(_images(ab_N2HW), k)
    weight_NkL = _gaussian_weights(_halves(keys_NkL)[1], sigma)
    bins_NkHW = _bin_indices(keys_NkL, ab_N2HW)
    return bins_NkHW, weight_NkL.view(bins_NkHW.shape)


def soft_encode_in_table(
    ab_N2HW: torch.Tensor, *, k: int = SOFT_ENCODE_K, sigma: float = SOFT_ENCODE_SIGMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """`soft_encode` for ab inside the lookup table (|a|, |b| < 120: the ab of every sRGB
    colour, so of every training target), written as one traceable computation: no
    brute-force branch, hence no host sync on accelerators, and ``torch.compile(fullgraph=
    True)`` takes it whole (with Lab and the loss, the training step's targets become a few
    fused kernels). Same bins and weights as `soft_encode` (on GPUs, compiled code may round
    distances with fused multiply-adds, which can swap bins at exactly equal distance);
    pixels beyond the table get NaN weights rather than wrong bins.
    """
    _check_k_and_sigma(k, sigma)
    ab_N2L = _images(ab_N2HW)
    (num_images, _, length) = ab_N2L.shape
    keys_Pk, inside_P = _table_keys(ab_N2L.movedim(1, 0).reshape(2, -1), k)
    keys_NkL = keys_Pk.view(num_images, length, k).transpose(1, 2)
    dist2_NkL = keys_NkL.bitwise_right_shift(32).int().view(torch.float32)
    weight_NkL = _gaussian_weights(dist2_NkL, sigma)
    weight_NkL = weight_NkL.masked_fill(~inside_P.view(num_images, 1, length), float("nan"))
    bins_NkHW = _bin_indices(keys_NkL.contiguous(), ab_N2HW)
    return bins_NkHW, weight_NkL.reshape(bins_NkHW.shape)


def _gaussian_weights(dist2_NkL: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(-d^2 / 2 sigma^2) over the k nearest, normalised to sum 1, relative to the nearest
    bin so that ab far from every bin still normalise: its term is exactly 1 instead of
    underflowing to 0."""
    weight_NkL = (dist2_NkL[:, :1] - dist2_NkL).div_(2.0 * sigma * sigma).exp_()
    return weight_NkL.div_(weight_NkL.sum(dim=1, keepdim=True))


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
