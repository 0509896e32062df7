"""Linear-layer fusion passes.

parallel_linear_fusion: linears that read the same input with frozen weights (Q/K/V, gate/up) become one
    matmul on the concatenated weights, split afterwards. One weight read, one launch instead of several.
linear_epilogue_fusion: matmul + bias + activation (+ residual add) become one mmaccel::fused_linear op
    that a target lowers to one kernel.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Sequence

import torch
import torch.fx as fx

from ..ops.fused_linear import ACTIVATIONS
from .patterns import (VIEW_OPS, add_constant, aten, constant_value, dtype, is_constant, is_op, layer_name,
                       merged_layer_name, replace_uses, same_shape, shape, single_user)
from .cleanup import drop_unused_constants
from .contract import PassContext, PassResult

# Ops whose output is a view of their input: a `view` downstream of a split output may stop being valid
# (the split changes row strides), so those views become `reshape`, which copies only when it must.
_ALIASING_OPS = (*VIEW_OPS, aten.transpose.int, aten.permute.default, aten.expand.default, aten.slice.Tensor,
                 aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.t.default,
                 aten.alias.default, operator.getitem)


def _linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(x2d, weight_t [K, N] constant, bias or None) for mm/addmm nodes computing a linear layer."""
    if is_op(node, aten.mm.default) and not node.kwargs and is_constant(node.args[1]):
        return node.args[0], node.args[1], None
    if is_op(node, aten.addmm.default) and not node.kwargs and len(node.args) == 3 and is_constant(node.args[2]):
        bias = node.args[0]
        if isinstance(bias, fx.Node) and len(shape(bias)) == 1:
            return node.args[1], node.args[2], bias
    return None


