"""mmaccel::int4_matmul_nbits: mmaccel::int4_linear with its weight in ONNX Runtime's MatMulNBits layout, for ONNX
export. Its translation is one com.microsoft::MatMulNBits (ONNX Runtime's 4-bit kernel reads the packed weight at
run time) plus the shared epilogue; int4_linear's standard-op translation instead unpacks the weight with
BitwiseAnd/BitShift, which ONNX Runtime constant-folds into an fp32 initializer at session start (fp32 memory and
speed). The export inserts this op in place of int4_linear (`to_matmul_nbits` repacks the values at compile time,
where the translation only sees symbolic initializers); no pass inserts it for the other targets.

MatMulNBits layout (bits=4, block_size = the group G): b uint8 [N, K/G, G/2], channel 2i of a block in the low
nibble of byte i and 2i+1 in the high; scales [N * K/G]; zero points uint8 [N, ceil((K/G)/2)], block 2j in the
low nibble of byte j. Same q, zero and scale as int4_linear, so the same values: w = (q - zero) * scale."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .fused_linear import _activate, linear_epilogue_onnx
from .registry import OpSpec, register

MSFT_DOMAIN = "com.microsoft"


def to_matmul_nbits(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4_linear's (packed [N, K/2], scale [N, K/G], zero [N, K/G]) -> MatMulNBits' (b, scales, zero points)."""
    n, groups = scale.shape
    blocks = packed.reshape(n, groups, group // 2)
    q = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # [N, K/G, G] in channel order
    b = q[..., 0::2] | (q[..., 1::2] << 4)
    zero = F.pad(zero, (0, groups % 2))  # an odd block count: the last byte's high nibble is unused
    return b.contiguous(), scale.reshape(-1).contiguous(), (zero[:, 0::2] | (zero[:, 1::2] << 4)).contiguous()


def dequantize_matmul_nbits(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight in scales' dtype, as MatMulNBits reads it: (q - zero) * scale in fp32, rounded once."""
    n, groups, half = b.shape
    q = torch.stack([b & 15, b >> 4], dim=-1).reshape(n, groups, 2 * half).float()
    zero = torch.stack([zero_points & 15, zero_points >> 4], dim=-1).reshape(n, -1)[:, :groups].float()
    w = (q - zero[..., None]) * scales.reshape(n, groups).float()[..., None]
    return w.reshape(n, groups * 2 * half).to(scales.dtype)


def int4_matmul_nbits_reference(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                                bias: Optional[torch.Tensor], activation: str,
                                residual: Optional[torch.Tensor]) -> torch.Tensor:
    y = _activate(F.linear(x, dequantize_matmul_nbits(b, scales, zero_points).to(x.dtype), bias), activation)
    return y if residual is None else y + residual


@torch.library.custom_op("mmaccel::int4_matmul_nbits", mutates_args=())
def int4_matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                      bias: Optional[torch.Tensor], activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    return int4_matmul_nbits_reference(x, b, scales, zero_points, bias, activation, residual)


@int4_matmul_nbits.register_fake
def _int4_matmul_nbits_fake(x, b, scales, zero_points, bias, activation, residual):
    return x.new_empty((*x.shape[:-1], b.shape[0]))


def int4_matmul_nbits_onnx(x, b, scales, zero_points, bias=None, activation: str = "none", residual=None):
    """com.microsoft::MatMulNBits (ONNX Runtime's contrib op: not a standard ONNX file), then + bias, activation,
    + residual in standard ops. N, K and the block size are static: b's shape."""
    n, groups, half = b.shape
    matmul_nbits = contrib_op("MatMulNBits", [("A", "T1"), ("B", "T2"), ("scales", "T1"), ("zero_points", "T3")],
                              ("Y", "T1"), {"T1": ["tensor(float)", "tensor(float16)"], "T2": ["tensor(uint8)"],
                                            "T3": ["tensor(uint8)"]}, ("K", "N", "bits", "block_size"))
    y = matmul_nbits(x, b, scales, zero_points, K=groups * 2 * half, N=n, bits=4, block_size=2 * half)
    return linear_epilogue_onnx(y, bias, activation, residual)


def contrib_op(name: str, inputs: list[tuple[str, str]], output: tuple[str, str], types: dict[str, list[str]],
               int_attributes: tuple[str, ...]):
    """An ONNX Script op of ONNX Runtime's com.microsoft domain, from the part of its schema an op here uses (onnx
    knows no contrib op, and the ONNX Script tracer builds nodes from a schema)."""
    from onnx.defs import OpSchema
    from onnxscript import values

    io = OpSchema.FormalParameter
    schema = OpSchema(name, MSFT_DOMAIN, 1, inputs=[io(*i) for i in inputs], outputs=[io(*output)],
                      type_constraints=[(t, allowed, "") for t, allowed in types.items()],
                      attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in int_attributes])
    return values.Op(values.Opset(MSFT_DOMAIN, 1), name, schema)


register(OpSpec(name="int4_matmul_nbits", op=torch.ops.mmaccel.int4_matmul_nbits.default,
                eager=int4_matmul_nbits_reference, onnx=int4_matmul_nbits_onnx))
