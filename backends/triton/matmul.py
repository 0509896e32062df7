"""Linear layers on the Triton target: each matmul against a frozen weight runs either the Triton GEMV kernel
(decode: a few activation rows) or the library matmul (cuBLAS), whichever a small autotuner measured faster
for that shape on this GPU. Choices are kept on disk, so a second process does not measure again.

The first call of a shape measures (it happens during the warm-up run that precedes CUDA graph capture);
during capture, or on the CPU interpreter, no timing is possible and the choice is the cached one, else
the library call (interpreter: the Triton kernel, so the tests run it)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from . import gemv as gemv_kernel
from .device import device_name
from .tuning import Choices, time_us

aten = torch.ops.aten
_choices = Choices("matmul_choices.json")


def _library(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def choose(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> str:
    # One activation row only: with 8 rows the padded-dot kernel won alone but lost in the 7B decode step
    # (H200, batch 8: 3.50 ms with it, 3.30 ms with cuBLAS), so wider decode batches stay on the library.
    if not gemv_kernel.supports(x, weight) or (x.is_cuda and x.shape[0] != 1):
        return "library"
    if not x.is_cuda:
        return "triton_gemv"
    key = f"{device_name(x.device)}|{x.dtype}|{x.shape[0]}x{weight.shape[0]}x{weight.shape[1]}|{bias is not None}"
    if _choices.get(key) is None:
        if torch.cuda.is_current_stream_capturing():
            return "library"
        # Interleaved rounds, best of each: the first timings of a process run while the GPU clock is still
        # ramping up (seen on an H200: 108 vs 31 us for the same kernel), which would favour whichever ran last.
        rounds = [(time_us(lambda: gemv_kernel.gemv(x, weight, bias)), time_us(lambda: _library(x, weight, bias)))
                  for _ in range(3)]
        triton_us, library_us = min(r[0] for r in rounds), min(r[1] for r in rounds)
        _choices.set(key, "triton_gemv" if triton_us < library_us else "library")
    return _choices.get(key)


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
