"""Quantized matmuls beyond decode, on a 7B decoder's shapes (one GPU run of about two minutes):

    python bench/quant_prefill_sweep.py [--out $OUT/quant_prefill_sweep.json]

Prefill (M = 640 rows): cuBLAS on the bf16 weight, the library's path for weight-only int8/int4 (dequantize
the weight, then cuBLAS), a candidate tiled Triton GEMM defined here (`_wq_gemm_kernel`: the usual
orientation, the quantized weight tile loaded pipelined and converted in registers) over a few block configs,
and fp8 (token quantization kernel + torch._scaled_mm). The candidate stays out of the library: on an H100
(bench/results/quant_prefill_sweep_h100.json) it beat dequantize+cuBLAS on 2 of 4 shapes by 6-12% and lost
on the others by up to 2x (int4), and every int8/int4 form stayed 1.4-2.2x slower than cuBLAS on bf16. Decode (M = 1): the fp8 GEMV that quantizes the token inside
(_fp8_gemv_kernel) against the int8 GEMV and torch._scaled_mm. Times: GPU time per call inside a CUDA graph,
L2 flushed before each call (backends/triton/tuning.py time_us), best of two measurements.
"""
from __future__ import annotations

import argparse
import os
import sys

from contextlib import nullcontext
from typing import Optional

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmaccel  # noqa: E402,F401
from common import default_out, environment, gb_per_s, rel_err, write_json  # noqa: E402
from mmaccel.backends.triton import quant_matmul as qm  # noqa: E402
from mmaccel.backends.triton.tuning import time_us  # noqa: E402
from mmaccel.ops.fp8_linear import quantize_fp8_weight, scaled_mm  # noqa: E402
from mmaccel.ops.int4_linear import quantize_int4_groupwise  # noqa: E402
from mmaccel.ops.int8_linear import quantize_per_channel  # noqa: E402


