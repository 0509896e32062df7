"""mmaccel::token_merge: ToMe bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", 2023),
r tokens of a [B, N, D] stream merged into their most similar neighbours, so N - r leave; the shape depends on r
only, never on the values (static shapes: CUDA graphs stay on).

The tokens alternate into two sets, A (even positions) and B (odd); each A token's most similar B token (cosine
of the tokens themselves) is its match, the r A tokens with the best matches are averaged into their matches,
weighted by how many original tokens each holds (`size`). The first token (a class token) is never merged, and
the kept A tokens stay in their order, so token 0 stays at position 0 (a pooler that reads it reads the class
token). `index` [B, N0] says where each of the N0 original tokens now is (token_unmerge reads it).
Outputs: (x [B, N - r, D], size [B, N - r], index [B, N0]); size and index None: the stream's first merge.
0 <= r <= (N - 1) // 2 (A keeps at least its first token; the pass clamps r)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .registry import OpSpec, register


def _start(x: torch.Tensor, size: Optional[torch.Tensor], index: Optional[torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens = x.shape[:2]
    size = x.new_ones(batch, tokens) if size is None else size
    index = torch.arange(tokens, device=x.device).expand(batch, tokens) if index is None else index
    return size, index


def token_merge_reference(x: torch.Tensor, size: Optional[torch.Tensor], index: Optional[torch.Tensor], r: int,
                          metric: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`metric` [B, N, M]: what the similarity is the cosine of; None (the op): the tokens x themselves. ToMe's
    choice, the attention keys averaged over heads, is measured through it by bench/token_merge_accuracy.py."""
    size, index = _start(x, size, index)
    batch, tokens, width = x.shape
    metric = x if metric is None else metric
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
    scores[:, 0] = -math.inf  # the first token is never merged
    best, match = scores.max(dim=-1)  # [B, Na]: each A token's most similar B token
    order = best.argsort(dim=-1, descending=True)
    src, keep = order[:, :r], order[:, r:].sort(dim=-1).values  # merged A tokens; kept ones, in their order
    dst = match.gather(1, src)  # [B, r]: the B token each merged one joins
    weighted = x * size[..., None]
    xa, xb, sa, sb = weighted[:, ::2], weighted[:, 1::2], size[:, ::2], size[:, 1::2]
    xb = xb.scatter_add(1, dst[..., None].expand(-1, -1, width), xa.gather(1, src[..., None].expand(-1, -1, width)))
    new_size = torch.cat([sa.gather(1, keep), sb.scatter_add(1, dst, sa.gather(1, src))], dim=1)
    new_x = torch.cat([xa.gather(1, keep[..., None].expand(-1, -1, width)), xb], dim=1) / new_size[..., None]
    # where each current token went: a kept A token to its rank, a merged one to its match, B tokens after the kept
    kept = keep.shape[1]
    ranks = torch.arange(kept, device=x.device).expand(batch, kept)
    pos_a = torch.zeros_like(order).scatter(1, keep, ranks).scatter(1, src, kept + dst)
    pos_b = kept + torch.arange(tokens // 2, device=x.device).expand(batch, tokens // 2)
    pos = torch.empty(batch, tokens, dtype=torch.long, device=x.device)
    pos[:, ::2], pos[:, 1::2] = pos_a, pos_b
    return new_x, new_size, pos.gather(1, index)


@torch.library.custom_op("mmaccel::token_merge", mutates_args=())
def token_merge(x: torch.Tensor, size: Optional[torch.Tensor], index: Optional[torch.Tensor],
                r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return token_merge_reference(x, size, index, r)


@token_merge.register_fake
def _token_merge_fake(x, size, index, r):
    batch, tokens, width = x.shape
    originals = tokens if index is None else index.shape[1]
    return (x.new_empty(batch, tokens - r, width), x.new_empty(batch, tokens - r),
            x.new_empty(batch, originals, dtype=torch.long))


def token_merge_onnx(x, size=None, index=None, r: int = 0):
    """The reference in standard ONNX (opset 18): TopK for the sorts, GatherElements, ScatterElements with
    reduction="add" for the merge (duplicate targets add, as scatter_add does)."""
    from onnxscript import opset18 as op

    shape = op.Shape(x)
    batch, tokens, width = op.Slice(shape, [0], [1]), op.Slice(shape, [1], [2]), op.Slice(shape, [2], [3])
    if size is None:
        size = op.Expand(op.CastLike(1.0, x), op.Concat(batch, tokens, axis=0))
    if index is None:
        index = op.Expand(op.Unsqueeze(op.Range(0, op.Squeeze(tokens), 1), [0]), op.Concat(batch, tokens, axis=0))
    big = [2**62]

    def every_other(t, start):
        return op.Slice(t, [start], big, [1], [2])

    metric = op.Div(x, op.ReduceL2(x, [-1], keepdims=1))
    scores = op.MatMul(every_other(metric, 0), op.Transpose(every_other(metric, 1), perm=[0, 2, 1]))
    n_a = op.Shape(scores, start=1, end=2)
    first = op.Equal(op.Range(0, op.Squeeze(n_a), 1), 0)
    scores = op.Where(op.Unsqueeze(first, [0, 2]), op.CastLike(-math.inf, x), scores)
    best, match = op.ReduceMax(scores, [-1], keepdims=0), op.ArgMax(scores, axis=-1, keepdims=0)
    _, order = op.TopK(best, n_a, axis=-1, largest=1, sorted=1)
    src = op.Slice(order, [0], [r], [1])
    kept = op.Sub(n_a, op.Constant(value_ints=[r]))
    keep = op.Cast(op.TopK(op.Cast(op.Slice(order, [r], big, [1]), to=1), kept, axis=-1, largest=0,
                           sorted=1)[0], to=7)  # ascending: the kept A tokens in their order (exact below 2**24)
    dst = op.GatherElements(match, src, axis=1)
    weighted = op.Mul(x, op.Unsqueeze(size, [-1]))
    xa, xb, sa, sb = every_other(weighted, 0), every_other(weighted, 1), every_other(size, 0), every_other(size, 1)

    def rows(i, n):
        return op.Expand(op.Unsqueeze(i, [-1]), op.Concat(batch, n, width, axis=0))

    r_len = op.Constant(value_ints=[r])
    xb = op.ScatterElements(xb, rows(dst, r_len), op.GatherElements(xa, rows(src, r_len), axis=1), axis=1,
                            reduction="add")
    new_size = op.Concat(op.GatherElements(sa, keep, axis=1),
                         op.ScatterElements(sb, dst, op.GatherElements(sa, src, axis=1), axis=1, reduction="add"),
                         axis=1)
    new_x = op.Div(op.Concat(op.GatherElements(xa, rows(keep, kept), axis=1), xb, axis=1), op.Unsqueeze(new_size, [-1]))
    zeros = op.Expand(op.Constant(value_int=0), op.Concat(batch, n_a, axis=0))
    ranks = op.Expand(op.Unsqueeze(op.Range(0, op.Squeeze(kept), 1), [0]), op.Concat(batch, kept, axis=0))
    pos_a = op.ScatterElements(op.ScatterElements(zeros, keep, ranks, axis=1), src, op.Add(dst, kept), axis=1)
    n_b = op.Shape(sb, start=1, end=2)
    pos_b = op.Expand(op.Unsqueeze(op.Add(op.Range(0, op.Squeeze(n_b), 1), kept), [0]), op.Concat(batch, n_b, axis=0))
    positions = op.Expand(op.Unsqueeze(op.Range(0, op.Squeeze(tokens), 1), [0]), op.Concat(batch, tokens, axis=0))
    pos = op.ScatterElements(op.CastLike(positions, pos_a), every_other(positions, 0), pos_a, axis=1)
    pos = op.ScatterElements(pos, every_other(positions, 1), pos_b, axis=1)
    return new_x, new_size, op.GatherElements(pos, index, axis=1)


register(OpSpec(name="token_merge", op=torch.ops.mmaccel.token_merge.default, eager=token_merge_reference,
                onnx=token_merge_onnx))
