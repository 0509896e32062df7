"""Targets. A target takes a post-pass GraphModule and returns a callable; it knows nothing of how the
graph was optimized."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import eager


def resolve_target(target: str, example_inputs: Sequence[Any]) -> tuple[str, str]:
    """(target to run, why). "auto" will pick triton on CUDA and onnxruntime on CPU once those targets
    exist; until then every graph runs on the eager target."""
    if target != "auto":
        return target, "requested"
    devices = sorted({t.device.type for t in example_inputs if isinstance(t, torch.Tensor)})
    return "eager", f"auto on {'/'.join(devices) or 'cpu'}: eager is the only target built so far"


def compile_for_target(target: str, gm: fx.GraphModule) -> Callable[[list[Any]], Any]:
    """Returns a boxed callable: it takes the list of graph inputs."""
    if target == "eager":
        return eager.compile_graph(gm)
    raise ValueError(f"unknown target {target!r}")
