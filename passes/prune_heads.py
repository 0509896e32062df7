"""Structural pruning of attention heads (lossy, opt-in: prune="heads"), a lever of passes/lossy.py.

An attention, on the post-fusion graph, is q/k/v projections (one fused_linear and a split, or separate ones) ->
views that split the channels into heads [..., H, D] -> transposes, rotary (pointwise ops with cos/sin broadcast
over the heads, slices and cats of the head dim), per-head norms -> scaled_dot_product_attention (attention_fusion
left it there) -> transposes and a view that merges the heads back -> the output projection (o_proj). Head h is
rows [h*D, (h+1)*D) of each projection and columns [h*Dv, (h+1)*Dv) of o_proj. Grouped-query attention (enable_gqa:
query head h reads KV head h // n) is pruned by KV group: a KV head and its n query heads go together.

Which heads: each group scored by what it adds to o_proj's output on the calibration samples, ||h_g W_o[:, g]^T||
(from the Gram matrix of o_proj's input: activation-aware, the head's output and o_proj's columns together), the top
groups kept; o_proj (and its bias) is then refit by least squares over the kept heads' columns (prune.refit_columns,
the MLP's refit). The scale stays 1/sqrt(head_dim): the head dim does not change, only the head count in the
reshapes. Options per attention: keep 50% / 75% of its groups, or all of them.

A parallel block (Phi, GPT-J: Q, K, V and the MLP's input in one matmul after parallel_linear_fusion) keeps the
MLP's rows of that matmul whole; with prune="mlp_channels" asked too, its attention is left to the MLP lever (both
would write the shared weight, each from the original). Views that reshape only the dims inside a head and stacks
beside the head dim (GPT-J's rotary over interleaved pairs) are followed. So are q, k and v cut out of each head
after the heads were split off (GPT-NeoX/Pythia: a split of [..., H, 3 * D]; Persimmon/Fuyu: selects of [..., H, 3,
D], then a LayerNorm per head): head h is then rows [h * 3D, (h + 1) * 3D) of the one projection (multi-head only).
CodeGen's [..., 4, 3 * D] model-parallel groups are followed only where there are 4 heads (a group per head); with
more, the view to the heads mixes them with other dims and the attention is left whole.

Left whole with the reason (a near-miss): any node between projections and o_proj also used elsewhere (K/V returned
as a cache), a view that mixes heads with other dims, a per-head mask or constant, a projection read elsewhere
than through its split, and K/V that go to a graph input written in place: a static KV cache (mmaccel.generate, HF StaticCache) is
allocated outside the graph with every head, and the prefill and decode graphs are pruned separately.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .contract import PassContext
from .lossy import ORIGINAL, Site, UnrecordedOnRelease
from .patterns import (VIEW_OPS, aten, constant_value, is_constant, is_op, layer_name, same_shape, shape, val,
                       writes_in_place)
from .prune import (SPLITS, FUSED_LINEAR, PRUNED, MadeCache, group_removal_order, keep_options, keeps_channels,
                    piece_rows, refit_on_host, refits, slices_as_splits, split_piece, split_sizes, streamed_grams,
                    weight_bytes)

SDPA = aten.scaled_dot_product_attention.default
KEEP_HEADS = {"keep_50": 0.5, "keep_75": 0.75}  # cheapest first
# An option's twin keeping the same number of groups chosen by group_removal_order (the refit's own residual)
# instead of each group's output alone. Neither choice wins everywhere (heads-50%, 1350 calibration images: the
# digits classifier 0.744 by output, 0.836 by refit; the captioner 0.844 by output, 0.552 by refit), so each
# attention offers both and the solver keeps the one whose measured error is lower (lossy.solve drops dominated
# options).
BY_REFIT = "+refit"
# Ops that act on each head alone when their other operands are the same heads or broadcast over them.
_HEADWISE = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default,
             aten.pow.Tensor_Scalar, aten.rsqrt.default, aten._to_copy.default, aten.clone.default,
             aten.mean.dim, aten.cat.default, aten.slice.Tensor, aten.transpose.int, aten.permute.default)
_FLAT, _HEADS = "flat", "heads"  # a region node's head count sits in its sizes' last entry (H * D) or the -2nd (H)


@dataclass
class _Path:
    """q, k or v traced back to a projection, or the output forward to o_proj: the views whose sizes name the head
    count (node, the index in its sizes that does: -1 for H * D, else where H is; channels per head), and the
    projection piece."""
    views: list[tuple[fx.Node, int, int]] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    piece: tuple[fx.Node, fx.Node | None, int] | None = None
    # q, k or v cut out of each head after the heads were split off (GPT-NeoX, Pythia: the projection's output is
    # [..., H, 3 * D], each head's q, k and v side by side; Persimmon [..., H, 3, D]): (what was cut, which piece,
    # of how many)
    within: tuple[fx.Node, int, int] | None = None


@dataclass
class _Attention:
    sdpa: fx.Node
    out: fx.Node  # o_proj, the fused_linear reading the merged heads
    heads: int  # query heads
    kv_heads: int
    paths: dict[str, _Path]  # "q", "k", "v", "o"

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _axis(node: fx.Node, dim: int) -> int:
    return dim % len(shape(node))


def _pointwise_operands(node: fx.Node, axis: int, heads: int) -> list[fx.Node] | str:
    """The operands of a head-wise op that carry the heads (to follow), or why one is neither those heads nor
    broadcast over them (a per-head constant, another tensor)."""
    if is_op(node, aten.cat.default):
        operands = node.args[0]
    elif is_op(node, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor):
        operands = node.args[:2]
    else:
        operands = node.args[:1]
    out_rank, carried = len(shape(node)), []
    for a in operands:
        if not isinstance(val(a), torch.Tensor):
            continue  # a number, or a size under dynamic shapes
        offset = out_rank - len(shape(a))
        if axis < offset or same_shape(shape(a)[axis - offset:axis - offset + 1], (1,)):
            continue  # broadcast over the heads: cos/sin, a scale
        if offset != 0 or not same_shape(shape(a)[axis:axis + 1], (heads,)) or is_constant(a):
            return f"'{node.name}' ({node.target}) mixes the heads with operand '{a.name}' {list(shape(a))}"
        carried.append(a)
    return carried


def _along_heads(node: fx.Node, axis: int) -> bool:
    """Whether a slice, cat or mean works along the head axis (or a mean drops dims), which a head-wise op must not."""
    if is_op(node, aten.mean.dim):
        keepdim = (len(node.args) > 2 and node.args[2]) or node.kwargs.get("keepdim", False)
        return not keepdim or any(_axis(node, d) == axis for d in node.args[1])
    if is_op(node, aten.slice.Tensor, aten.cat.default):
        return _axis(node, node.args[1] if len(node.args) > 1 else 0) == axis
    return False


def _step_back(node: fx.Node, axis: int, heads: int) -> tuple[list[tuple[fx.Node, int]], str | None] | str:
    """Head mode, one node back: [(operand, its head axis)], and "flat" when the operand is the channels before
    the heads were split off; or why the node is not followed."""
    if is_op(node, aten.transpose.int):
        d0, d1 = _axis(node, node.args[1]), _axis(node, node.args[2])
        return [(node.args[0], {d0: d1, d1: d0}.get(axis, axis))], None
    if is_op(node, aten.permute.default):
        return [(node.args[0], _axis(node, node.args[1][axis]))], None
    if is_op(node, aten.alias.default):  # Phi-3's partial rotary: q[..., :rotary_dim] of all of q
        return [(node.args[0], axis)], None
    if is_op(node, aten.stack.default):  # a new dim (GPT-J's rotary stacks -x2 and x1 inside each head)
        dim = _axis(node, node.args[1] if len(node.args) > 1 else 0)
        if dim == axis:
            return f"'{node.name}' ({node.target}) stacks along the heads"
        inner = axis if dim > axis else axis - 1
        for a in node.args[0]:
            if not same_shape(shape(a)[inner:inner + 1], (heads,)) or is_constant(a):
                return f"'{node.name}' ({node.target}) stacks the heads with operand '{a.name}' {list(shape(a))}"
        return [(a, inner) for a in node.args[0]], None
    if _along_heads(node, axis):
        return f"'{node.name}' ({node.target}) reduces, cuts or joins along the heads"
    if is_op(node, *_HEADWISE):
        carried = _pointwise_operands(node, axis, heads)
        return carried if isinstance(carried, str) else ([(a, axis) for a in carried], None)
    if is_op(node, *VIEW_OPS):
        before, after = shape(node.args[0]), shape(node)
        if axis == len(before) - 1 < len(after) - 1 and same_shape(before[:-1], after[:axis]):
            # the channels split into heads: [..., H * W] -> [..., H, W] (or [..., H, 3, D]: Persimmon's q, k, v)
            return [(node.args[0], -1)], _FLAT
        if same_shape(before, after) or (axis < len(after) - 1 and same_shape(before[:axis + 1], after[:axis + 1])):
            # the same shape, or one that reshapes only the dims inside a head (GPT-J's rotary interleaves pairs:
            # [..., H, D/2, 2] -> [..., H, D])
            return [(node.args[0], axis)], None
        return f"view '{node.name}' {list(before)} -> {list(after)} mixes the heads with other dims"
    return f"'{node.name}' ({node.target}) is not followed"


def _cut_inside_heads(node: fx.Node, axis: int) -> tuple[fx.Node, int, int, list[fx.Node]] | str | None:
    """(source, piece, pieces, nodes on the way) when `node` is q, k or v cut out of each head of `source` along a
    dim after the heads: a piece of a split (GPT-NeoX: [..., H, 3 * D] -> three [..., H, D]) or a select
    (Persimmon: [..., H, 3, D][..., i, :]); a reason when it cuts along or before the heads; else None."""
    if node.target is operator.getitem and is_op(node.args[0], *SPLITS):
        split = node.args[0]
        if _axis(split.args[0], split.args[2] if len(split.args) > 2 else 0) <= axis:
            return f"'{split.name}' ({split.target}) splits along or before the heads"
        return split.args[0], node.args[1], len(split_sizes(split)), [split]
    if is_op(node, aten.select.int):
        dim = _axis(node.args[0], node.args[1])
        if dim <= axis:
            return f"'{node.name}' ({node.target}) selects along or before the heads"
        count = shape(node.args[0])[dim]
        return (node.args[0], node.args[2] % count, count, []) if isinstance(count, int) else None
    return None


def _trace_back(start: fx.Node, heads: int) -> _Path | str:
    """q, k or v of an SDPA ([..., H, L, D]) back to the projection rows it is made of."""
    path, stack, seen = _Path(), [(start, len(shape(start)) - 3, _HEADS)], set()
    while stack:
        node, axis, mode = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        path.nodes.append(node)
        if mode == _FLAT:
            piece = split_piece(node)
            if piece or is_op(node, FUSED_LINEAR):
                if path.piece not in (None, piece or (node, None, 0)):
                    return "made of two projections"
                path.piece = piece or (node, None, 0)
                continue
            per_head = shape(node)[-1] // heads
            if not (is_op(node, *VIEW_OPS) and keeps_channels(node, shape(node)[-1])):
                return f"'{node.name}' ({node.target}) is not followed back to a projection"
            path.views.append((node, -1, per_head))
            stack.append((node.args[0], -1, _FLAT))
            continue
        cut = _cut_inside_heads(node, axis)
        if isinstance(cut, str):
            return cut
        if cut is not None:
            if path.within is not None:
                return "cut out of the heads twice"
            source, index, count, through = cut
            path.within = (source, index, count)
            path.nodes += through
            stack.append((source, axis, _HEADS))
            continue
        if node.target is operator.getitem and is_op(node.args[0], aten.native_layer_norm.default) \
                and node.args[1] == 0 and len(node.args[0].args[1]) < len(shape(node)) - axis:
            # a LayerNorm over each head's own dims, its weight shared by the heads (Persimmon's q/k norms)
            path.nodes.append(node.args[0])
            stack.append((node.args[0].args[0], axis, _HEADS))
            continue
        step = _step_back(node, axis, heads)
        if isinstance(step, str):
            return step
        operands, switch = step
        if switch == _FLAT:
            path.views.append((node, axis - len(shape(node)), 1))
        elif is_op(node, *VIEW_OPS):  # a view that keeps the shape: its sizes name H where the axis is
            path.views.append((node, axis - len(shape(node)), 1))
        stack.extend((a, ax, switch or _HEADS) for a, ax in operands)
    return path if path.piece is not None else "no projection reached"


def _trace_forward(sdpa: fx.Node, heads: int) -> _Path | str:
    """The SDPA's output [..., H, L, Dv] forward through transposes and the merging view to o_proj."""
    path, node, axis, mode = _Path(), sdpa, len(shape(sdpa)) - 3, _HEADS
    while True:
        if len(node.users) != 1:
            return f"'{node.name}' is used by {[u.name for u in node.users]}, not only on the way to o_proj"
        user = next(iter(user for user in node.users))
        if mode == _FLAT and is_op(user, FUSED_LINEAR) and user.args[0] is node:
            path.piece = (user, None, 0)
            return path
        path.nodes.append(user)
        if mode == _HEADS and is_op(user, aten.transpose.int, aten.permute.default, aten.clone.default,
                                      aten._to_copy.default):
            if is_op(user, aten.transpose.int):
                d0, d1 = _axis(user, user.args[1]), _axis(user, user.args[2])
                axis = {d0: d1, d1: d0}.get(axis, axis)
            elif is_op(user, aten.permute.default):
                axis = [_axis(user, d) for d in user.args[1]].index(axis)
        elif mode == _HEADS and is_op(user, *VIEW_OPS) and axis == len(shape(node)) - 2 \
                and len(shape(user)) == len(shape(node)) - 1 and same_shape(shape(user)[:-1], shape(node)[:-2]):
            path.views.append((user, -1, shape(node)[-1]))
            mode = _FLAT
        elif mode == _HEADS and is_op(user, *VIEW_OPS) and same_shape(shape(user), shape(node)):
            # a view that keeps the shape (HF CLIP's attn_output.view(B, H, L, D) before its transpose)
            path.views.append((user, axis - len(shape(user)), 1))
        elif mode == _FLAT and is_op(user, *VIEW_OPS) and keeps_channels(user, shape(node)[-1]):
            path.views.append((user, -1, shape(node)[-1] // heads))
        else:
            return f"'{user.name}' ({user.target}) is not followed forward to o_proj"
        node = user


def written_input(starts: list[fx.Node]) -> str | None:
    """The graph input that `starts` are read from and that the graph writes in place (a static KV cache), if
    any: followed back to the nearest matmul or attention."""
    stack, seen = list(starts), set()
    while stack:
        node = stack.pop()
        if node in seen or is_op(node, FUSED_LINEAR, SDPA, aten.mm.default, aten.addmm.default):
            continue
        seen.add(node)
        if node.op == "placeholder" and any(writes_in_place(u) and u.args[0] is node for u in node.users):
            return node.name
        stack.extend(node.all_input_nodes)
    return None


def _trace(sdpa: fx.Node) -> _Attention | str | None:
    """The prunable attention around `sdpa`, or why it is left whole; None when it has no heads to prune."""
    query, key, value = sdpa.args[:3]
    if len(shape(query)) != 4 or not all(isinstance(shape(t)[-3], int) for t in (query, key, value)):
        return None
    heads, kv_heads = shape(query)[-3], shape(key)[-3]
    if heads <= 1:
        return None
    if kv_heads == 1:
        return ("one K/V head (multi-query attention): heads are pruned by K/V group (a K/V head with its query "
                "heads), and one group cannot shrink")
    cache = written_input([key, value])
    if cache is not None:
        return (f"K/V go to graph input '{cache}', written in place (a static KV cache): its heads cannot shrink "
                "inside one graph")
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    if isinstance(mask, fx.Node) and len(shape(mask)) >= 3 and not same_shape(shape(mask)[-3:-2], (1,)):
        return f"the mask '{mask.name}' {list(shape(mask))} differs per head"
    paths: dict[str, _Path] = {}
    for name, tensor, count in (("q", query, heads), ("k", key, kv_heads), ("v", value, kv_heads)):
        path = _trace_back(tensor, count)
        if isinstance(path, str):
            return f"{name}: {path}"
        paths[name] = path
    out = _trace_forward(sdpa, heads)
    if isinstance(out, str):
        return out
    paths["o"] = out
    return _why_not(_Attention(sdpa, out.piece[0], heads, kv_heads, paths))


def _why_not(att: _Attention) -> _Attention | str:
    """Why a traced attention cannot be pruned, else the attention."""
    inside = {node for path in att.paths.values() for node in path.nodes} | {att.sdpa}
    for key in "qkv":
        for node in att.paths[key].nodes:
            outside = [u.name for u in node.users if u not in inside]
            if outside:
                return f"'{node.name}' ({key}) is also used by {outside}"
    pieces = [att.paths[key].piece for key in "qkv"]
    for up, split, _ in pieces:
        if split is not None and len(up.users) > 1:
            return f"projection '{up.name}' is also read elsewhere than through its split"
        if not is_constant(up.args[1]) or not (up.args[2] is None or is_constant(up.args[2])) or up.args[4] is not None:
            return f"projection '{up.name}': weight or bias is not a constant, or it adds a residual"
    if len(set(pieces)) != 3 and not _interleaved(att):
        return "q, k and v are not three different projections"
    out = att.out
    if not is_constant(out.args[1]) or not (out.args[2] is None or is_constant(out.args[2])):
        return f"o_proj '{out.name}': weight or bias is not a constant"
    if att.heads % att.kv_heads or (att.heads != att.kv_heads and not att.sdpa.kwargs.get("enable_gqa")):
        return f"{att.heads} query heads over {att.kv_heads} K/V heads without enable_gqa"
    return att


def _interleaved(att: _Attention) -> bool:
    """Whether q, k and v are the three pieces of one split inside each head of one projection's output (GPT-NeoX:
    [..., H, 3 * D] -> q, k, v), so head h is rows [h * 3D, (h + 1) * 3D) of that projection; multi-head only."""
    cuts = [att.paths[key].within for key in "qkv"]
    if None in cuts or att.heads != att.kv_heads or len({att.paths[key].piece for key in "qkv"}) != 1:
        return False
    return len({source for source, _, _ in cuts}) == 1 and sorted(i for _, i, _ in cuts) == list(range(cuts[0][2]))


def _shares_projection(att: _Attention) -> bool:
    """Whether Q/K/V's matmul also computes other pieces (a parallel block: Phi's and GPT-J's Q, K, V and MLP
    input in one matmul after parallel_linear_fusion)."""
    pieces = [att.paths[key].piece for key in "qkv"]
    return any(split is not None and len({i for u, _, i in pieces if u is up}) != len(split_sizes(split))
               for up, split, _ in pieces)


def find_attentions(gm: fx.GraphModule) -> tuple[list[_Attention], list[str]]:
    """The prunable attentions of gm, and the near-misses with their reasons."""
    found, near_misses = [], []
    for sdpa in gm.graph.find_nodes(op="call_function", target=SDPA):
        if PRUNED in sdpa.meta:
            continue
        att = _trace(sdpa)
        if isinstance(att, str):
            near_misses.append(f"attention '{sdpa.name}' ({layer_name(sdpa)}) left whole: {att}")
        elif att is not None:
            found.append(att)
    return found, near_misses


def _channels(kept_groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """Channel indices of the kept groups, `per_group` consecutive channels each."""
    return torch.cat([torch.arange(g * per_group, (g + 1) * per_group) for g in kept_groups.tolist()])


def _module_name(att: _Attention) -> str:
    """The attention module's name: what the q and o projections' names share ("model.layers.0.self_attn")."""
    names = [layer_name(att.paths[key].piece[0]).split(".") for key in "qo"]
    shared = next((i for i, (a, b) in enumerate(zip(*names)) if a != b), min(map(len, names)))
    return ".".join(names[0][:shared]) or layer_name(att.out)


class HeadLever(UnrecordedOnRelease):
    """The lossy mechanism's lever for attention heads: each attention a site, its options the fractions of its
    K/V groups (heads without grouped-query attention) to keep, cheapest first, then ORIGINAL."""
    name, label, noun, unit, cost_unit = "prune:heads", "heads", "pruning", "attention(s) pruned", "bytes"

    def __init__(self, removed: float | None = None) -> None:
        self.keep = keep_options(removed, KEEP_HEADS)
        self.near_misses: list[str] = []
        self.gm: fx.GraphModule | None = None
        self.attentions: dict[str, _Attention] = {}  # by the SDPA node's name (the site's node)
        self.options_of: dict[str, dict[str, int]] = {}  # per site, its options (K/V groups kept), cheapest first
        # per site and option: (groups kept, refit o_proj weight, bias), on the host: made from the site's gram,
        # which is then dropped (prune.GRAM_BYTES_AT_ONCE)
        self.refits: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
        self.costs: dict[str, dict[str, int]] = {}
        self.made = MadeCache()

    def _options(self, groups: int) -> dict[str, int]:
        options: dict[str, int] = {}
        for option, fraction in self.keep.items():
            keep = max(1, round(groups * fraction))
            if keep < groups and keep not in options.values():
                options[option] = keep
        return options

    def sites(self, gm: fx.GraphModule, ctx: PassContext) -> list[Site]:
        slices_as_splits(gm)
        found, self.near_misses = find_attentions(gm)
        # heads go by K/V group: a fraction that rounds to every group leaves no option below all of them
        self.near_misses += [f"attention '{att.sdpa.name}' ({layer_name(att.sdpa)}) left whole: {att.kv_heads} K/V "
                             "heads: heads are pruned by K/V group (a K/V head with its query heads), and no "
                             f"fraction offered ({', '.join(f'{f:g}' for f in self.keep.values())}) keeps fewer"
                             for att in found if not self._options(att.kv_heads)]
        found = [att for att in found if self._options(att.kv_heads)]
        if "mlp_channels" in (ctx.options.prune or ()):
            # Both levers would write the shared matmul's weight, each from the original: the later one would put
            # back the rows the earlier one removed. Left to the MLP lever there.
            shared = [att for att in found if _shares_projection(att)]
            self.near_misses += [f"attention '{att.sdpa.name}' ({layer_name(att.sdpa)}) left whole: its Q/K/V "
                                 "share one matmul with the MLP (a parallel block), whose channels mlp_channels "
                                 "prunes; with prune='heads' alone its heads are pruned" for att in shared]
            found = [att for att in found if att not in shared]
        if not found:
            return []
        self.gm = gm
        self.attentions = {att.sdpa.name: att for att in found}
        for i, gram in streamed_grams(gm, ctx, [att.out.args[0] for att in found], "attention outputs",
                                      "an output projection"):
            self._choose(found[i], gram)
        sites = []
        for att in found:
            options = self.options_of[att.sdpa.name]
            self.costs[att.sdpa.name] = {option: self._bytes_at(att, keep) for option, keep in options.items()}
            sites.append(Site(att.sdpa.name, _module_name(att), (att.heads, att.kv_heads),
                              self._bytes_at(att, att.kv_heads), (*options, ORIGINAL),
                              {ORIGINAL: 0.0}))
        return sites

    def _const(self, node: fx.Node | None) -> torch.Tensor | None:
        return None if node is None else constant_value(self.gm, node.target)

    def _per_group(self, att: _Attention) -> dict[str, int]:
        """Rows (q, k, v) and o_proj columns per K/V group."""
        e, dv = shape(att.sdpa.args[0])[-1], shape(att.sdpa.args[2])[-1]
        return {"q": att.group * e, "k": e, "v": dv, "o": att.group * dv}

    def _bytes_at(self, att: _Attention, groups: int) -> int:
        rows = self._per_group(att)
        total = 0
        for key in "qkv":
            up = att.paths[key].piece[0]
            bias = self._const(up.args[2])
            total += groups * rows[key] * weight_bytes(self._const(up.args[1])[0], None if bias is None else bias[:1])
        return total + groups * rows["o"] * weight_bytes(self._const(att.out.args[1])[:, 0]) + weight_bytes(
            self._const(att.out.args[2]))

    def cost(self, site: Site, option: str) -> int:
        return self.costs[site.node][option]

    def _keep(self, att: _Attention, option: str) -> int:
        return self._options(att.kv_heads)[option.removesuffix(BY_REFIT)]

    def _choose(self, att: _Attention, gram: torch.Tensor) -> None:
        """From the site's gram: its options (the BY_REFIT twins where the calibration tokens allow a refit), and
        for each the groups kept and o_proj refit on them, kept on the host (the gram is dropped after this)."""
        options = self._options(att.kv_heads)
        if refits(gram, self._per_group(att)["o"] * att.kv_heads):
            options = {name: keep for option, keep in options.items() for name in (option, option + BY_REFIT)}
        self.options_of[att.sdpa.name] = options
        refit = self.refits[att.sdpa.name] = {}
        for option in options:
            kept = self._kept_groups(att, option, gram)
            _, weight, bias = refit_on_host(gram, self._const(att.out.args[1]), self._const(att.out.args[2]),
                                            _channels(kept, self._per_group(att)["o"]))
            refit[option] = (kept, weight, bias)

    def _kept_groups(self, att: _Attention, option: str, gram: torch.Tensor) -> torch.Tensor:
        """The groups `option` keeps: those adding most to o_proj's output, ||h_g W_o[:, g]^T|| from the Gram
        matrix; for a BY_REFIT option, the last of group_removal_order."""
        keep = self._keep(att, option)
        w = self._const(att.out.args[1]).detach().double().cpu()
        if option.endswith(BY_REFIT):
            order = group_removal_order(gram, w, self._const(att.out.args[2]), att.kv_heads)
            return torch.tensor(sorted(order[len(order) - keep:]))
        width = self._per_group(att)["o"]
        scores = []
        for g in range(att.kv_heads):
            cols = slice(g * width, (g + 1) * width)
            scores.append(float(((w[:, cols] @ gram[cols, cols]) * w[:, cols]).sum().clamp_min(0)))
        return torch.tensor(scores).topk(keep).indices.sort().values

    def _made(self, site_node: str, option: str) -> dict[str, torch.Tensor | None]:
        """New constants at `option` by the node reading them; slices and solutions, never writes into the frozen
        constants. Kept made: each site's cheapest option (the first mix measured) and the last one made, so that
        measuring holds one extra attention's candidates at a time, as the MLP lever (issue 21; all of them were
        kept: 2.5x the attention weights on the device at the default options)."""
        key = (site_node, option)
        if (found := self.made.get(key)) is not None:
            return found
        att = self.attentions[site_node]
        kept, weight, bias = self.refits[site_node][option]
        rows = self._per_group(att)
        device = self._const(att.out.args[1]).device
        made = {"o.weight": weight.to(device), "o.bias": None if bias is None else bias.to(device)}
        # per projection: its split and, per piece of it that q, k or v is, the rows kept within that piece
        by_up: dict[fx.Node, tuple[fx.Node | None, dict[int, torch.Tensor]]] = {}
        if _interleaved(att):  # each kept head's q, k and v rows, side by side, in its piece of the projection
            up, split, index = att.paths["q"].piece
            width = split_sizes(split)[index] if split is not None else shape(up)[-1]
            by_up[up] = (split, {index: _channels(kept, width // att.heads)})
        else:
            for name in "qkv":
                up, split, index = att.paths[name].piece
                by_up.setdefault(up, (split, {}))[1][index] = _channels(kept, rows[name])
        for up, (split, ours) in by_up.items():
            index = piece_rows(split, ours)
            w, b = self._const(up.args[1]), self._const(up.args[2])
            made[f"{up.name}.weight"] = w.index_select(0, index.to(w.device))
            made[f"{up.name}.bias"] = None if b is None else b.index_select(0, index.to(b.device))
        return self.made.put(key, made, option == next(iter(self.options_of[site_node])))

    def rewrite(self, graph: fx.Graph, node: fx.Node, option: str, add: Callable[[str, torch.Tensor], str]) -> str:
        att = _trace(node)
        assert isinstance(att, _Attention), f"prune: the attention at '{node.name}' no longer traces"
        made = self._made(node.name, option)
        keep = self._keep(att, option)
        heads = {"q": keep * att.group, "k": keep, "v": keep, "o": keep * att.group}

        def constant(user: fx.Node, key: str) -> fx.Node | None:
            if made[key] is None:
                return None
            with graph.inserting_before(user):
                return graph.get_attr(add("_pruned", made[key]))

        for up in dict.fromkeys(att.paths[key].piece[0] for key in "qkv"):
            x, _, _, activation, residual = up.args
            up.args = (x, constant(up, f"{up.name}.weight"), constant(up, f"{up.name}.bias"), activation, residual)
        resized = set()  # q, k and v of one interleaved projection are one piece: resized once
        for key in "qkv":
            piece = att.paths[key].piece
            _, split, index = piece
            if split is not None and piece not in resized:
                resized.add(piece)
                sizes = split_sizes(split)
                sizes[index] = heads[key] * sizes[index] // (att.heads if key == "q" else att.kv_heads)
                split.target, split.args, split.kwargs = aten.split_with_sizes.default, (split.args[0], sizes, -1), {}
        for key, path in att.paths.items():
            for view, at, per_head in path.views:
                sizes = list(view.args[1])
                if isinstance(sizes[at], int) and sizes[at] != -1:
                    sizes[at] = heads[key] * per_head
                    view.args = (view.args[0], sizes)
        out = att.out
        out.args = (out.args[0], constant(out, "o.weight"), constant(out, "o.bias"), *out.args[3:])
        node.meta[PRUNED] = option
        return option
