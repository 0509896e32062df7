"""quantize (lossy, opt-in with options quantize=...): linear layers with frozen weights get quantized weights,
made once at compile time from the frozen weights.

int8_weight_only: each mmaccel::fused_linear becomes mmaccel::int8_linear with an int8 weight and one scale
per output channel (symmetric absmax). The pass runs the graph before and after on the compile's example
inputs and keeps the quantization only if the relative output error ||out - ref|| / ||ref|| is within
options.accuracy_budget; otherwise the graph stays unquantized and one warning says what was measured.
Layer-by-layer precision choice (hierarchy-aware mixed precision) and calibration sets are not built yet.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from ..compiler.errors import warn_once
from ..ops.int8_linear import quantize_per_channel
from .patterns import add_constant, constant_value, is_constant
from .pipeline import PassContext, PassResult, _copy_graph, clone_module

FUSED_LINEAR = torch.ops.mmaccel.fused_linear.default
INT8_LINEAR = torch.ops.mmaccel.int8_linear.default


def quantize_linears(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.options.quantize != "int8_weight_only":
        raise NotImplementedError(f"quantize={ctx.options.quantize!r}")
    if not ctx.example_inputs:
        raise ValueError("quantize needs the graph's example inputs to measure its error")
    reference = _run(gm, ctx.example_inputs)
    saved = _copy_graph(gm)
    before_bytes = after_bytes = 0
    count = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=FUSED_LINEAR)):
        x, weight, bias, activation, residual = node.args
        if not is_constant(weight) or not constant_value(gm, weight.target).is_floating_point():
            continue
        w = constant_value(gm, weight.target)
        q, scale = quantize_per_channel(w)
        with gm.graph.inserting_before(node):
            q_node = gm.graph.get_attr(add_constant(gm, "_int8_weight", q))
            s_node = gm.graph.get_attr(add_constant(gm, "_int8_scale", scale))
            new = gm.graph.call_function(INT8_LINEAR, (x, q_node, s_node, bias, activation, residual))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        before_bytes += w.numel() * w.element_size()
        after_bytes += q.numel() + scale.numel() * scale.element_size()
        count += 1
    if count == 0:
        return PassResult(changes=["no linear layer with a frozen weight"])
    gm.recompile()
    error = _relative_error(_run(gm, ctx.example_inputs), reference)
    budget = ctx.options.accuracy_budget
    summary = (f"int8 weight-only: {count} linear(s), weights {before_bytes / 2**20:.1f} -> "
               f"{after_bytes / 2**20:.1f} MiB; measured relative output error {error:.2e} on the example "
               f"inputs (budget {budget:g})")
    if not error <= budget:  # NaN counts as over budget
        gm.graph = saved
        gm.recompile()
        warn_once(f"mmaccel: quantization not applied: {summary}. Raise accuracy_budget to accept it.")
        return PassResult(matched=0, changes=[f"rolled back, over budget: {summary}"], measured_error=error)
    return PassResult(matched=count, changes=[summary], measured_error=error)


def _run(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The graph's outputs on the eager target, on copies of the inputs (a graph may write them in place)."""
    from ..backends.eager import compile_graph

    run = compile_graph(clone_module(gm))
    with torch.no_grad():
        out = run([a.clone() if isinstance(a, torch.Tensor) else a for a in inputs])
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]


def _relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, e in zip(actual, expected):
        if not e.is_floating_point() or e.numel() == 0:
            continue
        ref = e.double().norm()
        worst = max(worst, float((a.double() - e.double()).norm() / ref) if ref > 0 else float((a.double()).norm()))
    return worst
