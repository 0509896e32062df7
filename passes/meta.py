"""FakeTensor propagation: every node's meta["val"] (shapes stay symbolic), and the checks a pass must pass."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..compiler._torch_internals import FakeTensorMode, statically_known_true
from .patterns import constant_value


def propagate_fake(gm: fx.GraphModule, fake_mode: FakeTensorMode) -> None:
    """Recompute meta["val"] for every node from the placeholders' fake values and the real constants."""
    env: dict[fx.Node, Any] = {}
    consts: dict[str, Any] = {}

    def load(a: Any) -> Any:
        return env[a] if isinstance(a, fx.Node) else a

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta["val"]
        elif node.op == "get_attr":
            if node.target not in consts:
                real = constant_value(gm, node.target)
                consts[node.target] = fake_mode.from_tensor(real, static_shapes=True) \
                    if isinstance(real, torch.Tensor) else real
            val = consts[node.target]
        elif node.op == "call_function":
            args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), load)
            with fake_mode:
                val = node.target(*args, **kwargs)
        elif node.op == "output":
            continue
        else:
            raise NotImplementedError(f"meta propagation: node op {node.op!r} ({node.format_node()}) is not handled")
        env[node] = val
        node.meta["val"] = val


def output_signature(gm: fx.GraphModule) -> list[Any]:
    out = gm.graph.output_node()
    return [_sig(n.meta.get("val")) if isinstance(n, fx.Node) else _sig(n) for n in out.args[0]]


def _sig(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype)
    return ("value", type(v).__name__)


def signatures_match(before: list[Any], after: list[Any]) -> bool:
    if len(before) != len(after):
        return False
    for a, b in zip(before, after):
        if a[0] != b[0] or (a[0] == "tensor" and (a[2] != b[2] or len(a[1]) != len(b[1]))):
            return False
        if a[0] == "tensor" and not all(statically_known_true(x == y) for x, y in zip(a[1], b[1])):
            return False
    return True
