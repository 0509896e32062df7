"""mmaccel::fused_linear: activation(x @ weight.T + bias) + residual, one op that a target can lower to one
matmul kernel with its epilogue fused (the linear_epilogue_fusion pass gathers it from ATen)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .registry import OpSpec, register

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"fused_linear: activation {activation!r} is not one of {ACTIVATIONS}")


def linear_epilogue(y: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                    residual: Optional[torch.Tensor]) -> torch.Tensor:
    """The epilogue every linear op shares: + bias, activation, + residual (eager twin of linear_epilogue_onnx)."""
    if bias is not None:
        y = y + bias
    y = _activate(y, activation)
    return y if residual is None else y + residual


def fused_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    y = _activate(F.linear(x, weight, bias), activation)
    return y if residual is None else y + residual


@torch.library.custom_op("mmaccel::fused_linear", mutates_args=())
def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    return fused_linear_reference(x, weight, bias, activation, residual)


@fused_linear.register_fake
def _fused_linear_fake(x, weight, bias, activation, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def fused_linear_onnx(x, weight, bias=None, activation: str = "none", residual=None):
    """Standard ONNX (opset 18): MatMul on the transposed weight (ONNX Runtime folds the Transpose of an
    initializer once), Add, and the activation written out; ONNX Runtime fuses Gelu/FastGelu patterns."""
    from onnxscript import opset18 as op

    return linear_epilogue_onnx(op.MatMul(x, op.Transpose(weight, perm=[1, 0])), bias, activation, residual)


def linear_epilogue_onnx(y, bias=None, activation: str = "none", residual=None):
    """The epilogue every linear op shares, in standard ONNX: + bias, activation, + residual."""
    from onnxscript import opset18 as op

    if bias is not None:
        y = op.Add(y, bias)
    if activation == "relu":
        y = op.Relu(y)
    elif activation == "silu":
        y = op.Mul(y, op.Sigmoid(y))
    elif activation == "gelu":
        half = op.CastLike(0.5, y)
        y = op.Mul(op.Mul(half, y), op.Add(op.CastLike(1.0, y), op.Erf(op.Div(y, op.CastLike(2.0 ** 0.5, y)))))
    elif activation == "gelu_tanh":
        inner = op.Mul(op.CastLike((2.0 / 3.141592653589793) ** 0.5, y),
                       op.Add(y, op.Mul(op.CastLike(0.044715, y), op.Mul(y, op.Mul(y, y)))))
        y = op.Mul(op.Mul(op.CastLike(0.5, y), y), op.Add(op.CastLike(1.0, y), op.Tanh(inner)))
    elif activation != "none":
        raise ValueError(f"fused_linear: activation {activation!r} has no ONNX translation")
    if residual is not None:
        y = op.Add(y, residual)
    return y


register(OpSpec(name="fused_linear", op=torch.ops.mmaccel.fused_linear.default, eager=fused_linear_reference,
                onnx=fused_linear_onnx))
