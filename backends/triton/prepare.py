"""Graph preparation for code generation: composite ops written out as the primitive ATen ops that the
kernel generator fuses, and the graph made independent of the strides eager would have produced.

Each rewrite keeps meta["val"] exact (computed with the graph's fake mode), since code generation reads
shapes and dtypes from it."""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ...passes.patterns import writes_in_place

aten = torch.ops.aten


def emit(graph: fx.Graph, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
    """A new call_function node with its meta["val"] computed from the arguments' fake values."""
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = fx.node.map_aggregate((args, kwargs), lambda a: a.meta["val"] if isinstance(a, fx.Node) else a)
    with _fake_mode(fake_args, fake_kwargs):
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def _fake_mode(*trees: Any):
    found = []
    fx.node.map_aggregate(trees, lambda a: found.append(a.fake_mode) if hasattr(a, "fake_mode") else a)
    if not found:
        raise ValueError("no fake tensor among the arguments")
    return found[0]


def _upcast(graph: fx.Graph, x: fx.Node) -> fx.Node:
    dtype = x.meta["val"].dtype
    if dtype in (torch.float16, torch.bfloat16):
        return emit(graph, aten._to_copy.default, x, dtype=torch.float32)
    return x


def _cast(graph: fx.Graph, x: fx.Node, dtype: torch.dtype) -> fx.Node:
    return x if x.meta["val"].dtype == dtype else emit(graph, aten._to_copy.default, x, dtype=dtype)


def _layer_norm(graph: fx.Graph, node: fx.Node) -> dict[int, fx.Node] | None:
    x, normalized_shape, weight, bias, eps = node.args
    if len(normalized_shape) != 1:
        return None
    xf = _upcast(graph, x)
    mean = emit(graph, aten.mean.dim, xf, [-1], True)
    centered = emit(graph, aten.sub.Tensor, xf, mean)
    var = emit(graph, aten.mean.dim, emit(graph, aten.mul.Tensor, centered, centered), [-1], True)
    rstd = emit(graph, aten.rsqrt.default, emit(graph, aten.add.Tensor, var, eps))
    y = emit(graph, aten.mul.Tensor, centered, rstd)
    if weight is not None:
        y = emit(graph, aten.mul.Tensor, y, weight)
    if bias is not None:
        y = emit(graph, aten.add.Tensor, y, bias)
    return {0: _cast(graph, y, x.meta["val"].dtype), 1: mean, 2: rstd}


def _softmax(graph: fx.Graph, node: fx.Node) -> dict[int, fx.Node] | None:
    x, dim, half_to_float = node.args
    if dim not in (-1, x.meta["val"].dim() - 1):
        return None
    xf = _upcast(graph, x)
    shifted = emit(graph, aten.sub.Tensor, xf, emit(graph, aten.amax.default, xf, [-1], True))
    e = emit(graph, aten.exp.default, shifted)
    y = emit(graph, aten.div.Tensor, e, emit(graph, aten.sum.dim_IntList, e, [-1], True))
    return {0: _cast(graph, y, node.meta["val"].dtype)}


def _rows_then(graph: fx.Graph, x: fx.Node, n: Any) -> list[Any]:
    """The shape [*x's leading dims, n] for a reshape: a symbolic dim (Dynamo made a length dynamic) is read from
    x by a sym_size node, since a SymInt written into the graph as a value prints as its bare symbol ("s81"),
    which the graph's code does not define (a NameError on the third length of a compiled HF Llama)."""
    return [d if isinstance(d, int) else emit(graph, aten.sym_size.int, x, i)
            for i, d in enumerate(x.meta["val"].shape[:-1])] + [n]


def _fused_linear(graph: fx.Graph, node: fx.Node) -> dict[int, fx.Node] | None:
    """mmaccel::fused_linear -> one library matmul (cuBLAS picks the GEMV/GEMM kernel) and an epilogue of
    pointwise ops that the generator fuses into one kernel with whatever follows."""
    x, weight, bias, activation, residual = node.args
    xs = x.meta["val"].shape
    x2 = emit(graph, aten.reshape.default, x, [-1, xs[-1]])
    wt = emit(graph, aten.t.default, weight)
    plain = activation == "none" and residual is None
    y = emit(graph, aten.addmm.default, bias, x2, wt) if plain and bias is not None else emit(graph, aten.mm.default, x2, wt)
    y = emit(graph, aten.reshape.default, y, _rows_then(graph, x, weight.meta["val"].shape[0]))
    if not plain and bias is not None:
        y = emit(graph, aten.add.Tensor, y, bias)
    y = _ACTIVATIONS[activation](graph, y)
    if residual is not None:
        y = emit(graph, aten.add.Tensor, y, residual)
    return {0: y}


def _quantized_linear(graph: fx.Graph, node: fx.Node) -> dict[int, fx.Node] | None:
    """mmaccel's quantized linears -> backends/triton/quant_matmul.py and the same pointwise epilogue as
    fused_linear. int8_linear / int4_linear: the weight-only matmul with the dequantization fused into the
    kernel; w8a8_linear: those kernels on the dequantized activation for decode, the integer matmul beyond;
    fp8_linear: the scaled fp8 matmul."""
    from . import quant_matmul

    x, qweight = node.args[:2]
    x2 = emit(graph, aten.reshape.default, x, [-1, x.meta["val"].shape[-1]])
    if node.target in (torch.ops.mmaccel.w8a8_linear.default, torch.ops.mmaccel.fp8_linear.default):
        _, _, wscale, bias, activation, residual, *rest = node.args
        w8a8 = node.target is torch.ops.mmaccel.w8a8_linear.default
        granularity = rest[0] if rest else node.kwargs.get("granularity", "token" if w8a8 else "row")
        matmul = quant_matmul.w8a8_linear if w8a8 else quant_matmul.fp8_linear
        args = (x2, qweight, wscale, bias, granularity)
    else:
        if node.target is torch.ops.mmaccel.int8_linear.default:
            _, _, scale, bias, activation, residual = node.args
            zero, bits, group = None, 8, 0
        else:
            _, _, scale, zero, group, bias, activation, residual = node.args
            bits = 4
        if not quant_matmul.supports(x2.meta["val"], qweight.meta["val"], bits, group):
            graph.erase_node(x2)  # the op then runs its reference implementation
            return None
        matmul, args = quant_matmul.linear, (x2, qweight, scale, zero, bias, bits, group)
    n = qweight.meta["val"].shape[0]
    y = graph.call_function(matmul, args)
    y.meta["val"] = x2.meta["val"].new_empty((x2.meta["val"].shape[0], n))
    y = emit(graph, aten.reshape.default, y, _rows_then(graph, x, n))
    y = _ACTIVATIONS[activation](graph, y)
    if residual is not None:
        y = emit(graph, aten.add.Tensor, y, residual)
    return {0: y}


def _token_reduction(graph: fx.Graph, node: fx.Node) -> None:
    """mmaccel::token_merge / token_unmerge run their references: sorts, gathers and scatter-adds that are ATen
    library calls either way (the code generator fuses pointwise chains, not these); none reads a value on the
    host, so a CUDA graph records them."""
    return None


_ACTIVATIONS = {
    "none": lambda g, v: v, "relu": lambda g, v: emit(g, aten.relu.default, v),
    "silu": lambda g, v: emit(g, aten.silu.default, v), "gelu": lambda g, v: emit(g, aten.gelu.default, v),
    "gelu_tanh": lambda g, v: emit(g, aten.gelu.default, v, approximate="tanh")}


# The Triton target's lowering table: ATen composites written out for the code generator, and every mmaccel op
# (ops/), each lowered to ATen ops + this target's matmul kernels. Every op in ops.OPS has a row here
# (tests/test_ops_layout.py): an op without one would make the target refuse the graph.
COMPOSITES = {
    torch.ops.mmaccel.int8_linear.default: _quantized_linear,
    torch.ops.mmaccel.int4_linear.default: _quantized_linear,
    torch.ops.mmaccel.w8a8_linear.default: _quantized_linear,
    torch.ops.mmaccel.fp8_linear.default: _quantized_linear,
    aten.native_layer_norm.default: _layer_norm,
    aten._softmax.default: _softmax,
    torch.ops.mmaccel.fused_linear.default: _fused_linear,
    torch.ops.mmaccel.token_merge.default: _token_reduction,
    torch.ops.mmaccel.token_unmerge.default: _token_reduction,
    # Export-only (ONNX Runtime's MatMulNBits layout, the token embedding reading it and the int8 token
    # embedding, inserted by export_onnx(generation=True)): should a graph holding them reach this target, None
    # leaves each op to its reference implementation.
    torch.ops.mmaccel.int4_matmul_nbits.default: lambda graph, node: None,
    torch.ops.mmaccel.int4_embedding_nbits.default: lambda graph, node: None,
    torch.ops.mmaccel.int8_embedding.default: lambda graph, node: None,
}


def expand_composites(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        rewrite = COMPOSITES.get(node.target) if node.op == "call_function" else None
        if rewrite is None:
            continue
        with gm.graph.inserting_before(node):
            parts = rewrite(gm.graph, node)
        if parts is None:
            continue
        if isinstance(node.meta["val"], (tuple, list)):
            for user in list(node.users):
                if user.target is not operator.getitem:
                    raise NotImplementedError(f"{node.name} is used whole by {user.format_node()}")
                user.replace_all_uses_with(parts[user.args[1]])
                gm.graph.erase_node(user)
        else:
            node.replace_all_uses_with(parts[0])
        gm.graph.erase_node(node)
        count += 1
    gm.graph.eliminate_dead_code()
    return count


def views_as_reshapes(gm: fx.GraphModule) -> None:
    """Generated kernels write contiguous buffers where eager may have kept an input's layout, so a `view`
    that was valid on eager's strides may not be on ours: reshape gives the same values either way. An
    as_strided that only reshapes a contiguous tensor (adaptive pooling's unsqueeze, e.g. Swin's pooler)
    is a reshape too."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
        elif node.op == "call_function" and node.target is aten.as_strided.default and _reshapes_contiguous(node):
            node.target, node.args, node.kwargs = aten.reshape.default, node.args[:2], {}


# Views that never copy (reshape may): moving one earlier cannot change what it reads
_ALIASING_VIEWS = {aten.slice.Tensor, aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
                   aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.select.int}


def hoist_views(gm: fx.GraphModule) -> int:
    """Each aliasing view right after its inputs. The planner joins a root to an earlier kernel only when the
    root's inputs precede that kernel's first node, and an ATen view placed late in graph order (the slices
    of K that rotary reads, traced after Q's rotary) kept Q's rotary and K's rotary + KV-cache write in two
    kernels. A view of a tensor that something writes in place stays where it is."""
    position = {n: float(i) for i, n in enumerate(gm.graph.nodes)}
    moved = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target in _ALIASING_VIEWS and node.all_input_nodes):
            continue
        if any(writes_in_place(u) for a in node.all_input_nodes for u in a.users):
            continue
        last = max(node.all_input_nodes, key=position.__getitem__)
        if last.next is not node:
            last.append(node)
            position[node] = position[last] + 1e-6 * (moved + 1)
            moved += 1
    return moved


def _reshapes_contiguous(node: fx.Node) -> bool:
    """as_strided(x, size, stride) reads a contiguous x in order: no offset, same numel, and stride the
    contiguous strides of `size` wherever a dim has more than one element."""
    x, size, stride = node.args[:3]
    offset = node.args[3] if len(node.args) > 3 else node.kwargs.get("storage_offset")
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or offset not in (None, 0) or not val.is_contiguous():
        return False
    if not all(isinstance(v, int) for v in (*size, *stride, val.numel())):  # static sizes only
        return False
    if val.storage_offset() != 0 or val.numel() != math.prod(size):
        return False
    return all(s == e for d, s, e in zip(size, stride, _contiguous_strides(size)) if d != 1)


def _contiguous_strides(size) -> list[int]:
    strides, running = [], 1
    for d in reversed(size):
        strides.append(running)
        running *= d
    return strides[::-1]


def stride_dependent_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (aten.as_strided.default, aten.as_strided_.default, aten.set_.source_Tensor)]
