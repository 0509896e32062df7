"""mmaccel::int4_linear: activation(x @ dequant(packed).T + bias) + residual, with a 4-bit weight quantized per
group of `group` consecutive input channels (asymmetric: w = (q - zero) * scale, q and zero in 0..15). Decode
reads a quarter of a bf16 weight's bytes, plus one scale and one zero point per group.

Packing (ours, chosen for the kernels): in each group of G input channels, byte i (0 <= i < G/2) holds channel
i in its low nibble and channel G/2 + i in its high nibble. A kernel that loads a run of bytes then needs two
contiguous runs of x, not an even/odd gather. packed is uint8 [N, K/2]; scale [N, K/G] in the weight's dtype;
zero uint8 [N, K/G]. K must be a multiple of the group size."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .fused_linear import _activate
from .registry import OpSpec, by_output_rows, by_rows, register

GROUP_SIZES = (32, 64, 128)


def quantize_int4_groupwise(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], scale [N, K/group] in weight's dtype, zero uint8 [N, K/group])."""
    K = weight.shape[1]
    assert group in GROUP_SIZES and K % group == 0, f"int4: K={K} must be a multiple of the group size {group}"
    return by_rows(lambda rows: _groupwise(rows, group), weight)


def _groupwise(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group, group)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # the range holds 0, so zero is exact
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    scale = scale.to(weight.dtype).float()  # quantize against the scale the kernels will use
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8)
    half = group // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.reshape(N, K // 2), scale.to(weight.dtype), zero.to(torch.uint8)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """The [N, K] weight in scale's dtype: (q - zero) * scale, computed in fp32 and rounded once."""
    N, groups = scale.shape
    b = packed.reshape(N, groups, group // 2)
    q = torch.cat([b & 15, b >> 4], dim=-1).float()
    w = (q - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(N, groups * group).to(scale.dtype)


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                          bias: Optional[torch.Tensor], activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    # A large weight is dequantized a run of output rows at a time, so the reference never holds it whole in
    # float32
    y = by_output_rows(lambda r: F.linear(x, dequantize_int4(packed[r], scale[r], zero[r], group).to(x.dtype),
                                          None if bias is None else bias[r]), packed.shape[0], 2 * packed.shape[1])
    y = _activate(y, activation)
    return y if residual is None else y + residual


@torch.library.custom_op("mmaccel::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                bias: Optional[torch.Tensor], activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    return int4_linear_reference(x, packed, scale, zero, group, bias, activation, residual)


@int4_linear.register_fake
def _int4_linear_fake(x, packed, scale, zero, group, bias, activation, residual):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def int4_linear_onnx(x, packed, scale, zero, group: int, bias=None, activation: str = "none", residual=None):
    """Standard ops only (any ONNX Runtime runs it): the nibbles are unpacked with BitwiseAnd/BitShift, the
    weight dequantized per group and fed to the same MatMul and epilogue as fused_linear. The file holds the
    packed 4-bit weight."""
    from onnxscript import opset18 as op

    from .fused_linear import fused_linear_onnx

    n_k2 = op.Shape(packed)
    groups_shape = op.Concat(op.Slice(n_k2, [0], [1]), op.Constant(value_ints=[-1, group // 2]), axis=0)
    b = op.Reshape(packed, groups_shape)  # [N, groups, G/2]
    low = op.BitwiseAnd(b, op.Constant(value=_uint8(15)))
    high = op.BitShift(b, op.Constant(value=_uint8(4)), direction="RIGHT")
    q = op.Cast(op.Concat(low, high, axis=-1), to=1)  # [N, groups, G] float32
    w = op.Mul(op.Sub(q, op.Unsqueeze(op.Cast(zero, to=1), [-1])), op.Unsqueeze(op.Cast(scale, to=1), [-1]))
    w = op.Reshape(w, op.Concat(op.Slice(n_k2, [0], [1]), op.Constant(value_ints=[-1]), axis=0))
    return fused_linear_onnx(x, op.CastLike(op.CastLike(w, scale), x), bias, activation, residual)


def _uint8(value: int):
    import onnx

    return onnx.helper.make_tensor("c", onnx.TensorProto.UINT8, [], [value])


register(OpSpec(name="int4_linear", op=torch.ops.mmaccel.int4_linear.default, eager=int4_linear_reference,
                onnx=int4_linear_onnx))
