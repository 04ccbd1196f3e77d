"""Batch colorization throughput on CPU: `jobs.colorize` against the released demo's pipeline.

    python bench/colorize.py           (from the repository root; about a minute on 2 cores)

Input: scikit-image's photos as grayscale JPEGs at 1024 x 768 (quality 95; 240 for the job, 20
for the demo loop, whose own rate varies by a few percent over 10) in a temporary
folder. Both sides use the same weights (the released network's architecture with random
values unless ``--model`` names a weights file) and the same images, file in -> file out:

- baseline, the released demo's per-image loop on one core: PIL decode, scikit-image rgb2lab
  of the full image, PIL bicubic resize to 256, rgb2lab again, one fp32 forward at batch 1,
  the mean ab (the released port's readout), bilinear upsampling to full size, scikit-image
  lab2rgb, PIL JPEG encode;
- this job: `jobs.colorize.main` on a local Ray instance with every core and the job's
  defaults (on CPUs: one model actor per core, each decoding, colorizing, encoding and
  writing its batches), with the precision `jobs.runtime.choose_precision` picks (bf16
  autocast only on CPUs with bf16 units; ``--dtype int8``: every conv but the logits' in
  int8, that one so), torch Lab with chroma gamut mapping, annealed mean. Its time counts
  everything after Ray has started: planning, model loading, actor start, reading, writing.
  Its steady rate leaves out that start-up and the ramp after it: the slope of the later
  half of the outputs' finish times (the manifest's per-input times), outputs per second.

The figure of merit is images/s per core, the job's divided by the number of cores it used.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import color, data

from colorcore.decode import mean
from colorcore.model import ColorizationNet, ModelConfig
from jobs import colorize, models
from jobs.runtime import choose_precision, init_ray

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
SIZE_WH = (1024, 768)
DEMO_PX = 256  # the released demo resizes to 256 x 256


def write_scans(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        photo = getattr(data, PHOTOS[i % len(PHOTOS)])()
        scan = Image.fromarray(photo).convert("L").resize(SIZE_WH, Image.Resampling.BICUBIC)
        paths.append(folder / f"scan{i:04d}.jpg")
        scan.save(paths[-1], quality=95)
    return paths


def demo_colorize(model: torch.nn.Module, path: Path, out: Path) -> None:
    """The released demo's steps for one image (see the module docstring)."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    l_orig = color.rgb2lab(rgb)[:, :, 0]
    small = np.asarray(Image.fromarray(rgb).resize((DEMO_PX, DEMO_PX), Image.Resampling.BICUBIC))
    l_small = torch.from_numpy(color.rgb2lab(small)[:, :, 0]).float()[None, None]
    with torch.no_grad():
        ab_small = mean(model(l_small))
    ab = F.interpolate(ab_small, size=l_orig.shape, mode="bilinear", align_corners=False)
    lab = np.concatenate([l_orig[..., None], ab[0].permute(1, 2, 0).double().numpy()], axis=2)
    rgb_out = (color.lab2rgb(lab) * 255).round().astype(np.uint8)
    Image.fromarray(rgb_out).save(out, quality=95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=240, help="images for the job")
    parser.add_argument("--baseline-images", type=int, default=20, help="images for the demo")
    parser.add_argument("--model", help="weights URL (default: random released-format weights)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores for the job")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp32", "int8"),
        help="the job's --dtype",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="colorize-bench-") as tmp:
        root = Path(tmp)
        paths = write_scans(root / "scans", args.images)
        weights = args.model or str(root / "released.pth")
        if not args.model:
            torch.manual_seed(0)
            torch.save(ColorizationNet(ModelConfig()).state_dict(), weights)
        model = models.load_model(weights).model.eval()

        (root / "demo").mkdir()
        baseline = paths[: args.baseline_images]
        demo_colorize(model, baseline[0], root / "demo" / "warm-up.jpg")
        start = time.perf_counter()
        for path in baseline:
            demo_colorize(model, path, root / "demo" / path.name)
        demo_ips = len(baseline) / (time.perf_counter() - start)

        precision = choose_precision("auto", args.dtype)
        init_ray(num_cpus=args.cores)
        cfg = colorize.ColorizeConfig(
            input=str(root / "scans"),
            output=str(root / "job"),
            model=weights,
            batch_size=args.batch_size,
            dtype=args.dtype,
        )  # the job's defaults otherwise: on CPUs one whole-stage model actor per core
        start = time.perf_counter()
        summary = colorize.main(cfg)
        job_ips = summary.outputs / (time.perf_counter() - start)
        assert summary.outputs == args.images and summary.errors == 0
        times = summary.table.column("time").to_pylist()
        finished = sorted(datetime.fromisoformat(t).timestamp() for t in times)
        # Rows finish in bursts, a batch at a time: the slope of a straight line through the
        # later half's finish times, not the count between two of them, whose edges may cut
        # a batch whose network ran before the window.
        later = np.array(finished[len(finished) // 2 :])
        steady_ips = float(np.polyfit(later - later[0], np.arange(len(later)), 1)[0])

    dtype = "bf16" if precision.autocast_dtype == torch.bfloat16 else "fp32"
    dtype = f"int8 and {dtype}" if precision.int8 else dtype
    w, h = SIZE_WH
    print(f"\n{args.images} grayscale JPEGs at {w} x {h}; torch {torch.__version__}; "
          f"job precision {dtype} ({precision.reason})")  # fmt: skip
    print(f"{'pipeline':44s} {'cores':>5s} {'images/s':>9s} {'per core':>9s}")
    print(
        f"{'released demo loop (skimage Lab, batch 1)':44s} {1:5d} {demo_ips:9.2f} {demo_ips:9.2f}"
    )
    for name, ips in (("whole job", job_ips), ("steady, start-up left out", steady_ips)):
        label = f"jobs.colorize, {name}"
        print(f"{label:44s} {args.cores:5d} {ips:9.2f} {ips / args.cores:9.2f}  "
              f"{ips / args.cores / demo_ips:.2f}x per core")  # fmt: skip


if __name__ == "__main__":
    main()
