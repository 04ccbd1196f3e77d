"""Training-step throughput of the released network, with the step `jobs.train_loop` runs.

    python bench/train_step.py --compile           (on a GPU machine; about 3 minutes on an H100)
    python bench/train_step.py                     (on CPU: batch 4, about 1 minute on 2 cores)

One step, as a training worker does it (`jobs.train_loop.step_loss` and the optimizer calls):
Lab conversion and `colorcore.data.encode_targets` (sparse soft encoding with k = 10) on the
device from uint8 crops, the forward of `ColorizationNet(ModelConfig())` (the released ECCV16
network, 32.2M parameters) at 176 x 176 under the chosen precision, `rebalanced_cross_entropy`
in fp32, backward, Adam (0.9, 0.99, weight decay 1e-3); the loss stays on the device, as the
loop sums it there and reads it only when it logs. The crops are windows of scikit-image's
colour photos, already on the device (the nvJPEG loader delivers them there); the rebalancing
weights are those of the crops' own ab prior.

Modes: ``fp32`` (TF32 off: the naive port), ``tf32`` (CUDA only: what the job's fp32 precision runs,
as `jobs.train_loop` enables TF32), ``bf16_cl`` (bf16 autocast, model in channels_last; `step_loss`
makes the input channels_last on CUDA; on CPU only where `jobs.runtime.cpu_has_bf16_units`, as the
job's precision choice: without bf16 units a step is ~10x slower than fp32) and, with ``--compile``,
``bf16_cl_compile`` (`torch.compile` of the model, the Lab conversion and the loss, as
``TrainConfig.compile``). ``--modes`` runs a given list instead. Each mode starts from a fresh
model; the figure is the mean step time over ``--iters`` steps after ``--warmup`` steps (cuDNN
autotuning on, as in the job and the anchor; off with ``--no-cudnn-benchmark``), with peak GPU
memory (on CPU: the process's peak resident memory so far). TFLOP/s counts 3x the forward FLOPs.
Prints one JSON document and a table; writes it to ``$OUT/train_step.json`` when OUT is set. Run it
beside ``shared_bench/gpu_anchor.py`` on the same machine to compare with the anchor.

``--shards`` also runs each mode end to end: the batches come from `jobs.loader.TrainLoader`
over a prepared dataset of JPEG shards in a temporary folder (``--shard-images`` JPEGs of the
same photos at a short side of 256, as `bench/loader.py` writes them), decoded by each of
``--decode`` (default on CUDA: nvJPEG on the GPU, the job's choice there, then the CPU threads
and the CPU processes, as many as a worker with every core runs (`jobs.loader.decode_threads`);
on CPU the threads and the processes),
instead of one batch already on the device. Its rows are named ``MODE+shards:DECODE``; the
table gives their rates as a share of the same mode's synthetic rate, and the loader's own
rate with each decoder (batches taken, no step) is printed above the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import resource
import tempfile
import time
from collections.abc import Iterator

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import numpy as np
import torch
from loader import photo_jpegs, write_dataset
from skimage import data
from torch.utils.flop_counter import FlopCounterMode

from colorcore.color import rgb_to_lab
from colorcore.data import CROP_PX
from colorcore.model import ColorizationNet, ModelConfig
from colorcore.prior import AbHistogram
from jobs.loader import DECODE_MODES, DatasetIndex, TrainLoader, decode_threads
from jobs.runtime import cpu_has_bf16_units
from jobs.train import TrainConfig, rebalance_from
from jobs.train_loop import step_loss

MODES = ("fp32", "tf32", "bf16_cl", "bf16_cl_compile")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def photo_crops(batch: int, seed: int = 0) -> torch.Tensor:
    """uint8 (batch, 3, 176, 176) random windows of the photos, half of them flipped."""
    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)()[..., :3] for name in PHOTOS]
    crops = []
    for i in range(batch):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - CROP_PX + 1)
        left = rng.integers(0, photo.shape[1] - CROP_PX + 1)
        crop = photo[top : top + CROP_PX, left : left + CROP_PX]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def forward_gflops(model: torch.nn.Module) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 1, CROP_PX, CROP_PX, device=next(model.parameters()).device) * 100)
    return counter.get_total_flops() / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def shard_batches(
    root: str, batch: int, device: torch.device, decode: str
) -> Iterator[torch.Tensor]:
    """Batches of the job's loader over the dataset at `root`, decoded by `decode`, on `device`."""
    loader = TrainLoader(
        DatasetIndex.load(root), rank=0, world_size=1, batch_size=batch, crop_px=CROP_PX,
        seed=0, num_threads=decode_threads(os.cpu_count(), decode), decode=decode,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    with contextlib.closing(iter(loader)) as batches:
        for b in batches:
            yield b.rgb_N3HW.to(device, non_blocking=True)


SHARD_ITERS_FACTOR = 4
"""From shards, SHARD_ITERS_FACTOR x --iters batches are timed, so that the few the loader
stocked ahead (while the first step compiled) weigh little in the rate."""


def loader_rate(root: str, args, device: torch.device, decode: str) -> float:
    """Images/s of the loader alone at the step's batch size: the most a step can take."""
    count = SHARD_ITERS_FACTOR * args.iters
    with contextlib.closing(shard_batches(root, args.batch, device, decode)) as batches:
        for _ in range(args.warmup):
            next(batches)
        sync(device)
        start = time.perf_counter()
        for _ in range(count):
            next(batches)
        sync(device)
    return count * args.batch / (time.perf_counter() - start)


def run_mode(mode: str, batches, rebalance_Q, cfg: TrainConfig, args, device) -> dict:
    """Mean step time of one mode on `batches` (an iterator of uint8 crops on the device),
    from a fresh model and optimizer."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = mode != "fp32"  # as the training loop sets it
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    channels_last = mode.startswith("bf16_cl")
    model = ColorizationNet(ModelConfig()).to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
    )  # fmt: skip
    autocast_dtype = torch.bfloat16 if mode.startswith("bf16") else None
    compiled = dataclasses.replace(cfg, compile=mode.endswith("compile"))
    loss_of = step_loss(model, rebalance_Q, compiled, autocast_dtype, device)

    def step() -> torch.Tensor:
        loss = loss_of(next(batches))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    step()
    sync(device)
    first_s = time.perf_counter() - start  # includes compilation and autotuning
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    start = time.perf_counter()
    losses = [step() for _ in range(args.iters)]
    sync(device)
    step_s = (time.perf_counter() - start) / args.iters
    return {"mode": mode, "batch": cfg.batch_size, "step_ms": 1e3 * step_s,
            "img_s": cfg.batch_size / step_s, "peak_gib": peak_gib(device),
            "first_step_s": first_s, "loss": losses[-1].item()}  # fmt: skip


def measure(mode: str, batches, rebalance_Q, cfg, args, device, report: dict) -> dict:
    try:
        row = run_mode(mode, batches, rebalance_Q, cfg, args, device)
        row["tflops"] = 3 * report["gflops_fwd"] * row["img_s"] / 1e3
    except Exception as error:  # one failing mode (e.g. compile) must not lose the others
        row = {"mode": mode, "batch": args.batch, "error": repr(error)[:300]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=256 if cuda else 4, help="images per step")
    parser.add_argument("--iters", type=int, default=20 if cuda else 3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed steps")
    parser.add_argument("--compile", action="store_true", help="also bf16_cl with torch.compile")
    parser.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let cuDNN autotune (as the job does on GPUs)",
    )
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--shards", action="store_true", help="also end to end from JPEG shards")
    parser.add_argument("--shard-images", type=int, default=2048, help="JPEGs in the shards")
    parser.add_argument(
        "--decode",
        default="nvjpeg,pil,processes" if cuda else "pil,processes",
        help="comma-separated decoders for --shards: nvjpeg (GPU), pil (CPU threads), "
        "processes (CPU processes)",
    )
    args = parser.parse_args()
    decoders = args.decode.split(",")
    if set(decoders) - set(DECODE_MODES) or ("nvjpeg" in decoders and not cuda):
        parser.error(f"--decode {args.decode}: choose from {DECODE_MODES} (nvjpeg: CUDA only)")
    if args.warmup < 1 or args.iters < 1:
        parser.error("--warmup and --iters must be >= 1")
    if args.modes:
        modes = args.modes.split(",")
        if unknown := set(modes) - set(MODES):
            parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    else:
        bf16 = cuda or cpu_has_bf16_units()
        modes = [m for m, on in zip(MODES, (True, cuda, bf16, args.compile), strict=True) if on]
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(os.cpu_count())  # the step uses every core, unlike the other benches
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    cfg = TrainConfig(batch_size=args.batch, crop_px=CROP_PX)
    rgb_N3HW = photo_crops(args.batch)
    ab_N2HW = rgb_to_lab(rgb_N3HW.float() / 255)[:, 1:]
    histogram = AbHistogram().update(ab_N2HW, pixel_stride=4)
    rebalance_Q = rebalance_from(histogram, lam=cfg.rebalance_lambda, sigma=cfg.prior_sigma)
    rgb_N3HW, rebalance_Q = rgb_N3HW.to(device), rebalance_Q.to(device, torch.float32)

    report = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "size": CROP_PX,
        "cudnn_benchmark": args.cudnn_benchmark,
        "params": sum(p.numel() for p in ColorizationNet(ModelConfig()).parameters()),
        "gflops_fwd": forward_gflops(ColorizationNet(ModelConfig()).to(device)),
        "train": [],
    }
    with tempfile.TemporaryDirectory(prefix="train-step-shards-") as root:
        if args.shards:
            write_dataset(root, photo_jpegs(args.shard_images), shard_images=256)
            report["loader_img_s"] = {d: loader_rate(root, args, device, d) for d in decoders}
        for mode in modes:
            inputs = {"": lambda: (rgb_N3HW for _ in itertools.count())}
            for decode in decoders if args.shards else ():
                inputs[f"+shards:{decode}"] = functools.partial(
                    shard_batches, root, args.batch, device, decode
                )
            for suffix, batches in inputs.items():
                # From shards, more steps: batches the loader stocked while the first step
                # compiled would otherwise make a loader-bound step look faster.
                iters = SHARD_ITERS_FACTOR * args.iters
                timed = argparse.Namespace(**{**vars(args), "iters": iters})
                with contextlib.closing(batches()) as stream:
                    row = measure(mode, stream, rebalance_Q, cfg, timed if suffix else args,
                                  device, report)  # fmt: skip
                report["train"].append({**row, "mode": mode + suffix})
                print(json.dumps(report["train"][-1]), flush=True)
    print(json.dumps(report))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_step.json"), "w") as f:
            json.dump(report, f, indent=1)
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['device']}; torch {report['torch']}; ColorizationNet(ModelConfig()) "
          f"{report['params'] / 1e6:.1f}M params, {report['gflops_fwd']:.1f} GFLOPs forward at "
          f"{report['size']} x {report['size']}")  # fmt: skip
    for decode, rate in report.get("loader_img_s", {}).items():
        print(f"the loader alone over the shards, {decode}: {rate:.1f} img/s")
    print(f"{'mode':23s} {'batch':>5s} {'step ms':>9s} {'img/s':>8s} {'TFLOP/s':>8s} "
          f"{'peak GiB':>8s} {'1st step s':>10s}")  # fmt: skip
    synthetic = {r["mode"]: r.get("img_s") for r in report["train"]}
    for row in report["train"]:
        if "error" in row:
            print(f"{row['mode']:23s} {row['batch']:5d} failed: {row['error']}")
            continue
        base = synthetic.get(row["mode"].partition("+")[0])
        share = (
            f"  {row['img_s'] / base:.2f}x synthetic" if "+shards" in row["mode"] and base else ""
        )
        print(f"{row['mode']:23s} {row['batch']:5d} {row['step_ms']:9.1f} {row['img_s']:8.1f} "
              f"{row['tflops']:8.2f} {row['peak_gib']:8.2f} "
              f"{row['first_step_s']:10.1f}{share}")  # fmt: skip


if __name__ == "__main__":
    main()
