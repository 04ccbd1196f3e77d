"""Measure a colorization model the way the paper does, in parallel with Ray Data.

``python -m jobs.evaluate --model URL DATA [--split LIST] [--prior URL] [--output URL]
[--classifier vgg16 --classifier-weights URL] [--protocol resized|full]``

DATA is a prepared dataset (`jobs.dataset`) or, with ``--split``, a folder of images such as
an ImageNet val folder (flat or in class folders). The split list has one ``<path> [<label>]``
per line (``ctest10k.txt``: 10k val images with their class index; a label is optional). A
listed file is found by its path below DATA or, failing that, by its file name, and keyed
by the path as listed; the number of listed files not found is reported before any work
starts. With a prepared dataset a split keeps the listed images (matched by file stem; where
images of several folders have it, by the line's folders too, and refused where that leaves
more than one), labelled by the split if it has labels.

Protocol, stated in every output:

- ``resized`` (default, the released test): every image resized to EVAL_PX x EVAL_PX (256,
  PIL bicubic); the network sees its L and the predicted ab (1/4 size) is upsampled
  bilinearly to EVAL_PX; the metrics are computed on these EVAL_PX x EVAL_PX ab planes.
- ``full``: the network still sees the EVAL_PX image; its ab is upsampled to the original
  size and joined with the original L; the metrics are computed at full resolution. For a
  prepared dataset that is the resolution it stores (short side 256, `jobs.prepare`), not the
  source's: evaluate an image folder with ``--split`` for the sources' own sizes.

Rows, all measured on the same images in the same run: ground truth, gray (ab = 0) and the
model decoded as annealed mean (T), mean and mode. Columns, each AuC of all the measured
pixels pooled (the share of predicted pixel colours within each threshold, as the paper
counts it; each image's own AuC averaged is in table.csv and results.json beside it): raw
AuC of the per-pixel ab error over thresholds 0..150; class-rebalanced AuC (each pixel
weighted by the lambda = 0 rebalancing weight of its ground truth's bin; prior from
``--prior``, default DATA/prior.npz, or a ``.npy`` of smoothed probabilities such as the
released ``prior_probs.npy``); PSNR of the sRGB image; with ``--classifier``, the top-1
accuracy of an image classifier on each row's images (semantic interpretability). Also the
model's loss per image as the released training reported it (lambda = 1, 10-NN soft targets,
summed over the output pixels of the EVAL_PX image). Grayscale sources are left out (as
ctest10k leaves them out); unreadable inputs are skipped and counted, never fatal.

Written to OUTPUT: ``table.md`` and ``table.csv`` (like the paper's Table 1),
``auc_curves.png``, ``best_worst.png`` (colorized images with the best and worst raw AuC),
and ``results.json`` with every figure, per image too, and every skipped input.

Legend: N images, M rows (METHODS), T = 151 thresholds, H, W image size, h, w network output.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import hashlib
import importlib
import io
import json
import math
import posixpath
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from colorcore import metrics
from colorcore.color import lab_to_rgb, rgb_to_lab
from colorcore.data import make_targets
from colorcore.decode import (
    ANNEALED_MEAN_T,
    INFER_PX,
    annealed_mean,
    mean,
    mode,
    temperature_problem,
)
from colorcore.int8 import Int8Plan
from colorcore.loss import rebalanced_cross_entropy
from colorcore.quantize import NUM_AB_BINS, nearest_bin
from jobs import evaluate_parts, storage
from jobs.config import choice_problems, cpus_problems, empty_problems, presets_of
from jobs.crashes import CrashGuard
from jobs.dataset import PRIOR_FILE, Manifest
from jobs.images import BadImage, load_rgb, out_of_memory
from jobs.plots import figure_png, pyplot
from jobs.storage import S3Options

if TYPE_CHECKING:
    from jobs.models import LoadedModel

METHODS = ("ground_truth", "gray", "annealed_mean", "mean", "mode")
PRIMARY = "annealed_mean"  # the paper's decoding: ranks the best/worst grid
NUM_THRESHOLDS = metrics.AUC_MAX_DIST + 1
THUMB_PX = 128
THUMB_ASPECT_MAX = 8  # a panorama's strip stays a few thousand pixels wide (JPEG: 65,500)
READ_THREADS = 8  # concurrent object-store reads per read task
FILE_READ_CPUS = 0.25  # a task reading a batch of files (mostly waiting on storage)
PARQUET_READ_CPUS = 1.0  # a prepared dataset's read task (Ray Data's read tasks' default)
NO_LABEL = -1
MISSING_FILE = "missing file"
UNREADABLE = "unreadable: "
FILE_TOO_LARGE = "file too large: "  # above --max-file-mb: measured again under a larger one
TOO_LARGE_HERE = "too large to measure at full resolution here"


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    data: str = ""
    """Prepared dataset, or an image folder with --split (local path or storage URL)."""
    model: str = ""
    """Model to measure: released ECCV16 weights, a checkpoint, a run folder or a
    model.safetensors export (--model URL)."""
    split: str | None = None
    """Split list, '<path> [<int label>]' per line (e.g. ctest10k.txt)."""
    prior: str | None = None
    """prior.npz of ab counts, or .npy of smoothed probabilities (default: DATA/prior.npz)."""
    output: str = "runs/evaluate"
    """Folder for the tables, plots and results.json (local path or storage URL)."""
    protocol: Literal["resized", "full"] = "resized"
    """resized: metrics on EVAL_PX x EVAL_PX images (released test); full: original size."""
    eval_px: int = INFER_PX
    """Side of the square image the network sees (and the resized protocol measures)."""
    temperature: float = ANNEALED_MEAN_T
    """T of the annealed-mean decoding."""
    classifier: str | None = None
    """Classifier for top-1 accuracy: vgg16, small_cnn or package.module:function."""
    classifier_weights: str | None = None
    """Weights of the classifier (vgg16: a torchvision state dict)."""
    max_images: int | None = None
    """Measure only the first this many inputs (all when unset)."""
    batch_size: int = 16
    """Images per evaluation batch."""
    num_actors: int = 1
    """Evaluation actors (one per GPU with use_gpu)."""
    cpus_per_actor: float = 0.5
    """CPUs reserved per actor (fractional on small machines, or reads starve)."""
    use_gpu: bool = False
    """One GPU per actor."""
    accelerator_type: str | None = None
    """GPU model the actors run on, as Ray names it (L40S, H100, ...; needs use_gpu): on a
    cluster of several GPU node types, nodes of that type only (default: any GPU)."""
    precision: Literal["auto", "bf16", "fp32", "int8"] = "auto"
    """Autocast dtype of the networks; auto = bf16 where the device has fast bf16; int8 (on
    CPUs): the colorization network's convs but the last in int8, as `jobs.colorize --dtype
    int8` runs them (`colorcore.int8`), to measure what int8 costs a model in AuC (the
    classifier then runs in bf16 where the CPU has it, as with auto)."""
    grid_images: int = 6
    """Best and worst images shown in best_worst.png (each)."""
    max_file_mb: float = 256.0
    """Files of a split folder larger than this are error rows, not read (as `jobs.prepare`
    refuses them): one would fill a read task's memory."""
    crash_tries: int = 3
    """Deaths of the actor measuring an input alone (a decoder's crash on a malformed file,
    or Ray's memory monitor killing it) after which the input is an error row; Ray would
    try it again for ever (`jobs.crashes`)."""
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        if not self.data or not self.model:
            problems.append("DATA and --model are required")
        if self.eval_px % 8 or self.eval_px < 16:
            problems.append(f"eval_px must be a multiple of 8 and >= 16, got {self.eval_px}")
        if problem := temperature_problem(self.temperature):
            problems.append(problem)
        if self.max_images is not None and self.max_images < 1:
            problems.append(f"max_images must be >= 1, got {self.max_images}")
        if min(self.batch_size, self.num_actors, self.grid_images, self.crash_tries) < 1:
            problems.append("batch_size, num_actors, grid_images and crash_tries must be >= 1")
        problems += cpus_problems(self, "cpus_per_actor") + empty_problems(self, "output")
        if not self.max_file_mb > 0:
            problems.append(f"max_file_mb must be > 0, got {self.max_file_mb}")
        if self.accelerator_type and not self.use_gpu:
            problems.append("accelerator_type names a GPU: it needs use_gpu")
        if self.precision == "int8" and self.use_gpu:
            problems.append("precision int8 runs on CPUs: it cannot go with use_gpu")
        if self.classifier_weights and not self.classifier:
            problems.append("classifier_weights given without --classifier")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def prior_url(self) -> str:
        return self.prior or storage.join(self.data, PRIOR_FILE)

    def protocol_text(self) -> str:
        px = f"{self.eval_px}x{self.eval_px}"
        where = (
            f"metrics on the {px} ab planes"
            if self.protocol == "resized"
            else "ab upsampled to the original size, metrics at full resolution"
        )
        return (
            f"images resized to {px} (PIL bicubic), the network sees their L; {where}; "
            f"AuC over ab error thresholds 0..{metrics.AUC_MAX_DIST} (trapezoids, normalised), "
            "of all measured pixels pooled (the share of predicted pixel colours within each "
            "threshold; per-image means reported beside it); rebalanced AuC weights pixels by "
            "the lambda = 0 weight of their ground-truth bin; annealed mean "
            f"T = {self.temperature:g}; PSNR and the classifier see sRGB clipped to [0, 1], "
            "as in the released code; grayscale sources left out"
        )


# ---------------------------------------------------------------- presets


def paper() -> EvaluateConfig:
    """Table 1 on one GPU: `--preset paper --model URL DATA --split ctest10k.txt
    --classifier-weights vgg16.pth`; ImageNet val at 256x256, VGG-16 top-1.

    About 10 minutes for 10k images on one H100. Expected for the released model (paper,
    Table 1): raw AuC 89.5%, rebalanced AuC 67.3% (annealed mean), VGG-16 top-1 56.0%
    against 68.3% on ground truth and 52.7% on gray. In fp32: the annealed mean divides the
    logits by T = 0.38, and bf16 logits would move the figures being compared.
    """
    return EvaluateConfig(
        data="s3://colorcore-data/imagenet/val-images",
        model="colorization_release_v2-9b330a0b.pth",
        split="ctest10k.txt",
        prior="prior_probs.npy",
        classifier="vgg16",
        use_gpu=True,
        precision="fp32",
        cpus_per_actor=8,
        batch_size=64,
    )


def released_val() -> EvaluateConfig:
    """The released model's validation loss: `--preset released_val --model URL DATA --split
    first10k.txt`, the first 10k ImageNet val images at 256x256, no classifier.

    Expected: a loss of about 7,715 per image (1.88 nats per output pixel), the figure the
    authors published for the released model.
    """
    return dataclasses.replace(paper(), split="first10k.txt", classifier=None)


PRESETS = presets_of(paper, released_val)


# ---------------------------------------------------------------- classifiers


@dataclass(frozen=True)
class Classifier:
    """An image classifier: ``module(preprocess(rgb))`` gives logits (N, classes) whose
    indices are the dataset's labels."""

    module: nn.Module
    preprocess: Callable[[torch.Tensor], torch.Tensor]
    """sRGB in [0, 1], (N, 3, H, W) -> the module's input."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG_RESIZE_PX = 256  # torchvision's VGG-16 evaluation: short side 256, centre crop 224
VGG_CROP_PX = 224


def imagenet_preprocess(rgb_N3HW: torch.Tensor) -> torch.Tensor:
    """Short side to 256 (bilinear, antialiased), centre crop 224, ImageNet normalisation."""
    h, w = rgb_N3HW.shape[-2:]
    scale = VGG_RESIZE_PX / min(h, w)
    size = (max(VGG_CROP_PX, round(h * scale)), max(VGG_CROP_PX, round(w * scale)))
    x = F.interpolate(rgb_N3HW.float(), size=size, mode="bilinear", antialias=True)
    top, left = (size[0] - VGG_CROP_PX) // 2, (size[1] - VGG_CROP_PX) // 2
    x = x[..., top : top + VGG_CROP_PX, left : left + VGG_CROP_PX]
    mean_ = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (x - mean_) / std


def _vgg16(weights: bytes | None) -> Classifier:
    if weights is None:
        raise ValueError("--classifier vgg16 needs --classifier-weights (a VGG-16 state dict)")
    import torchvision  # only where VGG-16 runs: it does not import beside every torch build

    module = torchvision.models.vgg16()
    module.load_state_dict(torch.load(io.BytesIO(weights), weights_only=True))
    return Classifier(module, imagenet_preprocess)


class SmallConvNet(nn.Module):
    """A small image classifier for small datasets and tests: three strided convs, global
    average pooling, a linear layer; it sees the image resized to INPUT_PX."""

    INPUT_PX = 64
    FORMAT = "colorcore-small-cnn-v1"

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.num_classes, self.width = num_classes, width
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    @staticmethod
    def preprocess(rgb_N3HW: torch.Tensor) -> torch.Tensor:
        size = (SmallConvNet.INPUT_PX, SmallConvNet.INPUT_PX)
        x = F.interpolate(rgb_N3HW.float(), size=size, mode="bilinear", antialias=True)
        return 2 * x - 1

    def forward(self, x_N3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_N3HW).mean((2, 3)))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        state = {"format": self.FORMAT, "num_classes": self.num_classes, "width": self.width}
        torch.save(state | {"state_dict": self.state_dict()}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SmallConvNet:
        obj = torch.load(io.BytesIO(data), weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != cls.FORMAT:
            raise ValueError(f"not a {cls.FORMAT} file")
        model = cls(int(obj["num_classes"]), width=int(obj["width"]))
        model.load_state_dict(obj["state_dict"])
        return model


def _small_cnn(weights: bytes | None) -> Classifier:
    if weights is None:
        raise ValueError("--classifier small_cnn needs --classifier-weights")
    return Classifier(SmallConvNet.from_bytes(weights), SmallConvNet.preprocess)


CLASSIFIERS: dict[str, Callable[[bytes | None], Classifier]] = {
    "vgg16": _vgg16,
    "small_cnn": _small_cnn,
}


def load_classifier(name: str, weights_url: str | None, s3: S3Options | None = None) -> Classifier:
    """A built-in classifier by name, or ``package.module:function`` called with the weights'
    bytes (or None) and returning a `Classifier`."""
    weights = storage.read_bytes(weights_url, s3) if weights_url else None
    return classifier_from(name, weights)


def classifier_from(name: str, weights: bytes | None) -> Classifier:
    """`load_classifier` of weights read already."""
    if name in CLASSIFIERS:
        return CLASSIFIERS[name](weights)
    module_name, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"classifier {name!r}: use {sorted(CLASSIFIERS)} or package.module:fn")
    try:
        build = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"classifier {name!r}: {type(e).__name__}: {e}") from None
    return build(weights)


# ---------------------------------------------------------------- measuring one batch


@dataclass(frozen=True)
class Scores:
    """Per image and row (METHODS order) figures of one group of same-size images."""

    auc_raw_NM: torch.Tensor
    auc_rebalanced_NM: torch.Tensor
    psnr_db_NM: torch.Tensor
    curve_raw_NMT: torch.Tensor
    curve_rebalanced_NMT: torch.Tensor
    mass_raw_N: torch.Tensor
    """Each image's pixels: its weight in the pooled raw AuC."""
    mass_rebalanced_N: torch.Tensor
    """The sum of each image's pixel weights: its weight in the pooled rebalanced AuC."""
    rgb_by_method: dict[str, torch.Tensor]
    """Each row's sRGB images (N, 3, H, W), for the classifier and the grid."""


def _row_colours(
    method: str, rgb: torch.Tensor, lab: torch.Tensor, ab_small: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ab, sRGB) of a row's images: ground truth, gray, or a decoding upsampled to H x W."""
    if method == "ground_truth":
        return lab[:, 1:], rgb
    if method == "gray":
        ab = torch.zeros_like(lab[:, 1:])
    else:
        ab = F.interpolate(ab_small[method], size=rgb.shape[-2:], mode="bilinear")
    # RGB clipped, as the released code's scikit-image lab2rgb makes it (not the colorize
    # job's chroma reduction): PSNR and the classifier see the released pipeline's images.
    return ab, lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1), gamut="clip")


@torch.no_grad()
def measure_images(
    rgb_N3HW: torch.Tensor, ab_small: Mapping[str, torch.Tensor], *, rebalance0_Q: torch.Tensor
) -> Scores:
    """AuC (raw, rebalanced) and PSNR of every row for sRGB images in [0, 1] of one size.

    ``ab_small`` holds each decoding's ab (N, 2, h, w), upsampled here bilinearly to H x W;
    ``rebalance0_Q`` are the lambda = 0 weights.
    """
    rgb = rgb_N3HW.float()
    lab = rgb_to_lab(rgb)
    ab_true = lab[:, 1:]
    weights_NHW = rebalance0_Q.to(rgb.device)[nearest_bin(ab_true)]
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("raw", "reb", "psnr", "c_raw", "c_reb")}
    images = {}
    for method in METHODS:
        ab, images[method] = _row_colours(method, rgb, lab, ab_small)
        err_NHW = metrics.ab_error(ab, ab_true)
        auc_raw, curve_raw = metrics.error_auc(err_NHW)
        auc_reb, curve_reb = metrics.error_auc(err_NHW, pixel_weights=weights_NHW)
        for key, value in zip(parts, (auc_raw, auc_reb, None, curve_raw, curve_reb), strict=True):
            parts[key].append(metrics.psnr(images[method], rgb) if key == "psnr" else value)
    stacked = {k: torch.stack(v, dim=1).cpu() for k, v in parts.items()}
    N, H, W = weights_NHW.shape
    mass_raw_N = torch.full((N,), float(H * W), dtype=torch.float64)
    mass_rebalanced_N = weights_NHW.double().sum((1, 2)).cpu()
    return Scores(
        stacked["raw"], stacked["reb"], stacked["psnr"], stacked["c_raw"], stacked["c_reb"],
        mass_raw_N, mass_rebalanced_N, images,
    )  # fmt: skip


@torch.no_grad()
def top1_correct(
    classifier: Classifier, rgb_by_method: Mapping[str, torch.Tensor], labels_N: torch.Tensor
) -> torch.Tensor:
    """int8 (N, M): 1 where the classifier's top-1 is the label, 0 where not, -1 unlabelled."""
    columns = []
    for method in METHODS:
        logits = classifier.module(classifier.preprocess(rgb_by_method[method]))
        columns.append((logits.argmax(1).cpu() == labels_N).to(torch.int8))
    correct_NM = torch.stack(columns, dim=1)
    correct_NM[labels_N < 0] = -1
    return correct_NM


def decode_for_eval(
    data: bytes, eval_px: int, *, full: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Source bytes -> (uint8 (3, eval, eval), uint8 (3, H, W) original if `full` else None,
    source is gray)."""
    from PIL import Image

    image, gray = load_rgb(data)
    small = image.resize((eval_px, eval_px), Image.Resampling.BICUBIC)
    as_tensor = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1)  # noqa: E731
    return as_tensor(small), as_tensor(image) if full else None, gray


@dataclass
class EvalContext:
    """What an evaluation actor holds: the networks on their device and the weights."""

    cfg: EvaluateConfig
    model: nn.Module
    device: torch.device
    autocast_dtype: torch.dtype | None
    rebalance0_Q: torch.Tensor
    classifier: Classifier | None = None

    @property
    def network_dtype(self) -> str:
        """What the network runs in: fp32, an autocast dtype (bf16) or int8."""
        if self.cfg.precision == "int8":
            return "int8"
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
        return names.get(self.autocast_dtype, str(self.autocast_dtype))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


@torch.no_grad()
def _network(ctx: EvalContext, small_N3HW: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """Each decoding's ab (N, 2, h, w) and the loss per image (lambda = 1, as released)."""
    targets = make_targets(small_N3HW.to(ctx.device))
    with ctx.autocast():
        logits = ctx.model(targets.l_N1HW).float()
    ones_Q = torch.ones(NUM_AB_BINS, device=ctx.device)
    loss_N = rebalanced_cross_entropy(
        logits,
        targets.bins_NkHW,
        targets.weights_NkHW,
        ones_Q,
        nongray_N=None,  # the released loss counts near-gray photos; the mask is training's
        reduction="none",
    ).sum((1, 2))
    ab_small = {
        "annealed_mean": annealed_mean(logits, ctx.cfg.temperature),
        "mean": mean(logits),
        "mode": mode(logits).float(),
    }
    return ab_small, loss_N.double().cpu()


def _measure_group(
    ctx: EvalContext,
    images: list[torch.Tensor],
    ab_small: dict[str, torch.Tensor],
    labels_N: torch.Tensor,
) -> tuple[Scores | None, torch.Tensor | None, Callable[[int], list[torch.Tensor]], dict]:
    """(`measure_images` of the images, the classifier's top-1 hits or None, image i's
    thumbnails for the grid, {image: why} of those that could not be measured): same-size
    images at once, or at full resolution one at a time, each image's full-size rows
    dropped once it is classified and its thumbnails are made (a batch of large scans would
    otherwise hold five float copies of each). At full resolution an image too large for
    the memory at hand is left out (and said why), not the end of the batch; the scores,
    hits and thumbnails are then those of the others, in order (None when none is left)."""
    if ctx.cfg.protocol == "resized":
        rgb = torch.stack(images).to(ctx.device).float() / 255
        scores = measure_images(rgb, ab_small, rebalance0_Q=ctx.rebalance0_Q)
        correct = None
        if ctx.classifier is not None:
            with ctx.autocast():
                correct = top1_correct(ctx.classifier, scores.rgb_by_method, labels_N)
        return scores, correct, lambda i: _thumbnails(scores.rgb_by_method, i), {}
    parts, hits, thumbnails, failed = [], [], [], {}
    for i, img in enumerate(images):
        try:
            one = measure_images(
                img[None].to(ctx.device).float() / 255,
                {k: v[i : i + 1] for k, v in ab_small.items()},
                rebalance0_Q=ctx.rebalance0_Q,
            )
            hit = None
            if ctx.classifier is not None:
                with ctx.autocast():
                    hit = top1_correct(ctx.classifier, one.rgb_by_method, labels_N[i : i + 1])
            tiles = _thumbnails(one.rgb_by_method, 0)
        except (RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            one = None  # its rows, before the next image's are made
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            h, w = img.shape[-2:]
            failed[i] = f"{w}x{h} {TOO_LARGE_HERE} ({e})"[:300]
            continue
        hits += [hit] if hit is not None else []
        thumbnails.append(tiles)
        parts.append(dataclasses.replace(one, rgb_by_method={}))
        del one  # its full-size rows, before the next image's are made
    if not parts:
        return None, None, thumbnails.__getitem__, failed
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    scores = Scores(
        cat("auc_raw_NM"),
        cat("auc_rebalanced_NM"),
        cat("psnr_db_NM"),
        cat("curve_raw_NMT"),
        cat("curve_rebalanced_NMT"),
        cat("mass_raw_N"),
        cat("mass_rebalanced_N"),
        {},
    )
    return scores, torch.cat(hits) if hits else None, thumbnails.__getitem__, failed


def _empty_columns(n: int) -> dict[str, np.ndarray]:
    M = len(METHODS)
    nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
    return {
        "status": np.full(n, "ok", dtype=object),
        "reason": np.full(n, "", dtype=object),
        "loss": nan(n),
        "auc_raw": nan(n, M),
        "auc_rebalanced": nan(n, M),
        "mass_raw": nan(n),
        "mass_rebalanced": nan(n),
        "psnr_db": nan(n, M),
        "correct": np.full((n, M), -1, dtype=np.int8),
        "curve_raw": np.full((n, M, NUM_THRESHOLDS), np.nan, dtype=np.float32),
        "curve_rebalanced": np.full((n, M, NUM_THRESHOLDS), np.nan, dtype=np.float32),
        "strip_jpeg": np.full(n, b"", dtype=object),
    }


def _decode_batch(
    batch: Mapping[str, np.ndarray], out: dict[str, np.ndarray], eval_px: int, keep_full: bool
):
    """Decode every input (at full size too if `keep_full`); failures and grayscale sources are
    marked in `out`."""
    ok, small, full = [], [], []
    reasons = batch.get("reason", [""] * len(batch["key"]))
    for i, (data, reason) in enumerate(zip(batch["jpeg"], reasons, strict=True)):
        try:
            if reason:
                raise BadImage(reason)
            s, f, gray = decode_for_eval(bytes(data), eval_px, full=keep_full)
        except BadImage as e:
            out["status"][i], out["reason"][i] = "error", str(e)
            continue
        except (RuntimeError, MemoryError) as e:  # as `_measure_group` tells them apart
            if not out_of_memory(e):
                raise
            out["status"][i] = "error"  # not the image's fault: a re-run measures it again
            out["reason"][i] = f"{TOO_LARGE_HERE} (decoding it ran out of memory)"
            continue
        if gray:
            out["status"][i], out["reason"][i] = "grayscale", "grayscale source"
            continue
        ok.append(i)
        small.append(s)
        full.append(f)
    return ok, small, full


def evaluate_batch(batch: Mapping[str, np.ndarray], ctx: EvalContext) -> dict[str, np.ndarray]:
    """Measure one batch of inputs (columns key, label, jpeg and optionally reason): one
    output row per input, with status ok, grayscale or error."""
    n = len(batch["key"])
    out = _empty_columns(n) | {"key": np.asarray(batch["key"], dtype=object)}
    out["label"] = np.asarray(batch["label"], dtype=np.int64)
    out["network_dtype"] = np.full(n, ctx.network_dtype, dtype=object)
    ok, small, full = _decode_batch(batch, out, ctx.cfg.eval_px, ctx.cfg.protocol == "full")
    if not ok:
        return out
    ab_small, loss_N = _network(ctx, torch.stack(small))
    images = small if ctx.cfg.protocol == "resized" else full
    labels = torch.from_numpy(out["label"][ok])
    scores, correct, thumbnails, failed = _measure_group(ctx, images, ab_small, labels)
    for j, reason in failed.items():
        out["status"][ok[j]], out["reason"][ok[j]] = "error", reason
    kept = [j for j in range(len(ok)) if j not in failed]
    ok, loss_N = [ok[j] for j in kept], loss_N[kept]
    if scores is None:
        return out
    out["loss"][ok] = loss_N.numpy()
    out["auc_raw"][ok] = scores.auc_raw_NM.numpy()
    out["auc_rebalanced"][ok] = scores.auc_rebalanced_NM.numpy()
    out["mass_raw"][ok] = scores.mass_raw_N.numpy()
    out["mass_rebalanced"][ok] = scores.mass_rebalanced_N.numpy()
    out["psnr_db"][ok] = scores.psnr_db_NM.numpy()
    out["curve_raw"][ok] = scores.curve_raw_NMT.numpy()
    out["curve_rebalanced"][ok] = scores.curve_rebalanced_NMT.numpy()
    if correct is not None:
        out["correct"][ok] = correct.numpy()
    for j in _extremes(scores.auc_raw_NM[:, METHODS.index(PRIMARY)], ctx.cfg.grid_images):
        out["strip_jpeg"][ok[j]] = _strip(thumbnails(j))
    return out


def _extremes(values_N: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest and k lowest values (the batch's grid candidates)."""
    # NaN last among the best, as _grid ranks it (argsort would put it first)
    order = torch.argsort(values_N.nan_to_num(nan=-math.inf), descending=True).tolist()
    return sorted(set(order[:k] + order[-k:]))


def _thumbnails(rgb_by_method: Mapping[str, torch.Tensor], i: int) -> list[torch.Tensor]:
    """Image i's gray input, colorized and ground truth, each THUMB_PX high (or, for an image
    wider than THUMB_ASPECT_MAX to 1, that many times as wide), on the CPU."""
    tiles = []
    for method in ("gray", PRIMARY, "ground_truth"):
        img = rgb_by_method[method][i]
        h, w = img.shape[-2:]
        scale = min(THUMB_PX / h, THUMB_ASPECT_MAX * THUMB_PX / w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        tile = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True)
        tiles.append(tile[0].cpu())
    return tiles


def _strip(tiles: list[torch.Tensor]) -> bytes:
    """JPEG of `_thumbnails` side by side."""
    from PIL import Image

    strip = torch.cat(tiles, dim=-1).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(strip.numpy()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def evaluator_arguments(
    cfg: EvaluateConfig, loaded: LoadedModel, rebalance0_Q: torch.Tensor
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `Evaluator` actors' constructor arguments, the model's entry in results.json) for
    `cfg` with its model loaded: the actors load the very file the driver did (a run
    folder's newest checkpoint is fixed now) and check its SHA-256; with precision int8 the
    driver calibrates once and hands them the plan."""
    model_info = {"given": cfg.model, "url": loaded.url, "kind": loaded.kind}
    model_info["sha256"] = loaded.sha256
    int8 = None
    if cfg.precision == "int8":
        from jobs.models import int8_model

        net, error = int8_model(loaded.model.eval(), cfg.temperature, "evaluate")
        int8, dtype = net.plan, net.plan.float_dtype
        model_info["int8"] = {
            "logits_dtype": {None: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype)),
            "calibration_ab_error": dataclasses.asdict(error),
        }
    kwargs = {
        "cfg": _config_dict(dataclasses.replace(cfg, model=loaded.url)),
        "rebalance0_Q": rebalance0_Q.tolist(),
        "int8": int8,
        "model_sha256": loaded.sha256,
    }
    return kwargs, model_info


class Evaluator:
    """The Ray Data actor: loads the model (and classifier) once, then measures batches,
    each kept in the output folder (`jobs.evaluate_parts`) as it is handed on; inputs that
    kill it are given up (`crash_guard`). With
    precision int8 it builds the network of `int8` (the driver's calibration,
    `evaluator_arguments`), or calibrates one itself; `model_sha256`, when given, is what
    the model file must hash to (the file the driver measured). On CPUs it has the process
    keep freed memory for its next batches (`jobs.runtime.keep_freed_memory`)."""

    def __init__(
        self,
        cfg: dict[str, Any],
        rebalance0_Q: list[float],
        int8: Int8Plan | None = None,
        model_sha256: str | None = None,
    ) -> None:
        from jobs.config import from_dict
        from jobs.models import int8_model, load_model
        from jobs.runtime import choose_precision, keep_freed_memory

        config = from_dict(EvaluateConfig, cfg)
        precision = choose_precision("cuda" if config.use_gpu else "cpu", config.precision)
        if precision.device.type == "cpu":
            keep_freed_memory()
        model = load_model(config.model, config.s3, model_sha256).model.eval()
        if precision.int8:
            model = (
                int8.build(model) if int8 else int8_model(model, config.temperature, "evaluate")[0]
            )
        model = model.to(precision.device)
        classifier = None
        if config.classifier:
            classifier = load_classifier(config.classifier, config.classifier_weights, config.s3)
            classifier.module.eval().to(precision.device)
        self.ctx = EvalContext(
            config,
            model,
            precision.device,
            precision.autocast_dtype,
            torch.tensor(rebalance0_Q, dtype=torch.float64),
            classifier,
        )
        self.guard = crash_guard(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.guard("measure", batch, self.measure)

    def measure(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = evaluate_batch(batch, self.ctx)
        kept = _rows_where(out, [_lasting(reason) for reason in out["reason"]])
        if len(kept["key"]):  # for `main`
            evaluate_parts.write_part(self.ctx.cfg.output, kept, self.ctx.cfg.s3)
        return out


def crash_guard(cfg: EvaluateConfig) -> CrashGuard:
    """The actors' guard against inputs that take their process down (`jobs.crashes`), its
    records beside the kept measurements."""
    folder = storage.join(evaluate_parts.folder(cfg.output), "crashes")
    return CrashGuard(folder, cfg.s3, cfg.crash_tries, doing="measured", key="key")


def _lasting(reason: str) -> bool:
    """Whether a row's outcome is its input's own, which a re-run would find again (kept
    for it, `jobs.evaluate_parts`): not a file missing or unreadable in storage now, nor
    one too large for this machine's memory or for --max-file-mb."""
    passing = (MISSING_FILE, UNREADABLE, FILE_TOO_LARGE)
    return not (reason.startswith(passing) or TOO_LARGE_HERE in reason)


# ---------------------------------------------------------------- inputs and split lists


def read_split(text: str, name: str = "split") -> list[tuple[str, int]]:
    """Lines '<path> [<int label>]' -> (path without a leading '/', label or -1). A path
    may hold spaces where a label follows it (as in `jobs.prepare`'s label files)."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.strip().rsplit(None, 1)  # the label last
        if not parts:
            continue
        if len(parts) == 2 and not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{name}:{number}: expected '<path> [<int label>]', got {line!r}")
        entries.append((parts[0].lstrip("/"), int(parts[1]) if len(parts) == 2 else NO_LABEL))
    if not entries:
        raise ValueError(f"{name} lists no images")
    return entries


def _stem(path: str, names: Container[str]) -> str:
    """A listed path's file name as a prepared dataset's key names it, among the key `names`:
    as it is where a key has it (`photo.2019`, listed without an extension), else without
    an image file's extension, any Pillow reads, as `jobs.prepare` drops it
    (`photo.2019.jpg` and `scan.jfif` are `photo.2019` and `scan`; `photo.2019`, not a key,
    stays as it is, and is missing)."""
    from PIL import Image

    name = path.rsplit("/", 1)[-1]
    stem, suffix = posixpath.splitext(name)
    return stem if name not in names and suffix.lower() in Image.registered_extensions() else name


def _key_name(key: str) -> str:
    """A prepared dataset's key's file name: its extension is gone already (`photo.2019`)."""
    return key.rsplit("/", 1)[-1]


def resolve_split(
    entries: Sequence[tuple[str, int]], root_url: str, file_urls: Sequence[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Match listed paths to files below `root_url`: by relative path, else by file name
    (`_closest`) among the files no line names by path; a file another line names by path
    only where this line is the end of its path (the same file, written shorter).

    Returns (inputs as {key, label, url}, listed paths not found); a path naming a file
    listed already (by its path or its name) is left out."""
    root = storage.split_url(root_url)[1].rstrip("/") + "/"
    by_path = {storage.split_url(u)[1][len(root) :]: u for u in file_urls}
    named = {path for path, _ in entries if path in by_path}
    by_name: dict[str, list[str]] = collections.defaultdict(list)  # files no line names
    named_by_name: dict[str, list[str]] = collections.defaultdict(list)
    for rel in sorted(by_path):
        (named_by_name if rel in named else by_name)[rel.rsplit("/", 1)[-1]].append(rel)
    found, missing, seen = [], {}, set()  # missing: a dict, ordered and without repeats
    for path, label in entries:
        parts = path.split("/")
        rel = path if path in by_path else _closest(path, parts, by_name[parts[-1]], root_url)
        if rel is None:  # a file another line names, this line written shorter: a repeat
            ends = [n for n in named_by_name[parts[-1]] if n.endswith("/" + path)]
            rel = _closest(path, parts, ends, root_url)
        if rel is None:
            missing[path] = None
        elif (url := by_path[rel]) not in seen:
            seen.add(url)
            found.append({"key": path, "label": label, "url": url})  # a.jpg and a.png apart
    return found, list(missing)


def _listed_keys(
    entries: Sequence[tuple[str, int]], keys: Sequence[str], data: str
) -> tuple[dict[str, int | None], list[str]]:
    """(dataset key -> the split's label, listed paths no key answers) for a split's lines
    over a prepared dataset's keys. A line names the key of its file name (`_stem`), the
    closest where several keys have that name (`_closest`). A key listed again keeps its
    first line's label; a split without labels keeps the dataset's (None)."""
    by_name: dict[str, list[str]] = {}
    for key in keys:
        by_name.setdefault(_key_name(key), []).append(key)
    labelled = any(label != NO_LABEL for _, label in entries)
    split_labels: dict[str, int | None] = {}
    missing: dict[str, None] = {}  # ordered, without repeats
    for path, label in entries:
        stem = _stem(path, by_name)
        key = _closest(path, [*path.split("/")[:-1], stem], by_name.get(stem, []), data)
        if key is None:
            missing[path] = None
        else:
            split_labels.setdefault(key, label if labelled else None)
    return split_labels, list(missing)


def _closest(line: str, parts: list[str], candidates: list[str], data: str) -> str | None:
    """Of `candidates` (paths of one file name), the one sharing the most folders with the
    split's `line` (its `parts`), counted from the file up; None without candidates. A line
    that leaves more than one is refused: which image it means is not known."""
    if len(candidates) > 1:
        shared = [_shared_tail(c.split("/"), parts) for c in candidates]
        candidates = [c for c, n in zip(candidates, shared, strict=True) if n == max(shared)]
        if len(candidates) > 1:
            raise ValueError(
                f"the split's line {line!r} names {len(candidates)} images of {data} "
                f"({', '.join(candidates[:3])}{', ...' if len(candidates) > 3 else ''}): give "
                "each line the folders that tell them apart"
            )
    return candidates[0] if candidates else None


def _shared_tail(a: list[str], b: list[str]) -> int:
    """How many last parts two paths have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


@dataclass(frozen=True)
class InputPlan:
    """What will be measured: file inputs, or dataset shards narrowed to the split's keys
    (`split_labels`: key -> the split's label, NO_LABEL for a line without one; None for
    every key of a split without labels, whose images keep the dataset's)."""

    files: list[dict[str, Any]] | None
    shard_paths: list[str]
    split_labels: dict[str, int | None] | None
    listed: int
    """Images listed (a split's lines naming one image more than once count once)."""
    missing: list[str]
    repeated: int = 0
    """A split's lines naming an image an earlier line names (measured once)."""


def _dataset_keys(cfg: EvaluateConfig, shard_paths: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    fs, _ = storage.arrow_filesystem(cfg.data, cfg.s3)
    return [
        key
        for p in shard_paths
        for key in pq.read_table(p, filesystem=fs, columns=["key"]).column("key").to_pylist()
    ]


def plan_inputs(cfg: EvaluateConfig) -> InputPlan:
    """Find the inputs; a split's files that are not there are counted here, before work."""
    entries = None
    if cfg.split:
        entries = read_split(storage.read_bytes(cfg.split, cfg.s3).decode(), cfg.split)
    if storage.exists(storage.join(cfg.data, "manifest.json"), cfg.s3):
        manifest = Manifest.load(cfg.data, cfg.s3)
        manifest.require_images(cfg.data)
        _, root = storage.arrow_filesystem(cfg.data, cfg.s3)
        paths = [f"{root}/{s.name}" for s in manifest.shards]
        if entries is None:
            return InputPlan(None, paths, None, manifest.num_rows, [])
        split_labels, missing = _listed_keys(entries, _dataset_keys(cfg, paths), cfg.data)
        _refuse_none_found(cfg, split_labels, missing)
        listed = len(split_labels) + len(missing)
        return InputPlan(None, paths, split_labels, listed, missing, len(entries) - listed)
    if entries is None:
        raise ValueError(f"{cfg.data} is not a prepared dataset (no manifest.json): pass --split")
    # Every file: a line names what to measure, and one that is no image is an error row
    sizes = storage.sized_files(cfg.data, cfg.s3)
    found, missing = resolve_split(entries, cfg.data, sorted(sizes))
    _refuse_none_found(cfg, found, missing)
    for entry in found:
        entry["size"] = sizes[entry["url"]]
    listed = len(found) + len(missing)
    return InputPlan(found, [], None, listed, missing, len(entries) - listed)


def _refuse_none_found(cfg: EvaluateConfig, found: Sized, missing: list[str]) -> None:
    """A split none of whose lines is found in DATA names another dataset (ctest10k over the
    train folder, say): refused before any work, not measured as nothing but missing rows."""
    if missing and not found:
        raise ValueError(
            f"none of the {len(missing)} images --split {cfg.split} lists is in {cfg.data} "
            f"(such as {missing[0]!r}): is DATA the dataset the split is of?"
        )


def _read_files(
    batch: dict[str, np.ndarray], s3: S3Options, max_bytes: float
) -> dict[str, np.ndarray]:
    """Read the batch's files concurrently; a failed read, or a file above `max_bytes` (not
    read), becomes the row's reason."""

    def read(url: str, size: int) -> tuple[bytes, str]:
        if size > max_bytes:
            return b"", f"{FILE_TOO_LARGE}{size} bytes (--max-file-mb)"
        try:
            return storage.read_bytes(url, s3), ""
        except FileNotFoundError:
            return b"", MISSING_FILE
        except OSError as e:
            return b"", f"{UNREADABLE}{e}"

    with ThreadPoolExecutor(READ_THREADS) as pool:
        results = list(pool.map(read, batch["url"], batch["size"]))
    return {
        "key": batch["key"],
        "label": batch["label"],
        "jpeg": np.array([r[0] for r in results], dtype=object),
        "reason": np.array([r[1] for r in results], dtype=object),
    }


def _keep_listed(
    batch: dict[str, np.ndarray], split_labels: dict[str, int | None]
) -> dict[str, np.ndarray]:
    """The rows of listed keys, labelled as the split labels them: a dataset's labels index
    its own class list, which need not be the classifier's. A split without labels (None)
    keeps the dataset's."""
    keys = list(batch["key"])
    out = _rows_where(batch, [key in split_labels for key in keys])
    labels = [split_labels[k] for k in keys if k in split_labels]
    out["label"] = np.array(
        [own if label is None else label for label, own in zip(labels, out["label"], strict=True)],
        dtype=np.int64,
    )
    return out


def input_dataset(cfg: EvaluateConfig, plan: InputPlan, measured: frozenset[str] = frozenset()):
    """The Ray dataset of inputs: columns key, label, jpeg (and reason for files), without
    those of the keys `measured` already; None when no input is left."""
    import ray

    if plan.files is not None:
        files = [f for f in plan.files[: cfg.max_images] if f["key"] not in measured]
        if not files:
            return None
        blocks = max(1, min(len(files), math.ceil(len(files) / cfg.batch_size)))
        ds = ray.data.from_items(files, override_num_blocks=blocks)
        return ds.map_batches(
            _read_files,
            fn_kwargs={"s3": cfg.s3, "max_bytes": cfg.max_file_mb * 2**20},
            batch_format="numpy",
            num_cpus=FILE_READ_CPUS,
        )
    fs, _ = storage.arrow_filesystem(cfg.data, cfg.s3)
    ds = ray.data.read_parquet(plan.shard_paths, filesystem=fs, partitioning=None).select_columns(
        ["key", "label", "jpeg"]
    )
    if plan.split_labels is not None:
        ds = ds.map_batches(
            _keep_listed,
            fn_kwargs={"split_labels": plan.split_labels},
            batch_format="numpy",
            num_cpus=0.25,
        )
    if cfg.max_images:
        # The first images in shard order, the same on every run: without preserved order,
        # the limit would take whichever blocks arrive first. (The dataset's own copy of the
        # context: the stages built on it share it; other datasets of the process keep theirs.)
        ds = ds.limit(cfg.max_images)
        ds.context.execution_options.preserve_order = True
    if measured:
        ds = ds.map_batches(
            _unmeasured, fn_kwargs={"measured": measured}, batch_format="numpy", num_cpus=0.25
        )
    return ds


def _unmeasured(batch: dict[str, np.ndarray], measured: frozenset[str]) -> dict[str, np.ndarray]:
    return _rows_where(batch, [key not in measured for key in batch["key"]])


def _rows_where(batch: Mapping[str, np.ndarray], keep: Sequence[bool]) -> dict[str, np.ndarray]:
    """The batch's rows whose `keep` is true (one a row)."""
    mask = np.asarray(keep, dtype=bool)
    return {name: column[mask] for name, column in batch.items()}


# ---------------------------------------------------------------- the prior


def load_rebalance0(url: str, s3: S3Options | None = None) -> torch.Tensor:
    """lambda = 0 weights from a prior.npz of counts or a .npy of smoothed probabilities, in
    float64: the prior of a narrow set (a dataset's own) gives colours far from all of its
    weights beyond float32's range, and one such pixel would make its image's rebalanced AuC
    inf / inf, which the pooled figure would then leave out without a word."""
    from colorcore.prior import AbHistogram, rebalance_weights

    if not storage.exists(url, s3):
        raise ValueError(
            f"no prior at {url}: pass --prior (a prepared dataset's prior.npz, made by "
            "`python -m jobs.prior DATASET`, or the released prior_probs.npy)"
        )
    data = io.BytesIO(storage.read_bytes(url, s3))
    if url.endswith(".npy"):
        smoothed_Q = np.load(data, allow_pickle=False).astype(np.float64)
        smoothed_Q = smoothed_Q / smoothed_Q.sum()
    else:
        smoothed_Q = AbHistogram.load(data).smoothed_probabilities()
    try:
        weights_Q = rebalance_weights(smoothed_Q, lam=0.0)
    except ValueError as error:
        raise ValueError(f"the prior at {url}: {error}") from None
    if not bool(weights_Q.isfinite().all()):
        raise ValueError(f"the prior at {url} has bins too small for finite weights at lambda 0")
    return weights_Q


# ---------------------------------------------------------------- the set's figures


def _finite_mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def _mean_psnr(values: np.ndarray) -> float | None:
    """Mean PSNR without the images reproduced exactly (+inf dB); +inf where all were."""
    values = values[~np.isnan(values)]
    if len(finite := values[np.isfinite(values)]):
        return float(finite.mean())
    return math.inf if len(values) else None


def _weighing(mass_N: np.ndarray) -> np.ndarray:
    """The images that count in a pooled AuC and curve: those of some finite pixel weight."""
    return (mass_N > 0) & np.isfinite(mass_N)


def _pooled(auc_N: np.ndarray, mass_N: np.ndarray) -> float | None:
    """The AuC of all the images' pixels pooled: each image's AuC weighted by its pixels'
    total weight (an AuC is linear in its curve, and a curve is a weighted share)."""
    keep = ~np.isnan(auc_N) & _weighing(mass_N)
    return float(np.average(auc_N[keep], weights=mass_N[keep])) if keep.any() else None


def summarise(rows: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """The table: one entry per row of METHODS, over the measured images: AuC of their
    pixels pooled (and the mean of the images' own), mean PSNR, top-1."""
    ok = rows["status"] == "ok"
    table = []
    for m, method in enumerate(METHODS):
        correct = rows["correct"][ok, m]
        labelled = correct[correct >= 0]
        table.append(
            {
                "method": method,
                "auc_raw": _pooled(rows["auc_raw"][ok, m], rows["mass_raw"][ok]),
                "auc_rebalanced": _pooled(
                    rows["auc_rebalanced"][ok, m], rows["mass_rebalanced"][ok]
                ),
                "auc_raw_per_image": _finite_mean(rows["auc_raw"][ok, m]),
                "auc_rebalanced_per_image": _finite_mean(rows["auc_rebalanced"][ok, m]),
                "psnr_db": _mean_psnr(rows["psnr_db"][ok, m]),
                "top1": float(labelled.mean()) if len(labelled) else None,
                "top1_images": len(labelled),
            }
        )
    return table


def method_title(method: str, temperature: float) -> str:
    return {
        "ground_truth": "Ground truth",
        "gray": "Gray (ab = 0)",
        "annealed_mean": f"Model, annealed mean (T = {temperature:g})",
        "mean": "Model, mean (T = 1)",
        "mode": "Model, mode",
    }[method]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def table_markdown(result: Mapping[str, Any]) -> str:
    counts = result["counts"]
    lines = [
        f"# Evaluation of `{result['model']['url']}`",
        "",
        f"Data: `{result['data']}`"
        + (f", split `{result['split']}`" if result["split"] else "")
        + f"; {counts['measured']} images measured ({counts['grayscale']} grayscale left out, "
        f"{counts['errors']} skipped, unreadable or too large here (`results.json` says "
        f"why), {counts['missing']} listed but missing).",
        "",
        f"Protocol: {result['protocol']}.",
        "",
        *_int8_lines(result["model"].get("int8")),
        "| Method | AuC raw (%) | AuC rebalanced (%) | Top-1 (%) | PSNR (dB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["table"]:
        lines.append(
            f"| {method_title(row['method'], result['temperature'])} | {_pct(row['auc_raw'])} "
            f"| {_pct(row['auc_rebalanced'])} | {_pct(row['top1'])} | {_db(row['psnr_db'])} |"
        )
    loss = result["loss_per_image"]
    lines += ["", f"Model loss per image (lambda = 1, as released): {loss:,.1f}" if loss else ""]
    return "\n".join(lines).rstrip() + "\n"


def _int8_lines(int8: Mapping[str, Any] | None) -> list[str]:
    if not int8:
        return []
    error = int8["calibration_ab_error"]
    return [
        f"Int8 network (`--precision int8`, logits conv in {int8['logits_dtype']}): on the "
        f"calibration photos it moves the colours by {error['mean']:.2f} ab units on average "
        f"(99th percentile {error['p99']:.2f}).",
        "",
    ]


def table_csv(result: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = (
        "auc_raw", "auc_rebalanced", "top1", "psnr_db", "top1_images",
        "auc_raw_per_image", "auc_rebalanced_per_image",
    )  # fmt: skip
    writer.writerow(["method", *columns])
    for row in result["table"]:
        writer.writerow([row["method"], *("" if row[k] is None else row[k] for k in columns)])
    return buffer.getvalue()


def plot_curves(result: Mapping[str, Any]) -> bytes:
    """Fraction of pixels within each ab error threshold, raw and rebalanced, every row."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    thresholds = np.arange(NUM_THRESHOLDS)
    for ax, kind in zip(axes, ("raw", "rebalanced"), strict=True):
        for row in result["table"]:
            curve = result["curves"][kind][row["method"]]
            if curve is None:
                continue
            title = method_title(row["method"], result["temperature"])
            ax.plot(thresholds, curve, label=f"{title}: {_pct(row['auc_' + kind])}%")
        ax.set(xlabel="ab error threshold", ylabel="fraction of pixels", ylim=(0, 1.01))
        ax.set_title(f"{kind} AuC", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    return figure_png(fig)


def plot_best_worst(best: Sequence[tuple[str, float, bytes]], worst) -> bytes:
    """Two columns of (gray input | colorized | ground truth) strips: best and worst."""
    plt = pyplot()
    from PIL import Image

    n = max(len(best), len(worst), 1)
    fig, axes = plt.subplots(n, 2, figsize=(9, 1.6 * n), dpi=110, squeeze=False)
    for col, (items, title) in enumerate(((best, "best"), (worst, "worst"))):
        for row in range(n):
            ax = axes[row][col]
            ax.axis("off")
            if row < len(items):
                key, auc, jpeg = items[row]
                ax.imshow(np.asarray(Image.open(io.BytesIO(jpeg))))
                ax.set_title(f"{key}  AuC {100 * auc:.1f}%", fontsize=7)
        axes[0][col].text(0, -0.35, f"{title} (gray | colorized | truth)",
                          transform=axes[0][col].transAxes, fontsize=9)  # fmt: skip
    return figure_png(fig)


# ---------------------------------------------------------------- the job


CURVES = ("curve_raw", "curve_rebalanced")


def _mass(curve: str) -> str:
    """The column of the images' weights in a curve column's pooled sum."""
    return curve.replace("curve_", "mass_")


def collect(
    batches: Iterable[dict[str, np.ndarray]], grid_images: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(every output row's columns but the curves, sorted by key (Ray Data does not keep
    input order); each curve column summed over the measured rows, each row weighted by its
    mass, and the masses summed). What the driver holds stays small however many images:
    the curves (12 KB an image) are summed batch by batch, and only the strips that may
    still make the best / worst grid are kept."""
    kept: list[dict[str, np.ndarray]] = []
    grid: list[tuple[float, str, int, int]] = []  # strips kept: (AuC, key, batch, row)
    sums = {c: np.zeros((len(METHODS), NUM_THRESHOLDS)) for c in CURVES}
    sums |= {_mass(c): np.zeros(()) for c in CURVES}
    p = METHODS.index(PRIMARY)
    for batch in batches:
        ok = batch["status"] == "ok"
        for c in CURVES:  # pooled, as the AuC: each image's curve weighted by its mass
            mass = batch[_mass(c)]
            keep = ok & _weighing(mass)
            sums[c] += np.einsum("nmt,n->mt", batch[c][keep].astype(np.float64), mass[keep])
            sums[_mass(c)] += mass[keep].sum()
        # Copies: Ray's arrays are views that would keep each whole block (curves and strips
        # too) in memory; the strips are emptied below where the grid cannot show them.
        kept.append({k: np.array(v) for k, v in batch.items() if k not in CURVES})
        strips = ok & np.array([len(x) > 0 for x in batch["strip_jpeg"]], bool)
        grid += [
            (float(batch["auc_raw"][i, p]), str(batch["key"][i]), len(kept) - 1, int(i))
            for i in np.flatnonzero(strips)
        ]
        grid = _within_the_grid(grid, kept, grid_images)
    if not kept:
        rows = _empty_columns(0) | {"key": np.array([], dtype=object), "label": np.array([])}
        return {k: v for k, v in rows.items() if k not in CURVES}, sums
    rows = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
    order = np.argsort(rows["key"].astype(str), kind="stable")
    return {k: v[order] for k, v in rows.items()}, sums


def _within_the_grid(
    grid: list[tuple[float, str, int, int]], batches: list[dict[str, np.ndarray]], k: int
) -> list[tuple[float, str, int, int]]:
    """The k best and k worst of `grid` by the primary AuC, in `_grid`'s order (ties by
    key); the strips of the others are emptied in `batches`: they can no longer make it."""
    if len(grid) <= 2 * k:
        return grid
    # _grid's order: by AuC, highest first, a NaN after every number, ties by key; its worst
    # are that order reversed.
    ranked = sorted(grid, key=lambda c: (math.isnan(c[0]), -c[0] if c[0] == c[0] else 0, c[1]))
    keep = set(ranked[:k] + ranked[::-1][:k])
    for _, _, j, i in set(grid) - keep:
        batches[j]["strip_jpeg"][i] = b""
    return list(keep)


def build_result(
    cfg: EvaluateConfig,
    plan: InputPlan,
    rows: Mapping[str, np.ndarray],
    curve_sums: Mapping[str, np.ndarray],
    model_info: dict,
) -> dict[str, Any]:
    ok = rows["status"] == "ok"
    table = summarise(rows)
    curves = {
        kind: {
            m: (
                (curve_sums[f"curve_{kind}"][i] / mass).tolist()
                if (mass := float(curve_sums[f"mass_{kind}"])) > 0
                else None
            )
            for i, m in enumerate(METHODS)
        }
        for kind in ("raw", "rebalanced")
    }
    per_image = [
        {"key": str(rows["key"][i]), "label": int(rows["label"][i]), "loss": rows["loss"][i]}
        | {
            f"{m}_{col}": rows[col][i, j]
            for j, m in enumerate(METHODS)
            for col in ("auc_raw", "auc_rebalanced", "psnr_db", "correct")
        }
        | {"mass_raw": rows["mass_raw"][i], "mass_rebalanced": rows["mass_rebalanced"][i]}
        for i in np.flatnonzero(ok)
    ]
    skipped = [
        {"key": str(rows["key"][i]), "reason": str(rows["reason"][i])}
        for i in np.flatnonzero(rows["status"] == "error")
    ]
    counts = {
        "listed": plan.listed,
        "missing": len(plan.missing),
        "inputs": len(rows["key"]),
        "measured": int(ok.sum()),
        "grayscale": int((rows["status"] == "grayscale").sum()),
        "errors": len(skipped),
    }
    return {
        # what the actors ran, where "auto" chose it (bf16 moves the figures compared)
        "protocol": cfg.protocol_text()
        + (f"; the network in {', '.join(dtypes)}" if (dtypes := _network_dtypes(rows)) else ""),
        "network_dtype": dtypes,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "s3"},
        "temperature": cfg.temperature,
        "model": model_info,
        "data": cfg.data,
        "split": cfg.split,
        "prior": cfg.prior_url,
        "counts": counts,
        "table": table,
        "loss_per_image": _finite_mean(rows["loss"][ok]),
        "curves": curves,
        "images": per_image,
        "skipped": skipped,
        "missing": plan.missing,
    }


def _network_dtypes(rows: Mapping[str, np.ndarray]) -> list[str]:
    """The dtypes the network ran in over the measured images (one, unless actors differ)."""
    ok = rows["status"] == "ok"
    return sorted({str(d) for d in rows.get("network_dtype", np.full(len(ok), ""))[ok] if d})


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _grid(rows: Mapping[str, np.ndarray], k: int) -> bytes:
    has_strip = np.array([len(s) > 0 for s in rows["strip_jpeg"]], dtype=bool)
    idx = np.flatnonzero(has_strip & (rows["status"] == "ok"))
    auc = rows["auc_raw"][idx, METHODS.index(PRIMARY)]
    order = idx[np.argsort(-auc, kind="stable")]
    p = METHODS.index(PRIMARY)
    items = [
        (str(rows["key"][i]), float(rows["auc_raw"][i, p]), rows["strip_jpeg"][i]) for i in order
    ]
    return plot_best_worst(items[:k], items[::-1][:k])


def write_outputs(cfg: EvaluateConfig, result: dict[str, Any], rows) -> None:
    out = lambda name: storage.join(cfg.output, name)  # noqa: E731
    text = json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n"
    storage.write_bytes(out("results.json"), text.encode(), cfg.s3)
    storage.write_bytes(out("table.md"), table_markdown(result).encode(), cfg.s3)
    storage.write_bytes(out("table.csv"), table_csv(result).encode(), cfg.s3)
    storage.write_bytes(out("auc_curves.png"), plot_curves(result), cfg.s3)
    storage.write_bytes(out("best_worst.png"), _grid(rows, cfg.grid_images), cfg.s3)


def _report_plan(cfg: EvaluateConfig, plan: InputPlan) -> None:
    if cfg.split is None:
        print(f"evaluate: {plan.listed} images in {cfg.data}")
        return
    print(
        f"evaluate: split {cfg.split} lists {plan.listed} images: "
        f"{plan.listed - len(plan.missing)} found in {cfg.data}, {len(plan.missing)} missing"
        + (
            f" ({plan.repeated} lines name an image listed before: measured once)"
            if plan.repeated
            else ""
        )
    )
    for path in plan.missing[:5]:
        print(f"  missing: {path}")
    if len(plan.missing) > 5:
        print(f"  ... and {len(plan.missing) - 5} more (listed in results.json)")


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    """Measure the model; write the tables, plots and results.json; return the results."""
    import ray

    from jobs.lease import DriverLease
    from jobs.models import load_model
    from jobs.runtime import check_accelerator_type, check_gpus, check_local_fit, init_ray

    check_gpus(cfg.num_actors if cfg.use_gpu else 0,
               f"evaluation with use_gpu (--num-actors {cfg.num_actors}, a GPU each)")  # fmt: skip
    start = time.monotonic()
    cfg = storage.with_absolute_paths(
        cfg, "data", "model", "output", "classifier_weights", "split", "prior"
    )
    plan = plan_inputs(cfg)
    _report_plan(cfg, plan)
    rebalance0_Q = load_rebalance0(cfg.prior_url, cfg.s3)
    if not cfg.prior:
        print(
            f"evaluate: rebalancing weights from {cfg.prior_url}, the measured data's own "
            "prior; the paper's come from the training set's (--prior TRAIN/prior.npz)"
        )
    loaded = load_model(cfg.model, cfg.s3)  # fail here, not in every actor
    actor_arguments, model_info = evaluator_arguments(cfg, loaded, rebalance0_Q)
    classifier_sha256 = None
    if cfg.classifier:
        weights = None
        if cfg.classifier_weights:
            weights = storage.read_bytes(cfg.classifier_weights, cfg.s3)
            classifier_sha256 = hashlib.sha256(weights).hexdigest()
        # fail here, not in every actor; not kept: VGG-16 holds 0.5 GB
        _check_label_numbering(cfg, plan, classifier_from(cfg.classifier, weights))
    record = _record(cfg, plan, model_info, rebalance0_Q, classifier_sha256)
    with DriverLease(cfg.output, cfg.s3, what=f"evaluation output {cfg.output}"):
        earlier = evaluate_parts.resume(cfg.output, record, cfg.s3)
        crash_guard(cfg).clear()  # a killed run's: its batches need not recur
        init_ray(paths=[cfg.data, loaded.url, cfg.classifier_weights, cfg.output])
        check_accelerator_type(cfg.accelerator_type, "evaluate --accelerator-type")
        gpu = {"GPU": 1} if cfg.use_gpu else {}
        check_local_fit(
            f"evaluate needs {cfg.num_actors} model actor(s) of {cfg.cpus_per_actor:g} CPUs"
            f"{' and a GPU' * cfg.use_gpu} each",
            {"CPU": cfg.cpus_per_actor} | gpu,
            cfg.num_actors,
            beside={"CPU": FILE_READ_CPUS if plan.files is not None else PARQUET_READ_CPUS},
            hint="lower --num-actors or --cpus-per-actor",
        )

        inputs = None if plan.files is None else {f["key"] for f in plan.files[: cfg.max_images]}

        measured: set[str] = set()  # by an earlier run

        def batches() -> Iterator[dict[str, np.ndarray]]:
            for batch in evaluate_parts.read_parts(earlier, cfg.s3):
                # A batch measured twice (its actor died after keeping it) counts once; a file
                # no longer found in the folder not at all.
                keep = [k not in measured and (inputs is None or k in inputs) for k in batch["key"]]
                batch = _rows_where(batch, keep)
                measured.update(batch["key"])
                yield batch
            if measured:
                kept = evaluate_parts.folder(cfg.output)
                print(f"evaluate: {len(measured)} inputs measured by an earlier run of this "
                      f"evaluation (kept in {kept}); measuring the rest")  # fmt: skip
            ds = input_dataset(cfg, plan, frozenset(measured))
            if ds is None:
                return
            yield from ds.map_batches(
                Evaluator,
                fn_constructor_kwargs=actor_arguments,
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                batch_size=cfg.batch_size,
                batch_format="numpy",
                num_cpus=cfg.cpus_per_actor,
                num_gpus=1 if cfg.use_gpu else 0,
                accelerator_type=cfg.accelerator_type,
            ).iter_batches(batch_size=None, batch_format="numpy")

        rows, curve_sums = collect(batches(), cfg.grid_images)
        result = build_result(cfg, plan, rows, curve_sums, model_info)
        elapsed = time.monotonic() - start
        now = len(rows["key"]) - len(measured)  # the inputs this run measured
        result |= {"elapsed_s": elapsed, "images_per_s": now / elapsed}
        write_outputs(cfg, result, rows)
        evaluate_parts.finish(cfg.output, cfg.s3)
        print(table_markdown(result))
        print(f"evaluate: {len(rows['key'])} inputs in {elapsed:.1f}s -> {cfg.output}")
        return result


def _check_label_numbering(cfg: EvaluateConfig, plan: InputPlan, classifier: Classifier) -> None:
    """Refuses a prepared dataset's own labels for top-1 where they cannot be the
    classifier's: they index the dataset's class list (its class folders, sorted), which is
    the classifier's only where both have as many classes (ImageNet's 1,000 synsets, say).
    A split's labels are taken as the classifier's."""
    if plan.files is not None or any(v is not None for v in (plan.split_labels or {}).values()):
        return
    classes = len(Manifest.load(cfg.data, cfg.s3).classes)
    with torch.no_grad():
        outputs = classifier.module(classifier.preprocess(torch.full((1, 3, 64, 64), 0.5)))
    if outputs.shape[-1] != classes:
        raise ValueError(
            f"{cfg.data}'s labels number its own {classes} classes, and the classifier has "
            f"{outputs.shape[-1]} outputs: its top-1 would be compared with another "
            "numbering. Pass a --split whose lines give each image the classifier's label"
        )


def _record(
    cfg: EvaluateConfig,
    plan: InputPlan,
    model_info: Mapping[str, Any],
    rebalance0_Q: torch.Tensor,
    classifier_sha256: str | None = None,
) -> dict[str, Any]:
    """What decides an image's figures: the measurements an earlier run kept are taken only
    where it is the same (`jobs.evaluate_parts`). The model, the prior and the classifier's
    weights by their content, the split by its text, a prepared dataset by its shards; not
    where they are, nor how many actors or batches there are (a batch's best and worst
    strips are the grid's candidates however batches are made), nor --max-file-mb (the
    files it refused are measured again, `_lasting`), nor --crash-tries, with the parts'
    format.
    Files of an image folder are matched by key: the kept rows of files no longer listed are
    left out (`main`)."""
    record = _config_dict(cfg)
    for name in ("output", "model", "prior", "split", "classifier_weights", "batch_size",
                 "num_actors", "cpus_per_actor", "accelerator_type", "max_file_mb",
                 "crash_tries", "s3"):  # fmt: skip
        record.pop(name)
    record["parts_format"] = evaluate_parts.FORMAT
    record["model_sha256"] = model_info["sha256"]
    record["classifier_weights_sha256"] = classifier_sha256
    record["rebalance0_sha256"] = hashlib.sha256(rebalance0_Q.numpy().tobytes()).hexdigest()
    if cfg.split:
        split = storage.read_bytes(cfg.split, cfg.s3)
        record["split_sha256"] = hashlib.sha256(split).hexdigest()
    if plan.files is None:  # a prepared dataset: its shards, as made, wherever they are
        record.pop("data")
        record["data_shards_sha256"] = Manifest.load(cfg.data, cfg.s3).shards_sha256
    return record


def _config_dict(cfg: EvaluateConfig) -> dict[str, Any]:
    from jobs.config import to_dict

    return to_dict(cfg)


if __name__ == "__main__":
    from jobs.config import run_job

    run_job("jobs.evaluate", "EvaluateConfig", positionals=("data",))
