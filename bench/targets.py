"""Target construction and loss on the training device, as a share of a training step.

    python bench/targets.py                     (GPU: batch 256, a few seconds)
    python bench/targets.py --batch 8           (CPU)

Times what each step spends outside the network: `colorcore.data.make_targets` on uint8
176 x 176 crops already on the device (Lab conversion, every 4th ab pixel, sparse soft
encoding with k = 10), and `colorcore.loss.rebalanced_cross_entropy` forward and backward on
(N, 313, 44, 44) logits. Compare with the step time of `bench/train_step.py` or the anchor
(``shared_bench/gpu_anchor.py``) run in the same call: the target is under 5% of the step.
Each figure is the median of ``--iters`` timed runs after warm-up, synchronised on CUDA.
"""

from __future__ import annotations

import argparse
import json

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import torch
from timing import median_ms

from colorcore.data import CROP_PX, make_targets
from colorcore.loss import rebalanced_cross_entropy
from colorcore.quantize import ab_bins


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256 if cuda else 8)
    parser.add_argument("--iters", type=int, default=20 if cuda else 5)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")

    g = torch.Generator().manual_seed(0)
    # smooth random colour fields, not noise: ab values spread like photos'
    base = torch.randint(0, 256, (args.batch, 3, CROP_PX // 16, CROP_PX // 16), generator=g)
    rgb = torch.nn.functional.interpolate(base.float(), size=(CROP_PX, CROP_PX), mode="bilinear")
    rgb = rgb.clamp(0, 255).to(torch.uint8).to(device)
    rebalance_Q = torch.ones(len(ab_bins()), device=device)
    t = make_targets(rgb)
    h = t.bins_NkHW.shape[-1]
    logits = torch.randn(args.batch, len(ab_bins()), h, h, device=device, requires_grad=True)

    def loss_step() -> None:
        loss = rebalanced_cross_entropy(
            logits, t.bins_NkHW, t.weights_NkHW, rebalance_Q, nongray_N=t.nongray_N
        )
        loss.backward()

    sync = torch.cuda.synchronize if cuda else None

    def timed(fn) -> float:
        return median_ms(fn, args.iters, warmup=3, sync=sync)

    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "make_targets_ms": timed(lambda: make_targets(rgb)),
        "loss_fwd_bwd_ms": timed(loss_step),
    }
    result["total_ms"] = result["make_targets_ms"] + result["loss_fwd_bwd_ms"]
    print(json.dumps(result))
    print(
        f"{result['device']}, batch {args.batch} of {CROP_PX} x {CROP_PX}: targets "
        f"{result['make_targets_ms']:.2f} ms + loss fwd/bwd {result['loss_fwd_bwd_ms']:.2f} ms "
        f"= {result['total_ms']:.2f} ms per step"
    )


if __name__ == "__main__":
    main()
