"""Token merging in vision towers (lossy, opt-in: tokens="merge"), a lever of passes/lossy.py.

A tower is a chain of numbered blocks (layer names from Dynamo's nn_module_stack: "vision_model.encoder.layers.3")
over one residual stream [B, N, D]; a block's input is the [B, N, D] tensor made outside the block that only the
block reads. Each block input is a site: mmaccel::token_merge (ToMe bipartite soft matching, ops/token_merge.py)
merges r of its tokens before the block, the options r = 40%, 32%, 24%, 16%, 8% or 4% of the tower's tokens
(cheapest first), or none. r is fixed at compile time, so every shape stays static (no recompiles; CUDA graphs stay
on); it is clamped to (N - 1) // 2 of the tokens that reach the block (ToMe's rule: the A set keeps its first
token), so after large merges upstream a block merges fewer than its option says (r40% on every block of a
65-token tower: 26, 19, 9, 5, 2, 1 tokens).

After a merge every later shape holds fewer tokens: the rewrite follows the token axis forward through the ops a
transformer block is made of (views that flatten or split it, transposes, pointwise ops, layer norms, linears,
splits of the fused Q/K/V, SDPA) and rewrites the sizes the views and expands spell out. Attention is size-weighted
as in ToMe (a merged token stands for `size` originals): an additive log(size) bias over the keys, through SDPA's
attn_mask, so attention stays the fused op. Where the stream leaves the tower:
- a consumer that reads every token (the graph's output, LLaVA's projector after `[:, 1:]`) reads
  mmaccel::token_unmerge, each original token from the merged token it went into;
- `x[:, 0]` (CLIP/ViT's pooler) reads the merged stream as it is: the first token is never merged.
An op inside a block that the rewrite cannot follow (a user's attention mask, rotary embeddings that index the
positions, an attention left unfused) leaves the whole tower alone, with the reason as a near-miss. Text decoders
are such towers (causal masks), and are left alone that way.

Cost is in token-blocks, not bytes: r tokens merged before block b of a tower of L blocks save r * (L - b) token
passes through a block; the solver compares it with the error it adds (passes/lossy.py: a lever names its unit).
A site's cost is its own (the solver's costs add up), so it counts the r its option asks for: where merges upstream
clamp it, the saving is overstated (bench/tokens.py token_blocks counts what a mix keeps). The errors do not add:
a merge changes what every later block holds; the solver measures its mixes in context when they do not
(passes/lossy.py improve_in_context).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from .contract import PassContext
from .graph import clone_module
from .lossy import ORIGINAL, Site, UnrecordedOnRelease, split_hierarchy
from .patterns import VIEW_OPS, aten, is_op, layer_name, val

MERGE = torch.ops.mmaccel.token_merge.default
UNMERGE = torch.ops.mmaccel.token_unmerge.default
FUSED_LINEAR = torch.ops.mmaccel.fused_linear.default
SDPA = aten.scaled_dot_product_attention.default
# r per block as a fraction of the tower's tokens, cheapest first. ToMe's ViT-L/16 setting (r = 8 of 197 tokens,
# 4%) lost 0.4 points of ImageNet accuracy off the shelf; the larger r are for short towers and for the blocks
# after the first: on the trained 6-block digits tower (bench/token_merge_accuracy.py) r40% before every block
# but the first kept 37% of the token-blocks at +0.46 points, before every block it lost 7.1.
FRACTIONS = {"r40%": 0.40, "r32%": 0.32, "r24%": 0.24, "r16%": 0.16, "r8%": 0.08, "r4%": 0.04}
NOMINAL_R = "mmaccel_merge_r"  # a merge node's meta: the r its option asked for, before clamping
TOWER = "mmaccel_tower"  # the meta of the nodes the rewrite makes: the tower they belong to
SIZE_BIAS = "mmaccel_size_bias"  # an attn_mask node the rewrite made (log of the merged sizes)
_POINTWISE = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar,
              aten.mul.Scalar, aten.div.Scalar, aten.sub.Scalar, aten.neg.default, aten.pow.Tensor_Scalar,
              aten.gelu.default, aten.sigmoid.default, aten.tanh.default, aten.erf.default, aten.relu.default,
              aten.silu.default, aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default,
              aten.clone.default, aten._to_copy.default, aten.alias.default)


class Refused(Exception):
    """The token axis reaches an op the rewrite cannot follow; the tower is left alone."""


@dataclass(frozen=True)
class Axis:
    """Where a node's tokens are: dim `dim` of its value holds them with `inner` elements of that dim per token
    ([B * N, D] flattened: dim 0, inner 1); `old` tokens before this rewrite, `new` after; `source`: the merge
    whose size and index describe them."""
    dim: int
    inner: int
    old: int
    new: int
    source: fx.Node


@dataclass
class Tower:
    name: str
    blocks: list[str]  # block names, in order
    inputs: list[fx.Node]  # each block's input

    @property
    def tokens(self) -> int:
        return val(self.inputs[0]).shape[1]


def find_towers(gm: fx.GraphModule) -> tuple[list[Tower], list[str]]:
    """Chains of blocks with one [B, N, D] input each (N static, the same for every block), in graph order; and
    why towers whose inputs have symbolic sizes are left out."""
    inputs: dict[str, list[fx.Node]] = {}
    symbolic: dict[str, str] = {}  # tower -> why
    for node in gm.graph.nodes:
        v = val(node)
        if not (isinstance(v, torch.Tensor) and v.dim() == 3 and v.is_floating_point() and node.users):
            continue
        blocks = {split_hierarchy(layer_name(u))[1] for u in node.users}
        if len(blocks) == 1 and (block := blocks.pop()) != "-" and split_hierarchy(layer_name(node))[1] != block:
            if all(isinstance(s, int) for s in v.shape):
                inputs.setdefault(block, []).append(node)
            else:
                symbolic[split_hierarchy(block)[0]] = (
                    f"tower {split_hierarchy(block)[0]} left alone: {block}'s input {list(v.shape)} has symbolic "
                    "sizes (dynamic shapes, or calibration samples of different sizes); merging follows static sizes")
    towers: dict[str, Tower] = {}
    for block, nodes in inputs.items():
        if len(nodes) == 1:  # two candidate streams into one block: not one residual stream
            name = split_hierarchy(block)[0]
            tower = towers.setdefault(name, Tower(name, [], []))
            tower.blocks.append(block)
            tower.inputs.append(nodes[0])
    return [t for t in towers.values() if len({val(n).shape[1] for n in t.inputs}) == 1], list(symbolic.values())


def merge_tokens(graph: fx.Graph, block_input: fx.Node, r: int, tower: Tower) -> bool:
    """Merge r tokens (clamped) of `block_input` before the block that reads it, and follow the fewer tokens to
    where they leave the tower; False when no token can go. Raises Refused when the token axis cannot be followed
    (the graph is then half rewritten: the caller's copy is dropped)."""
    tokens = val(block_input).shape[1]
    r_applied = min(r, (tokens - 1) // 2)
    if r_applied < 1:
        return False
    upstream = _merges_before(graph, block_input, tower)
    size, index = (_output(graph, upstream[-1], 1), _output(graph, upstream[-1], 2)) if upstream else (None, None)
    users = list(block_input.users)
    with graph.inserting_after(block_input):
        merge = _emit(graph, tower.name, MERGE, block_input, size, index, r_applied)
    merge.meta[NOMINAL_R] = r
    merged = _output(graph, merge, 0)
    for user in users:
        user.replace_input_with(block_input, merged)
    axis = Axis(1, 1, tokens, tokens - r_applied, merge)
    _propagate(graph, {merged: axis, _output(graph, merge, 1): axis}, tower)
    return True


def _merges_before(graph: fx.Graph, stop: fx.Node, tower: Tower) -> list[fx.Node]:
    """The tower's merges ahead of `stop`, in graph order (the last one holds the sizes and index `stop` has)."""
    merges = []
    for node in graph.nodes:
        if node is stop:
            break
        if node.target is MERGE and node.meta.get(TOWER) == tower.name:
            merges.append(node)
    return merges


def _output(graph: fx.Graph, merge: fx.Node, i: int) -> fx.Node:
    """getitem i of a merge: 0 the tokens, 1 their sizes, 2 the index of the original tokens (made once)."""
    found = next((u for u in merge.users if u.target is operator.getitem and u.args[1] == i), None)
    if found is None:
        with graph.inserting_after(merge):
            found = _emit(graph, merge.meta[TOWER], operator.getitem, merge, i)
    return found


def _emit(graph: fx.Graph, tower: str, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
    """A node the rewrite makes, with its value and its tower."""
    node = graph.call_function(target, args, kwargs)
    node.meta[TOWER] = tower
    _refake(node)
    return node


def _refake(node: fx.Node) -> None:
    """node.meta["val"] recomputed from its arguments' values."""
    args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), val)
    if node.target is operator.getitem:
        node.meta["val"] = args[0][args[1]]
        return
    modes = []
    fx.node.map_aggregate((args, kwargs), lambda a: modes.append(a.fake_mode) if hasattr(a, "fake_mode") else a)
    with modes[0]:
        node.meta["val"] = node.target(*args, **kwargs)


def _inside(node: fx.Node, tower: Tower) -> bool:
    """Made by this rewrite, from a module of one of the tower's blocks, or from no module (a node a lossless
    pass made: parallel_linear_fusion's split of the fused Q/K/V)."""
    made_by_pass = not {"nn_module_stack", "stack_trace", "mmaccel_layer"} & set(node.meta)  # traced code has them
    return node.op != "output" and (node.meta.get(TOWER) == tower.name or made_by_pass
                                    or split_hierarchy(layer_name(node))[1] in tower.blocks)


def _propagate(graph: fx.Graph, seeds: dict[fx.Node, Axis], tower: Tower) -> None:
    """Rewrite every node downstream of `seeds` for the new token counts, in graph order. Where the tokens leave
    the tower they are unmerged for the first op outside it (a final norm, a projector, an attention-pooling
    head see every original token: a merged token repeated `size` times weighs in attention as the size bias
    does), except x[:, 0], which reads the unmerged class token."""
    tracked = dict(seeds)
    for node in list(graph.nodes):
        if node in tracked or not any(a in tracked for a in node.all_input_nodes):
            continue
        inside = _inside(node, tower)
        try:
            if not (inside or node.target is aten.select.int):
                raise Refused("outside the tower")
            axis = _follow(graph, node, tracked)
        except Refused as e:
            if inside:
                raise Refused(f"{layer_name(node)} ({node.name}): {e}") from None
            _unmerge_inputs(graph, node, tracked)
            continue
        _refake(node)
        if axis is not None:
            tracked[node] = axis


def _unmerge_inputs(graph: fx.Graph, node: fx.Node, tracked: dict[fx.Node, Axis]) -> None:
    for a in [a for a in node.all_input_nodes if a in tracked]:
        axis = tracked[a]
        if val(a).dim() != 3 or (axis.dim, axis.inner) != (1, 1):
            raise Refused(f"'{node.name}' ({node.target}) reads the tokens as {list(val(a).shape)}, a layout "
                          "token_unmerge cannot restore")
        with graph.inserting_before(node):
            restored = _emit(graph, axis.source.meta[TOWER], UNMERGE, a, _output(graph, axis.source, 2))
        node.replace_input_with(a, restored)


def _follow(graph: fx.Graph, node: fx.Node, tracked: dict[fx.Node, Axis]) -> Axis | None:
    """Rewrite `node` for its inputs' new token counts; its own token axis (None: its value has no tokens).
    Raises Refused, before changing anything, for an op the rewrite does not follow."""
    if node.op != "call_function":
        raise Refused("the graph's output")
    first = next(tracked[a] for a in node.all_input_nodes if a in tracked)
    rule = _RULES.get(node.target)
    if rule is not None:
        return rule(graph, node, tracked, first)
    if node.target in VIEW_OPS:
        return _reshape(node, tracked, first)
    if node.target in _POINTWISE:
        return _pointwise(node, tracked)
    raise Refused(f"'{node.name}' ({node.target}) is not an op the token rewrite follows")


def _only_first_tracked(node: fx.Node, tracked: dict[fx.Node, Axis]) -> None:
    if any(a in tracked for a in node.all_input_nodes if a is not node.args[0]):
        raise Refused(f"'{node.name}' ({node.target}) reads the tokens in more than its first argument")


def _old_shape(node: fx.Node, axis: Axis) -> list[int]:
    """A tracked node's shape before this rewrite (its meta holds the new one already)."""
    shape = list(val(node).shape)
    shape[axis.dim] = shape[axis.dim] // axis.new * axis.old
    return shape


def _reshape(node: fx.Node, tracked: dict[fx.Node, Axis], axis: Axis) -> Axis:
    """A view: the tokens are a factor of one output dim (kept, flattened with others, or split off)."""
    _only_first_tracked(node, tracked)
    sizes, old_in, old_out = list(node.args[1]), _old_shape(node.args[0], axis), list(val(node).shape)
    stride = axis.inner * math.prod(old_in[axis.dim + 1:])  # elements per token step, row-major
    for d in range(len(old_out)):
        below = math.prod(old_out[d + 1:])
        if below <= stride and stride % below == 0 and (below * old_out[d]) % (stride * axis.old) == 0:
            if not all(isinstance(s, int) for s in sizes):
                raise Refused(f"'{node.name}' has symbolic sizes")
            if sizes[d] != -1:
                sizes[d] = old_out[d] // axis.old * axis.new
            node.args = (node.args[0], sizes, *node.args[2:])
            return Axis(d, stride // below, axis.old, axis.new, axis.source)
    raise Refused(f"'{node.name}' splits the tokens over several dims {old_out}")


def _pointwise(node: fx.Node, tracked: dict[fx.Node, Axis]) -> Axis:
    """Elementwise: every tracked operand has its tokens at the same (right-aligned) dim; an untracked operand
    broadcasts over them (size 1 or no dim there)."""
    rank = val(node).dim()
    found = {(tracked[a].dim + rank - val(a).dim(), tracked[a].inner, tracked[a].new) for a in node.all_input_nodes
             if a in tracked}
    if len(found) != 1:
        raise Refused(f"'{node.name}' ({node.target}) combines token streams of different layouts")
    (dim, inner, _), axis = found.pop(), next(tracked[a] for a in node.all_input_nodes if a in tracked)
    for a in node.all_input_nodes:
        v = val(a)
        at = dim - (rank - v.dim()) if isinstance(v, torch.Tensor) else -1
        if a not in tracked and at >= 0 and v.shape[at] != 1:
            raise Refused(f"'{node.name}' ({node.target}) adds '{a.name}' {list(v.shape)}, one value per token "
                          "(a position embedding?)")
    return Axis(dim, inner, axis.old, axis.new, axis.source)


def _same(graph, node, tracked, axis) -> Axis:
    _only_first_tracked(node, tracked)
    return axis


def _getitem(graph, node, tracked, axis) -> Axis | None:
    """An output of a tracked layer norm, split or merge (a merge's index output has no tokens)."""
    return None if node.args[0].target is MERGE and node.args[1] == 2 else axis


def _layer_norm(graph, node, tracked, axis) -> Axis:
    _only_first_tracked(node, tracked)
    if axis.dim >= val(node.args[0]).dim() - len(node.args[1]):
        raise Refused(f"'{node.name}' normalizes over the tokens")
    return axis


def _split(graph, node, tracked, axis) -> Axis:
    _only_first_tracked(node, tracked)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim % val(node.args[0]).dim() == axis.dim:
        raise Refused(f"'{node.name}' splits the tokens")
    return axis


def _slice(graph, node, tracked, axis) -> Axis:
    _only_first_tracked(node, tracked)
    dim = node.args[1] if len(node.args) > 1 else 0
    if dim % val(node.args[0]).dim() == axis.dim:
        raise Refused(f"'{node.name}' slices the tokens")
    return axis


def _select(graph, node, tracked, axis) -> Axis | None:
    """x[:, 0] on [B, N, D] reads the first token, never merged: the pooled output needs no unmerge."""
    _only_first_tracked(node, tracked)
    rank = val(node.args[0]).dim()
    dim, index = node.args[1] % rank, node.args[2]
    if dim != axis.dim:
        return Axis(axis.dim - (dim < axis.dim), axis.inner, axis.old, axis.new, axis.source)
    if index == 0 and axis.inner == 1 and val(node.args[0]).shape[dim] == axis.new:
        return None
    raise Refused(f"'{node.name}' selects token {index}, which may be merged")


def _transpose(graph, node, tracked, axis) -> Axis:
    _only_first_tracked(node, tracked)
    rank = val(node.args[0]).dim()
    if node.target is aten.t.default:
        order = list(range(rank))[::-1]
    elif node.target is aten.transpose.int:
        order = list(range(rank))
        a, b = node.args[1] % rank, node.args[2] % rank
        order[a], order[b] = order[b], order[a]
    else:
        order = [d % rank for d in node.args[1]]
    return Axis(order.index(axis.dim), axis.inner, axis.old, axis.new, axis.source)


def _unsqueeze(graph, node, tracked, axis) -> Axis:
    _only_first_tracked(node, tracked)
    dim = node.args[1] % (val(node.args[0]).dim() + 1)
    return Axis(axis.dim + (dim <= axis.dim), axis.inner, axis.old, axis.new, axis.source)


def _squeeze(graph, node, tracked, axis) -> Axis:
    _only_first_tracked(node, tracked)
    dim = node.args[1] % val(node.args[0]).dim()
    if dim == axis.dim:
        raise Refused(f"'{node.name}' squeezes the token dim")
    return Axis(axis.dim - (dim < axis.dim), axis.inner, axis.old, axis.new, axis.source)


def _expand(graph, node, tracked, axis) -> Axis:
    _only_first_tracked(node, tracked)
    sizes, old_out = list(node.args[1]), list(val(node).shape)
    dim = axis.dim + len(old_out) - val(node.args[0]).dim()
    if sizes[dim] != -1:
        sizes[dim] = old_out[dim] // axis.old * axis.new
    node.args = (node.args[0], sizes, *node.args[2:])
    return Axis(dim, axis.inner, axis.old, axis.new, axis.source)


def _linear(graph, node, tracked, axis) -> Axis:
    """fused_linear(x, w, b, activation, residual): the tokens of x are not its features; a tracked residual has
    them where the output has."""
    x, *_, residual = node.args
    if x not in tracked or axis.dim == val(x).dim() - 1:
        raise Refused(f"'{node.name}' multiplies over the tokens")
    if any(a in tracked for a in node.args[1:4] if isinstance(a, fx.Node)) or (
            residual is not None and (residual not in tracked or tracked[residual] != axis)):
        raise Refused(f"'{node.name}' reads tokens of another layout in its weight, bias or residual")
    return axis


def _matmul(graph, node, tracked, axis) -> Axis:
    """mm(x, w), addmm(b, x, w) with x [tokens, K]."""
    x = node.args[1] if node.target is aten.addmm.default else node.args[0]
    if x not in tracked or axis.dim != 0 or sum(a in tracked for a in node.all_input_nodes) != 1:
        raise Refused(f"'{node.name}' multiplies over the tokens")
    return axis


def _attention(graph, node, tracked, axis) -> Axis | None:
    """SDPA over merged keys, with ToMe's size weighting: attn_mask = log(size) over the keys, [B, 1, 1, N]."""
    query, key, value = node.args[:3]
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    rank = val(key).dim()
    kv = [tracked.get(key), tracked.get(value)]
    if None in kv or kv[0] != kv[1] or (kv[0].dim, kv[0].inner) != (rank - 2, 1) or rank != 4:
        raise Refused(f"'{node.name}' reads keys and values that are not both [B, H, tokens, E]")
    if query in tracked and (tracked[query].dim, tracked[query].inner) != (rank - 2, 1):
        raise Refused(f"'{node.name}' reads queries of another layout")
    if (mask is not None and SIZE_BIAS not in mask.meta) or node.kwargs.get("is_causal") or len(node.args) > 3:
        raise Refused(f"'{node.name}' has an attention mask of the model's own")
    size, tower = _output(graph, kv[0].source, 1), kv[0].source.meta[TOWER]
    with graph.inserting_before(node):
        bias = _emit(graph, tower, aten.log.default, size)
        bias = _emit(graph, tower, aten.reshape.default, bias, [val(size).shape[0], 1, 1, kv[0].new])
        if val(bias).dtype != val(query).dtype:
            bias = _emit(graph, tower, aten._to_copy.default, bias, dtype=val(query).dtype)
    bias.meta[SIZE_BIAS] = True
    node.kwargs = {**node.kwargs, "attn_mask": bias}
    return tracked.get(query)


def _remerge(graph, node, tracked, axis) -> Axis:
    """A merge further down the tower: it reads the new sizes and index, its r clamped to the tokens it gets."""
    if tracked.get(node.args[0]) is None or (axis.dim, axis.inner) != (1, 1):
        raise Refused(f"'{node.name}' merges a stream of another layout")
    r = min(node.meta[NOMINAL_R], (axis.new - 1) // 2)
    old = val(node)[0].shape[1]
    node.args = (node.args[0], _output(graph, axis.source, 1), _output(graph, axis.source, 2), r)
    return Axis(1, 1, old, axis.new - r, node)


def _reunmerge(graph, node, tracked, axis) -> None:
    """An unmerge made by an earlier rewrite: it reads the index of the merge its tokens come from now."""
    if tracked.get(node.args[0]) is None:
        raise Refused(f"'{node.name}' reads tokens through its index only")
    node.args = (node.args[0], _output(graph, axis.source, 2))
    return None


Rule = Callable[[fx.Graph, fx.Node, dict, Axis], "Axis | None"]
_RULES: dict[Any, Rule] = {
    operator.getitem: _getitem, aten.native_layer_norm.default: _layer_norm,
    aten.split.Tensor: _split, aten.split_with_sizes.default: _split, aten.slice.Tensor: _slice,
    aten.select.int: _select, aten.transpose.int: _transpose, aten.permute.default: _transpose,
    aten.t.default: _transpose, aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze,
    aten.expand.default: _expand, FUSED_LINEAR: _linear, aten.mm.default: _matmul, aten.addmm.default: _matmul,
    SDPA: _attention, MERGE: _remerge, UNMERGE: _reunmerge,
}


def _tower_refusal(gm: fx.GraphModule, tower: Tower, r: int) -> str | None:
    """Why merging r tokens before every block of the tower, on a copy of gm, cannot be done; None: it can."""
    copy = clone_module(gm)
    nodes = {n.name: n for n in copy.graph.nodes}
    try:
        for block_input in tower.inputs:
            merge_tokens(copy.graph, nodes[block_input.name], r, tower)
    except Refused as e:
        return str(e)
    # the token axis found (dim 1 of the block inputs) must be the one the blocks attend over: a [N, B, D] tower
    # would otherwise merge images of the batch
    attended = {split_hierarchy(layer_name(n))[1] for n in copy.graph.find_nodes(op="call_function", target=SDPA)
                if isinstance(n.kwargs.get("attn_mask"), fx.Node) and SIZE_BIAS in n.kwargs["attn_mask"].meta}
    missing = [b for b in tower.blocks if b not in attended]
    return f"no attention over dim 1 of the stream in {missing[0]}" if missing else None


# tokens="auto" on one graph: its other levers change how many image tokens a prompt holds, an input of the graph.
AUTO_ON_ONE_GRAPH = ("tokens='auto' on one graph is tokens='merge': 'resolution' and 'prune' rewrite a LLaVA prompt, "
                     "which only mmaccel.generate does (there 'auto' chooses among them by first-token time)")


class MergeLever(UnrecordedOnRelease):
    """The token lever of the lossy mechanism: each block input of each vision tower is a site, its options the
    tokens to merge there (cheapest first), then ORIGINAL. Cost: token-blocks."""
    name, noun, unit, cost_unit = "tokens", "token merging", "block(s) merging tokens", "token-blocks"

    def __init__(self, scheme: str) -> None:
        if scheme not in ("merge", "auto"):
            raise NotImplementedError(f"tokens={scheme!r} has no graph lever (options validation should have refused "
                                      "it); tokens='merge' (and 'auto', which means it on one graph) is the one built")
        self.label = "merge"
        self.scheme = scheme
        self.near_misses: list[str] = []
        self.info: dict[str, tuple[Tower, dict[str, int], int]] = {}  # site node -> tower, option -> r, depth

    def sites(self, gm: fx.GraphModule, ctx: PassContext) -> list[Site]:
        self.near_misses, self.info = ([AUTO_ON_ONE_GRAPH] if self.scheme == "auto" else []), {}
        if gm.graph.find_nodes(op="call_function", target=MERGE):
            return []  # merged already: a second run changes nothing
        sites = []
        towers, missed = find_towers(gm)
        self.near_misses += missed
        for tower in towers:
            options = self._options(tower.tokens)
            reason = _tower_refusal(gm, tower, max(options.values(), default=0)) if options else \
                f"{tower.tokens} tokens, too few to merge"
            if reason is not None:
                self.near_misses.append(f"tower {tower.name} left alone: {reason}")
                continue
            for i, (block, x) in enumerate(zip(tower.blocks, tower.inputs)):
                depth = len(tower.blocks) - i
                self.info[x.name] = (tower, options, depth)
                sites.append(Site(x.name, block, tuple(val(x).shape), tower.tokens * depth, (*options, ORIGINAL),
                                  {ORIGINAL: 0.0}))
        return sites

    @staticmethod
    def _options(tokens: int) -> dict[str, int]:
        """Option -> r, for the fractions that give a distinct r of at least one token."""
        options: dict[str, int] = {}
        for option, fraction in FRACTIONS.items():
            r = round(tokens * fraction)
            if 1 <= r <= (tokens - 1) // 2 and r not in options.values():
                options[option] = r
        return options

    def cost(self, site: Site, option: str) -> int:
        tower, options, depth = self.info[site.node]
        return (tower.tokens - options[option]) * depth

    def rewrite(self, graph: fx.Graph, node: fx.Node, option: str, add: Callable[[str, torch.Tensor], str]) -> str:
        tower, options, _ = self.info[node.name]
        return option if merge_tokens(graph, node, options[option], tower) else ORIGINAL