# A candidate, not a copy of a library kernel: the library's tiled weight-only kernel is
# backends/triton/quant_matmul.py `_wq_matmul_kernel` (commit 3fc01d4; the weight tile on the left), whose
# grouped_tile this one imports.
@triton.jit
def _wq_gemm_kernel(X, W, Scale, Zero, Bias, Out, M, N, K, KW, n_groups, stride_xm,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = x @ dequant(W).T for many rows (prefill), in the usual orientation, acc[BLOCK_M, BLOCK_N] =
    dot(x, w.T): the activation tile is the left operand, the weight tile is loaded quantized (pipelined),
    converted in registers and staged to shared memory for the tensor cores. int8: the row scale is applied
    to the accumulator once; int4: one group per step (BLOCK_K = GROUP), dequantized with its scale and zero."""
    pid_m, pid_n = qm.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # wrapped: loads stay in bounds, the store drops them
    cols = offs_n % N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if BITS == 8:
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = W + cols[None, :].to(tl.int64) * KW + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: W transposed
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - k0
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
            acc = tl.dot(x, w.to(x.dtype), acc)  # exact conversion: |q| <= 127
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc *= tl.load(Scale + cols).to(tl.float32)[None, :]
    else:
        half: tl.constexpr = GROUP // 2
        offs_i = tl.arange(0, half)
        x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + offs_i[None, :]
        w_ptrs = W + cols[None, :].to(tl.int64) * KW + offs_i[:, None]  # [half, BLOCK_N] bytes
        for g in range(0, n_groups):
            x_low = tl.load(x_ptrs)
            x_high = tl.load(x_ptrs + half)
            b = tl.load(w_ptrs)
            s = tl.load(Scale + cols * n_groups + g).to(tl.float32)[None, :]
            z = tl.load(Zero + cols * n_groups + g).to(tl.float32)[None, :]
            w_low = (((b & 15).to(tl.float32) - z) * s).to(x_low.dtype)
            w_high = (((b >> 4).to(tl.float32) - z) * s).to(x_low.dtype)
            acc = tl.dot(x_low, w_low, acc)
            acc = tl.dot(x_high, w_high, acc)
            x_ptrs += GROUP
            w_ptrs += half
    if HAS_BIAS:
        acc += tl.load(Bias + cols).to(tl.float32)[None, :]
    out_ptrs = Out + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
         bias: Optional[torch.Tensor], bits: int, group: int, config: qm.QuantConfig) -> torch.Tensor:
    """_wq_gemm_kernel on x [M, K] (half precision: the tensor cores' operand), a new [M, N] tensor."""
    (M, K), N = x.shape, weight.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_k = config.block_k if bits == 8 else group
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _wq_gemm_kernel[grid](x, weight, scale.contiguous(), scale if zero is None else zero.contiguous(),
                              x if bias is None else bias.contiguous(), out, M, N, K, weight.shape[1],
                              K // group if bits == 4 else 1, x.stride(0), BITS=bits, GROUP=max(group, 2),
                              HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0, BLOCK_M=config.block_m,
                              BLOCK_N=config.block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=config.num_warps,
                              num_stages=config.num_stages)
    return out


SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]
GEMM_CONFIGS = [qm.QuantConfig(*c) for c in [
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
    (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4)]]


def timed(fn) -> float:
    return min(time_us(fn) for _ in range(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out("quant_prefill_sweep.json"))
    parser.add_argument("--rows", type=int, default=640)
    args = parser.parse_args()
    results = {**environment("cuda"), "prefill": [], "decode": []}
    for N, K in SHAPES[:4]:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        x = torch.randn(args.rows, K, device="cuda", dtype=torch.bfloat16)
        ref = x @ w.T
        row = {"N": N, "K": K, "M": args.rows, "cublas_bf16_us": timed(lambda: x @ w.T)}
        qf, sf = quantize_fp8_weight(w, "row")
        row["fp8_us"] = timed(lambda: qm.fp8_linear(x, qf, sf, None, "row"))
        row["fp8_scaled_mm_alone_us"] = timed(lambda: scaled_mm(*qm.quantize_fp8_rows(x), qf, sf, x.dtype))
        for bits in (8, 4):
            if bits == 8:
                q, s = quantize_per_channel(w)
                z, group = None, 0
            else:
                q, s, z = quantize_int4_groupwise(w, 128)
                group = 128
            row[f"int{bits}_dequant_cublas_us"] = timed(lambda: qm.linear(x, q, s, z, bits=bits, group=group))
            for cfg in GEMM_CONFIGS:
                key = f"int{bits}_gemm_{'_'.join(map(str, cfg))}"
                try:
                    out = gemm(x, q, s, z, None, bits, group, cfg)
                    row[key] = timed(lambda: gemm(x, q, s, z, None, bits, group, cfg))
                    row[key + "_err"] = rel_err(out, ref)
                except Exception as e:  # a config that does not compile (shared memory) is a data point
                    row[key] = str(e)[:120]
        best = {b: min((v, k) for k, v in row.items() if k.startswith(f"int{b}_gemm") and isinstance(v, float)
                       and not k.endswith("_err")) for b in (8, 4)}
        print(f"prefill {N}x{K}: cuBLAS bf16 {row['cublas_bf16_us']:.1f} us, fp8 {row['fp8_us']:.1f}; "
              + "; ".join(f"int{b} dequant+cuBLAS {row[f'int{b}_dequant_cublas_us']:.1f} best GEMM {best[b][0]:.1f} "
                          f"({best[b][1]})" for b in (8, 4)), flush=True)
        results["prefill"].append(row)
    for N, K in SHAPES:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        q, s = quantize_per_channel(w)
        qf, sf = quantize_fp8_weight(w, "row")
        ref = x.float() @ w.float().T
        out = qm.fp8_gemv(x, qf, sf, None)
        row = {"N": N, "K": K, "int8_gemv_us": timed(lambda: qm.linear(x, q, s, bits=8)),
               "fp8_gemv_us": timed(lambda: qm.fp8_gemv(x, qf, sf, None)), "fp8_gemv_err": rel_err(out, ref),
               "fp8_rows_scaled_mm_us": timed(lambda: scaled_mm(*qm.quantize_fp8_rows(x), qf, sf, x.dtype)),
               "w8a8_gemv_us": timed(lambda: qm.w8a8_gemv(x, q, s, None, "token")),
               "bytes": qf.numel()}
        row["fp8_gemv_gbps"] = gb_per_s(row["bytes"], row["fp8_gemv_us"])
        print(f"decode {N}x{K}: int8 GEMV {row['int8_gemv_us']:.1f} us, fp8 GEMV {row['fp8_gemv_us']:.1f} us "
              f"({row['fp8_gemv_gbps']:.0f} GB/s, err {row['fp8_gemv_err']:.3f}), fp8 rows+_scaled_mm "
              f"{row['fp8_rows_scaled_mm_us']:.1f} us", flush=True)
        results["decode"].append(row)
    write_json(args.out, results, indent=1)


if __name__ == "__main__":
    main()
