"""Graph rewrites that more than one target applies before running a graph. Targets import this and their
own files only, never another target."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ops import OPS

aten = torch.ops.aten


def lower_custom_ops(gm: fx.GraphModule) -> int:
    """mmaccel's own ops -> their plain-Python reference implementations (no dispatcher round trip)."""
    lowered = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in OPS:
            node.target = OPS[node.target].eager
            lowered += 1
    return lowered


# Functional updates that aot_autograd makes of in-place writes to graph inputs, and their in-place forms.
_INPLACE = {aten.index_copy.default: aten.index_copy_.default, aten.index_put.default: aten.index_put_.default}


def reinplace_input_updates(gm: fx.GraphModule) -> int:
    """`new = index_copy(cache, ...); ...; copy_(cache, new)` -> `index_copy_(cache, ...)`.

    Functionalization turns a KV-cache write of one token into a copy of the whole cache plus a copy
    back: for a 7B-dims decoder that is ~4 GB of traffic per decode step instead of a few KB. The
    rewrite is safe when the input has no reader other than the update and the final copy back."""
    count = 0
    for copy in list(gm.graph.find_nodes(op="call_function", target=aten.copy_.default)):
        dest, new = copy.args[0], copy.args[1]
        if (dest.op == "placeholder" and not copy.users and isinstance(new, fx.Node) and new.target in _INPLACE
                and new.args[0] is dest and set(dest.users) == {new, copy}):
            new.target = _INPLACE[new.target]
            gm.graph.erase_node(copy)
            count += 1
    return count


def is_view(node: fx.Node) -> bool:
    """An op whose result aliases its first argument (its schema says so) and writes nothing."""
    schema = getattr(node.target, "_schema", None)
    return (node.op == "call_function" and schema is not None and not schema.is_mutable and bool(node.args)
            and bool(schema.returns) and schema.returns[0].alias_info is not None)


def views_of_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions of the graph's outputs that are a tensor input or a view of one (a chain of view ops from a
    placeholder). AOTAutograd rebuilds such an output from the caller's input with the size, stride and
    offset of what the compiled graph returned, so a target must return it as that view (or that input itself),
    not as a copy."""
    found = []
    for i, out in enumerate(gm.graph.output_node().args[0]):
        node = out
        while isinstance(node, fx.Node) and is_view(node):
            node = node.args[0]
        if isinstance(node, fx.Node) and node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
            found.append(i)
    return found

