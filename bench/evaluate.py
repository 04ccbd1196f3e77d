"""Images per second of the evaluation job (`jobs.evaluate`) on this machine.

    python bench/evaluate.py           (from the repository root; about 2 minutes on 2 cores)

Input: synthetic scenes (`jobs.synthetic`) at 256 x 256, the resized protocol (metrics on the
256 x 256 ab planes). Two parts:

1. In-process, one thread, batches of 16: `evaluate_batch` (decode, the network once, three
   decodings, five rows of AuC / rebalanced AuC / PSNR, the loss) against the baseline of
   plain colorization of the same decoded images (the network and the annealed mean only),
   for the `ci`-size network (width 1/16) and the released-size network (width 1, fp32,
   random weights: speed does not depend on the weights).
2. The whole Ray Data job on a local image folder with a split list, the ci-size network,
   two actors of 0.5 CPU: images over wall time, Ray start-up excluded, actor start-up in.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import numpy as np
import torch
from timing import median_ms

from colorcore.decode import annealed_mean
from colorcore.model import ColorizationNet, ModelConfig
from colorcore.prior import AbHistogram
from colorcore.weights import save_checkpoint
from jobs import evaluate, synthetic

BATCH = 16
SIZE_PX = 256


def scenes(n: int) -> list[tuple[int, bytes]]:
    return [
        (label, synthetic.encode_png(synthetic.render_scene(label, i, size_px=SIZE_PX, seed=3)))
        for i, (label, _) in enumerate(synthetic.scene_names(n))
    ]


def histogram_of(images: list[tuple[int, bytes]]) -> AbHistogram:
    from jobs.prior import histogram_of as count

    return count([data for _, data in images], pixel_stride=4).histogram


def in_process(width: float, images, rebalance0_Q: torch.Tensor, repeats: int) -> tuple:
    """(colorize-only img/s, evaluation img/s) for one batch, one thread."""
    torch.manual_seed(0)
    model = ColorizationNet(ModelConfig(width=width)).eval()
    cfg = evaluate.EvaluateConfig(data="bench", model="bench", batch_size=BATCH)
    ctx = evaluate.EvalContext(cfg, model, torch.device("cpu"), None, rebalance0_Q)
    batch = {
        "key": np.array([f"scene{i}" for i in range(BATCH)], dtype=object),
        "label": np.array([label for label, _ in images[:BATCH]]),
        "jpeg": np.array([data for _, data in images[:BATCH]], dtype=object),
    }
    decoded = [evaluate.decode_for_eval(d, SIZE_PX, full=False)[0] for d in batch["jpeg"]]
    small = torch.stack(decoded)

    @torch.no_grad()
    def colorize_only() -> None:
        from colorcore.color import rgb_to_lab

        l_N1HW = rgb_to_lab(small.float() / 255)[:, :1]
        annealed_mean(model(l_N1HW), cfg.temperature)

    base_ms = median_ms(colorize_only, repeats)
    eval_ms = median_ms(lambda: evaluate.evaluate_batch(batch, ctx), repeats)
    return 1e3 * BATCH / base_ms, 1e3 * BATCH / eval_ms


def ray_job(images, histogram: AbHistogram, workdir: Path) -> tuple[float, float]:
    """(images per second of the whole job, seconds) on a local folder with a split list."""
    from jobs.runtime import init_ray

    folder = workdir / "images"
    lines = []
    for i, (label, data) in enumerate(images):
        path = folder / synthetic.CLASSES[label] / f"scene_{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        lines.append(f"/{path.relative_to(folder)} {label}")
    (workdir / "split.txt").write_text("\n".join(lines) + "\n")
    histogram.save(str(workdir / "prior.npz"))
    save_checkpoint(str(workdir / "model.pt"), ColorizationNet(ModelConfig(width=1 / 16)))
    cfg = evaluate.EvaluateConfig(
        data=str(folder),
        split=str(workdir / "split.txt"),
        prior=str(workdir / "prior.npz"),
        model=str(workdir / "model.pt"),
        output=str(workdir / "out"),
        num_actors=2,
        cpus_per_actor=0.5,
        batch_size=BATCH,
    )
    init_ray(num_cpus=os.cpu_count())
    start = time.perf_counter()
    evaluate.main(cfg)
    seconds = time.perf_counter() - start
    return len(images) / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--job-images", type=int, default=192, help="images for the Ray job")
    args = parser.parse_args()
    if args.job_images < BATCH:
        parser.error(f"--job-images must be at least the in-process batch, {BATCH}")
    torch.set_num_threads(1)

    images = scenes(args.job_images)
    histogram = histogram_of(images)
    from colorcore.prior import rebalance_weights

    rebalance0_Q = rebalance_weights(histogram.smoothed_probabilities(), lam=0.0)
    print(f"synthetic scenes at {SIZE_PX} x {SIZE_PX}, resized protocol; torch {torch.__version__}")
    print(f"{'in-process, 1 thread, batch 16':32s} {'colorize img/s':>14s} "
          f"{'evaluate img/s':>14s} {'evaluate / colorize':>20s}")  # fmt: skip
    for name, width in (("ci size (width 1/16)", 1 / 16), ("released size (width 1)", 1.0)):
        base, ours = in_process(width, images, rebalance0_Q, args.repeats)
        print(f"  {name:30s} {base:14.1f} {ours:14.1f} {ours / base:19.2f}x")
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        rate, seconds = ray_job(images, histogram, Path(tmp))
    print(
        f"Ray Data job, {len(images)} images, ci-size network, 2 actors x 0.5 CPU on "
        f"{os.cpu_count()} cores: {rate:.1f} img/s ({seconds:.1f} s, actor start-up included)"
    )


if __name__ == "__main__":
    main()
