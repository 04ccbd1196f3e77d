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


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one untimed warm-up call."""
    fn()  # warm-up: lazy tables, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
