"""attention_fusion: explicit softmax(Q @ K^T * scale + mask) @ V  ->  scaled_dot_product_attention.

Matches the forms HF transformers, timm, OpenAI Whisper and nanoGPT write, as they look in ATen:
- scale on the scores (`* s`, `/ s`), on q (timm: `q = q * scale`), or on q and k (Whisper: d^-0.25 each);
- an additive float mask (`scores + mask`), a boolean mask through `masked_fill(m, -inf)`, or none;
- softmax in a higher precision and cast back (`softmax(x, dtype=float32).to(q.dtype)`);
- dropout at p=0 / eval: already gone in the inference graph.
Near-misses left alone, each reported with its reason (mmaccel.explain): softmax over another dim, attention
probabilities used elsewhere (output_attentions), a mask that broadcasts the scores to a larger shape, a
non-constant scale, masked_fill with a finite value, operands of different dtypes.

One row differs by design: a query whose every key is masked (a left-padded position of a causal LM). Explicit
softmax over scores all at finfo.min averages V there; the SDPA kernel a target picks may give 0 instead (CUDA's
memory-efficient kernel did for HF GPT-J's eager attention on an H200, a 0.13 logit change at those positions
only). Such a position is padding, which no real token attends to: every other row is unchanged, and
transformers' own eager-against-SDPA tests leave those positions out the same way.

Grouped-query / multi-query attention (Llama, Mistral, Qwen2: fewer K/V heads than query heads): an SDPA whose
K and V are each head repeated n times (repeat_kv, repeat_interleave; explicit or fused here) reads the shared
heads instead, `scaled_dot_product_attention(q [..., Hq, L, E], k [..., Hkv, S, E], v [..., Hkv, S, Ev],
attn_mask=..., scale=..., enable_gqa=True)` with Hq = n * Hkv, so the repeat is never written to memory. A
repeat that is not that one (tiled heads, another dim) stays, reported as a near-miss.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .patterns import (VIEW_OPS, Miss, aten, cast_source, drop_dead_nodes, dtype, is_op, match_matmul, replace_uses,
                       same_shape, scalar_arg, shape, single_user, strip_noop_views)
from .contract import PassContext, PassResult

_SDPA = aten.scaled_dot_product_attention.default


@dataclass
class Attention:
    query: fx.Node
    key_t: fx.Node  # K^T as the graph has it; the rewrite transposes it back
    value: fx.Node
    mask: fx.Node | None
    mask_is_keep: bool  # masked_fill form: the mask marks positions to drop, SDPA wants positions to keep
    scale: float
    query_factors: list  # (mul or div, 0-d tensor) applied to the query before SDPA
    anchor: fx.Node  # node computing the attention output


def _strip_scale(node: fx.Node) -> tuple[fx.Node, float, list[tuple[object, fx.Node]]]:
    """x * c, x / c -> (x, c or 1/c, []) for Python numbers c; a 0-d tensor c (a float module attribute
    under dynamic=True becomes one) is returned as a factor (op, c) to apply to q instead."""
    scale, factors = 1.0, []
    while single_user(node) and is_op(node, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
        x, c = node.args[0], node.args[1]
        is_mul = node.target in (aten.mul.Tensor, aten.mul.Scalar)
        if is_mul and _is_scalar_tensor(x) and not _is_scalar_tensor(c):
            x, c = c, x
        if _is_scalar_tensor(c) and not _is_scalar_tensor(x):
            factors.append((aten.mul.Tensor if is_mul else aten.div.Tensor, c))
        else:
            number = scalar_arg(node, 1)
            if number is None or number == 0 or not math.isfinite(number):
                break
            scale *= number if is_mul else 1.0 / number
        node = x
    return node, scale, factors


def _is_scalar_tensor(a: object) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() == 0


def match_attention(node: fx.Node) -> Attention | Miss | None:
    """The attention computed at `node`, probs @ V. The anchor is a softmax whose result is multiplied by V:
    without one, None; with one that SDPA cannot express, a Miss saying why."""
    mm = match_matmul(node)
    if mm is None:
        return None
    probs, value = mm
    softmax, shared = _through_copies(probs)
    if not is_op(softmax, aten._softmax.default):
        return None
    if shared:
        return Miss(node, "the attention probabilities are used elsewhere too (output_attentions?); SDPA does not "
                          "return them")
    if cast_source(probs) is not softmax:
        return Miss(node, "the probabilities reach the matmul through a copy that is not a plain dtype cast")
    if softmax.args[1] not in (-1, len(shape(softmax)) - 1) or (len(softmax.args) > 2 and softmax.args[2]):
        return Miss(node, f"softmax over dim {softmax.args[1]}, not the last (the keys)")
    masked = _split_mask(cast_source(softmax.args[0]))
    if isinstance(masked, str):
        return Miss(node, masked)
    logits, mask, mask_is_keep = masked
    scores, scale, factors = _strip_scale(cast_source(logits))
    qk = match_matmul(scores) if single_user(scores) else None
    if qk is None:
        return Miss(node, _not_scores(scores))
    query, q_scale, q_factors = _strip_scale(qk[0])
    key_t, k_scale, k_factors = _strip_scale(qk[1])
    if len({dtype(query), dtype(key_t), dtype(value), dtype(node)}) != 1:
        return Miss(node, f"dtypes differ: q {dtype(query)}, K^T {dtype(key_t)}, V {dtype(value)}, "
                          f"output {dtype(node)}; SDPA takes one")
    if shape(query)[-1] != shape(key_t)[-2] and not same_shape(shape(query)[-1:], shape(key_t)[-2:-1]):
        return Miss(node, f"q's last dim {shape(query)[-1]} is not provably K's {shape(key_t)[-2]}")
    return Attention(query, key_t, value, mask, mask_is_keep, scale * q_scale * k_scale,
                     factors + q_factors + k_factors, node)


def _through_copies(node: fx.Node) -> tuple[fx.Node, bool]:
    """(the node `node` casts or copies, whether any node on the way is read by others too): cast_source stops
    at a shared cast; HF's eval-mode dropout is a clone, which output_attentions shares."""
    shared = not single_user(node)
    while is_op(node, aten._to_copy.default, aten.clone.default):
        node = node.args[0]
        shared = shared or not single_user(node)
    return node, shared


