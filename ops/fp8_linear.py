"""mmaccel::fp8_linear: activation(x @ W.T + bias) + residual with both operands in float8 e4m3 ("fp8 W8A8
dynamic", as torchao's Float8DynamicActivationFloat8WeightConfig and gpt-fast's fp8 path).

Why: the weight takes one byte per value, as int8_linear's, and the matmul runs on fp8 tensor cores, whose dense
peak on H100 is twice bf16's (1979 vs 989 TFLOP/s, SXM): cuBLASLt's scaled fp8 GEMM (torch._scaled_mm) serves
prefill and large-batch linears, which are compute bound. e4m3 keeps a relative step (3 mantissa bits) where int8
has an absolute one, so a per-tensor scale survives moderate outliers; only values below 2**-6 of the scale
(e4m3's subnormals) lose precision, and per token no token's values are pushed there by another's.

Quantization, exactly (the reference below computes these bits on any device, CPU included: fp8 values and
their products are exact in float32, and in TF32 too):
  weight, once at compile time: s_w = max(absmax, tiny) / 448 per output row (granularity "row") or for the
    whole tensor ("tensor", shape [1]); qweight = (w / s_w).to(float8_e4m3fn);
  activation, at run time: s_x = max(absmax, tiny) / 448 per token (last-dim row of x) for "row", for the whole
    tensor for "tensor"; xq = (x.float() / s_x).to(float8_e4m3fn), rounding to nearest even;
  y = ((float(xq) @ float(qweight).T) * s_x * s_w).to(x.dtype), float32 accumulation, then + bias, activation,
    + residual (linear_epilogue). 448 is e4m3's largest finite value, so |x / s| <= 448 up to an ulp, which
    still rounds to 448; tiny is float32's smallest normal (an all-zero row quantizes to zeros).

Where it runs fast: fp8_linear_scaled_mm, the same computation through torch._scaled_mm, on CUDA GPUs of compute
capability >= 8.9 (scaled_mm_supported says when), for the Triton target to lower the op to. Measured on an H200
(torch 2.11+cu130, bf16 x): the fp8 GEMM alone takes about 0.6x the time of the bf16 linear at M=4096, K=N=4096
and at M=8192, K=4096, N=14336, but the eager quantization of x (several unfused passes over it) leaves the whole
op at 0.86-0.94x the bf16 time for the larger shape and 1.7x for the smaller: a real gain needs x quantized in
one fused kernel. At M=16 (decode) the op is 4x slower than bf16; int8_linear's weight-only path suits decode.
The reference materializes float32 copies; it serves CPU and checking.

ONNX: fp8_linear_onnx needs opset 21 (ONNX_OPSET). ONNX Runtime's CPU build (1.30 and 1.32 checked) has float8
QuantizeLinear/DequantizeLinear kernels, per tensor, per axis and blocked, whose rounding matches torch's bit for
bit, but no float8 GEMM: the file keeps 1-byte weights and ONNX Runtime runs the matmul in float32.
"""
from __future__ import annotations

from typing import Optional

import torch

from .fused_linear import linear_epilogue
from .registry import OpSpec, by_rows, register

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
TINY = torch.finfo(torch.float32).tiny
GRANULARITIES = ("row", "tensor")
# fp8_linear_onnx needs opset 21 (float8 QuantizeLinear with output_dtype and block_size): a file holding this op
# is exported at this opset or later; at opset 18 the float8 nodes are invalid.
ONNX_OPSET = 21


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"fp8_linear: granularity {granularity!r} is not one of {GRANULARITIES}")


def _scale(absmax: torch.Tensor) -> torch.Tensor:
    return absmax.clamp(min=TINY) / FP8_MAX


