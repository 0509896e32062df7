"""Structural pruning of whole residual blocks (lossy, opt-in: prune="blocks"), a lever of passes/lossy.py.

A block is a numbered module of the model ("model.layers.3", "encoder.layer.0": the nodes whose layer name lies
under it, Dynamo's nn_module_stack, and the glue between them such as a split's getitems) that reads one residual
stream x and hands one value of x's shape on: x + f(x), pre-norm (Llama, ViT) or with the norm after the add
(BERT). Other inputs (masks, rotary tables, constants) may be read too. Dropping it makes its output its input,
ShortGPT-style; what only the block computed then goes with the cleanup.

Block redundancy is the cosine of the block's input against its output, per token, averaged over the calibration
tokens (near 1: the block changes the stream little); it is reported with each block, and the mechanism measures
the model's error with each block dropped before it chooses. Options per block: "drop", or ORIGINAL.

Left whole, with the reason: a block whose values leave it other than its output (a K/V cache returned), and a
block writing a graph input in place (a static KV cache: the prefill and decode graphs are pruned separately, so a
cache the dropped block no longer writes may still be read by a graph that kept it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from .contract import PassContext
from .lossy import ORIGINAL, Site, UnrecordedOnRelease, split_hierarchy
from .patterns import (aten, constant_value, dtype, is_constant, is_op, layer_name, same_shape, shape, val,
                       writes_in_place)
from .prune import FUSED_LINEAR, probe, weight_bytes
from .prune_heads import written_input

DROP = "drop"
DROPPED_TO = "mmaccel_dropped_to"  # a dropped block's output node -> the node its users read now


@dataclass
class _Block:
    name: str
    members: list[fx.Node]
    stream: fx.Node  # x, the residual stream read
    out: fx.Node  # the value handed on


def _members(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Nodes by numbered block, in graph order; a node without a module of its own (a split) joins the block that
    all its inputs and users are in."""
    blocks: dict[str, list[fx.Node]] = {}
    owner: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        block = split_hierarchy(layer_name(node))[1] if node.op == "call_function" else "-"
        if block != "-":
            owner[node] = block
            blocks.setdefault(block, []).append(node)
    for node in gm.graph.nodes:
        if node in owner or node.op != "call_function":
            continue
        around = {owner.get(n) for n in [*node.all_input_nodes, *node.users] if not is_constant(n)}
        if len(around) == 1 and None not in around:
            owner[node] = block = around.pop()
            blocks[block].append(node)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return {name: sorted(nodes, key=order.__getitem__) for name, nodes in blocks.items()}


def _is_residual(block: list[fx.Node], stream: fx.Node) -> bool:
    """The stream is added to what the block computes: an add, or the residual of a fused linear."""
    return any((is_op(n, aten.add.Tensor) and stream in n.args[:2]) or (is_op(n, FUSED_LINEAR) and n.args[4] is stream)
               for n in block)


def _downstream(members: list[fx.Node], stream: fx.Node) -> set[fx.Node]:
    """The members that depend on `stream` (members in graph order)."""
    reached = {stream}
    for node in members:
        if any(a in reached for a in node.all_input_nodes):
            reached.add(node)
    return reached - {stream}


def _trace(name: str, members: list[fx.Node]) -> _Block | str | None:
    """The residual block, why it cannot be dropped, or None when it is no residual block. Members that do not
    depend on the stream (rotary tables the block computed and CSE shared with later blocks) stay either way."""
    inside = set(members)
    # tensors only: a size (a SymInt under dynamic shapes) read outside stays valid whatever the block computes
    leaving = [n for n in members if isinstance(val(n), torch.Tensor) and any(u not in inside for u in n.users)]
    if not leaving:
        return None
    out = leaving[-1]
    inputs = dict.fromkeys(a for n in members for a in n.all_input_nodes
                           if a not in inside and not is_constant(a) and isinstance(val(a), torch.Tensor))
    streams = [a for a in inputs if same_shape(shape(a), shape(out)) and dtype(a) == dtype(out)
               and _is_residual(members, a) and out in _downstream(members, a)]
    if not streams:
        return None
    if len(streams) > 1:
        return f"it reads {len(streams)} inputs of its output's shape {[s.name for s in streams]}: x is unclear"
    computed = _downstream(members, streams[0])
    writer = next((u for n in computed for u in [n, *n.users] if writes_in_place(u)), None)
    cache = writer.args[0].name if writer is not None else written_input([a for a in inputs if a is not streams[0]])
    if cache is not None:
        return (f"it reads or writes graph input '{cache}', written in place (a static KV cache): the graphs that "
                "share it are pruned separately")
    others = [n.name for n in leaving if n in computed and n is not out]
    if others:
        return f"values other than its output leave it: {others}"
    return _Block(name, members, streams[0], out)


