"""What Ray Tune adds: trials per hour of a `ci` search against the same trials run one after
another without Tune, on one local Ray instance.

    python bench/tune_overhead.py [--trials 2]      (from the repository root; ~3 minutes)

Both sides train the same `ci` trials (lr 1e-3, one lambda per trial) for their full 40
steps: Tune runs them as `jobs.tune` does (FIFO scheduler, so none stops early, and the
concurrency the search would use here), the plain side calls
`jobs.train.build_trainer(cfg).fit()` for each trial in turn. The sample data is created
first in a temporary folder and is not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from jobs import train, tune
from jobs.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2, help="trials on each side")
    args = parser.parse_args()
    lambdas = tuple(round(0.5 + 0.5 * i / max(1, args.trials - 1), 3) for i in range(args.trials))

    root = tempfile.mkdtemp(prefix="tune-bench-")
    try:
        base = dataclasses.replace(
            train.ci(),
            data=f"{root}/sample/train",
            val_data=f"{root}/sample/val",
            storage=f"{root}/runs",
        )
        init_ray()
        train.ensure_sample_data(base)
        base = dataclasses.replace(base, make_sample_data=False)
        search = dataclasses.replace(
            tune.ci(),
            train=base,
            storage=f"{root}/searches",
            lrs=(1e-3,),
            lambdas=lambdas,
            scheduler="fifo",
        )

        start = time.monotonic()
        rows = tune.main(search)
        tuned_s = time.monotonic() - start
        assert all(r["status"] == "completed" for r in rows), rows

        start = time.monotonic()
        for i, lam in enumerate(lambdas):
            point = {"lr": 1e-3, "rebalance_lambda": lam, "schedule": search.schedules[0]}
            cfg = tune.trial_config(search, point, name=f"plain-{i}")
            result = train.build_trainer(cfg).fit()
            assert result.error is None, result.error
        plain_s = time.monotonic() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.trials} ci trials of {base.max_steps} steps, {os.cpu_count()} CPUs")
    print(f"{'':28s} {'seconds':>8s} {'trials/hour':>12s}")
    for name, seconds in (("Ray Tune (jobs.tune)", tuned_s), ("one after another", plain_s)):
        print(f"{name:28s} {seconds:8.0f} {3600 * args.trials / seconds:12.1f}")
    print(f"Tune's overhead: {tuned_s / plain_s:.2f}x the plain time")


if __name__ == "__main__":
    main()