def _split_mask(logits: fx.Node) -> tuple[fx.Node, fx.Node | None, bool] | str:
    """softmax's input -> (scores, mask or None, whether the mask marks positions to drop), or the reason
    the mask is not one SDPA takes."""
    if is_op(logits, aten.add.Tensor) and single_user(logits) and len(logits.args) == 2 and not logits.kwargs:
        lhs, rhs = logits.args
        scores, mask = (lhs, rhs) if match_matmul(_strip_scale(cast_source(lhs))[0]) else (rhs, lhs)
        if not isinstance(mask, fx.Node):
            return f"the scores plus the number {mask}, not a mask tensor"
        if not same_shape(shape(logits), shape(scores)):
            return (f"the mask {list(shape(mask))} broadcasts the scores {list(shape(scores))} to a larger shape "
                    f"{list(shape(logits))}")
        return scores, mask, False
    if is_op(logits, aten.masked_fill.Scalar) and single_user(logits):
        if logits.args[2] != float("-inf"):
            return f"masked_fill with {logits.args[2]}, not -inf: those keys keep a weight, SDPA's mask drops them"
        return logits.args[0], logits.args[1], True
    return logits, None, False


def _not_scores(node: fx.Node) -> str:
    """Why the softmax input, once mask and scalar scales are off, is not Q @ K^T."""
    if match_matmul(node) is not None:
        return f"the scores '{node.name}' (Q @ K^T) are used elsewhere too"
    if is_op(node, aten.mul.Tensor, aten.div.Tensor):
        x, factor = node.args[:2]
        factor = x if match_matmul(factor) is not None else factor
        if isinstance(factor, fx.Node) and shape(factor):
            return f"the scores are scaled by a tensor of shape {list(shape(factor))}, not one number"
    return f"the softmax input '{node.name}' ({node.target}) is not Q @ K^T times a scale plus a mask"


def _untranspose(graph: fx.Graph, key_t: fx.Node) -> fx.Node:
    """K from K^T: reuse the tensor the graph transposed when there is one, else transpose back."""
    rank = len(shape(key_t))
    if is_op(key_t, aten.transpose.int) and {d % rank for d in key_t.args[1:3]} == {rank - 2, rank - 1}:
        return key_t.args[0]
    return graph.call_function(aten.transpose.int, (key_t, -2, -1))


