"""Distributed training with Ray Train: the project's main job.

``python -m jobs.train --preset NAME [--config FILE] [--name RUN] [--storage URL] [--prior URL]``

Data-parallel (DDP) workers train `ColorizationNet` on a prepared dataset (`jobs.prepare`)
with the class-rebalanced loss; the prior comes from ``--prior`` (default: the dataset's
``prior.npz``). Checkpoints go to ``STORAGE/RUN/checkpoint_<step>/checkpoint.pt`` (the
``--model`` convention) with the optimizer, the step, the RNG state, the data offset, the
resolved config and the prior; re-running the same command with the same ``--name``
resumes from the latest one, and Ray restarts dead workers up to ``--max-failures`` times.
Metrics go to ``metrics.csv`` beside the checkpoints and, through a Ray Train callback, to
TensorBoard (``RUN/tensorboard/``) and MLflow (``--tracking``, see `jobs.tracking`); at the
end come loss and AuC curves, a grid of colorized validation images and ``model.safetensors``
for distribution.

On a cluster: ``ray job submit --working-dir . -- python -m jobs.train --preset h100x8
--data s3://BUCKET/imagenet/train --val-data s3://BUCKET/imagenet/val --storage s3://BUCKET/runs``
(shared storage: workers on other nodes write the checkpoints).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from colorcore.model import ModelConfig
from colorcore.prior import PRIOR_SMOOTHING_SIGMA, REBALANCE_LAMBDA, AbHistogram, rebalance_weights
from colorcore.quantize import SOFT_ENCODE_K, SOFT_ENCODE_SIGMA
from jobs import storage, synthetic
from jobs.config import choice_problems, empty_problems, presets_of, run_name_problem, to_dict
from jobs.dataset import MANIFEST_FILE, PRIOR_FILE, SHARD_ROW_GROUP_ROWS, Manifest
from jobs.loader import WINDOW_IMAGES, too_few_images
from jobs.storage import S3Options, split_url

METRICS_FILE = "metrics.csv"
DIVERGED_FILE = "diverged.json"  # where a run whose loss went non-finite stopped (train_loop)
RUN_FILE = "run.json"  # what a resumed run must keep: `check_resumable`
RESUME_FIELDS = (
    "model", "batch_size", "crop_px", "seed", "window_images", "read_groups", "soft_encode_k",
    "soft_encode_sigma", "rebalance_lambda", "prior_sigma", "loss_reduction",
)  # fmt: skip
RESUME_DEFAULTS = {"read_groups": 1}  # what runs recorded before these fields existed had
RETIRED_RESUME_FIELDS = ("window_shards",)  # windows of whole shards: the order before row groups
TRACKERS = ("tensorboard", "mlflow")  # where jobs.tracking can send the metrics table
SIGMA_RANGE = (1e-3, 1e3)  # of the soft encoding and the prior's smoothing (the paper's: 5 each)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: str = "runs/sample-data/train"
    """Prepared training dataset (local path or storage URL)."""
    val_data: str | None = "runs/sample-data/val"
    """Prepared held-out dataset for validation (none: no validation)."""
    prior: str | None = None
    """prior.npz with the ab counts (default: DATA/prior.npz)."""
    make_sample_data: bool = False
    """Create the synthetic sample dataset at DATA / VAL_DATA (and its prior) if missing."""
    sample_images: int = 600
    """Training images of the synthetic sample dataset (a tenth as many held out)."""
    storage: str = "runs"
    """Where run folders (checkpoints, metrics, plots) go: local path or storage URL."""
    name: str = "colorization"
    """Run name: re-running with the same name and storage resumes the run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    num_workers: int = 1
    """Data-parallel workers (one per GPU with use_gpu)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL, bf16 autocast, nvJPEG decoding by default)."""
    accelerator_type: str | None = None
    """GPU model the workers run on, as Ray names it (L40S, H100, ...; needs use_gpu): on a
    cluster of several GPU node types, nodes of that type only (default: any GPU)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (fractions allowed; the loader decodes on as many threads,
    2 to 8, or processes)."""
    batch_size: int = 40
    """Global batch: images per optimizer step over all workers."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each worker. The gradient is the whole batch's,
    but BatchNorm normalises over each micro-batch of batch_size / (num_workers x
    grad_accum_steps) images and moves its running averages once per micro-batch: a run
    resumed on other workers or micro-batches goes on with other BatchNorm statistics."""
    crop_px: int = 176
    """Random square crops (with horizontal flips) of this size."""
    max_steps: int = 450_000
    """Optimizer steps in all."""
    lr: float = 3e-5
    """Base learning rate."""
    lr_drop_steps: tuple[int, ...] = (200_000, 375_000)
    """Steps at which the learning rate drops."""
    lr_drop_factors: tuple[float, ...] = (1 / 3, 0.3)
    """Factor applied at each drop (3e-5 -> 1e-5 -> 3e-6 as released)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps."""
    adam_beta1: float = 0.9
    """Adam's decay of its gradient average."""
    adam_beta2: float = 0.99
    """Adam's decay of its squared-gradient average."""
    weight_decay: float = 1e-3
    """L2 penalty added to the gradient (Adam's coupled weight decay, as Caffe's)."""
    soft_encode_k: int = SOFT_ENCODE_K
    """Nearest ab bins each pixel's soft target spreads over."""
    soft_encode_sigma: float = SOFT_ENCODE_SIGMA
    """Gaussian width (ab units) of the soft targets' weights."""
    rebalance_lambda: float = REBALANCE_LAMBDA
    """Mix of the prior with uniform in the rebalancing weights (1: no rebalancing)."""
    prior_sigma: float = PRIOR_SMOOTHING_SIGMA
    """Gaussian smoothing of the prior over the ab plane."""
    loss_reduction: Literal["per_image", "per_pixel"] = "per_image"
    """Released normalisation (sum over pixels / images) or a per-pixel mean."""
    data_init: bool = False
    """Data-dependent initialisation on the first batch (fresh runs only)."""
    seed: int = 0
    """Seed of the initial weights, the data order, the crops and the flips."""
    window_images: int = WINDOW_IMAGES
    """Images shuffled together, whole row groups drawn from across the shards (see
    jobs.loader); each machine holds about two windows of JPEGs in memory (each worker,
    without share_reads)."""
    read_groups: int = 1
    """Groups the workers form, each reading its own part of every epoch (see jobs.loader):
    the number of machines of a multi-node run, each of which then reads 1/read_groups of the
    data an epoch instead of all of it. Divides num_workers; a resumed run keeps it."""
    share_reads: bool = True
    """The workers of a machine read each row group from storage once, and share it through
    a folder in /dev/shm (jobs.node_cache); else each reads every row group it needs."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Autocast dtype; auto = bf16 where the device has fast bf16."""
    compile: bool = False
    """torch.compile the model, and the target and loss functions with fullgraph=True (pays off
    on GPUs)."""
    decode: Literal["auto", "pil", "processes", "nvjpeg"] = "auto"
    """JPEG decoding: threads on the CPU ("pil": OpenCV for JPEGs, Pillow for the rest, the
    same pixels), the same in processes of their own ("processes", one a CPU: for hosts of
    many cores, where threads stop scaling past about 8; not yet measured on one), or nvJPEG
    on the GPU (auto: nvJPEG with use_gpu where torchvision imports, "pil" otherwise)."""
    checkpoint_every_steps: int = 2_000
    """Steps between checkpoints (a preempted worker loses at most this many)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept in the run folder."""
    val_every_steps: int = 2_000
    """Steps between validations on the held-out data."""
    val_images: int = 1_000
    """Held-out images measured at each validation, spread over the set (`validation.held_out`)."""
    log_every_steps: int = 100
    """Steps between rows of loss, lr and img/s in the metrics table."""
    max_failures: int = 3
    """Worker restarts Ray Train may make before the run fails."""
    tracking: str = "auto"
    """Where the metrics table also goes: none, tensorboard, mlflow or tensorboard,mlflow;
    auto: TensorBoard, plus MLflow when installed and MLFLOW_TRACKING_URI is set."""
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        if not 0 <= self.lr < math.inf:
            problems.append(f"lr must be finite and >= 0, got {self.lr}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            problems.append(
                f"adam betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}"
            )
        if not 0 <= self.weight_decay < math.inf:
            problems.append(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0 <= self.rebalance_lambda <= 1:
            problems.append(f"rebalance_lambda must be in [0, 1], got {self.rebalance_lambda}")
        if len(self.lr_drop_steps) != len(self.lr_drop_factors):
            problems.append("lr_drop_steps and lr_drop_factors must have the same length")
        if list(self.lr_drop_steps) != sorted(self.lr_drop_steps) or not all(
            0 < f < math.inf for f in self.lr_drop_factors
        ):
            problems.append("lr_drop_steps must increase and lr_drop_factors be finite and > 0")
        if any(step < 1 for step in self.lr_drop_steps):  # (past max_steps: a longer run's)
            problems.append(f"lr_drop_steps must be >= 1, got {list(self.lr_drop_steps)}")
        if min(self.num_workers, self.grad_accum_steps, self.max_steps, self.batch_size) < 1:
            problems.append("num_workers, grad_accum_steps, max_steps and batch_size must be >= 1")
        if min(self.num_workers, self.grad_accum_steps) >= 1 and self.batch_size % (
            self.num_workers * self.grad_accum_steps
        ):
            problems.append(
                f"batch_size {self.batch_size} must divide by num_workers x grad_accum_steps "
                f"({self.num_workers} x {self.grad_accum_steps})"
            )
        if not 0 <= self.seed < 2**63:  # numpy's seeds must be >= 0, torch's + rank < 2**64
            problems.append(f"seed must be >= 0 and < 2**63, got {self.seed}")
        if self.crop_px % 8 or self.crop_px < 16:
            problems.append(f"crop_px must be a multiple of 8 and >= 16, got {self.crop_px}")
        lo, hi = SIGMA_RANGE
        if not (
            1 <= self.soft_encode_k <= 313
            and lo <= self.soft_encode_sigma <= hi
            and lo <= self.prior_sigma <= hi
        ):
            problems.append(
                f"soft_encode_k must be in [1, 313]; sigmas finite and in [{lo:g}, {hi:g}]"
            )
        if min(self.checkpoint_every_steps, self.val_every_steps, self.log_every_steps) < 1:
            problems.append("checkpoint, validation and log intervals must be >= 1")
        if (
            self.keep_checkpoints < 1
            or not 1e-4 <= self.cpus_per_worker < math.inf  # Ray's unit: 1/10,000
            or self.max_failures < 0
        ):
            problems.append(
                "keep_checkpoints >= 1, cpus_per_worker finite and >= 0.0001, max_failures >= 0"
            )
        if self.val_data and self.val_images < 1:
            problems.append(f"val_images must be >= 1 with val_data, got {self.val_images}")
        problems += empty_problems(self, "data", "val_data", "storage", "prior")
        if self.val_data and self.data and split_url(self.val_data) == split_url(self.data):
            problems.append("val_data is the training data: validation needs a held-out set")
        if self.window_images < 1 or self.warmup_steps < 0:
            problems.append("window_images must be >= 1 and warmup_steps >= 0")
        if self.read_groups < 1 or self.num_workers % self.read_groups:
            problems.append(
                f"read_groups must be >= 1 and divide num_workers ({self.num_workers}), "
                f"got {self.read_groups}"
            )
        if self.decode == "nvjpeg" and not self.use_gpu:
            problems.append("decode nvjpeg decodes on the GPU: it needs use_gpu")
        if self.accelerator_type and not self.use_gpu:
            problems.append("accelerator_type names a GPU: it needs use_gpu")
        if self.make_sample_data and self.sample_images < len(synthetic.CLASSES):
            problems.append(f"sample_images must be >= {len(synthetic.CLASSES)} (a scene a "
                            f"class), got {self.sample_images}")  # fmt: skip
        if len(set(trackers := self.tracking.split(","))) < len(trackers):
            problems.append(f"tracking names a tracker twice: {self.tracking!r}")
        if self.tracking not in ("auto", "none") and not set(trackers) <= set(TRACKERS):
            problems.append(
                f"tracking must be auto, none or a comma list of {', '.join(TRACKERS)}; "
                f"got {self.tracking!r}"
            )
        if problem := run_name_problem(self.name):
            problems.append(problem)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def prior_url(self) -> str:
        return self.prior or storage.join(self.data, PRIOR_FILE)

    @property
    def run_url(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.num_workers * self.grad_accum_steps)

    @property
    def worker_resources(self) -> dict[str, float]:
        """What each worker takes on its node (Ray Train's `resources_per_worker`)."""
        return {"CPU": self.cpus_per_worker} | ({"GPU": 1} if self.use_gpu else {})

    def workers_text(self) -> str:
        """The workers and what each takes, for messages: ``2 workers of 8 CPUs and a GPU
        (H100) each``."""
        kind = f" ({self.accelerator_type})" if self.accelerator_type else ""
        gpu = f" and a GPU{kind}" * self.use_gpu
        return f"{self.num_workers} workers of {self.cpus_per_worker:g} CPUs{gpu} each"

    @property
    def worker_needs(self) -> dict[str, float]:
        """What a node must hold for each worker: its resources and, with accelerator_type,
        a GPU of that type (Ray's node resource ``accelerator_type:<name>``)."""
        named = {f"accelerator_type:{self.accelerator_type}": 0.001}
        return self.worker_resources | (named if self.accelerator_type else {})


# ---------------------------------------------------------------- presets


def smoke() -> TrainConfig:
    """CPU demo: `python -m jobs.train --preset smoke`; 44 s (AVX-512 BF16) to 2.5 minutes
    (AVX2) on 2 cores.

    Creates the synthetic sample dataset under runs/sample-data on first use, trains a
    tiny model with 2 workers, and prints the held-out rebalanced and raw AuC of the model
    and of the gray baseline; the model beats gray. BatchNorm averages its statistics over
    about 10 steps (PyTorch's usual momentum): 0.999, the released value, would average over
    the whole of so short a run, early steps included.
    """
    return TrainConfig(
        data="runs/sample-data/train",
        val_data="runs/sample-data/val",
        make_sample_data=True,
        name="smoke",
        model=ModelConfig(width=1 / 8, bn_moving_average=0.9),
        num_workers=2,
        cpus_per_worker=0.5,
        batch_size=32,
        crop_px=64,
        max_steps=300,
        lr=1e-3,
        lr_drop_steps=(200,),
        lr_drop_factors=(0.3,),
        weight_decay=0.0,
        checkpoint_every_steps=100,
        val_every_steps=100,
        val_images=60,
        log_every_steps=25,
        data_init=True,
    )


def ci() -> TrainConfig:
    """The smoke run cut to under 30 s of training, for tests: `--preset ci`."""
    return dataclasses.replace(
        smoke(),
        name="ci",
        data="runs/sample-data/ci/train",  # smoke's has other images: twice as many
        val_data="runs/sample-data/ci/val",
        sample_images=300,
        model=ModelConfig(width=1 / 16, bn_moving_average=0.9),
        batch_size=16,
        max_steps=40,
        lr_drop_steps=(30,),
        checkpoint_every_steps=20,
        val_every_steps=20,
        val_images=24,
        log_every_steps=10,
    )


def paper() -> TrainConfig:
    """The released schedule on one GPU:
    `python -m jobs.train --preset paper --data TRAIN --val-data VAL` (both prepared
    datasets; the preset's own URLs are placeholders).

    Batch 40 of 176 x 176 crops with flips, Adam (0.9, 0.99), weight decay 1e-3,
    lr 3e-5 -> 1e-5 at 200k -> 3e-6 at 375k, 450k iterations, k = 10, lambda = 0.5.
    Its 18M crops take about 1.6 h at an H100's compiled bf16 rate at batch 256 (3,212
    img/s), 15 h at its naive fp32 rate; batch 40 keeps the GPU less busy, so expect more.
    """
    return TrainConfig(
        data="s3://colorcore-data/imagenet/train",
        val_data="s3://colorcore-data/imagenet/val",
        name="paper",
        use_gpu=True,
        cpus_per_worker=8,
        compile=True,
        data_init=True,
    )


def h100x8() -> TrainConfig:
    """The paper's 18M samples on 8 GPUs:
    `python -m jobs.train --preset h100x8 --data TRAIN --val-data VAL`.

    Global batch 2048 (256 per GPU, the size at which one H100 is efficient), so 8,790 steps
    with the drops at the same fractions of the samples (200k/450k, 375k/450k). Learning
    rate: square-root scaling, lr = 3e-5 x sqrt(2048 / 40) = 2.15e-4. The loss is a mean
    over images, so a larger batch does not enlarge the gradient, it only lowers its noise;
    for Adam, whose step size is set by lr rather than by the gradient's scale, the step
    that keeps the same noise-to-signal ratio grows with the square root of the batch (the
    rule for adaptive methods; linear scaling is for SGD). 2% linear warm-up steadies the
    first steps at the larger rate. BatchNorm's running statistics average over the same
    share of the run as the released 0.999 does over 450k steps (about 1,000 of them): about
    20 steps here. Expect about 15 minutes at ~20k img/s.
    """
    samples = 450_000 * 40
    batch = 2048
    return dataclasses.replace(
        paper(),
        name="h100x8",
        num_workers=8,
        batch_size=batch,
        max_steps=math.ceil(samples / batch),
        lr=3e-5 * math.sqrt(batch / 40),
        model=ModelConfig(bn_moving_average=1 - batch / 40_000),
        lr_drop_steps=(round(200_000 * 40 / batch), round(375_000 * 40 / batch)),
        warmup_steps=176,
        checkpoint_every_steps=500,
        val_every_steps=500,
        log_every_steps=50,
    )


PRESETS = presets_of(smoke, ci, paper, h100x8)


# ---------------------------------------------------------------- the schedule and weights


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """lr at `step` (0-based): warm-up, then the base rate times every drop passed."""
    lr = cfg.lr
    for drop, factor in zip(cfg.lr_drop_steps, cfg.lr_drop_factors, strict=True):
        if step >= drop:
            lr *= factor
    if step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def load_prior(url: str, s3: storage.S3Options | None = None) -> AbHistogram:
    if not storage.exists(url, s3):
        raise ValueError(f"no prior at {url}: run `python -m jobs.prior DATASET` or pass --prior")
    return AbHistogram.load(io.BytesIO(storage.read_bytes(url, s3)))


def rebalance_from(histogram: AbHistogram, *, lam: float, sigma: float) -> torch.Tensor:
    """Rebalancing weights for `lam` from raw counts (smoothing applied here), float64: at
    lambda 0 (the rebalanced AuC's) those of colours far from a narrow dataset's pass
    float32's range; the loss's (at most Q / lambda) are made float32 where it uses them."""
    smoothed = AbHistogram(histogram.counts_Q, smoothing_sigma=sigma).smoothed_probabilities()
    return rebalance_weights(smoothed, lam=lam)


# ---------------------------------------------------------------- the driver


def build_trainer(
    cfg: TrainConfig,
    *,
    run_name: str | None = None,
    storage_url: str | None = None,
    callbacks: Sequence[Any] = (),
):
    """A `TorchTrainer` for `cfg` (the tuning job builds its trials with this)."""
    cfg = with_absolute_paths(cfg)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.tracking import tracking_callbacks
    from jobs.train_loop import train_loop_per_worker

    run_name = run_name or cfg.name
    run_url = storage.join(storage_url or cfg.storage, run_name)
    fs, path = storage.arrow_filesystem(storage_url or cfg.storage, cfg.s3)
    if storage.is_local(storage_url or cfg.storage):
        os.makedirs(path, exist_ok=True)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_url": run_url},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=cfg.worker_resources,
            accelerator_type=cfg.accelerator_type,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[
                *callbacks,
                *tracking_callbacks(
                    cfg.tracking,
                    run_url=run_url,
                    run_name=run_name,
                    final_step=cfg.max_steps,
                    config=to_dict(cfg),
                    s3=cfg.s3,
                ),
            ],
        ),
    )


