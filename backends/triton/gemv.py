"""Matmul for decode: out[M, N] = x[M, K] @ weight[N, K].T with a few activation rows (M <= 16).

In decode a linear layer reads its whole weight to produce one token's outputs, so its cost is streaming
the weight from HBM once; the arithmetic is free. Each program owns BLOCK_N rows of the weight (BLOCK_N
output columns) and walks along K in BLOCK_K chunks, the weight's contiguous axis, so every load is a
run of whole rows. Two kernels, chosen by M (block sizes from a sweep on an H200, bench/gemv_sweep.py;
results in bench/results/gemv_sweep_h200.json):

M = 1, no tensor cores: each program multiplies its [BLOCK_N, BLOCK_K] weight tile by the activation row
and accumulates the products elementwise in an fp32 tile, reduced across K once after the loop. One
weight row per program and 2 KiB of it per step give many small programs, each thread with a 16-byte load
in flight; the weight loads are marked evict-first (nothing rereads them; 6-7% faster). The x row is loaded
in the weight tile's shape, so both share one register layout and no per-step shuffle through shared memory
is needed. On the 7B decoder's shapes this streams the weight at 82-87% of a copy's bandwidth (70% on
4096x4096, where launch and ramp-up weigh more) where the padded tl.dot below reached 58-69%: 1.1-1.3x
faster than cuBLAS.

M > 1: a tl.dot with the activation padded to 16 rows, the smallest tile the tensor cores take (the
elementwise form needs M accumulators, and measured 1.3-2.6x slower at M = 4 and 8). Triton
software-pipelines the loads that feed a dot (num_stages tiles in flight per program), which is what
keeps HBM busy; the padded rows are masked loads, so they cost no memory traffic. fp32 inputs take the
exact (ieee) dot, CUDA-core FMAs rather than tf32 tensor cores.

When N leaves fewer programs than SMs, idle SMs are idle bandwidth, so K is split across programs too
(split-K). Splits write fp32 partial sums and a second kernel adds them in a fixed order, adds the bias
and casts: deterministic, and one extra launch, where fp32 atomics would need two (zeroing the buffer
before, casting after). The 7B decoder's shapes never split (splitting them was slower in the sweep).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .device import device_name, pdl_launch, sm_count
from .tuning import Choices, time_us, tuned

MAX_ROWS = 16  # one padded tl.dot tile of activation rows; more rows is prefill, where cuBLAS wins
BLOCK_M = 16


@triton.jit
def _activation(y, ACT: tl.constexpr):
    """ACT 1: GELU, 0.5 y (1 + erf(y / sqrt 2)); 2: GELU's tanh form; else y (fp32 in, fp32 out)."""
    if ACT == 1:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        e = tl.exp(-2.0 * tl.abs(inner))  # tanh(t) = sign(t) (1 - e) / (1 + e), e = exp(-2|t|): never overflows
        y = 0.5 * y * (1.0 + tl.where(inner < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e))
    return y