def fuse_parallel_linears(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        parts = _linear_parts(node)
        if parts is None or (parts[2] is not None and not is_constant(parts[2])):
            continue
        x, w, _ = parts
        groups[(x, shape(w)[0], dtype(w))].append(node)
    changes = []
    fused = 0
    for (x, _, _), members in groups.items():
        if len(members) < 2:
            continue
        widths = [int(shape(m)[-1]) for m in members]
        _fuse_group(gm, x, members, ctx.weight_owners)
        # Drop the replaced weights now, not at the next cleanup: their storage is freed group by group, so
        # compiling adds one group's weights at a time (H200, 7B dims, 8 layers: peak above the model 2.09 GiB
        # when all groups were dropped at the end)
        gm.graph.eliminate_dead_code()
        drop_unused_constants(gm)
        fused += 1
        changes.append(f"{len(members)} linears on '{x.name}' -> one matmul of width {sum(widths)} (split {widths})")
    return PassResult(matched=fused, changes=changes)


def _fuse_group(gm: fx.GraphModule, x: fx.Node, members: list[fx.Node], owners: Sequence[torch.Tensor]) -> None:
    graph = gm.graph
    weights_t = [constant_value(gm, _linear_parts(m)[1].target) for m in members]
    biases = [_linear_parts(m)[2] for m in members]
    # [sum N, K] (nn.Linear layout, contiguous); the matmul reads its transpose.
    w_cat_t = _concatenate_rows([w.t() for w in weights_t], owners).t()
    widths = [w.shape[1] for w in weights_t]
    first = min(members, key=list(graph.nodes).index)
    with graph.inserting_before(first):
        w_node = graph.get_attr(add_constant(gm, "_fused_weight", w_cat_t))
        if any(b is not None for b in biases):
            parts = [constant_value(gm, b.target) if b is not None else w.new_zeros(w.shape[1])
                     for b, w in zip(biases, weights_t)]
            b_node = graph.get_attr(add_constant(gm, "_fused_bias", torch.cat(parts)))
            mm = graph.call_function(aten.addmm.default, (b_node, x, w_node))
        else:
            mm = graph.call_function(aten.mm.default, (x, w_node))
        mm.meta["mmaccel_layer"] = merged_layer_name([layer_name(m) for m in members])
        split = graph.call_function(aten.split_with_sizes.default, (mm, widths, 1))
        for i, member in enumerate(members):
            piece = graph.call_function(operator.getitem, (split, i))
            replace_uses(member, piece)
            _views_to_reshapes(piece)


def _concatenate_rows(rows: list[torch.Tensor], owners: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat(rows), holding each weight once. Rows that already lie back to back in one storage (a graph
    compiled earlier rebound them so) are viewed in place. Otherwise the rows are copied into one buffer and
    the user's parameters they came from are rebound as views of it (`param.data = ...`), so the originals are
    freed and the module and the graph share one copy; values are unchanged, and FrozenGraph re-records the
    parameters' new storage after the passes. A row whose parameter is not among `owners`, or does not own its
    whole storage (tied, sliced, already a view of another fusion), keeps its own copy."""
    adjacent = _back_to_back(rows)
    if adjacent is not None:
        return adjacent
    cat = torch.cat(rows, dim=0)
    by_address = {(o.data_ptr(), tuple(o.shape), o.stride()): o for o in owners}
    offset = 0
    for row in rows:
        owner = by_address.get((row.data_ptr(), tuple(row.shape), row.stride()))
        n = row.shape[0]
        if owner is not None and owner.untyped_storage().nbytes() == owner.numel() * owner.element_size():
            with torch.no_grad():
                owner.data = cat[offset:offset + n]
        offset += n
    return cat


def _back_to_back(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """The [sum N, K] view over one storage when the rows are contiguous and consecutive in it, else None."""
    first = rows[0]
    if not all(r.is_contiguous() and r.dtype == first.dtype and r.shape[1:] == first.shape[1:]
               and r.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for r in rows):
        return None
    expected = first.data_ptr()
    for r in rows:
        if r.data_ptr() != expected:
            return None
        expected += r.numel() * r.element_size()
    total = sum(r.shape[0] for r in rows)
    return first.as_strided((total, *first.shape[1:]), first.stride())


def _views_to_reshapes(node: fx.Node) -> None:
    stack = list(node.users)
    while stack:
        user = stack.pop()
        if not is_op(user, *_ALIASING_OPS):
            continue
        if is_op(user, aten.view.default, aten._unsafe_view.default):
            user.target = aten.reshape.default
        stack.extend(user.users)


_ACTIVATION_OPS = {aten.relu.default: "relu", aten.silu.default: "silu", aten.gelu.default: "gelu"}


def _activation(node: fx.Node) -> str | None:
    if node.target not in _ACTIVATION_OPS:
        return None
    name = _ACTIVATION_OPS[node.target]
    if name == "gelu":
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    return name if name in ACTIVATIONS else None


def fuse_linear_epilogues(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    counts: dict[str, int] = defaultdict(int)
    for node in list(graph.nodes):
        parts = _linear_parts(node)
        if parts is None:
            continue
        x2d, w_t, bias = parts
        x, out = x2d, node
        # Absorb the flatten/unflatten views around the 2-D matmul so the op sees [..., K] -> [..., N].
        view_back = next(iter(node.users)) if single_user(node) else None
        if (is_op(x2d, *VIEW_OPS) and single_user(x2d) and view_back is not None and is_op(view_back, *VIEW_OPS)
                and len(shape(x2d.args[0])) >= 2 and same_shape(shape(x2d.args[0])[-1:], shape(x2d)[-1:])
                and same_shape(shape(view_back), (*shape(x2d.args[0])[:-1], shape(node)[-1]))):
            x, out = x2d.args[0], view_back
        activation = "none"
        user = next(iter(out.users)) if single_user(out) else None
        if user is not None and (act := _activation(user)) is not None:
            activation, out = act, user
        residual = None
        user = next(iter(out.users)) if single_user(out) else None
        if (is_op(user, aten.add.Tensor) and not user.kwargs and len(user.args) == 2
                and all(isinstance(a, fx.Node) for a in user.args)):
            other = user.args[1] if user.args[0] is out else user.args[0]
            if dtype(other) == dtype(out) and same_shape(shape(other), shape(out)) and same_shape(shape(user), shape(out)):
                residual, out = other, user
        with graph.inserting_before(out):
            weight = graph.call_function(aten.t.default, (w_t,))
            fused = graph.call_function(torch.ops.mmaccel.fused_linear.default, (x, weight, bias, activation, residual))
        fused.meta["mmaccel_layer"] = layer_name(node)
        replace_uses(out, fused)
        counts[f"{'bias' if bias is not None else 'no bias'}, {activation}{', residual' if residual is not None else ''}"] += 1
    graph.eliminate_dead_code()
    total = sum(counts.values())
    changes = [f"{total} linear(s) -> mmaccel.fused_linear: " + ", ".join(f"[{k}] x{v}" for k, v in counts.items())] if total else []
    return PassResult(matched=total, changes=changes)
