"""What the kernel generator fuses, per ATen op: pointwise expressions (Triton source on fp32 values),
view index maps (output coordinates -> input coordinates) and last-dimension reductions.

Half-precision values are computed in fp32 inside a kernel (as Inductor does) and rounded when stored;
an explicit cast in the graph is rounded where it stands, so `x.to(bf16)` keeps eager's rounding."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

aten = torch.ops.aten
prims = torch.ops.prims

TL_DTYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
             torch.int64: "tl.int64", torch.int32: "tl.int32", torch.int8: "tl.int8", torch.uint8: "tl.uint8",
             torch.bool: "tl.int1"}
HALF = (torch.float16, torch.bfloat16)


def literal(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return repr(value)
    return repr(value)


def _gelu(x: str, approximate: str = "none") -> str:
    if approximate == "tanh":
        inner = f"0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})"
        return f"0.5 * {x} * (1.0 + {_tanh(inner)})"
    return f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"


def _tanh(x: str) -> str:
    return f"(2.0 * tl.sigmoid(2.0 * ({x})) - 1.0)"


def _pow(x: str, exponent: Any) -> str | None:
    forms = {2: f"{x} * {x}", 3: f"{x} * {x} * {x}", 1: x, 0.5: f"tl.sqrt({x})", -0.5: f"tl.rsqrt({x})",
             -1: f"1.0 / {x}"}
    return forms.get(exponent)


def _max(a: str, b: str) -> str:
    return f"tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"


def _min(a: str, b: str) -> str:
    return f"tl.minimum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"


def _clamp(x: str, lo: Any = None, hi: Any = None) -> str:
    if lo is not None:
        x = _max(x, lo)
    if hi is not None:
        x = _min(x, hi)
    return x


def _not(x: str, dtype: torch.dtype) -> str:
    return f"({x} == 0)" if dtype == torch.bool else f"(~{x})"


# op -> f(args as source strings or Python scalars, kwargs) -> expression. Tensor arguments arrive as
# value names; the node's output dtype is given for the ops whose meaning depends on it.
Pointwise = Callable[..., str]
POINTWISE: dict[Any, Pointwise] = {
    aten.add.Tensor: lambda a, b, alpha=1: f"({a} + {b})" if alpha == 1 else f"({a} + {b} * {literal(alpha)})",
    aten.add.Scalar: lambda a, b, alpha=1: f"({a} + {literal(b * alpha)})",
    aten.sub.Tensor: lambda a, b, alpha=1: f"({a} - {b})" if alpha == 1 else f"({a} - {b} * {literal(alpha)})",
    aten.sub.Scalar: lambda a, b, alpha=1: f"({a} - {literal(b * alpha)})",
    aten.rsub.Scalar: lambda a, b, alpha=1: f"({literal(b)} - {a} * {literal(alpha)})",
    aten.mul.Tensor: lambda a, b: f"({a} * {b})",
    aten.mul.Scalar: lambda a, b: f"({a} * {literal(b)})",
    aten.div.Tensor: lambda a, b: f"({a} / {b})",
    aten.div.Scalar: lambda a, b: f"({a} / {literal(b)})",
    aten.neg.default: lambda a: f"(-{a})",
    aten.exp.default: lambda a: f"tl.exp({a})",
    aten.log.default: lambda a: f"tl.log({a})",
    aten.sqrt.default: lambda a: f"tl.sqrt({a})",
    aten.rsqrt.default: lambda a: f"tl.rsqrt({a})",
    aten.reciprocal.default: lambda a: f"(1.0 / {a})",
    aten.abs.default: lambda a: f"tl.abs({a})",
    aten.sin.default: lambda a: f"tl.sin({a})",
    aten.cos.default: lambda a: f"tl.cos({a})",
    aten.sigmoid.default: lambda a: f"tl.sigmoid({a})",
    aten.tanh.default: _tanh,
    aten.erf.default: lambda a: f"tl.erf({a})",
    aten.silu.default: lambda a: f"({a} * tl.sigmoid({a}))",
    aten.relu.default: lambda a: _max(a, "0.0"),
    aten.gelu.default: _gelu,
    aten.pow.Tensor_Scalar: _pow,
    aten.maximum.default: _max,
    aten.minimum.default: _min,
    aten.clamp.default: _clamp,
    aten.where.self: lambda c, a, b: f"tl.where({c}, {a}, {b})",
    aten.masked_fill.Scalar: lambda x, m, v: f"tl.where({m}, {literal(v)}, {x})",
    aten.masked_fill.Tensor: lambda x, m, v: f"tl.where({m}, {v}, {x})",
    aten.eq.Tensor: lambda a, b: f"({a} == {b})", aten.eq.Scalar: lambda a, b: f"({a} == {literal(b)})",
    aten.ne.Tensor: lambda a, b: f"({a} != {b})", aten.ne.Scalar: lambda a, b: f"({a} != {literal(b)})",
    aten.lt.Tensor: lambda a, b: f"({a} < {b})", aten.lt.Scalar: lambda a, b: f"({a} < {literal(b)})",
    aten.le.Tensor: lambda a, b: f"({a} <= {b})", aten.le.Scalar: lambda a, b: f"({a} <= {literal(b)})",
    aten.gt.Tensor: lambda a, b: f"({a} > {b})", aten.gt.Scalar: lambda a, b: f"({a} > {literal(b)})",
    aten.ge.Tensor: lambda a, b: f"({a} >= {b})", aten.ge.Scalar: lambda a, b: f"({a} >= {literal(b)})",
    aten.logical_and.default: lambda a, b: f"({a} & {b})",
    aten.logical_or.default: lambda a, b: f"({a} | {b})",
    # integer and bool only (ATen refuses floats): HF's masks combine their parts with & and |
    aten.bitwise_and.Tensor: lambda a, b: f"({a} & {b})",
    aten.bitwise_or.Tensor: lambda a, b: f"({a} | {b})",
}
# Ops whose expression depends on the output dtype: (args, dtype) -> expression.
TYPED: dict[Any, Callable[..., str]] = {
    aten.bitwise_not.default: lambda dtype, a: _not(a, dtype),
    aten.logical_not.default: lambda dtype, a: f"({a} == 0)",
}
# Same values, maybe another dtype: a cast (or nothing).
CASTS = {aten._to_copy.default, prims.convert_element_type.default, aten.clone.default, aten.alias.default,
         aten.detach.default, aten.lift_fresh_copy.default}
FACTORIES = {aten.full.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
             aten.scalar_tensor.default, aten.new_ones.default, aten.new_zeros.default, aten.new_full.default}
# start + coordinate * step along the one dimension: HF's mask builders make them every step
ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
REDUCTIONS = {aten.sum.dim_IntList: "sum", aten.mean.dim: "mean", aten.amax.default: "max", aten.amin.default: "min"}
VIEWS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
         aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default,
         aten.slice.Tensor, aten.select.int}
CAT = aten.cat.default


def cast(value: str, src: torch.dtype, dst: torch.dtype) -> str:
    """A cast between compute dtypes, rounding to a half type where the graph asks for one."""
    if dst == src:
        return value
    if dst == torch.bool:
        return f"({value} != 0)"
    if dst in HALF:
        return f"{value}.to({TL_DTYPES[dst]}).to(tl.float32)"
    if dst.is_floating_point:
        return f"{value}.to(tl.float32)"
    return f"{value}.to({TL_DTYPES[dst]})"


def factory_value(node: Any) -> Any:
    """The constant a factory node fills its output with."""
    if node.target in (aten.zeros_like.default, aten.new_zeros.default):
        return 0
    if node.target in (aten.ones_like.default, aten.new_ones.default):
        return 1
    if node.target is aten.new_full.default:
        return node.args[2]
    return node.args[1] if node.target in (aten.full.default, aten.full_like.default) else node.args[0]


def arange_start_step(node: Any) -> tuple[Any, Any]:
    """(start, step) of an arange node (its end is the output's length)."""
    if node.target is aten.arange.default:
        return 0, 1
    return node.args[0], node.args[2] if node.target is aten.arange.start_step and len(node.args) > 2 else 1
