"""Small pattern helpers the passes share: read a pass as "match this, replace with that"."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..compiler._torch_internals import statically_known_true

aten = torch.ops.aten

VIEW_OPS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def is_op(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def shape(node: fx.Node) -> tuple:
    return tuple(val(node).shape)


def dtype(node: fx.Node) -> torch.dtype:
    return val(node).dtype


def same_shape(a: tuple, b: tuple) -> bool:
    """Provably equal shapes (symbolic sizes included), without adding guards."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def is_constant(node: Any) -> bool:
    """A frozen weight or other constant tensor held by the graph module."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def constant_value(gm: fx.GraphModule, target: str) -> Any:
    """The tensor a get_attr node reads."""
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def add_constant(gm: fx.GraphModule, prefix: str, tensor: torch.Tensor) -> str:
    """Store `tensor` on the module under a fresh name starting with `prefix`; returns the name."""
    i = 0
    while hasattr(gm, f"{prefix}{i}"):
        i += 1
    gm.register_buffer(f"{prefix}{i}", tensor, persistent=False)
    return f"{prefix}{i}"


def writes_in_place(node: fx.Node) -> bool:
    """An op that writes its first argument (copy_, index_copy_): in a functionalized graph, a graph input's
    in-place update (a static KV cache)."""
    schema = getattr(node.target, "_schema", None)
    info = schema.arguments[0].alias_info if schema is not None and schema.arguments else None
    return node.op == "call_function" and info is not None and info.is_write


def drop_dead_nodes(graph: fx.Graph) -> bool:
    """graph.eliminate_dead_code under one rule, wherever the passes run. FX keeps an unread op tagged
    nondeterministic_seeded unless a Dynamo TracingContext is active: a graph optimized inside torch.compile's
    backend call lost its dead attention, the same graph optimized after mmaccel.compile's calibration samples
    ran kept it, computed it, and the levers met it (token merging refused the tower at the CPU flash kernel
    attention_fusion had replaced; a dropped block kept its q/k/v projections). The attention ops
    carry the tag for their dropout only: at dropout_p=0 they draw no random numbers and go like any pure op.
    Other random ops stay, as in eager: a draw shifts the RNG stream of the ops after it."""
    return graph.eliminate_dead_code(
        is_impure_node=lambda node: node.is_impure(impure_random=_dropout_p(node) != 0.0))


def _dropout_p(node: fx.Node) -> Any:
    """The dropout_p argument of an attention op (SDPA and every device-specific kernel); None: no such op."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if node.op == "call_function" and schema is not None else []
    if "dropout_p" not in names:
        return None
    i = names.index("dropout_p")
    return node.kwargs.get("dropout_p", node.args[i] if i < len(node.args) else schema.arguments[i].default_value)


def scalar_arg(node: fx.Node, index: int) -> float | None:
    """The Python number at args[index], or None when it is a tensor, a symbolic value or missing."""
    if len(node.args) <= index:
        return None
    a = node.args[index]
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def cast_source(node: fx.Node) -> fx.Node:
    """See through dtype-only casts (`.to(dtype)`, `.float()`, `.type_as(q)`): the node whose value is being
    cast. Half-precision casts also spell out layout and device; a device change is not a cast."""
    while (is_op(node, aten._to_copy.default) and single_user(node)
           and set(node.kwargs) <= {"dtype", "layout", "device"}
           and node.kwargs.get("layout", torch.strided) == torch.strided
           and ("device" not in node.kwargs or torch.device(node.kwargs["device"]) == val(node.args[0]).device)):
        node = node.args[0]
    return node


