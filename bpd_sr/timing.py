"""One timing harness: the median wall-clock seconds of a call over repeats, so that the
benchmarks, the choice of k and the compiled step's warm-up all time the same way. A call
on a GPU must end by synchronising (``bpd_sr.training.trainspeed.synchronize``) for the
time to mean anything."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median of ``repeats`` timings of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
