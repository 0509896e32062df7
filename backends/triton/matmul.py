"""Linear layers on the Triton target: each matmul against a frozen weight runs either the Triton GEMV kernel
(decode: a few activation rows) or the library matmul (cuBLAS), whichever a small autotuner measured faster
for that shape on this GPU. Choices are kept on disk, so a second process does not measure again.

The first call of a shape measures (it happens during the warm-up run that precedes CUDA graph capture);
during capture, or on the CPU interpreter, no timing is possible and the choice is the cached one, else
the library call (interpreter: the Triton kernel, so the tests run it)."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.fx as fx

from . import gemv as gemv_kernel

aten = torch.ops.aten
_choices: dict[str, str] | None = None


def _cache_path() -> str:
    from . import cache_dir

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


def _time_us(fn) -> float:
    """Median with L2 flushed before each run: in a decode step each weight is read once, from HBM."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median") * 1000


def choose(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> str:
    if not gemv_kernel.supports(x, weight):
        return "library"
    if not x.is_cuda:
        return "triton_gemv"
    key = f"{torch.cuda.get_device_name(x.device)}|{x.dtype}|{x.shape[0]}x{weight.shape[0]}x{weight.shape[1]}|{bias is not None}"
    choices = _load()
    if key not in choices:
        if torch.cuda.is_current_stream_capturing():
            return "library"
        triton_us = _time_us(lambda: gemv_kernel.gemv(x, weight, bias))
        library_us = _time_us(lambda: _library(x, weight, bias))
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