@triton.jit
def _gemv_row_kernel(X, W, Bias, Out, G, WG, WB, Res, N, K, k_per_split, eps,
                     HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     FINAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X1D: tl.constexpr,
                     LAYER_NORM: tl.constexpr, ACT: tl.constexpr, USE_GDC: tl.constexpr):
    """M = 1: elementwise products accumulated in an fp32 [BLOCK_N, BLOCK_K] tile, one reduction at the end.
    FINAL (one split): the fused prologue and epilogues (NORM, GLU, HAS_RESIDUAL: see `gemv`) here; split K:
    the fp32 partial sums of x * norm weight against the rows (gate and up), the rest in _finish_splits_kernel.
    X1D: x (and the norm weight) loaded once per step as a [BLOCK_K] vector and broadcast over the tile's rows,
    where the default loads them in the tile's shape (see the module docstring). LAYER_NORM (with NORM, X1D):
    LayerNorm instead of RMSNorm, in one pass as RMSNorm is: W . ((x - mean) * rstd * g + beta) =
    rstd * (W . (d * g) - E[d] * (W . g)) + W . beta, d = x - x[0], with W . g and W . beta per row (WG, WB,
    fp32) computed once when the graph is compiled, and d's sum and sum of squares gathered in the main loop
    (the shift by x[0] keeps |E[d]| near std, where x's own mean would cancel in fp32; a first pass
    over x for the statistics put two L2 round trips before the first weight load, which a GEMV of a few
    microseconds cannot hide). ACT: 1 GELU (erf), 2 GELU (tanh), after the bias."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = split * k_per_split + tl.arange(0, BLOCK_K)
    w_rows = offs_n % N  # rows past N wrap to valid rows (see _gemv_kernel)
    w_ptrs = W + w_rows[:, None].to(tl.int64) * K + offs_k[None, :]
    u_ptrs = W + (w_rows + N)[:, None].to(tl.int64) * K + offs_k[None, :]  # GLU: the up half's rows
    if USE_GDC:  # programmatic dependent launch (device.pdl): this program may start while the previous kernel
        # drains. The weights are constants, so the first weight tile is read now, overlapping that kernel's
        # tail; x, the norm weight's product and the residual are read after the wait for its writes.
        w = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
        if GLU:
            u = tl.load(u_ptrs, mask=(offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel launches now and waits for this one's writes
    # x's one row, repeated to the weight tile's shape so that both loads get the same register layout
    if X1D:
        x_ptrs = X + offs_k
        g_ptrs = G + offs_k
        squares = tl.zeros([BLOCK_K], tl.float32)
    else:
        x_ptrs = X + (offs_n * 0)[:, None] + offs_k[None, :]
        g_ptrs = G + (offs_n * 0)[:, None] + offs_k[None, :]
        squares = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    sums = tl.zeros([BLOCK_K], tl.float32)  # LayerNorm's sum of x - shift
    # LayerNorm works on d = x - shift, shift = x's first element: var = E[x^2] - E[x]^2 and the fold
    # W . (x g) - mean W . g both cancel catastrophically in fp32 when |mean| >> std (a row of 1000 +- 0.1),
    # and with d in both (W . ((x - mean) g) = W . (d g) - E[d] W . g) the cancelling terms are of std's size
    shift = tl.load(X).to(tl.float32) if LAYER_NORM else 0.0
    for k in range(0, k_per_split, BLOCK_K):
        k_ok = (offs_k < K - k)[None, :]
        if not USE_GDC:  # (with USE_GDC, w is this tile, loaded one iteration ahead: see the loop's end)
            w = tl.load(w_ptrs, mask=k_ok, other=0.0, eviction_policy="evict_first")  # read once; measured faster
        if X1D:
            xv = tl.load(x_ptrs, mask=offs_k < K - k, other=0.0).to(tl.float32)
            if NORM:  # the norm's statistics ride along the loop; its row scale is applied once at the end
                if LAYER_NORM:
                    xv = tl.where(offs_k < K - k, xv - shift, 0.0)
                    sums += xv
                    squares += xv * xv
                else:
                    squares += xv * xv
                xv *= tl.load(g_ptrs, mask=offs_k < K - k, other=0.0).to(tl.float32)
                g_ptrs += BLOCK_K
            x = xv[None, :]
        else:
            x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                x *= tl.load(g_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                g_ptrs += BLOCK_K
        acc += w.to(tl.float32) * x
        if GLU:
            if not USE_GDC:
                u = tl.load(u_ptrs, mask=k_ok, other=0.0, eviction_policy="evict_first")
            up += u.to(tl.float32) * x
            u_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        if USE_GDC:  # the next tile, one iteration ahead (the first was read before gdc_wait); none past the split
            next_ok = (offs_k < K - k - BLOCK_K)[None, :] & (k + BLOCK_K < k_per_split)
            w = tl.load(w_ptrs, mask=next_ok, other=0.0, eviction_policy="evict_first")
            if GLU:
                u = tl.load(u_ptrs, mask=next_ok, other=0.0, eviction_policy="evict_first")
    out = tl.sum(acc, axis=1)
    if not FINAL:  # partials [splits, 1, N or 2N]: gate (or the plain output), then up
        width = 2 * N if GLU else N
        tl.store(Out + split * width + offs_n, out, mask=offs_n < N)
        if GLU:
            tl.store(Out + split * width + N + offs_n, tl.sum(up, axis=1), mask=offs_n < N)
    else:
        if LAYER_NORM:  # one split: the loop saw all of x
            mean = tl.sum(sums, axis=0) / K
            rstd = tl.rsqrt(tl.maximum(tl.sum(squares, axis=0) / K - mean * mean, 0.0) + eps)
            out = rstd * (out - mean * tl.load(WG + w_rows)) + tl.load(WB + w_rows)
        elif NORM:
            if X1D:
                scale = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
            else:
                scale = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)
            out *= scale
        if HAS_BIAS:
            out += tl.load(Bias + w_rows).to(tl.float32)
        if GLU:
            up_out = tl.sum(up, axis=1)
            if NORM:
                up_out *= scale
            out = out * tl.sigmoid(out) * up_out
        out = _activation(out, ACT)
        if HAS_RESIDUAL:
            out += tl.load(Res + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _gemv_kernel(X, W, Bias, Out, G, Res, M, N, K, stride_xm, stride_rm, k_per_split, eps,
                 HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = split * k_per_split + tl.arange(0, BLOCK_K)
    # Weight rows past N wrap to valid rows instead of being masked: only the K mask is left on the hot
    # load, and the wrapped results are dropped at the store
    w_rows = offs_n % N
    # int64 row offsets: an embedding-sized weight can hold more than 2**31 elements
    w_ptrs = W + w_rows[:, None].to(tl.int64) * K + offs_k[None, :]
    u_ptrs = W + (w_rows + N)[:, None].to(tl.int64) * K + offs_k[None, :]  # GLU: the up half's rows
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    g_ptrs = G + offs_k
    m_ok = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    squares = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        # K - k rather than a moving offs_k: Triton sees K's divisibility and keeps the loads vectorized
        k_ok = offs_k < K - k
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:  # RMSNorm's statistics ride along the loop; its row scale is applied once at the end
            xf = x.to(tl.float32)
            squares += xf * xf
            x = (xf * tl.load(g_ptrs, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(X.dtype.element_ty)
            g_ptrs += BLOCK_K
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if GLU:
            u = tl.load(u_ptrs, mask=k_ok[None, :], other=0.0)
            up = tl.dot(x, tl.trans(u), up, input_precision=DOT_PRECISION)
            u_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ok = m_ok[:, None] & (offs_n < N)[None, :]
    if not FINAL:  # partials [splits, M, N or 2N], as in _gemv_row_kernel
        width = 2 * N if GLU else N
        part_ptrs = Out + (split * M + offs_m[:, None]) * width + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=out_ok)
        if GLU:
            tl.store(part_ptrs + N, up, mask=out_ok)
    else:
        if NORM:
            scale = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]
            acc *= scale
        if HAS_BIAS:
            acc += tl.load(Bias + w_rows).to(tl.float32)[None, :]
        if GLU:
            if NORM:
                up *= scale
            acc = acc * tl.sigmoid(acc) * up
        if HAS_RESIDUAL:
            acc += tl.load(Res + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_ok, other=0.0).to(tl.float32)
        tl.store(Out + offs_m[:, None] * N + offs_n[None, :], acc.to(Out.dtype.element_ty), mask=out_ok)


@triton.jit
def _finish_splits_kernel(Part, X, Bias, G, WG, WB, Res, Out, N, K, num_splits, stride_xm, stride_rm, eps,
                          HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, LAYER_NORM: tl.constexpr,
                          ACT: tl.constexpr, USE_GDC: tl.constexpr):
    """Split K, grid (M, N blocks): sums one row's partials in a fixed order (the result does not depend on
    scheduling), then what the fused GEMV does after its dot products: RMSNorm's row scale (its statistics
    from x's row, read here once per program: K values against the weight's N x K), bias, SiLU(gate) * up,
    residual."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    width = 2 * N if GLU else N
    acc = tl.zeros([BLOCK], tl.float32)
    up = tl.zeros([BLOCK], tl.float32)
    for s in range(num_splits):
        row = Part + (s * tl.num_programs(0) + m) * width
        acc += tl.load(row + offs, mask=ok, other=0.0)
        if GLU:
            up += tl.load(row + N + offs, mask=ok, other=0.0)
    if NORM:
        squares = tl.zeros([BLOCK], tl.float32)
        sums = tl.zeros([BLOCK], tl.float32)
        shift = tl.load(X + m * stride_xm).to(tl.float32) if LAYER_NORM else 0.0  # as the partials (row kernel)
        for k in range(0, K, BLOCK):
            k_ok = k + tl.arange(0, BLOCK) < K
            xk = tl.load(X + m * stride_xm + k + tl.arange(0, BLOCK), mask=k_ok, other=0.0).to(tl.float32)
            if LAYER_NORM:
                xk = tl.where(k_ok, xk - shift, 0.0)
            squares += xk * xk
            sums += xk
        if LAYER_NORM:
            mean = tl.sum(sums, axis=0) / K
            rstd = tl.rsqrt(tl.maximum(tl.sum(squares, axis=0) / K - mean * mean, 0.0) + eps)
            acc = rstd * (acc - mean * tl.load(WG + offs, mask=ok, other=0.0)) + tl.load(WB + offs, mask=ok, other=0.0)
        else:
            scale = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
            acc *= scale
            up *= scale
    if HAS_BIAS:
        acc += tl.load(Bias + offs, mask=ok, other=0.0).to(tl.float32)
    if GLU:
        acc = acc * tl.sigmoid(acc) * up
    acc = _activation(acc, ACT)
    if HAS_RESIDUAL:
        acc += tl.load(Res + m * stride_rm + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + m * N + offs, acc.to(Out.dtype.element_ty), mask=ok)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv computes x @ weight.T: x [M, K] with 1 <= M <= 16 and unit stride along K (rows may be
    strided), weight a contiguous [N, K], both of one float dtype on one device (quantized weights:
    quant_matmul.py)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return False
    (M, K), N = x.shape, weight.shape[0]
    if not (1 <= M <= MAX_ROWS and K >= 1 and N >= 1 and x.stride(1) == 1 and weight.is_contiguous()):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if x.dtype != weight.dtype:
        return False
    return x.device == weight.device and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    k_per_split: int  # a whole number of block_k
    splits: int
    num_warps: int
    num_stages: int
    x1d: bool = False  # M = 1: x as a [BLOCK_K] vector broadcast over the rows (_gemv_row_kernel's X1D)


