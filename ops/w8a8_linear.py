"""mmaccel::w8a8_linear: activation(dequant(quant(x) @ qweight.T) + bias) + residual with both operands in 8 bits:
the int8 weight of int8_linear (per output channel, symmetric, scale = absmax / 127) and the activation quantized
at run time, so the matmul runs on integers with int32 accumulation ("W8A8 dynamic").

Activation quantization, exactly (the reference below and the ONNX translation compute the same bits):
  1. granularity "token" (default): r = max(absmax of the row, tiny) per token and xn = x / r, so every row
     spans at most [-1, 1]; granularity "tensor": r = 1, xn = x;
  2. xn is quantized as ONNX DynamicQuantizeLinear does: lo = min(0, min xn), hi = max(0, max xn),
     scale = (hi - lo) / 255 (1 if hi == lo), zero = round(-lo / scale) clamped to 0..255,
     q = clamp(round(xn / scale) + zero, 0, 255), rounding half to even, all in float32;
  3. acc = (q - zero) @ qweight.T exactly (int32); y = (float(acc) * (scale * wscale)) * r, then + bias,
     activation, + residual.
Per token, the step of token i is r_i * scale: about absmax_i / 127.5, finer when the whole normalized tensor
is mostly positive (GELU outputs). The zero point is shared by the tensor, so a token's result depends on the
other tokens of the call only through `scale` and `zero` (per tensor, through the range of the whole tensor).

Why this form (ONNX Runtime 1.32 CPU, AVX512-VNNI, ViT-B/16 linear shapes; bench/w8a8_onnx_forms.py): ONNX
Runtime fuses DynamicQuantizeLinear -> MatMulInteger -> scale into one kernel (DynamicQuantizeMatMul: quantize,
u8 x s8 VNNI GEMM, per-channel scale), so "tensor" is the fastest form there is. "token" adds three passes to
it (absmax, divide, rescale), +10-30% per linear, and keeps each token's own step when token ranges differ (a
token with massive activations no longer coarsens all the others). Written-out per-token symmetric int8
(ReduceMax/Div/Round/Clip/Cast) costs more passes, per-row zero points are refused by ONNX Runtime's
MatMulInteger, and int8 x int8 MatMulInteger has no fast x86 kernel (8-15x slower than uint8 x int8).
On x86 without VNNI (AVX2, AVX-512 without VNNI), ONNX Runtime's u8 x s8 kernel adds the products of two
neighbouring k in 16 bits with saturation (vpmaddubsw): 255 * 127 * 2 = 64770 overflows. Found by CI on such a
CPU, where a W8A8 graph gave 0.032 relative error against the 0.0020 the quantize pass measured. So weights that
such a kernel may multiply are quantized to 7 bits, |q| <= 63 (scale = absmax / 63; ONNX Runtime's own
reduce_range): 255 * 63 * 2 = 32130 fits, the result is the reference's bits, and the pass measures the error
of the weights that run (PassContext.w8a8_weight_bits). export_onnx always writes 7 bits (the file may run on any
CPU); the onnxruntime target keeps 8 where this host's ONNX Runtime does not saturate (a probe, once per process:
backends/onnxruntime integer_matmul_saturates). uint8 weights with zero point 128 (the u8 x u8 kernel, which does
not saturate) would keep 8 bits everywhere but ran 3-6x slower here at 16-197 rows (VNNI CPU, K 768-4096).
torch._int_mm, which the reference below (and so the pass's measurement) uses, is exact on CUDA; on a CPU
without VNNI oneDNN's kernel may saturate the same way, so CPU graphs keep 7 bits where cpu_int_mm_saturates()
finds it does.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .fused_linear import linear_epilogue
from .registry import OpSpec, register

TINY = torch.finfo(torch.float32).tiny
GRANULARITIES = ("token", "tensor")


def quantize_activation(x: torch.Tensor, granularity: str = "token"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Steps 1-2 of the module docstring: (q with values 0..255, zero (0-dim), scale (0-dim), r [..., 1] or None
    for granularity "tensor"), all float32, with x ~= (q - zero) * scale * r."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"w8a8_linear: granularity {granularity!r} is not one of {GRANULARITIES}")
    xn = x.float()
    r = None
    if granularity == "token":
        r = xn.abs().amax(dim=-1, keepdim=True).clamp(min=TINY)
        xn = xn / r
    lo, hi = xn.min().clamp(max=0), xn.max().clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    zero = torch.round((-lo / scale).clamp(0, 255))
    q = (torch.round(xn / scale) + zero).clamp(0, 255)
    return q, zero, scale, r


def integer_matmul(q: torch.Tensor, zero: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """(q - zero) @ qweight.T, exact, int32 [M, N], for q [M, K] holding 0..255. The uint8 operand is shifted
    to int8 (q - 128) for torch._int_mm, and the shift is added back through the weight's row sums."""
    a = (q - 128).to(torch.int8)
    if _int_mm_supported(a, qweight):
        m = a.shape[0]
        if a.is_cuda and m <= 16:  # cuBLAS's int8 GEMM takes more than 16 rows: zero rows are added, then dropped
            a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
        acc = torch._int_mm(a, qweight.t())[:m]
    else:  # float64 holds every partial sum exactly (|sum| <= K * 128 * 127 << 2**53)
        acc = (a.double() @ qweight.double().t()).to(torch.int32)
    shift = (128 - zero).to(torch.int32)
    return acc + shift * qweight.sum(dim=1, dtype=torch.int32)


