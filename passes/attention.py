"""attention_fusion: explicit softmax(Q @ K^T * scale + mask) @ V  ->  scaled_dot_product_attention.

Matches the forms HF transformers, timm, OpenAI Whisper and nanoGPT write, as they look in ATen:
- scale on the scores (`* s`, `/ s`), on q (timm: `q = q * scale`), or on q and k (Whisper: d^-0.25 each);
- an additive float mask (`scores + mask`), a boolean mask through `masked_fill(m, -inf)`, or none;
- softmax in a higher precision and cast back (`softmax(x, dtype=float32).to(q.dtype)`);
- dropout at p=0 / eval: already gone in the inference graph.
Near-misses left alone: softmax over another dim, attention probabilities used elsewhere
(output_attentions), a mask that broadcasts the scores to a larger shape, a non-constant scale,
masked_fill with a finite value.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .patterns import aten, cast_source, replace_uses, dtype, is_op, match_matmul, same_shape, scalar_arg, shape, single_user
from .contract import PassContext, PassResult


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


def match_attention(node: fx.Node) -> Attention | None:
    mm = match_matmul(node)
    if mm is None:
        return None
    probs, value = mm
    softmax = cast_source(probs)
    if not (is_op(softmax, aten._softmax.default) and single_user(softmax)):
        return None
    if softmax.args[1] not in (-1, len(shape(softmax)) - 1) or (len(softmax.args) > 2 and softmax.args[2]):
        return None
    logits = cast_source(softmax.args[0])
    mask, mask_is_keep = None, False
    if is_op(logits, aten.add.Tensor) and single_user(logits) and len(logits.args) == 2 and not logits.kwargs:
        lhs, rhs = logits.args
        scores_side, mask = (lhs, rhs) if match_matmul(_strip_scale(cast_source(lhs))[0]) else (rhs, lhs)
        if not isinstance(mask, fx.Node) or not same_shape(shape(logits), shape(scores_side)):
            return None
        logits = scores_side
    elif is_op(logits, aten.masked_fill.Scalar) and single_user(logits):
        if logits.args[2] != float("-inf"):
            return None
        mask, mask_is_keep = logits.args[1], True
        logits = logits.args[0]
    logits = cast_source(logits)
    scores, scale, factors = _strip_scale(logits)
    qk = match_matmul(scores) if single_user(scores) else None
    if qk is None:
        return None
    query, q_scale, q_factors = _strip_scale(qk[0])
    key_t, k_scale, k_factors = _strip_scale(qk[1])
    if len({dtype(query), dtype(key_t), dtype(value), dtype(node)}) != 1:
        return None
    if shape(query)[-1] != shape(key_t)[-2] and not same_shape(shape(query)[-1:], shape(key_t)[-2:-1]):
        return None
    return Attention(query, key_t, value, mask, mask_is_keep, scale * q_scale * k_scale,
                     factors + q_factors + k_factors, node)


def _untranspose(graph: fx.Graph, key_t: fx.Node) -> fx.Node:
    """K from K^T: reuse the tensor the graph transposed when there is one, else transpose back."""
    rank = len(shape(key_t))
    if is_op(key_t, aten.transpose.int) and {d % rank for d in key_t.args[1:3]} == {rank - 2, rank - 1}:
        return key_t.args[0]
    return graph.call_function(aten.transpose.int, (key_t, -2, -1))


def _rewrite(graph: fx.Graph, att: Attention) -> None:
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
            aten.scaled_dot_product_attention.default, (query, key, att.value),
            {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": att.scale})
    replace_uses(att.anchor, sdpa)


# Device-specific SDPA kernels that tracing a user's F.scaled_dot_product_attention produces, with the
# name their mask argument has. The canonical op lets every target pick its own kernel.
_BACKEND_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: "attn_mask",
    aten._scaled_dot_product_efficient_attention.default: "attn_bias",
    aten._scaled_dot_product_flash_attention.default: None,
    aten._scaled_dot_product_cudnn_attention.default: "attn_bias",
}


def _canonicalize_sdpa(gm: fx.GraphModule) -> int:
    """Backend SDPA kernel calls whose only used result is the attention output -> aten SDPA."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, *_BACKEND_SDPA) or not all(
                u.target is operator.getitem and u.args[1] == 0 for u in node.users):
            continue
        bound = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        kw = bound.kwargs if bound is not None else {}
        if not kw or kw.get("dropout_p", 0.0) != 0.0:
            continue
        mask_name = _BACKEND_SDPA[node.target]
        with gm.graph.inserting_before(node):
            sdpa = gm.graph.call_function(
                aten.scaled_dot_product_attention.default, (kw["query"], kw["key"], kw["value"]),
                {"attn_mask": kw.get(mask_name) if mask_name else None, "dropout_p": 0.0,
                 "is_causal": bool(kw.get("is_causal", False)), "scale": kw.get("scale")})
        for user in list(node.users):
            replace_uses(user, sdpa)
        count += 1
    return count


def fuse_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    canonical = _canonicalize_sdpa(gm)
    found = [att for node in list(gm.graph.nodes) if (att := match_attention(node)) is not None]
    for att in found:
        _rewrite(gm.graph, att)
    gm.graph.eliminate_dead_code()
    changes = [f"{canonical} device-specific SDPA kernel call(s) -> scaled_dot_product_attention"] if canonical else []
    if found:
        masks = sum(a.mask is not None for a in found)
        changes.append(f"{len(found)} explicit attention(s) -> scaled_dot_product_attention "
                       f"({masks} with mask, scales {sorted({round(a.scale, 6) for a in found})})")
    return PassResult(matched=len(found) + canonical, changes=changes)