def _rewrite(graph: fx.Graph, att: Attention) -> fx.Node:
    with graph.inserting_before(att.anchor):
        key = _untranspose(graph, att.key_t)
        mask = att.mask
        if mask is not None and att.mask_is_keep:
            mask = mask.args[0] if is_op(mask, aten.logical_not.default) else \
                graph.call_function(aten.logical_not.default, (mask,))
        elif mask is not None and dtype(mask) not in (torch.bool, dtype(att.query)):
            mask = graph.call_function(aten._to_copy.default, (mask,), {"dtype": dtype(att.query)})
        query = att.query
        for op, factor in att.query_factors:
            query = graph.call_function(op, (query, factor))
        sdpa = graph.call_function(
            _SDPA, (query, key, att.value),
            {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": att.scale})
    replace_uses(att.anchor, sdpa)
    return sdpa


# Device-specific SDPA kernels that tracing a user's F.scaled_dot_product_attention produces, with the
# name their mask argument has. The canonical op lets every target pick its own kernel.
_BACKEND_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: "attn_mask",
    aten._scaled_dot_product_efficient_attention.default: "attn_bias",
    aten._scaled_dot_product_flash_attention.default: None,
    aten._scaled_dot_product_cudnn_attention.default: "attn_bias",
}


def _canonicalize_sdpa(gm: fx.GraphModule) -> list[fx.Node]:
    """Backend SDPA kernel calls whose only used result is the attention output -> aten SDPA. The kernels
    take K/V with fewer heads than Q as they are (grouped-query attention, HF's `enable_gqa=True`); the
    aten op needs enable_gqa said, or it broadcasts the heads and fails."""
    canonical = []
    for node in list(gm.graph.nodes):
        if not is_op(node, *_BACKEND_SDPA) or not all(
                u.target is operator.getitem and u.args[1] == 0 for u in node.users):
            continue
        bound = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        kw = bound.kwargs if bound is not None else {}
        if not kw or kw.get("dropout_p", 0.0) != 0.0:
            continue
        mask_name = _BACKEND_SDPA[node.target]
        query, key, value = kw["query"], kw["key"], kw["value"]
        with gm.graph.inserting_before(node):
            sdpa = gm.graph.call_function(
                _SDPA, (query, key, value),
                {"attn_mask": kw.get(mask_name) if mask_name else None, "dropout_p": 0.0,
                 "is_causal": bool(kw.get("is_causal", False)), "scale": kw.get("scale"),
                 **({} if same_shape(shape(query)[-3:-2], shape(key)[-3:-2]) else {"enable_gqa": True})})
        output = _in_kernel_layout(gm.graph, sdpa, node)
        if output is None:
            gm.graph.erase_node(sdpa)
            continue
        for user in list(node.users):
            replace_uses(user, output)
        canonical.append(sdpa)
    return canonical


def _in_kernel_layout(graph: fx.Graph, sdpa: fx.Node, kernel: fx.Node) -> fx.Node | None:
    """`sdpa`'s output with the strides the kernel's had, which the graph after it may rely on (a view). The
    CUDA kernels write [B, H, S, D] laid out as [B, S, H, D], so HF's transpose(1, 2) then view(B, S, H * D)
    needs no copy in the traced graph, while the aten op's output (as FakeTensor propagation lays it out) is
    contiguous: on the H200 (transformers 5.17) 'Cannot view a tensor ... as (2, 16, 32)' rolled the pass back
    on every HF Llama prefill. Where the layouts differ, one copy makes the kernel's; None: a layout this cannot
    make (the kernel call is then left as it is)."""
    return _with_layout(graph, sdpa, next((u.meta.get("val") for u in kernel.users), None))


def _fake_output(sdpa: fx.Node) -> torch.Tensor | None:
    """The aten op's output as FakeTensor propagation lays it out, for the arguments `sdpa` has now."""
    try:
        return sdpa.target(*(a.meta.get("val") if isinstance(a, fx.Node) else a for a in sdpa.args),
                           **{k: a.meta.get("val") if isinstance(a, fx.Node) else a for k, a in sdpa.kwargs.items()})
    except Exception:  # no fake values to compare: validation after the pass checks the graph as it is
        return None


def _with_layout(graph: fx.Graph, sdpa: fx.Node, want: Any) -> fx.Node | None:
    """The node giving `sdpa`'s output laid out as `want` (`sdpa` itself, or a copy after it)."""
    canonical = _fake_output(sdpa)
    if canonical is None or not isinstance(want, torch.Tensor) or want.dim() != 4 or _same_layout(canonical, want):
        return sdpa
    if not (canonical.is_contiguous() and want.transpose(1, 2).is_contiguous()):
        return None
    sdpa.meta["val"] = canonical  # later matches in this pass read its shape (replace_uses says why)
    with graph.inserting_after(sdpa):
        heads_inner = graph.call_function(aten.transpose.int, (sdpa, 1, 2))
    with graph.inserting_after(heads_inner):
        copy = graph.call_function(aten.clone.default, (heads_inner,), {"memory_format": torch.contiguous_format})
    with graph.inserting_after(copy):
        return graph.call_function(aten.transpose.int, (copy, 1, 2))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b lay out their elements alike: equal strides wherever a dim has more than one element. A
    decode step's one query row ([B, H, 1, D]) is laid out the same as contiguous whichever stride the size-1 dim
    has, so the kernel's [B, S, H, D] storage needs no copy there; comparing every stride added one copy kernel per
    layer and decode step (the registry's grouped-query decode step on an H200: 8 generated kernels for 6)."""
    return a.shape == b.shape and all(size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _share_kv(graph: fx.Graph, sdpa: fx.Node, key: fx.Node, value: fx.Node) -> bool:
    """Let `sdpa` read K/V's shared heads (enable_gqa) and keep the layout its users saw. On CUDA the op with
    repeated K/V runs the efficient kernel ([B, S, H, D] storage, which HF's view after it relies on) while with
    enable_gqa and a mask it runs the math path (contiguous): on the H200 'Cannot view a tensor with shape
    [2, 5, 4, 8] ... as (2, 5, 32)' rolled the pass back on tiny grouped-query Llamas. False: left repeated."""
    before = _fake_output(sdpa)
    args, kwargs = sdpa.args, sdpa.kwargs
    sdpa.args = (sdpa.args[0], key, value, *sdpa.args[3:])
    sdpa.kwargs = {**sdpa.kwargs, "enable_gqa": True}
    users = list(sdpa.users)
    output = _with_layout(graph, sdpa, before)
    if output is None:
        sdpa.args, sdpa.kwargs = args, kwargs
        return False
    if output is not sdpa:
        for user in users:
            user.replace_input_with(sdpa, output)
    return True


def _head_repeat(node: fx.Node) -> tuple[fx.Node, object] | str | None:
    """(x, n) when `node` is x [..., Hkv, S, D] with each head repeated n times in place, [..., Hkv * n, S, D]
    where head h is x's head h // n, as enable_gqa reads K/V: HF's repeat_kv and repeat_interleave(n, dim=-3),
    in ATen unsqueeze(x, -3) -> expand -> (contiguous clone) -> reshape. Another repeat: why it is not this
    one. None: no repeat."""
    if is_op(node, aten.repeat.default):
        return f"K/V are tiled with repeat({list(node.args[1])}); enable_gqa shares heads in groups (h // n)"
    if not is_op(node, *VIEW_OPS):
        return None
    expand = strip_noop_views(node.args[0])
    unsqueeze = strip_noop_views(expand.args[0]) if is_op(expand, aten.expand.default) else None
    if not is_op(unsqueeze, aten.unsqueeze.default):
        return None
    x = unsqueeze.args[0]
    rank, big, out = len(shape(x)), shape(expand), shape(node)
    dim = unsqueeze.args[1] % (rank + 1)
    if not same_shape((*big[:dim], *big[dim + 1:]), shape(x)) or len(out) != rank:
        return None
    grouped = dim > 0 and same_shape(out, (*big[:dim - 1], big[dim - 1] * big[dim], *big[dim + 1:]))
    tiled = dim < rank and same_shape(out, (*big[:dim], big[dim] * big[dim + 1], *big[dim + 2:]))
    if not (grouped or tiled):
        return None
    repeated = dim - 1 if grouped else dim
    if repeated != rank - 3:
        return f"K/V are repeated along dim {repeated - rank} of {list(shape(x))}, not the heads (dim -3)"
    if not grouped:
        return "K/V heads are tiled (head h reads h % Hkv); enable_gqa shares them in groups (h // n)"
    return x, big[dim]


def _match_grouped_kv(sdpa: fx.Node) -> tuple[fx.Node, fx.Node] | Miss | None:
    """(K, V) with their shared heads when an SDPA reads them with each head repeated for grouped-query
    attention; a Miss when K or V is repeated otherwise."""
    key, value = sdpa.args[1:3]
    if sdpa.kwargs.get("enable_gqa"):
        return None
    k, v = _head_repeat(key), _head_repeat(value)
    if k is None and v is None:
        return None
    reason = next((r for r in (k, v) if isinstance(r, str)), None)
    if reason is None and (k is None or v is None or not same_shape((k[1],), (v[1],))):
        reason = "K and V are not repeated alike"
    out = shape(sdpa)  # [..., Hq, L, Ev]: Q's batch dims and heads (a Q just scaled by the pass has no shape yet)
    if reason is None and not (same_shape(shape(key)[:-2], out[:-2]) and all(
            len(shape(t)) == len(out) and same_shape(shape(t)[:-3], out[:-3]) for t in (k[0], v[0]))):
        reason = "K/V and Q differ in batch dims or heads"
    if reason is not None:
        return Miss(sdpa, f"K/V stay repeated: {reason}")
    return k[0], v[0]


def fuse_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    canonical = _canonicalize_sdpa(gm)
    matches = [m for node in list(gm.graph.nodes) if (m := match_attention(node)) is not None]
    found = [m for m in matches if isinstance(m, Attention)]
    fused = [_rewrite(gm.graph, att) for att in found]
    grouped = [(node, m) for node in gm.graph.find_nodes(op="call_function", target=_SDPA)
               if (m := _match_grouped_kv(node)) is not None]
    shared = {sdpa: m for sdpa, m in grouped if not isinstance(m, Miss) and _share_kv(gm.graph, sdpa, *m)}
    grouped = [(sdpa, m if isinstance(m, Miss) or sdpa in shared else
                Miss(sdpa, "K/V stay repeated: the shared-head op's output layout differs from what the graph "
                           "after it reads")) for sdpa, m in grouped]
    drop_dead_nodes(gm.graph)  # the replaced kernel calls, which still read the query
    scaled = [sdpa for sdpa in gm.graph.find_nodes(op="call_function", target=_SDPA)
              if _absorb_query_scale(gm.graph, sdpa)]
    drop_dead_nodes(gm.graph)
    misses = [m for m in matches if isinstance(m, Miss)] + [m for _, m in grouped if isinstance(m, Miss)]
    changes = _changes(canonical, found, shared)
    if scaled:
        changes.append(f"{len(scaled)} attention(s) take the query's scaling as SDPA's scale (one kernel fewer each)")
    return PassResult(matched=len({*canonical, *fused, *shared, *scaled}), changes=changes,
                      near_misses=[str(m) for m in misses])


# Ops a multiplication by a number commutes with: moving the factor past them changes no value.
_LAYOUT_OPS = (*VIEW_OPS, aten.transpose.int, aten.permute.default, aten.clone.default)


def _absorb_query_scale(graph: fx.Graph, sdpa: fx.Node) -> bool:
    """sdpa(layout(q * c), k, v, scale=s) -> sdpa(layout(q), k, v, scale=c * s). HF Whisper and BART scale the
    query by head_dim ** -0.5 themselves and call SDPA with scale=1.0: in a decode step that multiply is a
    kernel of its own per attention (two per Whisper decoder layer, of about 19). Only when the scaled query
    feeds this SDPA alone, through layout ops."""
    node = sdpa.args[0]
    while is_op(node, *_LAYOUT_OPS) and single_user(node):
        node = node.args[0]
    if not (is_op(node, aten.mul.Tensor, aten.mul.Scalar) and single_user(node) and isinstance(node.args[0], fx.Node)):
        return False
    query, source = sdpa.args[0].meta.get("val"), node.args[0].meta.get("val")
    factor, scale = scalar_arg(node, 1), sdpa.kwargs.get("scale")
    if (factor is None or not math.isfinite(factor) or factor == 0 or not isinstance(query, torch.Tensor)
            or not isinstance(query.shape[-1], int) or not isinstance(source, torch.Tensor)
            or source.dtype != query.dtype):  # a multiply that also promotes its input stays
        return False
    head_dim = query.shape[-1]
    node.replace_all_uses_with(node.args[0])
    graph.erase_node(node)
    sdpa.kwargs = {**sdpa.kwargs, "scale": factor * (head_dim ** -0.5 if scale is None else scale)}
    return True


def _changes(canonical: list[fx.Node], found: list[Attention], shared: dict) -> list[str]:
    changes = []
    if canonical:
        grouped = sum(bool(n.kwargs.get("enable_gqa")) for n in canonical)
        changes.append(f"{len(canonical)} device-specific SDPA kernel call(s) -> scaled_dot_product_attention"
                       + (f" ({grouped} grouped-query, enable_gqa)" if grouped else ""))
    if found:
        masks = sum(a.mask is not None for a in found)
        changes.append(f"{len(found)} explicit attention(s) -> scaled_dot_product_attention "
                       f"({masks} with mask, scales {sorted({round(a.scale, 6) for a in found})})")
    if shared:
        changes.append(f"{len(shared)} attention(s) read the shared K/V heads (enable_gqa) instead of repeating them")
    return changes
