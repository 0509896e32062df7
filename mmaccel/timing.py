"""The project's one timing helper (the demo and every bench/ script): warm up, then time each of `repeats`
calls; the median is the number reported. On a CUDA device each call is timed by CUDA events and followed by a
synchronize, so launch overhead counts (a step's latency as a caller sees it); elsewhere by wall clock.

The Triton target's autotuners (backends/triton/tuning.py `time_us`) measure differently on purpose:
GPU time inside a CUDA graph with the L2 flushed, launch cost left out; the kernel sweeps use it to agree with it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

Device = Optional[torch.device | str]


def times_ms(fn: Callable[[], object], repeats: int, warmup: int = 3, device: Device = None,
             before: Callable[[], object] | None = None) -> list[float]:
    """ms of each of `repeats` calls, after `warmup` untimed ones. `device`: a CUDA device times by CUDA events,
    None or a CPU device by wall clock. `before`: untimed work ahead of each timed call (an L2 flush)."""
    for _ in range(warmup):
        fn()
    if device is not None and torch.device(device).type == "cuda":
        return _cuda_times_ms(fn, repeats, before)
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3, device: Device = None,
              before: Callable[[], object] | None = None) -> float:
    return statistics.median(times_ms(fn, repeats, warmup, device, before))


def _cuda_times_ms(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None) -> list[float]:
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def interleaved_times_ms(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 3,
                         device: Device = None) -> dict[str, list[float]]:
    """`times_ms` of several functions in interleaved rounds (one call of each per round), so that load from
    other processes on a shared machine, or a GPU clock still ramping up, falls on all of them alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name] += times_ms(fn, 1, 0, device)
    return times
