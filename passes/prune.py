"""Structural pruning of MLP channels (lossy, opt-in: prune="mlp_channels"), a lever of passes/lossy.py.

An MLP, on the post-fusion graph (lossy levers run after the lossless passes), is up projection(s) ->
channel-wise ops -> a down projection, where channel j of the intermediate h [tokens, I] comes from row j of
each up weight only and reaches column j of the down weight only:
- SwiGLU: fused_linear(x, [W_gate; W_up]) -> split -> silu(gate) * up -> fused_linear(h, W_down) (the form
  parallel_linear_fusion leaves, also when Q/K/V and gate/up share one matmul; or two separate up linears);
- GELU / ReLU MLP: fused_linear(x, W_up, b, "gelu") -> fused_linear(h, W_down, b), the activation in the
  epilogue or written out in pointwise ops.
Views between them may regroup the token dims, never the channel (last) dim. A structure the trace cannot
follow is left whole; where it reached an activation (it looked like an MLP) the reason is a near-miss.

Which channels: each MLP's h is collected on the calibration samples (its Gram matrix H^T H, float64). W_down (and
its bias) is refit by least squares (refit_columns, which prune_heads uses for o_proj too) so that the down
projection's output over the kept channels best matches the original output on the calibration tokens (ridge
normal equations), which is what lets accuracy hold without fine-tuning; the channels are chosen for that refit,
by optimal brain surgeon on its least squares (removal_order: a channel whose work correlated channels can take
over goes first). The refit needs REFIT_TOKENS_PER_CHANNEL calibration tokens per channel (with fewer it fits the
tokens the error is measured on, and promises more than other inputs get): below that the kept columns stay
unrefit, with one warning, and channel j is scored ||h_j|| * ||W_down[:, j]|| (what dropping it removes from the
down projection's output; activation-aware: weight magnitude alone keeps channels that never fire; tiny Llama,
keep 50%, no refit: relative error 0.035 against 0.043 by ||W_down[:, j]|| alone). Options per MLP: keep 25% /
50% / 75% of the channels, or all of them; where the graph has few MLPs, every multiple of a finer step
(fine_step) instead, so that the solver can land between the quarters.

Tried on all-MiniLM-L6-v2 at 25% of every MLP's channels removed (post-LN BERT, bench/prune_accuracy.py's
calibration, on the module with this file's math; lowest cosine of the 8 texts / held-out docstrings, mean: this
pass 0.926 / 0.950 / 0.9852, 0.922 / 0.947 / 0.9853 with each MLP's grams taken on the model with the earlier ones
pruned, where the next four start) and not kept, each within 0.012 of that: the refit weighted per token by 1/var of
the LayerNorm input that follows (the error after normalization) 0.927 / 0.946 / 0.9851; sequential refit (each MLP
fit to the unpruned LayerNorm input less the pruned residual, making up for the error before it) 0.928 / 0.946 /
0.9865; per-layer keeps chosen from measured sensitivities, 25% removed in all (1024, 1024, 1024, 1152, 1280, 1408
channels) 0.926 / 0.944 / 0.9862, with the sequential refit 0.934 / 0.946 / 0.9880. On docstrings alone (this pass
0.842 / 0.952): optimal brain surgeon with each output weighted by its LayerNorm gamma 0.829 / 0.956; a ridge
pulling the refit towards the original columns instead of zero, 1e-4 to 1e-1, 0.842 to 0.832; the bias alone
compensated for the removed channels' mean (FLAP), no refit, 0.737 / 0.830 (the refit's intercept already does
that). What limits it: one MLP alone at 25% costs the worst sentence 0.010-0.027 of cosine (the last two layers the
most: 0.021, 0.027), and the six costs add (0.088 summed, 0.074 measured together).

The weights physically shrink: new constants (rows of the up weights, refit columns of the down weight); the
frozen constants, which may be the user's parameters or views of fused buffers, are never written.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from ..compiler.errors import warn_once
from .contract import PassContext
from .lossy import ORIGINAL, REPLAYED, Site, calibration_samples, run_graph
from .patterns import VIEW_OPS, add_constant, aten, constant_value, is_constant, is_op, layer_name, same_shape, shape, val

FUSED_LINEAR = torch.ops.mmaccel.fused_linear.default
KEEP = {"keep_25": 0.25, "keep_50": 0.5, "keep_75": 0.75}  # cheapest first, as the mechanism needs
# Below this many MLPs the lever offers fine_step's finer steps: quarters of 3 MLPs move the MLPs' bytes in steps of
# 1/12 (the trained digits ViT of bench/prune_accuracy.py, 3 MLPs of 96 channels: 4.1% of its linear weights a
# step, no mix between 29% and 37% removed; with steps of 16 channels, 30.3% removed at -0.28 test points); from 4
# MLPs quarters step by 1/16 or less. Fine steps give at most 7 options per MLP, so such a lever measures at most
# 21 sensitivities, about as many as 6 MLPs at quarters (all-MiniLM-L6-v2: 18, ~1 min each on 2 CPU cores).
FINE_BELOW_SITES = 4


def keep_options(removed: float | None, default: dict[str, float]) -> dict[str, float]:
    """A lever's options: the user's one fraction to remove (prune={"mlp_channels": 0.5}) as its kept fraction,
    else the lever's default fractions."""
    return dict(default) if removed is None else {f"keep_{round(100 * (1 - removed))}%": 1 - removed}