def match_matmul(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when `node` computes a @ b for N-D a, b with equal batch dims: the forms aten.matmul
    decomposes into (expand -> view -> bmm -> view, or a plain bmm)."""
    if is_op(node, aten.bmm.default):
        return node.args[0], node.args[1]
    if not (is_op(node, *VIEW_OPS) and is_op(node.args[0], aten.bmm.default)):
        return None
    bmm = node.args[0]
    operands = []
    for flat in bmm.args:
        if not (is_op(flat, *VIEW_OPS) and single_user(flat)):
            return None
        operands.append(flat.args[0])
    a, b = (strip_noop_views(x) for x in operands)
    sa, sb, so, sflat_a = shape(a), shape(b), shape(node), shape(bmm.args[0])
    if len(sa) < 3 or len(sb) != len(sa) or len(so) != len(sa):
        return None
    # The flattening views keep the two matrix dims and the output view restores a's batch dims:
    # then bmm over the flattened batch is exactly a @ b.
    if not (same_shape(sa[:-2], sb[:-2]) and same_shape(so[:-2], sa[:-2]) and same_shape(sflat_a[1:], sa[-2:])
            and same_shape(so[-2:], (sa[-2], sb[-1])) and same_shape(shape(bmm.args[1])[1:], sb[-2:])):
        return None
    return a, b


def replace_uses(old: fx.Node, new: fx.Node) -> None:
    """Point every user of `old` at `new`, which computes the same value (so it inherits old's meta: later
    matches in the same pass read its shape before the pipeline re-propagates, reports name its layer, and a
    target's fallback warning names its source line)."""
    new.meta.setdefault("val", old.meta.get("val"))
    for key in ("nn_module_stack", "stack_trace"):
        if key in old.meta:
            new.meta.setdefault(key, old.meta[key])
    old.replace_all_uses_with(new)


def strip_noop_views(node: fx.Node) -> fx.Node:
    """See through expands to the same shape, contiguity clones and whole-dim slices (`x[:, :, None]` under
    dynamic shapes): same values, same shape."""
    while (is_op(node, aten.expand.default, aten.clone.default, aten.slice.Tensor) and single_user(node)
           and same_shape(shape(node.args[0]), shape(node))):
        node = node.args[0]
    return node


def last_of(nodes: list[fx.Node]) -> fx.Node:
    """The latest of `nodes` in graph order (new nodes that read them must come after it)."""
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return max(nodes, key=order.__getitem__)


def layer_name(node: fx.Node) -> str:
    """The model's name for the module a node came from ("vision.layers.0.attn.q_proj"), from Dynamo's
    nn_module_stack, or the name a pass recorded when it merged nodes ("...attn.{q,k,v}_proj"); else the node's."""
    if "mmaccel_layer" in node.meta:
        return node.meta["mmaccel_layer"]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    # Dynamo names the module by how the compiled function reached it: L['self'] (the module compiled),
    # L['args'][0] (passed to a compiled function), L['model'] (a closure variable). The rest is the model's.
    return re.sub(r"^L(\[[^\]]*\])+\.?", "", path) or node.name


def merged_layer_name(names: list[str]) -> str:
    """["a.q_proj", "a.k_proj", "a.v_proj"] -> "a.{q_proj,k_proj,v_proj}"; the common module path stays in
    front ("model.layers.0.{self_attn.q_proj,mlp.fc1}": Phi's parallel block), so that the merged node is still
    in its numbered block (prune="blocks" read "{model.layers.0.self_attn.q_proj,...}" as a block of its own
    and left Phi's, GPT-J's and CodeGen's blocks whole)."""
    if len(set(names)) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    if common == 0:
        return "{" + ",".join(names) + "}"
    return ".".join(parts[0][:common]) + ".{" + ",".join(".".join(p[common:]) for p in parts) + "}"


@dataclass(frozen=True)
class Miss:
    """A pattern whose anchor was there but a check failed, and why (onnxscript's `check_result.fail`): the pass
    leaves that place alone and `mmaccel.explain` lists it. A matcher returns None where the anchor is absent."""
    node: fx.Node
    reason: str

    def __str__(self) -> str:
        layer = layer_name(self.node)
        return f"{layer}: {self.reason}" if layer == self.node.name else f"{layer} ({self.node.name}): {self.reason}"

