"""Linear layers on the Triton target: each matmul against a frozen weight runs either the Triton GEMV kernel
(decode: a few activation rows) or the library matmul (cuBLAS), whichever a small autotuner measured faster
for that shape on this GPU. Choices are kept on disk, so a second process does not measure again.

The first call of a shape measures (it happens during the warm-up run that precedes CUDA graph capture);
during capture, or on the CPU interpreter, no timing is possible and the choice is the cached one, else
the library call (interpreter: the Triton kernel, so the tests run it)."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from . import gemv as gemv_kernel
from .cache import cache_dir
from .device import device_name

aten = torch.ops.aten
_choices: dict[str, str] | None = None


def _cache_path() -> str:
    return os.path.join(cache_dir(), "matmul_choices.json")


def _load() -> dict[str, str]:
    global _choices
    if _choices is None:
        try:
            with open(_cache_path()) as f:
                _choices = json.load(f)
        except (OSError, ValueError):
            _choices = {}
    return _choices


def _save() -> None:
    path = _cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_choices, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _library(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _time_us(fn: Callable[[], Any], reps: int = 10) -> float:
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


def choose(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> str:
    # One activation row only: with 8 rows the padded-dot kernel won alone but lost in the 7B decode step
    # (H200, batch 8: 3.50 ms with it, 3.30 ms with cuBLAS), so wider decode batches stay on the library.
    if not gemv_kernel.supports(x, weight) or (x.is_cuda and x.shape[0] != 1):
        return "library"
    if not x.is_cuda:
        return "triton_gemv"
    key = f"{device_name(x.device)}|{x.dtype}|{x.shape[0]}x{weight.shape[0]}x{weight.shape[1]}|{bias is not None}"
    choices = _load()
    if key not in choices:
        if torch.cuda.is_current_stream_capturing():
            return "library"
        # Interleaved rounds, best of each: the first timings of a process run while the GPU clock is still
        # ramping up (seen on an H200: 108 vs 31 us for the same kernel), which would favour whichever ran last.
        rounds = [(_time_us(lambda: gemv_kernel.gemv(x, weight, bias)), _time_us(lambda: _library(x, weight, bias)))
                  for _ in range(3)]
        triton_us, library_us = min(r[0] for r in rounds), min(r[1] for r in rounds)
        choices[key] = "triton_gemv" if triton_us < library_us else "library"
        _save()
    return choices[key]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T (+ bias), x [M, K], weight [N, K]."""
    if choose(x, weight, bias) == "triton_gemv":
        return gemv_kernel.gemv(x, weight, bias)
    return _library(x, weight, bias)


def route_linears(gm: fx.GraphModule) -> int:
    """mm(x, t(w)) and addmm(b, x, t(w)) with w a frozen weight -> linear(x, w, b)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default) or node.kwargs:
            continue
        bias, x, wt = (None, *node.args) if node.target is aten.mm.default else node.args
        if not (isinstance(wt, fx.Node) and wt.target is aten.t.default and wt.args[0].op == "get_attr"):
            continue
        if bias is not None and bias.meta["val"].dim() != 1:
            continue
        node.target, node.args = linear, (x, wt.args[0], bias)
        if not wt.users:
            gm.graph.erase_node(wt)
        count += 1
    return count