def fine_step(width: int) -> int:
    """The channels a lever of few MLPs (FINE_BELOW_SITES) steps by: about width / 8, rounded up to the largest
    granule of 128, 64, 32, 16 channels that fits in width / 8. Always a multiple of 16: the K step of a tensor-core
    dot on 16-bit weights, so the pruned down projection's matmul tiles stay whole; 96 and 128 channels step by 16,
    1024 by 128. A step below 32 (widths under 256) may leave a down projection that int4 groups of 32 do not
    divide: the quantize lever then leaves that linear as it is, measured and reported (lossy.Lever.rewrite)."""
    granule = next((g for g in (128, 64, 32) if 8 * g <= width), 16)
    return granule * math.ceil(width / 8 / granule)


# Ridge of the refit, relative to the mean diagonal of the kept channels' Gram matrix: keeps the normal
# equations well-posed for channels that are near-collinear on the calibration tokens. Not a tuning knob: on the
# tiny Llama (tests/hf_tiny.py) the error is the same to 3 digits for ridges from 1e-6 to 1e-2.
RIDGE = 1e-4
# The refit needs this many calibration tokens per channel of h, else it fits the calibration tokens rather than
# the MLP: tiny Llama (64 channels), error reported / on 8 held-out inputs, keep 50%: 128 tokens 0.025 / 0.038
# (no refit: 0.035 / 0.038), 1024 tokens 0.030 / 0.033 (no refit: 0.037 / 0.038).
REFIT_TOKENS_PER_CHANNEL = 16
# Channels removal_order drops per step (a rank-OBS_STEP update of the inverse): all-MiniLM-L6-v2's first
# 1536-channel MLP orders in 58 s at 1 (each step rewrites the 19 MB inverse), 1.2 s at 8, 0.5-9 s at 32 on 2
# shared cores (load 2-4), the least squares error of keeping 75% or 50% the same to 4 digits at 1, 8, 16, 32.
OBS_STEP = 32
# Host bytes of float64 Gram matrices held at once while channels are chosen. Each is (I + 1)^2 x 8 bytes: 0.97 GB
# for a 7B MLP (I = 11008), so holding every MLP's at once took 31 GB of host memory at 32 layers (issue 21). The
# grams are collected for groups of MLPs under this budget (one pass over the calibration samples per group);
# each MLP's channel order and its options' refit down projections are computed from its gram, which is then
# dropped: what stays per MLP is those refits in the weight's dtype on the host (1.5x the down weight for the
# quarters, 0.14 GB at 7B).
GRAM_BYTES_AT_ONCE = 2 << 30
_ACTIVATIONS = (aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
                aten.erf.default)
# Ops that act on each channel alone when their tensor operands all have the output's shape.
_CHANNELWISE = (*_ACTIVATIONS, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor,
                aten.neg.default, aten.pow.Tensor_Scalar, aten._to_copy.default, aten.clone.default)
PRUNED = "mmaccel_pruned"  # a down projection's meta once its MLP is pruned: a second run leaves it alone
SPLITS = (aten.split_with_sizes.default, aten.split.Tensor)
_MATMULS = {FUSED_LINEAR: 0, aten.mm.default: 0, aten.addmm.default: 1}  # op -> index of its input argument


@dataclass
class _Mlp:
    down: fx.Node  # the linear reading h
    width: int  # I: channels of h
    region: list[fx.Node]  # channel-wise ops and views between the up projections and h
    pieces: list[tuple[fx.Node, fx.Node | None, int]]  # (up fused_linear, its split or None, piece index)

    @property
    def ups(self) -> list[fx.Node]:
        return list(dict.fromkeys(up for up, _, _ in self.pieces))


