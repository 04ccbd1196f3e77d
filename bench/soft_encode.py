"""Soft-encoding speed on one CPU core: colorcore's table-driven soft_encode against the
released code's way (its NNEncode: scikit-learn's NearestNeighbors with a ball tree over the
313 bins, 10 neighbours, Gaussian weights normalised, written into a dense (P, 313) array),
with the ball tree's bare queries and a plain torch cdist + top-k over all 313 bins for
reference.

    python bench/soft_encode.py            (from the repository root; about 20 s)

Inputs: one training batch of targets, 40 random 176 x 176 crops of scikit-image's colour
photos converted to Lab, ab subsampled every 4th pixel to 44 x 44 (as training does).
Everything runs single-threaded (thread pools pinned to 1 before numpy, torch and sklearn
load); each figure is the median of several timed repeats after a warm-up.

Legend: N batch, 2 ab channels, H, W target size, P = N x H x W pixels, k neighbours.
"""

from __future__ import annotations

import argparse

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import numpy as np
import torch
from skimage import data
from sklearn.neighbors import BallTree, NearestNeighbors
from timing import median_ms

from colorcore import quantize
from colorcore.color import rgb_to_lab

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
CROP_PX = 176  # released training crop
BATCH = 40  # released training batch


def target_batch(seed: int = 0) -> torch.Tensor:
    """(N, 2, 44, 44) fp32 ab targets from random crops of real photos."""
    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)()[..., :3] for name in PHOTOS]
    crops = []
    for i in range(BATCH):
        photo = photos[i % len(photos)]
        y, x = (int(rng.integers(0, s - CROP_PX + 1)) for s in photo.shape[:2])
        crops.append(photo[y : y + CROP_PX, x : x + CROP_PX])
    rgb_N3HW = torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    return quantize.subsample_targets(rgb_to_lab(rgb_N3HW)[:, 1:]).contiguous()


def gaussian_weights(dist_Pk: np.ndarray, sigma: float) -> np.ndarray:
    weights_Pk = np.exp(-(dist_Pk**2) / (2 * sigma**2))
    return weights_Pk / weights_Pk.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per method")
    args = parser.parse_args()
    torch.set_num_threads(1)
    k, sigma = quantize.SOFT_ENCODE_K, quantize.SOFT_ENCODE_SIGMA

    ab_N2HW = target_batch()
    ab_P2_np = ab_N2HW.permute(0, 2, 3, 1).reshape(-1, 2).double().numpy()
    bins_Q2_np = quantize.ab_bins().double().numpy()
    ball_tree = BallTree(bins_Q2_np)
    neighbours = NearestNeighbors(n_neighbors=k, algorithm="ball_tree", n_jobs=1).fit(bins_Q2_np)
    bins_Q2 = quantize.ab_bins()

    def ours() -> tuple[torch.Tensor, torch.Tensor]:
        return quantize.soft_encode(ab_N2HW, k=k, sigma=sigma)

    def sklearn_ball_tree() -> np.ndarray:
        dist_Pk, _ = ball_tree.query(ab_P2_np, k=k)
        return gaussian_weights(dist_Pk, sigma)

    dense_PQ = np.zeros((len(ab_P2_np), len(bins_Q2_np)))  # the released encoder reuses it
    rows_P1 = np.arange(len(ab_P2_np))[:, None]

    def released_nnencode() -> np.ndarray:
        dist_Pk, bins_Pk = neighbours.kneighbors(ab_P2_np)
        dense_PQ[...] = 0
        dense_PQ[rows_P1, bins_Pk] = gaussian_weights(dist_Pk, sigma)
        return dense_PQ

    def sklearn_kneighbors() -> np.ndarray:
        dist_Pk, _ = neighbours.kneighbors(ab_P2_np)
        return gaussian_weights(dist_Pk, sigma)

    def torch_cdist_topk() -> torch.Tensor:
        ab_P2 = ab_N2HW.permute(0, 2, 3, 1).reshape(-1, 2)
        dist_Pk = torch.cdist(ab_P2, bins_Q2).topk(k, dim=1, largest=False).values
        return torch.softmax(-dist_Pk.square() / (2 * sigma**2), dim=1)

    # Sanity: the same weights (sorted, since tied bins may come in another order).
    _, weights_NkHW = ours()
    ours_Pk = weights_NkHW.permute(0, 2, 3, 1).reshape(-1, k).double().numpy()
    gap = np.abs(np.sort(ours_Pk, axis=1) - np.sort(sklearn_ball_tree(), axis=1)).max()

    n, _, h, w = ab_N2HW.shape
    print(f"batch {n} x 2 x {h} x {w} ab targets ({n * h * w} pixels), k = {k}, sigma = {sigma}")
    print(
        f"torch {torch.__version__}, 1 thread; lookup cells hold C = {quantize.candidate_width(k)}"
    )
    print(f"max |weight difference| soft_encode vs ball tree: {gap:.1e}")
    timings = {
        "colorcore soft_encode": median_ms(ours, args.repeats),
        "released NNEncode (kneighbors, dense 313)": median_ms(released_nnencode, args.repeats),
        "sklearn BallTree.query + weights": median_ms(sklearn_ball_tree, args.repeats),
        "sklearn NearestNeighbors(ball_tree) + weights": median_ms(
            sklearn_kneighbors, args.repeats
        ),
        "torch cdist + topk over 313 (reference)": median_ms(torch_cdist_topk, args.repeats),
    }
    ours_ms = timings["colorcore soft_encode"]
    print(f"{'method':46s} {'ms/batch':>9s} {'img/s':>7s} {'time / soft_encode':>19s}")
    for name, ms in timings.items():
        print(f"{name:46s} {ms:9.1f} {1e3 * n / ms:7.0f} {ms / ours_ms:18.1f}x")


if __name__ == "__main__":
    main()
