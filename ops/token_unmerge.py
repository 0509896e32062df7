"""mmaccel::token_unmerge: a merged token stream [B, N, D] back at its N0 original positions, each original token
reading the merged token it went into (`index` [B, N0], from mmaccel::token_merge): for a consumer that needs one
output per original token (LLaVA's projector takes every patch token)."""
from __future__ import annotations

import torch

from .registry import OpSpec, register


def token_unmerge_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


@torch.library.custom_op("mmaccel::token_unmerge", mutates_args=())
def token_unmerge(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return token_unmerge_reference(x, index)


@token_unmerge.register_fake
def _token_unmerge_fake(x, index):
    return x.new_empty(x.shape[0], index.shape[1], x.shape[2])


def token_unmerge_onnx(x, index):
    """GatherElements along the tokens, the index repeated over the features."""
    from onnxscript import opset18 as op

    shape = op.Concat(op.Shape(index), op.Shape(x, start=2, end=3), axis=0)
    return op.GatherElements(x, op.Expand(op.Unsqueeze(index, [-1]), shape), axis=1)


register(OpSpec(name="token_unmerge", op=torch.ops.mmaccel.token_unmerge.default, eager=token_unmerge_reference,
                onnx=token_unmerge_onnx))
