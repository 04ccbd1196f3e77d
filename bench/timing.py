"""Shared by the benchmarks: single-thread pinning and a median-of-repeats timer.

Import this module before numpy or torch (``python bench/NAME.py`` puts bench/ on sys.path):
the thread-count variables only take effect if set before the libraries start their pools.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def median_ms(
    fn: Callable[[], object],
    repeats: int,
    *,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
) -> float:
    """Median wall time of ``fn()`` in milliseconds, after `warmup` untimed calls (lazy
    tables, allocator, autotuning). `sync` (e.g. ``torch.cuda.synchronize``) runs before and
    after each timed call, so that queued device work is counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
