"""Ray Train's fixed cost on a short run: the ``ci`` preset's `fit()` against the same loop
run in this process without Ray.

    RAY_AUTH_MODE=disabled flock /tmp/colorcore-ray.lock python bench/train_overhead.py
                                       (from the repository root; about 5 minutes on 2 cores)

Both sides train the ``ci`` preset (a 1/16-width network, 64 x 64 crops, global batch 16,
40 steps, validation and a checkpoint every 20 steps, data-dependent initialisation) on the
synthetic sample dataset, which `jobs.train.ensure_sample_data` writes into a temporary
folder first (on the same local Ray instance; not timed against either side).

- `fit()`: `jobs.train.build_trainer(cfg).fit()` on a local Ray instance with every core:
  the preset's 2 DDP workers of 0.5 CPU, checkpoints reported to Ray Train's storage in the
  temporary folder. Its wall time includes the controller's start, the workers' spawn and
  imports, the process group, the per-step gradient all-reduce and the teardown.
- in-process, after Ray is shut down: the pieces `jobs.train_loop` builds (prior, dataset
  index, `TrainLoader`, data-dependent init, validation crops, Adam) for one worker holding
  the whole global batch, with as many torch threads as the fit's workers together, the same
  step (`jobs.train_loop.step_loss`), validation at the same steps and the same checkpoints
  written with `colorcore.weights.save_checkpoint`.

Printed: both wall times, their difference (what Ray Train adds to a run this short), and the
per-step times: the fit's from the img/s its workers log every 10 steps (mean over windows
without a validation or checkpoint in them), the in-process one measured the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import torch

from colorcore.data import make_targets
from colorcore.datainit import data_dependent_init
from colorcore.model import ColorizationNet
from colorcore.weights import save_checkpoint
from jobs.loader import DatasetIndex, TrainLoader, decode_threads
from jobs.runtime import choose_precision, init_ray
from jobs.train import (
    TrainConfig,
    build_trainer,
    ci,
    ensure_sample_data,
    learning_rate,
    load_prior,
    read_metrics,
    rebalance_from,
)
from jobs.train_loop import step_loss
from jobs.validation import load_crops, validate


def window_step_ms(img_per_s: list[float], steps: list[float], cfg: TrainConfig) -> float:
    """Mean ms per step over the logged windows that hold no validation or checkpoint step
    (those run after the log row, so they fall into the next window)."""
    busy = {s for s in steps if s % cfg.val_every_steps == 0 or s % cfg.checkpoint_every_steps == 0}
    clean = [
        1e3 * cfg.batch_size / ips
        for ips, s in zip(img_per_s, steps, strict=True)
        if s - cfg.log_every_steps not in busy
    ]
    return statistics.mean(clean) if clean else float("nan")


def fit_threads(cfg: TrainConfig) -> int:
    """Torch threads of the fit's workers together (`jobs.train_loop` gives each int(CPUs))."""
    return cfg.num_workers * max(1, int(cfg.cpus_per_worker))


