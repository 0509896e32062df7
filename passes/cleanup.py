"""Lossless cleanup passes: dead-code elimination, CSE, constant folding of frozen weights."""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from .patterns import add_constant, constant_value, drop_dead_nodes, is_constant, val
from .contract import PassContext, PassResult


def eliminate_dead_code(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove nodes whose values nobody uses (in-place writes to inputs are kept), then unused constants."""
    before = len(gm.graph.nodes)
    skipped = drop_empty_cat_inputs(gm.graph)
    drop_dead_nodes(gm.graph)
    freed = drop_unused_constants(gm)
    removed = before - len(gm.graph.nodes)
    changes = [f"removed {removed} dead node(s)"] if removed else []
    if freed:
        changes.append(f"released {freed} unused constant(s)")
    if skipped:
        changes.append(f"dropped {skipped} empty 1-D cat input(s)")
    return PassResult(matched=removed + skipped, changes=changes)


def drop_empty_cat_inputs(graph: fx.Graph) -> int:
    """Drop the inputs of shape (0,) that aten.cat skips anyway (its legacy rule). HF's DynamicCache starts a
    layer as `torch.tensor([])`, on the CPU whatever the model's device, and concatenates onto it: on CUDA
    that host operand stopped CUDA-graph capture (tiny HF Mistral on an H200: "Cannot copy between CPU and
    CUDA tensors during CUDA graph capture")."""
    dropped = 0
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.cat.default):
        tensors = list(node.args[0])
        kept = [t for t in tensors if not _empty_1d(t)]
        if kept and len(kept) < len(tensors):
            node.args = (kept, *node.args[1:])
            dropped += len(tensors) - len(kept)
    return dropped


def _empty_1d(node: Any) -> bool:
    value = val(node)
    return isinstance(value, torch.Tensor) and tuple(value.shape) == (0,)


def drop_unused_constants(gm: fx.GraphModule) -> int:
    """Delete module attributes that no get_attr node reads any more (frees folded-away weights)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    unused = [name for name in list(gm._buffers) if name not in used]
    for name in unused:
        delattr(gm, name)
    return len(unused)


def _cse_key(node: fx.Node) -> Any:
    def freeze(a: Any) -> Any:
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(freeze(x) for x in a))
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        if isinstance(a, float) and a != a:
            return ("nan",)
        return a
    return (node.op, node.target, freeze(node.args), freeze(node.kwargs))


def _is_pure(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or node.is_impure():
        return False
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags


def eliminate_common_subexpressions(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Merge nodes that compute the same pure function of the same inputs."""
    seen: dict[Any, fx.Node] = {}
    merged = Counter()
    for node in list(gm.graph.nodes):
        if not _is_pure(node):
            continue
        try:
            key = _cse_key(node)
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            merged[_op_name(node)] += 1
        else:
            seen[key] = node
    total = sum(merged.values())
    changes = [f"merged {total} duplicate node(s): " + _summary(merged)] if total else []
    return PassResult(matched=total, changes=changes)


def fold_constants(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Evaluate, once at compile time, every pure node whose inputs are all constants (frozen weights and
    what is computed only from them: transposes, concatenations, casts, masks) and store the results.
    Factory calls with no constant input (e.g. `ones(n, n)`) are left alone: cheap at run time, and
    folding them would hold memory for nothing. Values returned to the user are never folded, so an
    output never aliases a constant the graph keeps using."""
    values: dict[fx.Node, Any] = {n: constant_value(gm, n.target) for n in gm.graph.nodes if is_constant(n)}
    outputs = set(gm.graph.output_node().all_input_nodes)
    folded = Counter()
    for node in list(gm.graph.nodes):
        if not _foldable(node, values) or node in outputs and not _to_device(node, values):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            continue
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(add_constant(gm, "_folded", result))
            # an output gets its own copy of the constant, made on the device
            kept = gm.graph.call_function(torch.ops.aten.clone.default, (const,)) if node in outputs else const
        const.meta = dict(node.meta)
        kept.meta = dict(node.meta)
        node.replace_all_uses_with(kept)
        gm.graph.erase_node(node)
        values[const] = result
        folded[_op_name(node)] += 1
    drop_dead_nodes(gm.graph)
    drop_unused_constants(gm)
    total = sum(folded.values())
    changes = [f"folded {total} node(s) on constants: " + _summary(folded)] if total else []
    return PassResult(matched=total, changes=changes)


def _to_device(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    """A copy of a host constant to the GPU, returned: folded even so (into a device constant and a device
    copy of it), since a host-to-device copy cannot be recorded in a CUDA graph. HF Mistral's cache returns
    its sliding window as `torch.tensor(window).to(device)`: 'Cannot copy between CPU and CUDA tensors during
    CUDA graph capture' on an H200."""
    value = val(node)
    return (isinstance(value, torch.Tensor) and value.device.type != "cpu"
            and any(isinstance(values.get(n), torch.Tensor) and values[n].device.type == "cpu"
                    for n in node.all_input_nodes))


def _foldable(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    if node.op != "call_function" or not _is_pure(node) or not node.all_input_nodes:
        return False
    return all(n in values for n in node.all_input_nodes)


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def _summary(counter: Counter) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counter.most_common())
