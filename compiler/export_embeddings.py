"""Quantized token embeddings for export_onnx(generation=True) with a quantize option (issue 18).

The quantize pass takes linears only, so a decoder's token embedding table stayed fp32 in the int4 folder: 98 MB
of a 125M Llama's 154 MB (0.31x of fp32's bytes, the issue's target is under 0.3x). Here each aten.embedding on a
frozen floating-point table becomes mmaccel::int8_embedding (ops/int8_embedding.py: int8 per row, gathered then
scaled in standard ONNX ops, so ONNX Runtime cannot fold it back to fp32).

Lossy, so measured: the graph's outputs with and without the int8 tables against the model run eagerly on the
graph's trace inputs (the inputs the quantize pass measured on); the first is the file's error, quantize pass
included, and must stay within accuracy_budget, or the tables stay fp32 (with a warning). Both numbers go into the
report as the pass `quantize_embedding`.

A table also read in fp32 elsewhere (a tied lm_head the quantize pass left unquantized) is left alone, a near-miss:
the fp32 table stays in the file for the head, and an int8 copy beside it would add bytes. A tied head the pass
did quantize reads its own int4 / int8 weights, so the fp32 table is the embedding's alone and gets replaced.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..ops.int8_embedding import quantize_embedding_rows
from ..passes.cleanup import drop_unused_constants
from ..passes.contract import PassResult
from ..passes.graph import clone_module
from ..passes.lossy import pooled_relative_error, run_graph
from ..passes.patterns import add_constant, constant_value, is_constant
from ..passes.quantize import EMBEDDING, token_embeddings
from .errors import warn_once

NAME = "quantize_embedding"


def quantize_embeddings(gm: fx.GraphModule, inputs: Sequence[Any], reference: list[torch.Tensor],
                        budget: float) -> PassResult:
    """Replace gm's token embeddings by int8 ones when the error of the result against `reference` (the model's
    outputs on `inputs`) stays within `budget`; the PassResult says what was done and measured."""
    start = time.perf_counter()
    tables, near_misses = _tables(gm)
    result = PassResult(name=NAME, lossy=True, near_misses=near_misses, nodes_before=len(gm.graph.nodes))
    if not tables:
        result.changes = ["no token embedding on a table only embeddings read"]
        return result
    made = {target: quantize_embedding_rows(table) for target, table in tables.items()}
    before = pooled_relative_error([run_graph(gm, inputs)], [reference])
    candidate = clone_module(gm)
    _rewrite(candidate, made)
    after = pooled_relative_error([run_graph(candidate, inputs)], [reference])
    shapes = ", ".join(str(tuple(t.shape)) for t in tables.values())
    measured = (f"measured relative output error against the model on the trace inputs {after:.2e} "
                f"({before:.2e} with the fp32 table(s))")
    if not after <= budget:  # NaN counts as over budget
        warn_once(f"mmaccel: token embedding(s) {shapes} left fp32: int8 rows would make the {measured}, over "
                  f"accuracy_budget {budget:g}")
        result.changes, result.measured_error = [f"rolled back, over budget {budget:g}: {measured}"], before
    else:
        result.matched = _rewrite(gm, made)
        mb = sum(t.numel() * t.element_size() for t in tables.values()) / 1e6
        kept = sum(q.numel() + s.numel() * s.element_size() for q, s in made.values()) / 1e6
        result.changes = [f"{result.matched} token embedding(s) {shapes} int8 per row ({mb:.2f} -> {kept:.2f} MB); "
                          f"{measured}; budget {budget:g}"]
        result.measured_error = after
    result.nodes_after, result.seconds = len(gm.graph.nodes), time.perf_counter() - start
    return result


def _tables(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The frozen floating-point tables that embeddings read and nothing else reads (a tied lm_head the quantize
    pass kept would still read it: an int8 copy would add bytes beside it), by constant name; near-misses for
    the others. The quantize lever's own rule (passes/quantize.py token_embeddings)."""
    nodes, near_misses = token_embeddings(gm)
    return {node.args[0].target: constant_value(gm, node.args[0].target) for node in nodes}, near_misses


def _rewrite(gm: fx.GraphModule, made: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """aten.embedding(table, ids) -> int8_embedding(ids, q, scale) for each table in `made`; the fp32 tables
    are dropped from gm. Returns how many embeddings were rewritten."""
    count, added = 0, {}
    for node in list(gm.graph.find_nodes(op="call_function", target=EMBEDDING)):
        weight = node.args[0]
        if not is_constant(weight) or weight.target not in made:
            continue
        with gm.graph.inserting_before(node):
            if weight.target not in added:
                added[weight.target] = [gm.graph.get_attr(add_constant(gm, f"_int8_embedding_{part}", t))
                                        for part, t in zip(("weight", "scale"), made[weight.target])]
            new = gm.graph.call_function(torch.ops.mmaccel.int8_embedding.default, (node.args[1], *added[weight.target]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.eliminate_dead_code()
    drop_unused_constants(gm)
    gm.recompile()
    return count
