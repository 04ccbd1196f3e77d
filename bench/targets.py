"""Target construction and loss on the training device, as a share of a training step.

    python bench/targets.py                     (GPU: batch 256, about a minute with compilation)
    python bench/targets.py --batch 8 --no-compile    (CPU)

Times what each step spends outside the network, as `jobs.train_loop.step_loss` runs it, on
uint8 176 x 176 crops already on the device: the targets (`colorcore.data.make_targets`: L at
full size, ab at every 4th pixel, sparse soft encoding with k = 10 and the gray mask; on CUDA
or compiled with the in-table encoding, which needs no host sync) and
`colorcore.loss.rebalanced_cross_entropy` forward and backward on (N, 313, 44, 44) logits in
the autocast dtype (bf16 on CUDA). Both ways the job runs them: eager, and with
``TrainConfig.compile`` (targets and loss each compiled whole). Compare the total with the
step time of `bench/train_step.py` or of the anchor (``shared_bench/gpu_anchor.py``) run in
the same call: the goal is under 5% of the step. Each figure is the median of ``--iters``
timed runs after warm-up, synchronised on CUDA.
"""

from __future__ import annotations

import argparse
import functools
import json

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import torch
from timing import median_ms

from colorcore.data import CROP_PX, make_targets
from colorcore.loss import rebalanced_cross_entropy
from colorcore.quantize import TARGET_STRIDE, ab_bins


def measure(
    rgb, logits, rebalance_Q, *, compiled: bool, iters: int, sync, profile: bool = False
) -> dict[str, float]:
    in_table = compiled or rgb.is_cuda
    targets_of = functools.partial(make_targets, in_table=in_table)
    compile_ = torch.compile if compiled else (lambda fn, **_: fn)
    targets_fn = compile_(targets_of, fullgraph=True)
    loss_fn = compile_(rebalanced_cross_entropy, fullgraph=True)
    t = targets_fn(rgb)

    def loss_step() -> None:
        logits.grad = None  # as in a step: the gradient flows on, nothing accumulates here
        loss_fn(logits, t.bins_NkHW, t.weights_NkHW, rebalance_Q, nongray_N=t.nongray_N).backward()

    def timed(fn) -> float:
        return median_ms(fn, iters, warmup=3, sync=sync)

    row = {"targets_ms": timed(lambda: targets_fn(rgb)), "loss_fwd_bwd_ms": timed(loss_step)}
    row["total_ms"] = sum(row.values())
    if profile:
        print_profile(lambda: (targets_fn(rgb), loss_step()), sync)
    return row


def print_profile(step, sync) -> None:
    """The kernels (CUDA) or operators (CPU) of five runs of `step`, most time first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profiler(activities=activities) as prof:
        for _ in range(5):
            step()
        if sync:
            sync()
    by = "cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=by, row_limit=15, max_name_column_width=60))


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256 if cuda else 8)
    parser.add_argument("--iters", type=int, default=20 if cuda else 5)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--profile", action="store_true", help="print the compiled run's kernels, most time first"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")

    g = torch.Generator().manual_seed(0)
    # smooth random colour fields, not noise: ab values spread like photos'
    base = torch.randint(0, 256, (args.batch, 3, CROP_PX // 16, CROP_PX // 16), generator=g)
    rgb = torch.nn.functional.interpolate(base.float(), size=(CROP_PX, CROP_PX), mode="bilinear")
    rgb = rgb.clamp(0, 255).to(torch.uint8).to(device)
    rebalance_Q = torch.ones(len(ab_bins()), device=device)
    h = CROP_PX // TARGET_STRIDE
    logits = torch.randn(args.batch, len(ab_bins()), h, h, generator=g)
    logits = logits.to(device, torch.bfloat16 if cuda else torch.float32).requires_grad_()
    sync = torch.cuda.synchronize if cuda else None

    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "logits_dtype": str(logits.dtype),
    }
    for name in ("eager", "compiled") if args.compile else ("eager",):
        compiled = name == "compiled"
        result[name] = measure(
            rgb, logits, rebalance_Q, compiled=compiled, iters=args.iters, sync=sync,
            profile=args.profile and compiled,
        )  # fmt: skip
    print(json.dumps(result))
    print(f"{result['device']}, batch {args.batch} of {CROP_PX} x {CROP_PX}, {logits.dtype} logits")
    print(f"{'':9} {'targets ms':>11} {'loss f+b ms':>12} {'total ms':>9}")
    for name in ("eager", "compiled"):
        if name in result:
            r = result[name]
            print(
                f"{name:9} {r['targets_ms']:11.2f} {r['loss_fwd_bwd_ms']:12.2f} "
                f"{r['total_ms']:9.2f}"
            )


if __name__ == "__main__":
    main()
