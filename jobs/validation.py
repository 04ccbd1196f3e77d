"""Held-out measurements shared by training (every M steps), tuning and the smoke summary.

On centre crops of a prepared held-out dataset: the validation loss under lambda = 1
weights (no rebalancing, so comparable across runs with different lambdas; summed over
pixels, averaged over images, as the released loss; near-gray colour photos count, as in
`jobs.evaluate`: the released loss layer's gray mask weights only the gradient) and the
AuC of the annealed-mean colours against the ground truth at crop resolution, raw and
class-rebalanced (lambda = 0 weights of the ground truth's nearest bin), for the model and
for the gray baseline (ab = 0), of all the images' pixels pooled, as `jobs.evaluate`
reports it. Each rank measures its share of the images; sums are all-reduced when
torch.distributed is initialised.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from colorcore.color import rgb_to_lab
from colorcore.data import make_targets, random_crop_flip
from colorcore.decode import ANNEALED_MEAN_T, annealed_mean
from colorcore.loss import rebalanced_cross_entropy
from colorcore.metrics import ab_auc
from colorcore.quantize import nearest_bin
from jobs import storage
from jobs.dataset import SHARD_ROW_GROUP_ROWS
from jobs.images import BadImage, decode_3hw
from jobs.loader import DatasetIndex

log = logging.getLogger(__name__)
T = TypeVar("T")
HELD_OUT_SPREAD = 4  # validation images from 4x the row groups they would fill


def load_crops(
    dataset_url: str,
    *,
    num_images: int,
    crop_px: int,
    rank: int = 0,
    world_size: int = 1,
    s3: storage.S3Options | None = None,
) -> torch.Tensor:
    """uint8 centre crops (n, 3, crop, crop) of this rank's share of `num_images` colour
    images spread over the set (`held_out`), read as the training loader reads: the JPEGs
    of the row groups holding them, each in one ranged read (not whole shards); a rank's
    share is a stretch of them, so each rank reads its own row groups. An image that no
    longer decodes (its shard damaged since it was prepared) is left out, with a warning:
    the run goes on."""
    index = DatasetIndex.load(dataset_url, s3)
    pairs = held_out([(s, r) for s, rows in enumerate(index.rows) for r in rows], num_images)
    share = slice(rank * len(pairs) // world_size, (rank + 1) * len(pairs) // world_size)
    mine = np.asarray(pairs[share], dtype=np.int64).reshape(-1, 2)
    places = zip(*(a.tolist() for a in index.units.of_rows(mine)), strict=True)  # (unit, row)
    crops = []
    for u, group in itertools.groupby(places, key=lambda p: p[0]):
        s, g = int(index.units.shard[u]), int(index.units.group[u])
        files = index.read_jpegs(s, g, s3)
        for _, r in group:
            try:
                image_3HW = decode_3hw(files[r])
            except BadImage as error:
                where = f"{index.shard_urls[s]} row {r} of row group {g}"
                log.warning("validation: %s does not decode (%s): left out", where, error)
                continue
            crops.append(random_crop_flip(image_3HW, crop_px, None))
    if not crops:
        return torch.zeros(0, 3, crop_px, crop_px, dtype=torch.uint8)
    return torch.stack(crops)


def held_out(rows: Sequence[T], n: int) -> list[T]:
    """`n` of `rows` (the set's colour images in storage order) spread over all of it: the
    first rows of each of up to `HELD_OUT_SPREAD` times as many equal stretches as a row
    group's worth of rows would fill, so that they are read in about as many row groups. A
    prefix would be a few classes of a set stored class by class (ImageNet's val folders)."""
    if n >= len(rows) or n < 1:
        return list(rows[: max(n, 0)])
    stretches = min(n, HELD_OUT_SPREAD * math.ceil(n / SHARD_ROW_GROUP_ROWS))
    while math.ceil(n / stretches) * stretches > len(rows):  # stretches longer than taken
        stretches -= 1  # (1 always is: n < len(rows))
    take = math.ceil(n / stretches)
    bounds = np.linspace(0, len(rows), stretches + 1).astype(int)
    return [row for a in bounds[:-1] for row in rows[a : a + take]][:n]


@dataclass(frozen=True)
class ValidationResult:
    images: int
    loss: float
    """Per image, lambda = 1 weights."""
    auc_raw: float
    auc_rebalanced: float
    gray_auc_raw: float
    gray_auc_rebalanced: float

    @property
    def auc_mean(self) -> float:
        """Mean of the raw and rebalanced AuC: the search objective (the rebalanced AuC alone
        rewards lambda -> 0, the raw alone lambda -> 1)."""
        return (self.auc_raw + self.auc_rebalanced) / 2

    @classmethod
    def worst(cls) -> ValidationResult:
        """The figures of a model that no longer computes (its loss not finite), each the
        worst, as `validate` would give them, without running it; the gray baseline's are
        unknown (NaN)."""
        return cls(0, math.inf, 0.0, 0.0, math.nan, math.nan)

    def as_metrics(self, prefix: str = "val_") -> dict[str, float]:
        values = self.__dict__ | {"auc_mean": self.auc_mean}
        return {f"{prefix}{k}": float(v) for k, v in values.items()}


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    crops_N3HW: torch.Tensor,
    *,
    rebalance0_Q: torch.Tensor,
    k: int,
    sigma: float,
    T: float = ANNEALED_MEAN_T,
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
) -> ValidationResult:
    """Measure `model` on uint8 crops; `rebalance0_Q` are the lambda = 0 weights."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # images, loss, raw AuC (model, gray) summed over images (crops of one size: pooled is
    # their mean), rebalanced AuC (model, gray) summed weighted by the images' total pixel
    # weight, and that weight: pooled, each pixel counts by its weight
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    ones_Q = torch.ones_like(rebalance0_Q, device=device)
    rebalance0_Q = rebalance0_Q.to(device)
    for start in range(0, len(crops_N3HW), batch_size):
        rgb = crops_N3HW[start : start + batch_size].to(device)
        t = make_targets(rgb, k=k, sigma=sigma, in_table=True)  # no host sync on a GPU
        autocast = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            logits = model(t.l_N1HW)
        loss = rebalanced_cross_entropy(
            logits, t.bins_NkHW, t.weights_NkHW, ones_Q, nongray_N=None, reduction="none"
        ).sum((1, 2))
        # A diverged model's NaN loss counts as the worst, +inf: searches minimising the
        # loss stop such a trial (NaN compares false with every cut-off, so it would stay).
        loss = loss.nan_to_num(nan=math.inf)
        ab_true = rgb_to_lab(rgb.float() / 255)[:, 1:]
        ab_pred = F.interpolate(annealed_mean(logits, T), size=ab_true.shape[-2:], mode="bilinear")
        w_rebal = rebalance0_Q[nearest_bin(ab_true)]
        mass_N = w_rebal.double().sum((1, 2))
        gray = torch.zeros_like(ab_true)
        sums += torch.stack(
            [
                torch.tensor(float(len(rgb)), device=device, dtype=torch.float64),
                loss.double().sum(),
                ab_auc(ab_pred, ab_true)[0].double().sum(),
                (ab_auc(ab_pred, ab_true, pixel_weights=w_rebal)[0].double() * mass_N).sum(),
                ab_auc(gray, ab_true)[0].double().sum(),
                (ab_auc(gray, ab_true, pixel_weights=w_rebal)[0].double() * mass_N).sum(),
                mass_N.sum(),
            ]
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    images, loss, raw, rebalanced, gray_raw, gray_rebalanced, mass = sums.tolist()
    if not images:  # not one held-out image decoded: nothing measured, not a loss of 0
        return ValidationResult(0, *[math.nan] * 5)
    n, mass = images, max(mass, 1e-300)
    return ValidationResult(
        int(images), loss / n, raw / n, rebalanced / mass, gray_raw / n, gray_rebalanced / mass
    )


def format_summary(result: ValidationResult, precision: str = "fp32") -> str:
    return (
        f"held-out ({result.images} images, {precision}): rebalanced AuC model "
        f"{result.auc_rebalanced:.4f} vs gray {result.gray_auc_rebalanced:.4f}; raw AuC model "
        f"{result.auc_raw:.4f} vs gray {result.gray_auc_raw:.4f}; loss {result.loss:.1f} per image"
    )
