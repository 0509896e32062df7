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

A head quantized to int4 (MatMulNBits by now, export_generation.use_matmul_nbits) whose bits the table gives
exactly when quantized the same way is the table's tied head: the embedding can read the head's 4-bit weights
instead of an int8 copy (ops/int4_embedding_nbits.py), the table stored once as ONNX Runtime GenAI's builder
stores it. That candidate is measured first (4-bit rows have more error than int8 rows); over the budget, the
int8 rows are measured next, then the fp32 table stays. Qwen2 130m with a tied head: the int8 table was 24.6 MB
of a 79.2 MB int4 folder, against GenAI's 64.0 MB (bench/onnx_fusion_peers.py --arch qwen2).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..ops.int4_embedding_nbits import gather_layout
from ..ops.int4_linear import quantize_int4_groupwise
from ..ops.int4_matmul_nbits import to_matmul_nbits
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
    """Replace gm's token embeddings by ones reading a tied int4 head's weights, else by int8 ones, when the
    error of the result against `reference` (the model's outputs on `inputs`) stays within `budget`; the
    PassResult says what was done and measured."""
    start = time.perf_counter()
    tables, near_misses = _tables(gm)
    result = PassResult(name=NAME, lossy=True, near_misses=near_misses, nodes_before=len(gm.graph.nodes))
    if not tables:
        result.changes = ["no token embedding on a table only embeddings read"]
        return result
    tied = _tied_int4_heads(gm, tables)
    int8 = {target: quantize_embedding_rows(table) for target, table in tables.items()}
    before = pooled_relative_error([run_graph(gm, inputs)], [reference])
    shapes = ", ".join(str(tuple(t.shape)) for t in tables.values())
    tried = []
    # the tied tables through their head's 4-bit weights first (the fewest bytes), then every table int8
    options = [(tied, {t: r for t, r in int8.items() if t not in tied})] if tied else []
    for shared, rows in options + [({}, int8)]:
        candidate = clone_module(gm)
        _rewrite(candidate, rows, shared)
        after = pooled_relative_error([run_graph(candidate, inputs)], [reference])
        how = (f"{len(shared)} read from the tied int4 head's weights, {len(rows)} int8 per row" if shared else
               "int8 per row")
        tried.append(f"{how}: relative output error {after:.2e}")
        if after <= budget:  # NaN counts as over budget
            result.matched = _rewrite(gm, rows, shared)
            mb = sum(t.numel() * t.element_size() for t in tables.values()) / 1e6
            kept = sum(q.numel() + s.numel() * s.element_size() for q, s in rows.values()) / 1e6
            kept += sum(x.numel() * x.element_size() for parts in shared.values() for x in parts[1:]) / 1e6
            result.changes = [f"{result.matched} token embedding(s) {shapes}: {how} ({mb:.2f} -> {kept:.2f} MB); "
                              f"measured relative output error against the model on the trace inputs {after:.2e} "
                              f"({before:.2e} with the fp32 table(s)); budget {budget:g}",
                              *(f"tried first, over budget: {t}" for t in tried[:-1])]
            result.measured_error = after
            break
    else:
        measured = "; ".join(tried)
        warn_once(f"mmaccel: token embedding(s) {shapes} left fp32: every quantized form is over accuracy_budget "
                  f"{budget:g} ({measured}; {before:.2e} with the fp32 table(s))")
        result.changes, result.measured_error = [f"rolled back, over budget {budget:g}: {measured}"], before
    result.nodes_after, result.seconds = len(gm.graph.nodes), time.perf_counter() - start
    return result


def _tied_int4_heads(gm: fx.GraphModule, tables: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """table constant -> (the head's b node, GatherBlockQuantized scales, zero points) for each table that,
    quantized as the quantize pass quantizes an int4 linear (quantize_int4_groupwise, then MatMulNBits' layout),
    gives exactly the bits of an int4 head: the head is the table's tied copy. Bits, not values, decide: a head
    quantized from other weights never matches all of them."""
    heads = list(gm.graph.find_nodes(op="call_function", target=torch.ops.mmaccel.int4_matmul_nbits.default))
    found = {}
    for target, table in tables.items():
        for head in heads:
            b, scales, zero_points = (constant_value(gm, n.target) for n in head.args[1:4])
            n, blocks, half = b.shape
            if tuple(table.shape) != (n, blocks * 2 * half) or scales.dtype != table.dtype:
                continue
            mine = to_matmul_nbits(*quantize_int4_groupwise(table, 2 * half), 2 * half)
            if all(torch.equal(x, y) for x, y in zip(mine, (b, scales, zero_points))):
                found[target] = (head.args[1], *gather_layout(scales, zero_points, blocks))
                break
    return found


def _tables(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The frozen floating-point tables that embeddings read and nothing else reads (a tied lm_head the quantize
    pass kept would still read it: an int8 copy would add bytes beside it), by constant name; near-misses for
    the others. The quantize lever's own rule (passes/quantize.py token_embeddings)."""
    nodes, near_misses = token_embeddings(gm)
    return {node.args[0].target: constant_value(gm, node.args[0].target) for node in nodes}, near_misses


def _rewrite(gm: fx.GraphModule, made: dict[str, tuple[torch.Tensor, torch.Tensor]],
             shared: dict[str, tuple] | None = None) -> int:
    """aten.embedding(table, ids) -> int8_embedding(ids, q, scale) for each table in `made`, or
    int4_embedding_nbits(ids, the head's b, scales, zero points) for each in `shared` (_tied_int4_heads); the fp32
    tables are dropped from gm. Returns how many embeddings were rewritten."""
    shared = shared or {}
    count, added = 0, {}
    for node in list(gm.graph.find_nodes(op="call_function", target=EMBEDDING)):
        weight = node.args[0]
        if not is_constant(weight) or (weight.target not in made and weight.target not in shared):
            continue
        with gm.graph.inserting_before(node):
            if weight.target in shared:
                b, scales, zero_points = shared[weight.target]
                if weight.target not in added:  # the head's own b constant: one copy of the bits in the file
                    added[weight.target] = [gm.graph.get_attr(b.target), *(
                        gm.graph.get_attr(add_constant(gm, f"_int4_embedding_{part}", t))
                        for part, t in (("scale", scales), ("zero", zero_points)))]
                op = torch.ops.mmaccel.int4_embedding_nbits.default
            else:
                if weight.target not in added:
                    added[weight.target] = [gm.graph.get_attr(add_constant(gm, f"_int8_embedding_{part}", t))
                                            for part, t in zip(("weight", "scale"), made[weight.target])]
                op = torch.ops.mmaccel.int8_embedding.default
            new = gm.graph.call_function(op, (node.args[1], *added[weight.target]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.eliminate_dead_code()
    drop_unused_constants(gm)
    gm.recompile()
    return count