def find_blocks(gm: fx.GraphModule) -> tuple[list[_Block], list[str]]:
    """The droppable residual blocks of gm, and the near-misses with their reasons."""
    found, near_misses = [], []
    for name, members in _members(gm).items():
        block = _trace(name, members)
        if isinstance(block, str):
            near_misses.append(f"block {name} left whole: {block}")
        elif block is not None:
            found.append(block)
    return found, near_misses


def _cosines(gm: fx.GraphModule, ctx: PassContext, blocks: list[_Block]) -> list[float]:
    """Per block, the mean over calibration tokens of cos(input, output): how little the block changes the stream."""
    totals, count = [0.0] * len(blocks), 0
    for values in probe(gm, ctx, [node for b in blocks for node in (b.stream, b.out)]):
        for i in range(len(blocks)):
            x, y = (v.reshape(-1, v.shape[-1]).double() for v in values[2 * i:2 * i + 2])
            totals[i] += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum())
        count += values[0].reshape(-1, values[0].shape[-1]).shape[0]
    return [total / max(count, 1) for total in totals]


class BlockLever(UnrecordedOnRelease):
    """The lossy mechanism's lever for residual blocks: each block a site, its options "drop", then ORIGINAL."""
    name, label, noun, unit, cost_unit = "prune:blocks", "blocks", "pruning", "block(s) dropped", "bytes"

    def __init__(self) -> None:
        self.near_misses: list[str] = []
        self.blocks: dict[str, _Block] = {}  # by the output node's name (the site's node)

    def sites(self, gm: fx.GraphModule, ctx: PassContext) -> list[Site]:
        found, self.near_misses = find_blocks(gm)
        if not found:
            return []
        self.blocks = {block.out.name: block for block in found}
        sites = []
        for block, cosine in zip(found, _cosines(gm, ctx, found)):
            sites.append(Site(block.out.name, block.name, tuple(shape(block.out)[-1:]), self._bytes(gm, block),
                              (DROP, ORIGINAL), {ORIGINAL: 0.0}, score={"cosine(in, out)": cosine}))
        return sites

    @staticmethod
    def _bytes(gm: fx.GraphModule, block: _Block) -> int:
        """Bytes of the constants only the block reads (what dropping it frees)."""
        inside = set(block.members)
        owned = {a.target for n in block.members for a in n.all_input_nodes
                 if is_constant(a) and all(u in inside for u in a.users)}
        return weight_bytes(*(constant_value(gm, t) for t in owned if isinstance(constant_value(gm, t), torch.Tensor)))

    def cost(self, site: Site, option: str) -> int:
        return 0

    def rewrite(self, graph: fx.Graph, node: fx.Node, option: str, add: Callable[[str, torch.Tensor], str]) -> str:
        block = self.blocks[node.name]
        stream = next(n for n in graph.nodes if n.name == block.stream.name)
        while DROPPED_TO in stream.meta:  # the block before was dropped too: its input is this one's
            stream = stream.meta[DROPPED_TO]
        inside = {n.name for n in block.members}
        node.replace_all_uses_with(stream, delete_user_cb=lambda user: user.name not in inside)
        node.meta[DROPPED_TO] = stream
        return option
