"""Wall-clock timing for CPU measurements (the demo and bench/): warm up, then the median of repeats."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    return statistics.median(times_ms(fn, repeats, warmup))


def times_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Wall-clock ms of each of `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times
