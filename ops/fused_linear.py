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


register(OpSpec(name="fused_linear", op=torch.ops.mmaccel.fused_linear.default, eager=fused_linear_reference))