# M = 1 with RMSNorm in front: weight rows per program, x and the norm weight loaded once per step as a vector
# (X1D); 0 keeps the tile-shaped loads of a plain GEMV, which re-read x and the norm weight for every weight row.
# H200 sweep (bench/results/decode_kernels_sweep_gemv_h200.json): fused qkv 36.6 us tile-shaped, 29.5-30.3 with
# 8 or 4 rows (plain 29.9), gate/up + SiLU*up 105.7 -> 97.1, LM head 86.4 -> 69.0 (plain 68.4); the 16-layer
# decode step 2.646 -> 2.400 ms at 4 rows, 2.414 at 8. MMACCEL_GEMV_NORM_ROWS overrides it for measurements.
NORM_ROWS = int(os.environ.get("MMACCEL_GEMV_NORM_ROWS", "4"))


def _config(M: int, N: int, K: int, device: torch.device, dtype: torch.dtype, norm: bool = False,
            layer_norm: bool = False) -> GemvConfig:
    """Block sizes and the K split. On CUDA, from the sweep, in bytes of a weight row so that fp32 gets the
    same tile bytes as bf16: M = 1 takes one row and 2 KiB of it per step, 4 warps (one 16-byte load per
    thread). M > 1 takes 64 rows x 256 bytes with 3 stages when N gives at least one such program per SM,
    else 16 rows x 1 KiB with 2 warps and 4 stages (more programs, still deep pipelines). K is split when the
    column blocks alone leave SMs idle, aiming at 2 programs per SM. On the interpreter: small blocks and a
    pretend 8 SMs, so small test shapes still cover several blocks, partial tiles and split-K. (M = 1 on CUDA:
    `gemv` then measures its candidates per shape, see _tuned_config.)"""
    if device.type == "cuda":
        sms = sm_count(device)
        if M == 1:  # 2 KiB of a weight row per step
            block_n, block_k, num_warps, num_stages = 1, 2048 // dtype.itemsize, 4, 1
        elif triton.cdiv(N, 64) >= sms:
            block_n, block_k, num_warps, num_stages = 64, 256 // dtype.itemsize, 4, 3
        else:
            block_n, block_k, num_warps, num_stages = 16, 1024 // dtype.itemsize, 2, 4
    else:
        sms, block_k, block_n, num_warps, num_stages = 8, 32, 4 if M == 1 else 16, 1, 1
    # LayerNorm in front runs on the X1D path only (x's sum is gathered on the vector): 4 rows if NORM_ROWS says 0
    x1d = M == 1 and norm and (NORM_ROWS > 0 or layer_norm)
    block_n = triton.next_power_of_2(NORM_ROWS or 4) if x1d else block_n
    return _split(GemvConfig(block_n, block_k, 0, 0, num_warps, num_stages, x1d), N, K, sms)


