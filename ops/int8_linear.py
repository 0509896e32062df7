"""mmaccel::int8_linear: activation((x @ qweight.T) * scale + bias) + residual, with an int8 weight quantized per
output channel (symmetric, scale = absmax / 127). Decode reads half the bytes of a bf16 weight.

The scale is per output row, so it factors out of the matmul: the int8 values are converted to x's dtype
(exact: |q| <= 127) and the product is scaled once, instead of materializing a dequantized weight."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .fused_linear import linear_epilogue
from .registry import OpSpec, by_output_rows, by_rows, register


def quantize_per_channel(weight: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K] with |q| <= qmax, scale [N] in the weight's dtype), symmetric per output channel. qmax=63
    (7 bits) for W8A8 weights that a saturating x86 int8 kernel may multiply (ops/w8a8_linear.py says why)."""
    return by_rows(lambda w: _per_channel(w, qmax), weight)


def _per_channel(weight: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = weight.detach().float().abs().amax(dim=1)
    scale = (absmax / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale.to(weight.dtype)


def int8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                          activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    # a large weight a run of output rows at a time (no whole converted copy)
    y = by_output_rows(lambda r: F.linear(x, qweight[r].to(x.dtype)), *qweight.shape)
    return linear_epilogue(y * scale, bias, activation, residual)


@torch.library.custom_op("mmaccel::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    return int8_linear_reference(x, qweight, scale, bias, activation, residual)


@int8_linear.register_fake
def _int8_linear_fake(x, qweight, scale, bias, activation, residual):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def int8_linear_onnx(x, qweight, scale, bias=None, activation: str = "none", residual=None):
    """Standard QDQ: DequantizeLinear(int8 weight, per-channel scale, axis 0) feeding the same MatMul and
    epilogue as fused_linear; the file holds int8 weights and any ONNX Runtime runs it."""
    from onnxscript import opset18 as op

    from .fused_linear import fused_linear_onnx

    weight = op.DequantizeLinear(qweight, op.Cast(scale, to=1), axis=0)  # float32 scale: DQ's requirement
    return fused_linear_onnx(x, op.CastLike(weight, x), bias, activation, residual)


register(OpSpec(name="int8_linear", op=torch.ops.mmaccel.int8_linear.default, eager=int8_linear_reference,
                onnx=int8_linear_onnx))
