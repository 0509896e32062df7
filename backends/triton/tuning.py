"""What the Triton target's autotuners share: the GPU timer and the per-device choices kept on disk (one JSON
file per kind of choice under the kernel cache), so a second process does not measure again."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Callable, Sequence, TypeVar

import torch

from .cache import cache_dir


def time_us(fn: Callable[[], Any], reps: int = 10) -> float:
    """GPU time of one call, L2 flushed before each (a decode step reads each weight once, from HBM).

    Timed inside a CUDA graph, so host launch cost is left out: the first call of a compiled graph runs
    under Dynamo's frame hooks, where a Python launcher looked 3-6x slower than its kernel (H200: a 31 us
    GEMV timed at 108 us), and CUDA graph replay is how the Triton target runs such shapes anyway."""
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")  # 256 MiB, over any L2
    fn()
    elapsed = {}
    for with_fn in (False, True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        graph.replay()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        elapsed[with_fn] = statistics.median(times)
    return max(elapsed[True] - elapsed[False], 0.0) * 1000 / reps


class Choices:
    """A dict of choices, read from `name` in the cache folder on first use and written back whole (through a
    temporary file, so a reader never sees half of it) whenever one is added."""

    def __init__(self, name: str) -> None:
        self.name, self._data = name, None

    def _path(self) -> str:
        return os.path.join(cache_dir(), self.name)

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            try:
                with open(self._path()) as f:
                    self._data = json.load(f)
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def get(self, key: str) -> Any:
        return self._load().get(key)

    def set(self, key: str, value: Any) -> None:
        self._load()[key] = value
        path = self._path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self._data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


T = TypeVar("T")


def tuned(table: Choices, key: str, options: Callable[[], Sequence[T]], measure: Callable[[T], float],
          restore: Callable[[list], T]) -> T:
    """The choice kept under `key` (`restore` rebuilds it from its list); else measured now among `options()`
    (pick), unless a CUDA graph is being captured: then options()[0], the static choice, and nothing kept, so
    the next call outside a capture measures."""
    known = table.get(key)
    if known is not None:
        return restore(known)
    if torch.cuda.is_current_stream_capturing():
        return options()[0]
    return pick(table, key, options(), measure)


# How much faster than the static choice a measured option must be to replace it. Timed alone (time_us), an option
# can look faster than it runs inside a decode step (launched with programmatic dependent launch, after other
# kernels): on one H200 the 7B-dims 16-layer step ran 2.53-2.57 ms with the GEMV configs chosen at a 3% margin
# against 2.31 ms with the static ones (MMACCEL_GEMV_TUNE=0), where another H200 had chosen 2.34 ms; the 7B
# shapes' sweep had them within 2% of static, while the wins the tuner exists for are 1.2-1.8x (Whisper's K =
# 1280 GEMVs) and keep clearing this margin.
MARGIN = 0.10


def pick(table: Choices, key: str, options: Sequence[T], measure: Callable[[T], float], margin: float = MARGIN) -> T:
    """The option `measure` (option -> us) times fastest, best of two interleaved rounds (a GPU clock still
    ramping up would favour whichever ran last); options[0], the static choice, unless another beats it by
    `margin`. An option whose measurement raises (a launch the GPU refuses) is dropped; options[0]'s failure is
    raised, since it is what runs untuned. The winner is kept in `table` under `key` (as a list)."""
    times: dict[Any, float] = {}
    for _ in range(2):
        for option in options:
            if times.get(option) == float("inf"):
                continue
            try:
                us = measure(option)
            except Exception:  # noqa: BLE001 - see the docstring
                if option == options[0]:
                    raise
                us = float("inf")
            times[option] = min(times.get(option, float("inf")), us)
    best = min(options, key=times.__getitem__)
    if times[best] > (1 - margin) * times[options[0]]:
        best = options[0]
    table.set(key, list(best))
    return best