def _split(cfg: GemvConfig, N: int, K: int, sms: int) -> GemvConfig:
    """cfg with K split when its column blocks alone leave SMs idle (about 2 programs per SM)."""
    n_blocks = triton.cdiv(N, cfg.block_n)
    splits = 1 if n_blocks >= sms else min(triton.cdiv(2 * sms, n_blocks), triton.cdiv(K, cfg.block_k))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), cfg.block_k) * cfg.block_k
    return cfg._replace(k_per_split=k_per_split, splits=triton.cdiv(K, k_per_split))


# One activation row on CUDA: the config is measured per shape and fusion (tuning.time_us: in a CUDA graph, L2
# flushed) among the static one and these (rows per program, bytes of a weight row per step, warps, X1D), the
# winners of the H200 sweeps, and kept on disk. Whisper large-v3's decoder (K = 1280, which 2 KiB steps of
# bf16 cover as 1024 + a quarter-used 256) ran 1.2-1.8x faster with 512 or 256 elements per step: qkv+LayerNorm
# 9.64 -> 5.93 us, fc1+LayerNorm+GELU 10.09 -> 7.86, fc2+residual 8.22 -> 5.53, LM head+LayerNorm 71.6 -> 40.2
# (bench/results/decode_kernels_sweep_whisper_h200.json); the 7B decoder's shapes were within 2% of the static
# choice (decode_kernels_sweep_gemv_h200.json). A candidate must beat the static config by tuning.MARGIN.
# MMACCEL_GEMV_TUNE=0 keeps the static config (measurements).
TUNE_SWITCH = "MMACCEL_GEMV_TUNE"
CANDIDATES = [(16, 1024, 8, True), (4, 1024, 2, True), (8, 1024, 2, True), (4, 4096, 8, True), (2, 4096, 8, True),
              (8, 512, 2, True), (16, 512, 4, True), (2, 2048, 2, True), (4, 2048, 4, True), (8, 2048, 4, True),
              (1, 2048, 4, False), (1, 4096, 4, False)]