def quantize_fp8_weight(weight: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight float8_e4m3fn [N, K], wscale float32 [N] for "row" or [1] for "tensor"), w ~= qweight * wscale."""
    _check_granularity(granularity)
    if granularity == "row":
        return by_rows(_fp8_rows, weight)
    row_absmax = by_rows(lambda rows: (rows.detach().float().abs().amax(dim=1),), weight)[0]
    wscale = _scale(row_absmax.amax().reshape(1))
    return by_rows(lambda rows: ((rows.detach().float() / wscale).to(FP8),), weight)[0], wscale


def _fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().float()
    wscale = _scale(w.abs().amax(dim=1))
    return (w / wscale[:, None]).to(FP8), wscale


def quantize_fp8_activation(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """(xq float8_e4m3fn, shaped as x; sx float32, [..., 1] for "row" (per token), 0-dim for "tensor"),
    x ~= xq * sx. x must hold at least one value."""
    _check_granularity(granularity)
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True) if granularity == "row" else xf.abs().amax()
    sx = _scale(absmax)
    return (xf / sx).to(FP8), sx


def fp8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
                         activation: str, residual: Optional[torch.Tensor], granularity: str = "row") -> torch.Tensor:
    _check_granularity(granularity)
    if x.numel() == 0:  # no row to take a range from: the empty (or bias-only, K = 0) result of a plain linear
        y = torch.nn.functional.linear(x, qweight.to(x.dtype))
    else:
        xq, sx = quantize_fp8_activation(x, granularity)
        y = ((xq.float() @ qweight.float().t()) * sx * wscale.float()).to(x.dtype)
    return linear_epilogue(y, bias, activation, residual)


def fp8_matmul_available(device: torch.device) -> bool:
    """Whether `device` has fp8 tensor cores that torch._scaled_mm uses: CUDA, compute capability >= 8.9."""
    return (device.type == "cuda" and bool(torch.version.cuda) and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def scaled_mm_supported(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether fp8_linear_scaled_mm runs x @ qweight.T on fp8 tensor cores: torch._scaled_mm on CUDA needs
    compute capability >= 8.9, a row-major [M, K] and a column-major [K, N] float8 operand (qweight.t() of a
    contiguous qweight), and K and N multiples of 16. ROCm is left out: its MI300 kernels take float8_e4m3fnuz."""
    if not (qweight.device == x.device and fp8_matmul_available(x.device)):
        return False
    n, k = qweight.shape
    return (qweight.dtype == FP8 and qweight.is_contiguous() and k % 16 == 0 and n % 16 == 0
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def fp8_linear_scaled_mm(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
                         activation: str, residual: Optional[torch.Tensor], granularity: str = "row") -> torch.Tensor:
    """fp8_linear through torch._scaled_mm, the scales applied to the float32 accumulator in the GEMM's epilogue.
    Per-row scales go to the GEMM only for bfloat16 output: older torch (CUTLASS path, taken on sm89 and where
    cuBLAS < 12.9) accepts per-row scales for bf16 output only, later ones for fp16 and, on sm90 with cuBLAS 12.9,
    fp32 too; for float16/float32 x the GEMM runs with unit scales into float32 and the scales follow as one
    elementwise pass. use_fast_accum stays off (the reference promises float32 accumulation). On CPU (torch 2.13
    has a kernel) the values are the reference's up to the order of the sums; on Hopper the fp8 tensor cores add
    with fewer bits than float32 between cuBLAS's float32 promotions: up to 2.5e-4 of the output's largest value
    apart, measured for K = 64 to 16384 on an H200."""
    _check_granularity(granularity)
    n, k = qweight.shape
    if x.numel() == 0 or n == 0:
        return fp8_linear_reference(x, qweight, wscale, bias, activation, residual, granularity)
    xq, sx = quantize_fp8_activation(x.reshape(-1, k).contiguous(), granularity)  # row-major, as _scaled_mm needs
    y = scaled_mm(xq, sx, qweight, wscale, x.dtype)
    return linear_epilogue(y.reshape(*x.shape[:-1], n), bias, activation, residual)


def scaled_mm(xq: torch.Tensor, sx: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(xq @ qweight.T) * sx * wscale in out_dtype through torch._scaled_mm, for a quantized activation xq
    [M, K] (row-major) with sx 0-dim, [1] or [M, 1] (see fp8_linear_scaled_mm for the dtype rules)."""
    n = qweight.shape[0]
    wscale = wscale.float()
    if sx.numel() == 1 and wscale.numel() == 1:
        scale_a, scale_b = sx.reshape(()), wscale.reshape(())
    else:  # rowwise: scale_a [M, 1] and scale_b [1, N], both contiguous
        scale_a, scale_b = sx.expand(xq.shape[0], 1).contiguous(), wscale.expand(n).reshape(1, n).contiguous()
    if scale_a.numel() == 1 or out_dtype == torch.bfloat16:
        return torch._scaled_mm(xq, qweight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    one = torch.ones((), device=xq.device)
    acc = torch._scaled_mm(xq, qweight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (acc * scale_a * scale_b).to(out_dtype)


@torch.library.custom_op("mmaccel::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
               activation: str, residual: Optional[torch.Tensor], granularity: str = "row") -> torch.Tensor:
    return fp8_linear_reference(x, qweight, wscale, bias, activation, residual, granularity)


@fp8_linear.register_fake
def _fp8_linear_fake(x, qweight, wscale, bias, activation, residual, granularity="row"):
    _check_granularity(granularity)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def fp8_linear_onnx(x, qweight, wscale, bias=None, activation: str = "none", residual=None,
                    granularity: str = "row"):
    """Standard ONNX, opset 21 (ONNX_OPSET), the reference's steps: the activation's scale computed in the graph,
    QuantizeLinear(output_dtype float8) per token as one block of K values along the last axis (block_size), so
    any rank and dynamic leading dims work; the weight a float8 initializer under DequantizeLinear (axis 0, its
    float32 scales); a float32 MatMul, then * s_x. The quantized x re-enters float by Cast and the product is
    scaled, rather than through a DequantizeLinear: ONNX Runtime 1.30 (ORT_ENABLE_EXTENDED and above) rewrites
    DequantizeLinear -> MatMul <- DequantizeLinear into its integer-only MatMulIntegerToFloat even for float8
    inputs and then refuses to load the file (1.32 leaves it alone). Values differ from the reference's
    (float(xq) @ float(qweight).T) * s_x * s_w only by the rounding of qweight * s_w and the order of the sums."""
    from onnxscript import ir
    from onnxscript import opset21 as op

    from .fused_linear import linear_epilogue_onnx

    _check_granularity(granularity)
    f32 = ir.DataType.FLOAT
    xf = x if x.dtype == f32 else op.Cast(x, to=f32)
    if granularity == "row":
        absmax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[-1]), keepdims=1)
        blocks = {"axis": -1, "block_size": qweight.shape[1]}
    else:
        absmax, blocks = op.ReduceMax(op.Abs(xf), keepdims=0), {}
    sx = op.Div(op.Max(absmax, op.Constant(value_float=TINY)), op.Constant(value_float=FP8_MAX))
    xq = op.QuantizeLinear(xf, sx, output_dtype=ir.DataType.FLOAT8E4M3FN, **blocks)
    wscale = op.Cast(wscale, to=f32)
    if wscale.shape is not None and wscale.shape.numel() == 1:  # one scale: per tensor, not per axis
        weight = op.DequantizeLinear(qweight, op.Squeeze(wscale))
    else:
        weight = op.DequantizeLinear(qweight, wscale, axis=0)
    y = op.Mul(op.MatMul(op.Cast(xq, to=f32), op.Transpose(weight, perm=[1, 0])), sx)
    if x.dtype != f32:
        y = op.CastLike(y, x)
    return linear_epilogue_onnx(y, bias, activation, residual)


register(OpSpec(name="fp8_linear", op=torch.ops.mmaccel.fp8_linear.default, eager=fp8_linear_reference,
                onnx=fp8_linear_onnx, onnx_opset=ONNX_OPSET))