def in_process(cfg: TrainConfig, run_dir: str) -> tuple[float, float]:
    """The training loop for `cfg` without Ray; returns (wall s, ms per step)."""
    start = time.perf_counter()
    torch.set_num_threads(fit_threads(cfg))
    precision, device = choose_precision("cpu", cfg.precision), torch.device("cpu")
    histogram = load_prior(cfg.prior_url)
    rebalance_Q = rebalance_from(histogram, lam=cfg.rebalance_lambda, sigma=cfg.prior_sigma)
    rebalance_Q = rebalance_Q.float()
    rebalance0_Q = rebalance_from(histogram, lam=0.0, sigma=cfg.prior_sigma)
    torch.manual_seed(cfg.seed)
    model = ColorizationNet(cfg.model)
    index = DatasetIndex.load(cfg.data)
    shape = {"rank": 0, "world_size": 1, "crop_px": cfg.crop_px}
    if cfg.data_init:
        first = TrainLoader(index, **shape, batch_size=cfg.micro_batch, seed=cfg.seed + 1)
        data_dependent_init(model, make_targets(next(iter(first)).rgb_N3HW).l_N1HW)
    loader = TrainLoader(
        index, **shape, batch_size=cfg.batch_size, seed=cfg.seed, window_images=cfg.window_images,
        num_threads=decode_threads(torch.get_num_threads()),
    )  # fmt: skip
    batches = iter(loader)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
    )  # fmt: skip
    val_crops = load_crops(cfg.val_data, num_images=cfg.val_images, crop_px=cfg.crop_px)
    loss_of = step_loss(model, rebalance_Q, cfg, precision.autocast_dtype, device)
    window_start, img_per_s, logged = time.perf_counter(), [], []
    for step in range(1, cfg.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, cfg)
        rgb = next(batches).rgb_N3HW
        loss = loss_of(rgb)
        loss.backward()
        loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every_steps == 0:
            now = time.perf_counter()
            img_per_s.append(cfg.log_every_steps * cfg.batch_size / (now - window_start))
            logged.append(step)
            window_start = now
        if step % cfg.val_every_steps == 0 or step == cfg.max_steps:
            validate(
                model, val_crops, rebalance0_Q=rebalance0_Q, k=cfg.soft_encode_k,
                sigma=cfg.soft_encode_sigma, autocast_dtype=precision.autocast_dtype,
            )  # fmt: skip
        if step % cfg.checkpoint_every_steps == 0 or step == cfg.max_steps:
            extra = {"step": step, "optimizer": optimizer.state_dict()}
            path = os.path.join(run_dir, f"checkpoint_{step}.pt")
            save_checkpoint(path, model, prior_counts=histogram.counts_Q, extra=extra)
    batches.close()
    return time.perf_counter() - start, window_step_ms(img_per_s, logged, cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=ci().max_steps, help="optimizer steps")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="train-overhead-") as root:
        cfg = dataclasses.replace(
            ci(),
            data=f"{root}/sample-data/train",
            val_data=f"{root}/sample-data/val",
            storage=f"{root}/runs",
            make_sample_data=False,
            max_steps=args.steps,
        )
        start = time.perf_counter()
        init_ray(num_cpus=os.cpu_count())
        ray_init_s = time.perf_counter() - start
        try:
            start = time.perf_counter()
            ensure_sample_data(cfg)
            data_s = time.perf_counter() - start
            start = time.perf_counter()
            result = build_trainer(cfg).fit()
            fit_s = time.perf_counter() - start
            if result.error:
                raise result.error
        finally:
            import ray

            ray.shutdown()
        rows = read_metrics(cfg.run_url)
        logged = [r for r in rows if "img_per_s" in r]
        fit_step_ms = window_step_ms(
            [r["img_per_s"] for r in logged], [r["step"] for r in logged], cfg
        )
        os.makedirs(f"{root}/in-process")
        local_s, local_step_ms = in_process(cfg, f"{root}/in-process")

    print(f"\nci preset: {cfg.max_steps} steps of global batch {cfg.batch_size} at "
          f"{cfg.crop_px} px, width {cfg.model.width:g}; {os.cpu_count()} cores; "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"not timed against either side: ray.init {ray_init_s:.1f} s, sample data {data_s:.1f} s")
    print(f"{'run':52s} {'wall s':>7s} {'ms/step':>8s}")
    fit_name = f"Ray Train fit(), {cfg.num_workers} DDP workers x {cfg.cpus_per_worker:g} CPU"
    print(f"{fit_name:52s} {fit_s:7.1f} {fit_step_ms:8.1f}")
    local_name = f"in-process, 1 worker, {fit_threads(cfg)} threads"
    print(f"{local_name:52s} {local_s:7.1f} {local_step_ms:8.1f}")
    print(f"Ray Train adds {fit_s - local_s:.1f} s to this run ({fit_s / local_s:.1f}x the "
          f"in-process time)")  # fmt: skip


if __name__ == "__main__":
    main()