_tuned = Choices("gemv_configs.json")


def candidates(N: int, K: int, dtype: torch.dtype, fusion: "Fusion", static: GemvConfig, sms: int
               ) -> list[GemvConfig]:
    """The static config first, then CANDIDATES as configs for this shape (a norm in front takes X1D ones:
    LayerNorm runs only there, and RMSNorm's tile-shaped loads re-read x per row), without repeats."""
    out = [static]
    for rows, row_bytes, warps, x1d in CANDIDATES:
        if fusion.norm_weight is not None and not x1d:
            continue
        cfg = _split(GemvConfig(rows, row_bytes // dtype.itemsize, 0, 0, warps, 1, x1d), N, K, sms)
        if cfg not in out:
            out.append(cfg)
    return out


def _tuned_config(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fusion: "Fusion", N: int,
                  static: GemvConfig) -> GemvConfig:
    """The measured config of this one-row shape and fusion on CUDA (static elsewhere, while a CUDA graph is
    being captured before any measurement, or with MMACCEL_GEMV_TUNE=0)."""
    if not x.is_cuda or x.shape[0] != 1 or os.environ.get(TUNE_SWITCH, "1") == "0":
        return static
    K = x.shape[1]
    norm = "none" if fusion.norm_weight is None else "layernorm" if fusion.norm_bias is not None else "rmsnorm"
    key = (f"v1|{device_name(x.device)}|{x.dtype}|1x{N}x{K}|{norm}|glu={fusion.glu}|"
           f"residual={fusion.residual is not None}|bias={bias is not None}|{fusion.activation}")

    def measure(cfg: GemvConfig) -> float:
        out = torch.empty(1, N, device=x.device, dtype=x.dtype)
        part = out if cfg.splits == 1 else torch.empty(cfg.splits, 1, N * (2 if fusion.glu else 1),
                                                         device=x.device, dtype=torch.float32)
        return time_us(lambda: _launch(x, weight, bias, part, out, fusion, cfg, N))

    return tuned(_tuned, key, lambda: candidates(N, K, x.dtype, fusion, static, sm_count(x.device)), measure,
                 lambda known: GemvConfig(*known))


ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2}


class Fusion(NamedTuple):
    """What rides along a GEMV: RMSNorm of x in front (x * rsqrt(mean(x**2) + eps) * norm_weight, in fp32
    without rounding in between), or LayerNorm when norm_bias is given ((x - mean) * rsqrt(var + eps) *
    norm_weight + norm_bias; one activation row); SiLU(gate) * up after (the weight's first half of rows is gate,
    the second up: the output has half the rows' width); an activation after the bias (ACTIVATIONS; one
    activation row); and + residual ([M, N], after the bias and activation)."""
    norm_weight: Optional[torch.Tensor] = None
    eps: float = 0.0
    glu: bool = False
    residual: Optional[torch.Tensor] = None
    norm_bias: Optional[torch.Tensor] = None
    activation: str = "none"
    norm_folds: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # LayerNorm: layer_norm_folds, computed once


def layer_norm_folds(weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W @ g, W @ beta) in fp32, [N] each: what a LayerNorm in front of the GEMV leaves per output row once its
    statistics are known (see _gemv_row_kernel). In blocks of rows, so an LM head's weight is never copied whole
    to fp32."""
    g, beta = norm_weight.float(), norm_bias.float()
    parts = [rows.float() @ torch.stack([g, beta], dim=1) for rows in weight.split(4096)]
    both = torch.cat(parts)
    return both[:, 0].contiguous(), both[:, 1].contiguous()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         fusion: Fusion = Fusion()) -> torch.Tensor:
    """x @ weight.T (+ bias) for the shapes `supports` accepts, as a new contiguous [M, N] tensor in
    x.dtype; fp32 accumulation, the bias (and `fusion`'s prologue and epilogues) in fp32 before the one
    rounding."""
    assert supports(x, weight), "gemv: unsupported inputs"
    (M, K), N = x.shape, weight.shape[0] // (2 if fusion.glu else 1)
    assert bias is None or (bias.shape == (N,) and bias.device == x.device), "gemv: bias must be [N]"
    assert not (fusion.glu and (bias is not None or weight.shape[0] % 2)), "gemv: GLU takes an even weight, no bias"
    layer_norm = fusion.norm_bias is not None
    assert not layer_norm or (fusion.norm_weight is not None and not fusion.glu), "gemv: LayerNorm takes its weight, no GLU"
    assert M == 1 or not (layer_norm or fusion.activation != "none"), "gemv: LayerNorm and activations take one row"
    cfg = _config(M, N, K, x.device, weight.dtype, norm=fusion.norm_weight is not None, layer_norm=layer_norm)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        cfg = _tuned_config(x, weight, bias, fusion, N, cfg)
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    # Split K: fp32 partials (gate and up for GLU), finished by one more kernel: sum, norm scale, bias, GLU,
    # residual. A fused GEMV that could not split lost 0.34 ms of a 16-layer decode step on an H200 (GEMV time
    # 1.75 -> 2.08 ms: o_proj and down_proj, 32 programs' worth of rows, need the split to fill 132 SMs)
    part = out if cfg.splits == 1 else torch.empty(cfg.splits, M, N * (2 if fusion.glu else 1), device=x.device,
                                                     dtype=torch.float32)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _launch(x, weight, bias, part, out, fusion, cfg, N)
    return out


def fused_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fusion: Fusion) -> torch.Tensor:
    """What gemv computes, unfused and in fp32: RMSNorm or LayerNorm, matmul, + bias, SiLU(gate) * up,
    activation, + residual."""
    x = x.float()
    if fusion.norm_bias is not None:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], fusion.norm_weight.float(), fusion.norm_bias.float(),
                                           fusion.eps)
    elif fusion.norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + fusion.eps) * fusion.norm_weight.float()
    y = x @ weight.float().T + (0 if bias is None else bias.float())
    if fusion.glu:
        gate, up = y.chunk(2, dim=-1)
        y = gate * torch.sigmoid(gate) * up
    if fusion.activation != "none":
        y = torch.nn.functional.gelu(y, approximate="tanh" if fusion.activation == "gelu_tanh" else "none")
    return y if fusion.residual is None else y + fusion.residual.float()


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], part: torch.Tensor,
            out: torch.Tensor, fusion: Fusion, cfg: GemvConfig, N: int) -> None:
    """The GEMV into `out`, through the fp32 partials `part` when K is split (`part` is `out` otherwise)."""
    (M, K), grid = x.shape, (triton.cdiv(N, cfg.block_n), cfg.splits)
    norm, residual = fusion.norm_weight, fusion.residual
    assert norm is None or norm.shape == (K,), "gemv: the norm weight must be [K]"
    assert residual is None or residual.shape == (M, N), "gemv: the residual must be [M, N]"
    flags = dict(HAS_BIAS=bias is not None, NORM=norm is not None, GLU=fusion.glu, HAS_RESIDUAL=residual is not None)
    epilogue = dict(LAYER_NORM=fusion.norm_bias is not None, ACT=ACTIVATIONS[fusion.activation])
    launch = pdl_launch(x.device)
    assert not epilogue["LAYER_NORM"] or (M == 1 and cfg.x1d), "gemv: LayerNorm runs in the one-row X1D kernel"
    # Absent operands are passed as x: a pointer the kernel never reads
    bias_arg, g_arg, res_arg = (x if t is None else t.contiguous() for t in (bias, norm, residual))
    folds = (x, x)
    if epilogue["LAYER_NORM"]:  # the graph's call passes them, computed when it was compiled
        folds = fusion.norm_folds or layer_norm_folds(weight, norm, fusion.norm_bias)
    final = cfg.splits == 1
    if M == 1:
        _gemv_row_kernel[grid](x, weight, bias_arg, part, g_arg, *folds, res_arg, N, K, cfg.k_per_split,
                               fusion.eps, **flags, **epilogue, **launch, FINAL=final, BLOCK_N=cfg.block_n,
                               BLOCK_K=cfg.block_k, X1D=cfg.x1d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _gemv_kernel[grid](
            x, weight, bias_arg, part, g_arg, res_arg, M, N, K, x.stride(0), res_arg.stride(0), cfg.k_per_split,
            fusion.eps, **flags, FINAL=final,
            # fp32 inputs would otherwise be rounded to tf32 by the tensor cores
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **launch,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not final:
        block = 1024 if x.is_cuda else 64
        _finish_splits_kernel[(M, triton.cdiv(N, block))](
            part, x, bias_arg, g_arg, *folds, res_arg, out, N, K, cfg.splits, x.stride(0), res_arg.stride(0),
            fusion.eps, **flags, **epilogue, **launch, BLOCK=block)


def benchmark(M: int = 1, N: int = 4096, K: int = 4096, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Median microseconds of gemv and of torch's x @ weight.T (cuBLAS) and the GB/s each achieves, next to
    a copy of the weight (read + write) as the bandwidth to compare with. CUDA only."""
    assert torch.cuda.is_available(), "benchmark needs a GPU"
    from triton.testing import do_bench  # clears L2 before each run, so the weight comes from HBM

    x = torch.randn(M, K, device="cuda", dtype=dtype)
    weight = torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5
    torch.testing.assert_close(gemv(x, weight), x @ weight.T, rtol=2e-2, atol=2e-2)
    copy = torch.empty_like(weight)
    runs = {"gemv": lambda: gemv(x, weight), "torch": lambda: x @ weight.T, "copy": lambda: copy.copy_(weight)}
    us = {name: do_bench(fn, return_mode="median") * 1e3 for name, fn in runs.items()}
    moved = {"gemv": (N * K + M * K + M * N) * dtype.itemsize, "copy": 2 * N * K * dtype.itemsize}
    moved["torch"] = moved["gemv"]
    gbps = {name: moved[name] / us[name] / 1e3 for name in runs}
    return {"M": M, "N": N, "K": K, "dtype": str(dtype), **{f"{name}_us": us[name] for name in runs},
            **{f"{name}_gbps": gbps[name] for name in runs}, "gemv_vs_copy": gbps["gemv"] / gbps["copy"]}
