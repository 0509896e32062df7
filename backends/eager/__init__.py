"""The eager target: runs the optimized ATen graph as generated Python (FX codegen), with mmaccel's own ops
swapped for their plain-Python implementations so no dispatcher round trip is paid."""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx

from ...ops import OPS


def lower_custom_ops(gm: fx.GraphModule) -> int:
    lowered = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in OPS:
            node.target = OPS[node.target].eager
            lowered += 1
    return lowered


def compile_graph(gm: fx.GraphModule) -> Callable[[list[Any]], Any]:
    lower_custom_ops(gm)
    gm.recompile()
    forward = gm.forward

    def run(args: list[Any]) -> Any:
        return forward(*args)

    return run