def _is_last_dim(node: fx.Node, dim: int) -> bool:
    return dim in (-1, len(shape(node)) - 1)


def split_sizes(split: fx.Node) -> list[int]:
    if split.target is aten.split_with_sizes.default:
        return list(split.args[1])
    total, size = shape(split.args[0])[-1], split.args[1]
    return [min(size, total - start) for start in range(0, total, size)]


def piece_rows(split: fx.Node | None, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """Rows of a fused_linear's weight that stay: for each piece of its last-dim `split` (None: one piece, 0) the
    rows `kept` gives for it (indices within the piece), every row of a piece it leaves out (a parallel block's
    other pieces: Q/K/V beside an MLP's input). Both levers' pruned projections are these rows."""
    if split is None:
        return kept[0]
    rows, start = [], 0
    for index, size in enumerate(split_sizes(split)):
        rows.append(start + kept[index] if index in kept else torch.arange(start, start + size))
        start += size
    return torch.cat(rows)


def slices_as_splits(gm: fx.GraphModule) -> int:
    """Rewrites a fused_linear output read only by last-dim slices that tile it ([0, a), [a, b), [b, N): Phi-3's
    qkv_proj output cut into Q, K and V) as one split_with_sizes and its pieces, the form the levers follow (the
    same values, views either way); how many. Phi-3's heads were left whole: "slice is not followed back to a
    projection"."""
    done = 0
    for up in gm.graph.find_nodes(op="call_function", target=FUSED_LINEAR):
        width, users = shape(up)[-1], list(up.users)
        if not isinstance(width, int) or not users or not all(
                is_op(u, aten.slice.Tensor) and len(u.args) >= 4 and _is_last_dim(up, u.args[1])
                and (len(u.args) < 5 or u.args[4] == 1) and all(isinstance(a, int) for a in u.args[2:4])
                for u in users):
            continue
        # sorted by bounds alone: two slices that start alike (an overlap, refused below) must not compare nodes
        cuts = sorted(((u.args[2], min(u.args[3], width), u) for u in users), key=lambda cut: cut[:2])
        if cuts[0][0] != 0 or cuts[-1][1] != width or any(a[1] != b[0] for a, b in zip(cuts, cuts[1:])) \
                or any(start >= end for start, end, _ in cuts):
            continue
        with gm.graph.inserting_after(up):
            split = gm.graph.call_function(aten.split_with_sizes.default, (up, [e - s for s, e, _ in cuts], -1))
        split.meta.update(up.meta)
        split.meta["val"] = tuple(val(u) for _, _, u in cuts)
        for i, (_, _, user) in enumerate(cuts):
            with gm.graph.inserting_before(user):
                piece = gm.graph.call_function(operator.getitem, (split, i))
            piece.meta.update(user.meta)
            user.replace_all_uses_with(piece)
            gm.graph.erase_node(user)
        done += 1
    if done:
        gm.recompile()
    return done


def split_piece(node: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """(up, split, index) when `node` is one piece of a last-dim split of a fused_linear's output."""
    if not (is_op(node, operator.getitem) and is_op(node.args[0], *SPLITS)):
        return None
    split = node.args[0]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not (is_op(split.args[0], FUSED_LINEAR) and _is_last_dim(split.args[0], dim)):
        return None
    return split.args[0], split, node.args[1]


def keeps_channels(view: fx.Node, width: int) -> bool:
    """A view that regroups the token dims only: the last dim, `width` before and after, written as such."""
    sizes = view.args[1]
    return (same_shape(shape(view.args[0])[-1:], (width,)) and same_shape(shape(view)[-1:], (width,))
            and sizes[-1] in (width, -1))


def _trace(down: fx.Node) -> _Mlp | str | None:
    """The MLP whose h `down` reads; a reason when it looked like one (an activation was reached) but cannot be
    pruned; None when it is not an MLP."""
    h = matmul_input(down)
    width = shape(h)[-1]
    if not isinstance(width, int):
        return None
    region, pieces, seen, activated, stack = [], [], set(), False, [h]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        piece = split_piece(node)
        if is_op(node, FUSED_LINEAR) or piece:
            up, split, index = piece or (node, None, 0)
            size = split_sizes(split)[index] if split is not None else shape(node)[-1]
            if not same_shape((size,), (width,)):
                return None
            activated |= up.args[3] != "none"
            pieces.append((up, split, index))
        elif is_op(node, *_CHANNELWISE) and all(same_shape(shape(a), shape(node)) for a in node.all_input_nodes):
            activated |= node.target in _ACTIVATIONS
            region.append(node)
            stack.extend(node.all_input_nodes)
        elif is_op(node, *VIEW_OPS) and keeps_channels(node, width):
            region.append(node)
            stack.append(node.args[0])
        else:
            return f"'{node.name}' ({node.target}) is not channel-wise" if activated else None
    if not activated:
        return None  # h is linear in the input: a low-rank product, not an MLP
    mlp = _Mlp(down, width, region, pieces)
    return _why_not(mlp) or mlp


def _why_not(mlp: _Mlp) -> str | None:
    """Why a traced MLP cannot be pruned (its channels used outside it, a weight that is not a constant)."""
    channel_nodes = [*mlp.region, *(node for up, split, index in mlp.pieces
                                    for node in ([up] if split is None else [n for n in split.users
                                                                             if n.args[1] == index]))]
    inside = set(mlp.region) | {mlp.down}
    for node in channel_nodes:
        outside = [u.name for u in node.users if u not in inside]
        if outside:
            return f"intermediate '{node.name}' is also used by {outside}"
    for up, split, _ in mlp.pieces:
        if split is not None and len(up.users) > 1:
            return f"up projection '{up.name}' is also used outside its split"
        if not is_constant(up.args[1]) or not (up.args[2] is None or is_constant(up.args[2])):
            return f"up projection '{up.name}': weight or bias is not a constant"
        if up.args[4] is not None:
            return f"up projection '{up.name}' adds a residual"
    down = mlp.down
    if down.target is not FUSED_LINEAR or not is_constant(down.args[1]) \
            or not (down.args[2] is None or is_constant(down.args[2])):
        return f"down projection '{down.name}': weight or bias is not a constant"
    if any(a in channel_nodes for a in down.args[1:]):
        return f"down projection '{down.name}' reads h twice"
    return None


def find_mlps(gm: fx.GraphModule) -> tuple[list[_Mlp], list[str]]:
    """The prunable MLPs of gm, and the near-misses with their reasons."""
    mlps, near_misses, claimed = [], [], set()
    for node in gm.graph.nodes:
        if not is_op(node, *_MATMULS) or PRUNED in node.meta:
            continue
        found = _trace(node)
        where = f"MLP before '{layer_name(node)}'"
        if isinstance(found, str):
            near_misses.append(f"{where} left whole: {found}")
        elif found is not None and claimed & set(found.ups):
            near_misses.append(f"{where} left whole: its up projection is shared with another MLP")
        elif found is not None:
            claimed |= set(found.ups)
            mlps.append(found)
    return mlps, near_misses


def probe(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node]) -> Iterator[list[torch.Tensor]]:
    """The values of `nodes` on each calibration sample (a copy of gm that returns them; gm is left as it is)."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, copies)
    graph.output(tuple(copies[node] for node in nodes))
    module = fx.GraphModule(gm, graph)
    for sample in calibration_samples(ctx):
        yield [value.detach() for value in run_graph(module, sample)]


def grams(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node]) -> list[torch.Tensor]:
    """Per node h [..., I], [h, 1]^T [h, 1] over every calibration token (float64, [I + 1, I + 1]): the channel
    norms, the refit's normal equations and (last entry) the token count, without keeping the activations."""
    result = [torch.zeros(shape(n)[-1] + 1, shape(n)[-1] + 1, dtype=torch.float64) for n in nodes]
    for values in probe(gm, ctx, nodes):
        for gram, h in zip(result, values):
            h = h.reshape(-1, h.shape[-1]).double().cpu()
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
            gram += h.T @ h
    return result


def matmul_input(node: fx.Node) -> fx.Node:
    return node.args[_MATMULS[node.target]]


def refits(gram: torch.Tensor, width: int) -> bool:
    """Whether `gram` holds enough calibration tokens for refit_columns to refit `width` input columns."""
    return bool(gram[-1, -1] >= REFIT_TOKENS_PER_CHANNEL * width)


def channel_order(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The channels of a down projection y = h W^T + b with Gram matrix `gram` of [h, 1], least important first.
    Refit (refits): optimal brain surgeon on the refit's least squares, removal_order. Not refit: by
    ||h_j|| * ||W[:, j]||, what dropping channel j alone removes from the output."""
    width = weight.shape[1]
    if refits(gram, width):
        return removal_order(gram, weight, bias)
    score = gram.diagonal()[:width].clamp_min(0).sqrt() * weight.detach().double().cpu().norm(dim=0)
    return score.argsort()


def _refit_problem(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta = [W^T; b], the inverse of the ridged Gram matrix over theta's rows): where optimal brain surgeon on
    refit_columns' least squares starts."""
    width = weight.shape[1]
    w = weight.detach().double().cpu()
    theta = w.T if bias is None else torch.cat([w.T, bias.detach().double().cpu()[None]])
    lhs = gram[:len(theta), :len(theta)]
    ridge = RIDGE * float(lhs.diagonal()[:width].mean().clamp_min(1e-30))
    return theta, torch.linalg.inv(lhs + ridge * torch.eye(len(theta), dtype=lhs.dtype))


def group_removal_order(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        groups: int) -> list[int]:
    """`groups` equal runs of input columns (attention heads, or K/V groups, ahead of o_proj), least important
    first, for a refit consumer: removal_order's optimal brain surgeon with a whole group removed at a time (error
    tr(theta_g^T [G^-1]_gg^-1 theta_g), then the rest refit)."""
    theta, inverse = _refit_problem(gram, weight, bias)
    width = weight.shape[1] // groups
    alive, order = list(range(groups)), []

    def cost(g: int) -> float:
        cols = slice(g * width, (g + 1) * width)
        return float(torch.trace(theta[cols].T @ torch.linalg.solve(inverse[cols, cols], theta[cols])))

    while alive:
        g = min(alive, key=cost)
        cols = slice(g * width, (g + 1) * width)
        pivot = torch.linalg.inv(inverse[cols, cols])
        theta = theta - inverse[:, cols] @ (pivot @ theta[cols])
        inverse = inverse - inverse[:, cols] @ pivot @ inverse[cols]
        alive.remove(g)
        order.append(g)
    return order


def removal_order(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Every channel, least important first, for a refit consumer: greedily, OBS_STEP at a time, the channels
    whose removal adds the least to (theta - theta0)^T G (theta - theta0) once the other columns (and the bias)
    are refit (optimal brain surgeon, structured as in ZipLM: theta = [W^T; b], G the ridged Gram matrix, error
    ||theta_j||^2 / [G^-1]_jj; then theta becomes the refit of the rest and G^-1 the inverse without j). The
    ||h_j|| * ||W[:, j]|| score ignores that the refit moves a dropped channel's work onto correlated ones:
    all-MiniLM-L6-v2, every MLP at 75% (50%) of its channels, 25,600 calibration tokens of docstrings: least
    squares error of layer 0 0.0193 -> 0.0175 (0.0343 -> 0.0317), lowest cosine of held-out docstrings' embeddings
    0.932 -> 0.954 (0.836 -> 0.881)."""
    width = weight.shape[1]
    theta, inverse = _refit_problem(gram, weight, bias)
    alive, order, left = torch.ones(width, dtype=torch.bool), [], width
    while left:
        cost = theta[:width].pow(2).sum(1) / inverse.diagonal()[:width]
        pool = cost.masked_fill(~alive, float("inf")).topk(min(2 * OBS_STEP, left), largest=False).indices
        drop = pool[_greedy_in_pool(theta[pool], inverse[pool][:, pool], min(OBS_STEP, left))]
        pivot = torch.linalg.inv(inverse[drop][:, drop])  # [S, S]
        theta = theta - inverse[:, drop] @ (pivot @ theta[drop])
        inverse = inverse - inverse[:, drop] @ pivot @ inverse[drop]
        alive[drop], left = False, left - len(drop)
        order.append(drop)
    return torch.cat(order)


def _greedy_in_pool(theta: torch.Tensor, inverse: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of `count` rows of a pool of candidates, dropped one at a time by removal_order's error, each drop
    updating the pool's own rows only (exact for the pool: a channel whose twin went earlier in the step now costs
    what losing both costs, so it stays; dropping the step's cheapest at once lost both copies of duplicated
    channels)."""
    theta, inverse, dropped = theta.clone(), inverse.clone(), []
    for _ in range(count):
        cost = theta.pow(2).sum(1) / inverse.diagonal()
        cost[dropped] = float("inf")
        j = int(cost.argmin())
        theta -= torch.outer(inverse[:, j], theta[j]) / inverse[j, j]
        inverse -= torch.outer(inverse[:, j], inverse[j]) / inverse[j, j]
        dropped.append(j)
    return torch.tensor(dropped)


def refit_columns(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [N, len(kept)], bias) of a linear y = h W^T + b that reads only the input columns `kept` (ascending),
    with Gram matrix `gram` of [h, 1] over the calibration tokens: [W'; b'] minimizing
    ||h_kept W'^T + b' - (h W^T + b)||^2 + ridge ||W'||^2 (the consumer of pruned MLP channels or attention heads).
    With fewer than REFIT_TOKENS_PER_CHANNEL tokens per input column the kept columns stay as they are."""
    width, keep = weight.shape[1], len(kept)
    if not refits(gram, width):
        return weight.index_select(1, kept.to(weight.device)), bias
    w = weight.detach().double().cpu()
    full = torch.cat([w.T, (bias.detach().double().cpu() if bias is not None else w.new_zeros(w.shape[0]))[None]])
    columns = torch.cat([kept, torch.tensor([width])]) if bias is not None else kept
    lhs = gram[columns][:, columns]
    ridge = RIDGE * float(lhs.diagonal()[:keep].mean().clamp_min(1e-30))
    solution = torch.linalg.solve(lhs + ridge * torch.eye(len(columns), dtype=lhs.dtype), gram[columns] @ full)
    new_weight = solution[:keep].T.contiguous().to(weight.dtype).to(weight.device)
    new_bias = None if bias is None else solution[keep].to(bias.dtype).to(bias.device)
    return new_weight, new_bias


def gram_groups(widths: list[int], budget: int | None = None) -> list[list[int]]:
    """Indices of `widths` in consecutive groups whose float64 grams ((width + 1)^2 x 8 bytes each) fit `budget`
    (GRAM_BYTES_AT_ONCE), at least one per group."""
    budget = GRAM_BYTES_AT_ONCE if budget is None else budget
    groups: list[list[int]] = []
    used = budget
    for i, width in enumerate(widths):
        size = (width + 1) ** 2 * 8
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def streamed_grams(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], what: str,
                   consumer: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(index into `nodes`, its gram) for every node: grams collected for groups under GRAM_BYTES_AT_ONCE (one
    pass over the calibration samples per group), each handed over and let go before the next group is collected;
    after the last, one warning if the tokens are too few to refit the widest consumer (warn_few_tokens)."""
    widths = [int(shape(n)[-1]) for n in nodes]
    tokens = 0
    for group in gram_groups(widths):
        found = grams(gm, ctx, [nodes[i] for i in group])
        tokens = int(found[0][-1, -1])
        for i in group:
            yield i, found.pop(0)
    warn_few_tokens(tokens, max(widths), what, consumer)


def refit_on_host(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(kept, weight, bias) of refit_columns on the host: what a lever keeps per option once the gram is gone."""
    weight, bias = refit_columns(gram, weight, bias, kept)
    return kept, weight.cpu(), None if bias is None else bias.cpu()


def warn_few_tokens(tokens: int, widest: int, what: str, consumer: str) -> None:
    """One warning when the calibration tokens are too few for refit_columns to refit the widest consumer."""
    if tokens < REFIT_TOKENS_PER_CHANNEL * widest:
        warn_once(f"mmaccel: prune: {tokens} calibration tokens for {what} of up to {widest} channels; {consumer} "
                  f"is refit from {REFIT_TOKENS_PER_CHANNEL} tokens per channel ({REFIT_TOKENS_PER_CHANNEL * widest} "
                  "here), below that its kept columns stay as they are (more error): pass more calibration samples")


def weight_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class MadeCache:
    """A lever's candidates by (site, option): each site's cheapest option (the first mix measured) and the last
    one made, so that the sensitivity measurement holds one extra site's candidates at a time (issue 21)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], dict[str, torch.Tensor | None]] = {}
        self.last: tuple[tuple[str, str], dict[str, torch.Tensor | None]] | None = None

    def get(self, key: tuple[str, str]) -> dict[str, torch.Tensor | None] | None:
        if key in self.kept:
            return self.kept[key]
        return self.last[1] if self.last is not None and self.last[0] == key else None

    def put(self, key: tuple[str, str], made: dict[str, torch.Tensor | None], cheapest: bool
            ) -> dict[str, torch.Tensor | None]:
        if cheapest:
            self.kept[key] = made
        else:
            self.last = key, made
        return made


class MlpChannelLever:
    """The lossy mechanism's lever for MLP channels: each MLP found on the graph is a site, its options the
    fractions of its channels to keep (cheapest first), then ORIGINAL."""
    name, label, noun, unit, cost_unit = "prune:mlp_channels", "mlp_channels", "pruning", "MLP(s) pruned", "bytes"

    def __init__(self, removed: float | None = None) -> None:
        self.keep = keep_options(removed, KEEP)
        self.fine = False  # fine_step's options instead of self.keep's fractions (a default lever of few MLPs)
        self.near_misses: list[str] = []
        self.gm: fx.GraphModule | None = None
        self.mlps: dict[str, _Mlp] = {}  # by the name of the down projection's node (the site's node)
        # per site and option: (channels kept, refit down weight, bias), on the host (GRAM_BYTES_AT_ONCE)
        self.refits: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
        # bytes per site and option, counted on the graph as found (the final rewrite changes its nodes)
        self.costs: dict[str, dict[str, int]] = {}
        self.made = MadeCache()

    def sites(self, gm: fx.GraphModule, ctx: PassContext) -> list[Site]:
        mlps, self.near_misses = find_mlps(gm)
        if not mlps:
            return []
        self.gm = gm
        self.fine = self.keep == KEEP and len(mlps) < FINE_BELOW_SITES
        self.mlps = {mlp.down.name: mlp for mlp in mlps}
        for i, gram in streamed_grams(gm, ctx, [matmul_input(mlp.down) for mlp in mlps], "MLPs",
                                      "a down projection"):
            self._choose(mlps[i], gram)
        sites = []
        for mlp in mlps:
            options = self._options(mlp.width)
            self.costs[mlp.down.name] = {option: self._bytes_at(mlp, keep) for option, keep in options.items()}
            down_name = layer_name(mlp.down)
            name = down_name.rsplit(".", 1)[0] if "." in down_name else down_name
            sites.append(Site(mlp.down.name, name, (mlp.width, shape(mlp.down)[-1]), self._bytes_at(mlp, mlp.width),
                              (*options, ORIGINAL), {ORIGINAL: 0.0}))
        return sites

    def _options(self, width: int) -> dict[str, int]:
        """Option -> channels kept, cheapest first: for the fractions that keep a distinct number, fewer than all;
        for a lever of few MLPs, every multiple of fine_step where that is finer than the quarters (named by the
        percent kept: keep_17 keeps 16 of 96)."""
        step = fine_step(width)
        if self.fine and 4 * step < width:
            return {f"keep_{round(100 * keep / width)}": keep for keep in range(step, width, step)}
        # widths of 128 and more keep multiples of 32 (64, 128 from 256, 512): a pruned down projection can still
        # take int4 groups of that size, and matmul tiles stay whole
        granule = next((g for g in (128, 64, 32) if width >= 4 * g), 1)
        options: dict[str, int] = {}
        for option, fraction in self.keep.items():
            keep = max(granule, round(width * fraction / granule) * granule)
            if keep < width and keep not in options.values():
                options[option] = keep
        return options

    def _const(self, node: fx.Node | None) -> torch.Tensor | None:
        return None if node is None else constant_value(self.gm, node.target)

    def _bytes_at(self, mlp: _Mlp, width: int) -> int:
        """Bytes of the MLP's weights with `width` channels: its up rows (and biases), the down weight."""
        # per channel: one row of each up weight (and one bias entry), one column of the down weight
        row = sum(weight_bytes(self._const(up.args[1])[0],
                               self._const(up.args[2])[:1] if up.args[2] is not None else None)
                  for up, _, _ in mlp.pieces)
        down_w, down_b = self._const(mlp.down.args[1]), self._const(mlp.down.args[2])
        return width * (row + weight_bytes(down_w[:, 0])) + weight_bytes(down_b)

    def cost(self, site: Site, option: str) -> int:
        return self.costs[site.node][option]

    def _choose(self, mlp: _Mlp, gram: torch.Tensor) -> None:
        """From the MLP's gram: its channel order, and for every option the channels kept and the down projection
        refit on them, kept on the host (the gram is dropped after this)."""
        down_w, down_b = self._const(mlp.down.args[1]), self._const(mlp.down.args[2])
        order = channel_order(gram, down_w, down_b)
        self.refits[mlp.down.name] = {}
        for option, keep in self._options(mlp.width).items():
            self.refits[mlp.down.name][option] = refit_on_host(gram, down_w, down_b,
                                                               order[mlp.width - keep:].sort().values)

    def _made(self, site_node: str, option: str) -> dict[str, torch.Tensor | None]:
        """The MLP's new constants at `option`, by the node that reads them; slices and solutions, never writes
        into the frozen constants. Kept made: each MLP's cheapest option (the first mix measured) and the last
        one made, so that the sensitivity measurement holds one extra MLP's candidates at a time (issue 21)."""
        key = (site_node, option)
        if (found := self.made.get(key)) is not None:
            return found
        mlp = self.mlps[site_node]
        options = self._options(mlp.width)
        device = self._const(mlp.down.args[1]).device
        kept, weight, bias = self.refits[site_node][option]
        made = {"down.weight": weight.to(device), "down.bias": None if bias is None else bias.to(device)}
        for up in mlp.ups:
            rows = self._kept_rows(mlp, up, kept)
            w, b = self._const(up.args[1]), self._const(up.args[2])
            made[f"{up.name}.weight"] = w.index_select(0, rows.to(w.device))
            made[f"{up.name}.bias"] = None if b is None else b.index_select(0, rows.to(b.device))
        return self.made.put(key, made, option == next(iter(options)))

    @staticmethod
    def _kept_rows(mlp: _Mlp, up: fx.Node, kept: torch.Tensor) -> torch.Tensor:
        """Rows of `up`'s weight that stay: the kept channels of the MLP's pieces, every row of other pieces
        (Q/K/V sharing the matmul)."""
        split = next(split for u, split, _ in mlp.pieces if u is up)
        return piece_rows(split, {index: kept for u, _, index in mlp.pieces if u is up})

    def replaced(self, gm: fx.GraphModule, node: fx.Node, option: str) -> list[tuple[torch.Tensor, Any]]:
        """The MLP's weights and biases; the first, the down projection's weight, carries what rebuilds the pruned
        MLP on a recompile after weights="release": the option and the new constants, ups in their trace order."""
        mlp, made = self.mlps[node.name], self._made(node.name, option)
        rebuild = (option, [(made[f"{up.name}.weight"], made[f"{up.name}.bias"]) for up in mlp.ups],
                   made["down.weight"], made["down.bias"])
        nodes = [n for n in (mlp.down.args[1], mlp.down.args[2], *(a for up in mlp.ups for a in up.args[1:3]))
                 if is_constant(n)]
        return [(constant_value(gm, n.target), rebuild if i == 0 else None) for i, n in enumerate(nodes)]

    def replay(self, gm: fx.GraphModule, released: Any) -> str:
        """Each MLP whose down projection an earlier graph pruned under this scheme (and weights="release" then
        freed), rebuilt with that graph's kept channels and refit weights: nothing traced on data, nothing
        measured."""
        rebuilt = 0
        for mlp in find_mlps(gm)[0]:
            record = released.recall(constant_value(gm, mlp.down.args[1].target), self.label)
            if record is None:
                continue
            option, ups, weight, bias = record
            self.mlps[mlp.down.name] = mlp
            self.made.kept[(mlp.down.name, option)] = {
                "down.weight": weight, "down.bias": bias,
                **{f"{up.name}.{part}": t for up, pair in zip(mlp.ups, ups)
                   for part, t in zip(("weight", "bias"), pair)}}
            self.rewrite(gm.graph, mlp.down, option, lambda p, t: add_constant(gm, p, t))
            mlp.down.meta[REPLAYED] = option
            rebuilt += 1
        return (f"{self.label}: {rebuilt} MLP(s) rebuilt from the pruned weights of an earlier graph (weights "
                "released; nothing measured)")

    def rewrite(self, graph: fx.Graph, node: fx.Node, option: str, add: Callable[[str, torch.Tensor], str]) -> str:
        mlp = _trace(node)
        assert isinstance(mlp, _Mlp), f"prune: the MLP before '{node.name}' no longer traces"
        made = self._made(node.name, option)
        keep = made["down.weight"].shape[1]  # also on a replay, which makes no options (it measures nothing)

        def constant(user: fx.Node, key: str) -> fx.Node | None:
            if made[key] is None:
                return None
            with graph.inserting_before(user):
                return graph.get_attr(add("_pruned", made[key]))

        for up in mlp.ups:
            x, _, _, activation, residual = up.args
            up.args = (x, constant(up, f"{up.name}.weight"), constant(up, f"{up.name}.bias"), activation, residual)
        for split in dict.fromkeys(split for _, split, _ in mlp.pieces if split is not None):
            ours = {index for _, s, index in mlp.pieces if s is split}
            sizes = [keep if i in ours else size for i, size in enumerate(split_sizes(split))]
            split.target, split.args, split.kwargs = aten.split_with_sizes.default, (split.args[0], sizes, -1), {}
        for view in mlp.region:
            if is_op(view, *VIEW_OPS) and view.args[1][-1] == mlp.width:
                view.args = (view.args[0], [*view.args[1][:-1], keep])
        down = mlp.down
        down.args = (down.args[0], constant(down, "down.weight"), constant(down, "down.bias"), *down.args[3:])
        down.meta[PRUNED] = option
        return option
