"""The eager target: runs the optimized ATen graph as generated Python (FX codegen), with mmaccel's own ops
swapped for their plain-Python implementations so no dispatcher round trip is paid."""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx

from ..common import lower_custom_ops, reinplace_input_updates


def compile_graph(gm: fx.GraphModule) -> Callable[[list[Any]], Any]:
    lower_custom_ops(gm)
    reinplace_input_updates(gm)
    gm.recompile()
    forward = gm.forward

    def run(args: list[Any]) -> Any:
        return forward(*args)

    return run