@lru_cache(maxsize=None)  # once per process
def cpu_int_mm_saturates() -> bool:
    """Whether torch._int_mm on this CPU loses products to 16-bit saturation. oneDNN's int8 kernels for x86
    without VNNI run int8 x int8 as uint8 x int8 (the first operand shifted by 128) through vpmaddubsw and leave
    keeping the weights to 7 bits to the caller (its "Nuances of int8 computations"); integer_matmul's first
    operand is q - 128, so q = 255 against weights of 127 is the worst case. Probed once per process with every
    sign of the largest products, at one row and at 16 (a GEMV and a GEMM kernel). The quantize pass measures
    W8A8 with this op's reference, so where it saturates W8A8 weights keep 7 bits on CPU graphs."""
    return any(bool((torch._int_mm(torch.full((rows, 64), x, dtype=torch.int8),
                                   torch.full((64, 16), w, dtype=torch.int8)) != x * w * 64).any())
               for rows in (1, 16) for x in (127, -128) for w in (127, -127))


def _int_mm_supported(a: torch.Tensor, qweight: torch.Tensor) -> bool:
    (m, k), n = a.shape, qweight.shape[0]
    if a.device.type == "cpu":  # torch 2.13's CPU _int_mm is wrong for K = 1 (and N > 1)
        return m > 0 and n > 0 and k > 1
    return a.device.type == "cuda" and m > 0 and k >= 16 and k % 8 == 0 and n % 8 == 0


def w8a8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
                          activation: str, residual: Optional[torch.Tensor],
                          granularity: str = "token") -> torch.Tensor:
    if x.numel() == 0:  # no row to take a range from: the empty (or bias-only, K = 0) result of a plain linear
        y = torch.nn.functional.linear(x, qweight.to(x.dtype))
    else:
        q, zero, scale, r = quantize_activation(x, granularity)
        acc = integer_matmul(q.reshape(-1, x.shape[-1]), zero, qweight).reshape(*x.shape[:-1], qweight.shape[0])
        y = acc.float() * (scale * wscale.float())
        y = (y if r is None else y * r).to(x.dtype)
    return linear_epilogue(y, bias, activation, residual)


@torch.library.custom_op("mmaccel::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
                activation: str, residual: Optional[torch.Tensor], granularity: str = "token") -> torch.Tensor:
    return w8a8_linear_reference(x, qweight, wscale, bias, activation, residual, granularity)


@w8a8_linear.register_fake
def _w8a8_linear_fake(x, qweight, wscale, bias, activation, residual, granularity="token"):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def w8a8_linear_onnx(x, qweight, wscale, bias=None, activation: str = "none", residual=None,
                     granularity: str = "token"):
    """Standard ONNX (opset 18), the steps of the module docstring one for one. ONNX Runtime fuses
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(Mul(scale, wscale)) into DynamicQuantizeMatMul
    (MatMulIntegerToFloat where one quantized activation feeds several linears); the int8 weight is transposed
    and packed once. Other runtimes run the same ops unfused, with the same result."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    from .fused_linear import linear_epilogue_onnx

    if granularity not in GRANULARITIES:
        raise ValueError(f"w8a8_linear: granularity {granularity!r} is not one of {GRANULARITIES}")
    xn = x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)
    if granularity == "token":
        r = op.Max(op.ReduceMax(op.Abs(xn), op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_float=TINY))
        xn = op.Div(xn, r)
    q, scale, zero = op.DynamicQuantizeLinear(xn)
    acc = op.MatMulInteger(q, op.Transpose(qweight, perm=[1, 0]), zero)
    y = op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Mul(scale, op.Cast(wscale, to=ir.DataType.FLOAT)))
    if granularity == "token":
        y = op.Mul(y, r)
    if x.dtype != ir.DataType.FLOAT:
        y = op.CastLike(y, x)
    return linear_epilogue_onnx(y, bias, activation, residual)


register(OpSpec(name="w8a8_linear", op=torch.ops.mmaccel.w8a8_linear.default, eager=w8a8_linear_reference,
                onnx=w8a8_linear_onnx))
