"""Linear-layer fusion passes.

parallel_linear_fusion: linears that read the same input with frozen weights (Q/K/V, gate/up) become one
    matmul on the concatenated weights, split afterwards. One weight read, one launch instead of several.
linear_epilogue_fusion: matmul + bias + activation (+ residual add) become one mmaccel::fused_linear op
    that a target lowers to one kernel.
Near-misses, with the reason mmaccel.explain shows: a matmul reading the same input as others that cannot join
them (weight or bias not a frozen constant, addmm with beta/alpha); an activation or add after a linear that
stays separate (the pre-activation value is read elsewhere, the add broadcasts or converts).
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Sequence

import torch
import torch.fx as fx

from ..compiler._torch_internals import storage_id
from ..ops.fused_linear import ACTIVATIONS
from .patterns import (VIEW_OPS, Miss, add_constant, aten, constant_value, drop_dead_nodes, dtype, is_constant, is_op,
                       layer_name, merged_layer_name, replace_uses, same_shape, shape, single_user)
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


def _not_a_linear(node: fx.Node) -> str:
    """Why an mm/addmm node is not a linear layer with a frozen weight (_linear_parts gave None)."""
    if node.kwargs or len(node.args) > 3:
        return f"addmm with beta/alpha {dict(node.kwargs) or node.args[3:]}"
    weight = node.args[-1]
    if not is_constant(weight):
        return f"its weight '{weight.name}' is not a frozen constant"
    return f"its bias {list(shape(node.args[0]))} is not one value per output column"


def fuse_parallel_linears(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    # The anchor: one input that several matmuls read. The rest is checked member by member.
    by_input: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if is_op(node, aten.mm.default, aten.addmm.default):
            by_input[node.args[0] if node.target is aten.mm.default else node.args[1]].append(node)
    changes, misses, fused = [], [], 0
    for x, matmuls in by_input.items():
        members = []
        for node in matmuls if len(matmuls) > 1 else ():
            reason = _why_not_parallel(node)
            if reason is None:
                members.append(node)
            else:
                misses.append(Miss(node, f"not merged with the other matmuls reading '{x.name}': {reason}"))
        if len(members) < 2:
            continue
        widths = [int(shape(m)[-1]) for m in members]
        _fuse_group(gm, x, members, ctx.weight_owners)
        # Drop the replaced weights now, not at the next cleanup: their storage is freed group by group, so
        # compiling adds one group's weights at a time (H200, 7B dims, 8 layers: peak above the model 2.09 GiB
        # when all groups were dropped at the end)
        drop_dead_nodes(gm.graph)
        drop_unused_constants(gm)
        fused += 1
        changes.append(f"{len(members)} linears on '{x.name}' -> one matmul of width {sum(widths)} (split {widths})")
    return PassResult(matched=fused, changes=changes, near_misses=[str(m) for m in misses])


def _why_not_parallel(node: fx.Node) -> str | None:
    """None when the matmul can join the others on its input: a linear whose weight (and bias, if any) are
    frozen constants. Sharing the input, the members share K and dtype (mm checks both)."""
    parts = _linear_parts(node)
    if parts is None:
        return _not_a_linear(node)
    if parts[2] is not None and not is_constant(parts[2]):
        return f"its bias '{parts[2].name}' is not a frozen constant"
    return None


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
    """The [sum N, K] view over one storage when the rows are contiguous and consecutive in it, else None. Read
    from storage identity and offsets, not addresses: a parameter weights="release" freed enters a recompile as
    a stand-in with its layout but no data (compiler/release.py), and must be found back to back all the same."""
    first = rows[0]
    if not all(r.is_contiguous() and r.dtype == first.dtype and r.shape[1:] == first.shape[1:]
               and storage_id(r) == storage_id(first) for r in rows):
        return None
    expected = first.storage_offset()
    for r in rows:
        if r.storage_offset() != expected:
            return None
        expected += r.numel()
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
    misses: list[Miss] = []
    for node in list(graph.nodes):
        parts = _linear_parts(node)
        if parts is None:
            continue
        x2d, w_t, bias = parts
        x, out = _absorb_views(node, x2d)
        activation, out, act_miss = _absorb_activation(node, out)
        residual, out, residual_miss = _absorb_residual(node, out)
        misses += [m for m in (act_miss, residual_miss) if m is not None]
        with graph.inserting_before(out):
            weight = graph.call_function(aten.t.default, (w_t,))
            fused = graph.call_function(torch.ops.mmaccel.fused_linear.default, (x, weight, bias, activation, residual))
        fused.meta["mmaccel_layer"] = layer_name(node)
        replace_uses(out, fused)
        counts[f"{'bias' if bias is not None else 'no bias'}, {activation}{', residual' if residual is not None else ''}"] += 1
    drop_dead_nodes(graph)
    total = sum(counts.values())
    changes = [f"{total} linear(s) -> mmaccel.fused_linear: " + ", ".join(f"[{k}] x{v}" for k, v in counts.items())] if total else []
    return PassResult(matched=total, changes=changes, near_misses=[str(m) for m in misses])


def _absorb_views(node: fx.Node, x2d: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(input, output) of the linear with the flatten/unflatten views around the 2-D matmul absorbed, so the
    op sees [..., K] -> [..., N]; else the matmul's own."""
    view_back = next(iter(node.users)) if single_user(node) else None
    if (is_op(x2d, *VIEW_OPS) and single_user(x2d) and view_back is not None and is_op(view_back, *VIEW_OPS)
            and len(shape(x2d.args[0])) >= 2 and same_shape(shape(x2d.args[0])[-1:], shape(x2d)[-1:])
            and same_shape(shape(view_back), (*shape(x2d.args[0])[:-1], shape(node)[-1]))):
        return x2d.args[0], view_back
    return x2d, node


def _absorb_activation(node: fx.Node, out: fx.Node) -> tuple[str, fx.Node, Miss | None]:
    """(activation, new output, near-miss): the activation applied to the linear's output, when it is the only
    user; a Miss when an activation reads it but so does something else."""
    activations = [u for u in out.users if _activation(u) is not None]
    if activations and single_user(out):
        return _activation(activations[0]), activations[0], None
    if activations:
        return "none", out, Miss(node, f"its output is read by {activations[0].name} and {len(out.users) - 1} "
                                       f"other node(s): the activation stays separate")
    return "none", out, None


def _absorb_residual(node: fx.Node, out: fx.Node) -> tuple[fx.Node | None, fx.Node, Miss | None]:
    """(residual, new output, near-miss): the tensor added to the output when the add is its only user and
    neither broadcasts nor converts; a Miss when the add does."""
    user = next(iter(out.users)) if single_user(out) else None
    if not (is_op(user, aten.add.Tensor) and not user.kwargs and len(user.args) == 2
            and all(isinstance(a, fx.Node) for a in user.args)):
        return None, out, None
    other = user.args[1] if user.args[0] is out else user.args[0]
    if dtype(other) != dtype(out):
        return None, out, Miss(node, f"the add after it reads a {dtype(other)} tensor, the output is {dtype(out)}: "
                                     f"not fused as a residual")
    if not (same_shape(shape(other), shape(out)) and same_shape(shape(user), shape(out))):
        return None, out, Miss(node, f"the add after it broadcasts {list(shape(other))} against the output "
                                     f"{list(shape(out))}: not fused as a residual")
    return other, user, None