def fit(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> Any:
    """`build_trainer(cfg).fit()` of the run (or a search's trial), its error raised: an
    earlier attempt's divergence is forgotten first (the training loop writes it again if
    this attempt diverges too), and the checkpoints Ray never recorded are removed after
    (`jobs.models.remove_unrecorded`)."""
    from jobs.models import remove_unrecorded

    storage.remove([storage.join(cfg.run_url, DIVERGED_FILE)], cfg.s3)
    result = build_trainer(cfg, callbacks=callbacks).fit()
    if result.error:
        raise result.error
    remove_unrecorded(cfg.run_url, cfg.keep_checkpoints, cfg.s3)
    return result


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute, as workers need them."""
    return storage.with_absolute_paths(cfg, "data", "val_data", "prior", "storage")


def preflight(cfg: TrainConfig) -> None:
    """Checks that fail fast, before any worker starts."""
    from jobs.tracking import trackers

    trackers(cfg.tracking)  # a tracker asked for but not installed
    storage.check_reachable(cfg.storage, cfg.s3)
    if cfg.make_sample_data:  # the data (and its prior) are created next if missing
        if problem := too_few_images(cfg.sample_images, cfg.batch_size, cfg.read_groups,
                                     SHARD_ROW_GROUP_ROWS):  # fmt: skip
            raise ValueError(f"the sample data would hold {problem}: raise --sample-images")
        return

    manifest = Manifest.load(cfg.data, cfg.s3)
    if cfg.crop_px > (short := manifest.config.get("short_side_px", cfg.crop_px)):
        print(f"warning: crop_px {cfg.crop_px} is above the short side of {cfg.data}'s images "
              f"({short}): every crop is scaled up first", file=sys.stderr)  # fmt: skip
    colour = manifest.num_rows - manifest.num_grayscale
    # Row groups as jobs.prepare writes them: the workers check the ones the shards hold.
    if problem := too_few_images(colour, cfg.batch_size, cfg.read_groups, SHARD_ROW_GROUP_ROWS):
        raise ValueError(f"{cfg.data} has {problem}")
    histogram = load_prior(cfg.prior_url, cfg.s3)
    for lam in {cfg.rebalance_lambda, *([0.0] if cfg.val_data else [])}:  # the loss's, AuC's
        try:
            rebalance_from(histogram, lam=lam, sigma=cfg.prior_sigma)
        except ValueError as error:
            raise ValueError(f"the prior at {cfg.prior_url}: {error}") from None
    if cfg.val_data:
        held_out = Manifest.load(cfg.val_data, cfg.s3)
        if held_out.num_rows == held_out.num_grayscale:  # validation measures colour only
            raise ValueError(
                f"the validation data {cfg.val_data} holds no colour image "
                f"({held_out.num_grayscale} grayscale): give --val-data a set with colour "
                "images, or none"
            )


def check_resumable(cfg: TrainConfig) -> None:
    """A run resumed under its name must go on training the way it started: its network,
    batches, targets, prior and data (its shards, by name, size and checksum: the order the
    data offset counts in, wherever they have moved; the schedule and step count may
    change, but not to fewer steps than its checkpoints hold). Recorded in the run folder at
    the start, compared on every re-run, before any worker starts; checkpoints without the
    record are refused (nothing tells how they were trained). Torn checkpoints are removed
    first (`jobs.models.remove_torn`): a run whose only checkpoints a crash cut short starts
    over."""
    from jobs.models import checkpoint_files, checkpoint_step, remove_torn

    record = {k: to_dict(cfg)[k] for k in RESUME_FIELDS} | input_digests(cfg)
    record = json.loads(json.dumps(record))
    url = storage.join(cfg.run_url, RUN_FILE)
    remove_torn(cfg.run_url, cfg.s3)
    checkpoints = checkpoint_files(cfg.run_url, cfg.s3)
    # Before its first checkpoint a run has nothing to keep: it may start over differently
    # (say with a smaller batch after running out of memory).
    if not checkpoints:
        storage.write_bytes(url, json.dumps(record, indent=1).encode(), cfg.s3)
        return
    if not storage.exists(url, cfg.s3):
        raise ValueError(
            f"run {cfg.name} has checkpoints in {cfg.run_url} but no record of how it started "
            f"({url}): put the record back, or train under another --name"
        )
    trained = checkpoint_step(checkpoints[-1])  # (oldest first)
    if trained > cfg.max_steps:
        raise ValueError(
            f"run {cfg.name} has a checkpoint of step {trained}, past max_steps "
            f"{cfg.max_steps}: resume it with max_steps {trained} or more, or train under "
            "another --name"
        )
    started = RESUME_DEFAULTS | json.loads(storage.read_bytes(url, cfg.s3))
    if retired := [k for k in RETIRED_RESUME_FIELDS if k in started]:
        raise ValueError(
            f"run {cfg.name} started with {', '.join(retired)} (see {url}), an input order "
            "this version does not make: train under another --name"
        )
    changed = [k for k in record if k in started and not kept(started[k], record[k])]
    if changed:
        raise ValueError(
            f"run {cfg.name} started with other {', '.join(changed)} (see {url}): resume it "
            "with the same values, or train under another --name"
        )


def input_digests(cfg: TrainConfig, *, validation: bool = False) -> dict[str, str]:
    """SHA-256 of the prior's file and of the training data's shards (by name, size and
    checksum: wherever they have moved), and with `validation` of the validation data's."""

    prior = hashlib.sha256(storage.read_bytes(cfg.prior_url, cfg.s3)).hexdigest()
    digests = {"prior_sha256": prior}
    digests["data_shards_sha256"] = Manifest.load(cfg.data, cfg.s3).shards_sha256
    if validation and cfg.val_data:
        digests["val_shards_sha256"] = Manifest.load(cfg.val_data, cfg.s3).shards_sha256
    return digests


def kept(started: Any, now: Any) -> bool:
    """Whether a recorded value is kept by the current one; keys the record lacks (fields
    added since the run started, such as ``model.bn_moving_average``) are not compared."""
    if isinstance(started, dict) and isinstance(now, dict):
        return all(k not in started or kept(started[k], v) for k, v in now.items())
    return started == now


def ensure_sample_data(cfg: TrainConfig) -> None:
    """Create the synthetic sample train/val datasets and the prior where missing. Made
    once: a run that starts while another makes them waits for it (the lease of each
    dataset's folder), then finds them made."""
    from jobs import prepare, prior, synthetic
    from jobs.lease import DriverLease

    counts = (cfg.sample_images, max(3, cfg.sample_images // 10))
    datasets = [(u, c, s) for u, c, s in zip((cfg.data, cfg.val_data), counts, (0, 1), strict=True)
                if u is not None]  # fmt: skip
    for url, count, seed in datasets:
        needed = [storage.join(url, MANIFEST_FILE)]
        if url == cfg.data:
            needed.append(cfg.prior_url)
        if not all(storage.exists(u, cfg.s3) for u in needed):
            with DriverLease(url, cfg.s3, what=f"the sample data {url}", wait=True):
                if not storage.exists(needed[0], cfg.s3):
                    images = url.rstrip("/") + "-images"  # beside the dataset, same storage
                    synthetic.main(
                        synthetic.SyntheticConfig(
                            dst=images, num_images=count, seed=seed, s3=cfg.s3
                        )
                    )
                    prepare.main(
                        prepare.PrepareConfig(src=images, dst=url, max_group_images=200,
                                              cpus_per_task=0.5, s3=cfg.s3),
                        leased=True,
                    )  # fmt: skip
                if url == cfg.data and not storage.exists(cfg.prior_url, cfg.s3):
                    prior.main(prior.PriorConfig(dataset=cfg.data, output=cfg.prior_url,
                                                 cpus_per_task=0.5, s3=cfg.s3))  # fmt: skip
        if (made := Manifest.load(url, cfg.s3).num_inputs) != count:
            print(f"warning: {url} holds {made} sample images, made before, not the {count} "
                  "--sample-images asks: training on them (another --data and --val-data "
                  f"would get {count})", file=sys.stderr)  # fmt: skip


def main(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the run; returns the final metrics."""
    from jobs.lease import DriverLease
    from jobs.runtime import check_accelerator_type, check_gpus, check_local_fit, init_ray

    cfg = with_absolute_paths(cfg)
    check_gpus(cfg.num_workers if cfg.use_gpu else 0, "training with use_gpu")
    preflight(cfg)
    with DriverLease(cfg.run_url, cfg.s3, what=f"run {cfg.name}"):  # one driver a run
        needed = (cfg.prior_url, storage.join(cfg.data, MANIFEST_FILE))
        data_ready = not cfg.make_sample_data or all(storage.exists(u, cfg.s3) for u in needed)
        if data_ready:
            check_resumable(cfg)
        init_ray(paths=[cfg.storage, cfg.data, cfg.val_data, cfg.prior_url])
        check_accelerator_type(cfg.accelerator_type, "train --accelerator-type")
        check_local_fit(f"training needs {cfg.workers_text()}", cfg.worker_needs,
                        cfg.num_workers, hint="lower num_workers or cpus_per_worker")  # fmt: skip
        if cfg.make_sample_data:
            ensure_sample_data(cfg)
            preflight(dataclasses.replace(cfg, make_sample_data=False))
        if not data_ready:
            check_resumable(cfg)
        start = time.monotonic()
        diverged = storage.join(cfg.run_url, DIVERGED_FILE)
        result = fit(cfg)
        metrics = dict(result.metrics or {})
        if (metrics.get("step") or 0) < cfg.max_steps and storage.exists(diverged, cfg.s3):
            from jobs.models import checkpoint_files

            where = json.loads(storage.read_bytes(diverged, cfg.s3))
            restart = (
                "go on from its last checkpoint"
                if checkpoint_files(cfg.run_url, cfg.s3)
                else "start it again (it has no checkpoint yet)"
            )
            what = "its weights broke, its loss" if where.get("weights_broken") else "its loss was"
            raise ValueError(
                f"run {cfg.name} diverged: {what} {where['loss']} at step {where['step']} "
                f"(lr {where['lr']:.3g}); run the same command with a lower --lr to {restart}, "
                "or train under another --name"
            )
        metrics = final_metrics(metrics, cfg)
        print(
            f"train: run {cfg.name} finished at step {metrics.get('step')} "
            f"in {time.monotonic() - start:.0f}s"
        )
        from jobs.train_report import write_report

        summary = write_report(cfg)
        return metrics | summary


def final_metrics(reported: dict, cfg: TrainConfig) -> dict:
    """The figures of the run's last step: those Ray reported, or, where those are of an
    earlier step, the run's table's row of its last step. A run resumed at its end (its driver
    killed after the last checkpoint was written, before Ray recorded it) reports without a
    checkpoint, and Ray's result holds the last report it recorded one with."""
    if (reported.get("step") or 0) >= cfg.max_steps:
        return reported
    rows = [r for r in read_metrics(cfg.run_url, cfg.s3) if r.get("step") == cfg.max_steps]
    if not rows:
        return reported
    return rows[-1] | {"step": cfg.max_steps}  # the table's: not the stale report's offset


def read_metrics(run_url: str, s3: storage.S3Options | None = None) -> list[dict[str, float]]:
    """The run's metrics table (one row per logged step)."""
    url = storage.join(run_url, METRICS_FILE)
    if not storage.exists(url, s3):
        return []
    rows = csv.DictReader(io.StringIO(storage.read_bytes(url, s3).decode()))
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows]


if __name__ == "__main__":
    from jobs.config import run_job

    run_job("jobs.train", "TrainConfig")
