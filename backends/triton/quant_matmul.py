"""Matmuls against weight-only quantized weights, the dequantization fused into the kernel: the weight is read
from memory in its quantized form once, never written back dequantized.

    int8: weight int8 [N, K], one scale per output row (applied to the row's sum).
    int4: weight uint8 [N, K/2] (two 4-bit values per byte, packing in ops/int4_linear.py), a scale and a
          zero point per group of G input channels: w = (q - zero) * scale.

One activation row (decode): `_wq_gemv_kernel`, the dot-free row kernel of gemv.py generalized to BLOCK_N
weight rows per program. With a bf16 weight one row per program was best (gemv.py), but an int8 or int4 weight
gives 2-4x fewer bytes per step than the activation chunk it multiplies, so a program shares each activation
load across BLOCK_N rows (block sizes from bench/quant_gemv_sweep.py). int4 with 2-16 rows (batched decode,
speculative verify steps) on a GPU: `_int4_tc_kernel`, tensor cores over weight tiles unpacked by integer logic,
the scale and zero point applied per group after the dot, K split over programs. Other cases up to 16 rows:
`_wq_matmul_kernel`, a tiled tl.dot GEMM that dequantizes each weight tile in registers; more rows (prefill),
the weight dequantized once and the library matmul.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .device import device_name
from .tuning import Choices, time_us, tuned


# int8 -> float32 without a conversion instruction: b + 128 (0..255) added to the bits of 2**23 (0x4B000000) is
# the float 2**23 + b + 128, and subtracting 2**23 + 128 is exact. Conversion instructions (I2F) issue at 16 per
# clock per SM on Hopper, an eighth of the FMA rate; this is an integer add plus a float add. Measured once on
# an H100 against the same kernels with I2F (commit 46cde07; bench/results/quant_gemv_abtest_h100.json): the
# int8 GEMV 3% faster over a 7B decoder's shapes (up to 8% on 4096x4096). The same trick for int4 nibbles
# measured no faster (up to 10% slower), so the int4 GEMV is not limited by its conversions, and keeps them.
MAGIC = tl.constexpr(0x4B000000)
TWO_23 = tl.constexpr(8388608.0)
TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: the floor of a range (all-zero rows)


@triton.jit
def _s8_to_f32(b):
    """b: int8 -> float32, exactly."""
    return (b.to(tl.int32) + (MAGIC + 128)).to(tl.float32, bitcast=True) - (TWO_23 + 128.0)


@triton.jit
def int4_group_sums(b, X, Scale, Zero, rows, g0, offs_g, offs_i, g_ok, n_groups, GROUP: tl.constexpr):
    """[BLOCK_N, steps]: each row's dot product with the activation over groups g0 + offs_g (g_ok: groups that
    exist), from their packed bytes b [BLOCK_N, steps, GROUP // 2]: s * (sum(q * x) - z * sum(x)) per group."""
    half: tl.constexpr = GROUP // 2
    k_low = (g0 + offs_g)[:, None] * GROUP + offs_i[None, :]  # byte i: channels i and half + i
    x_low = tl.load(X + k_low, mask=g_ok[:, None], other=0.0).to(tl.float32)
    x_high = tl.load(X + k_low + half, mask=g_ok[:, None], other=0.0).to(tl.float32)
    qx = (b & 15).to(tl.float32) * x_low[None, :, :] + (b >> 4).to(tl.float32) * x_high[None, :, :]
    sz = rows[:, None] * n_groups + (g0 + offs_g)[None, :]
    s = tl.load(Scale + sz, mask=g_ok[None, :], other=0.0).to(tl.float32)
    z = tl.load(Zero + sz, mask=g_ok[None, :], other=0).to(tl.float32)
    x_sum = tl.sum(x_low + x_high, axis=1)
    return s * (tl.sum(qx, axis=2) - z * x_sum[None, :])


@triton.jit
def _wq_gemv_kernel(X, W, Scale, Zero, Bias, Out, N, K, KW, n_groups,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One activation row, BLOCK_N weight rows per program.

    int8: BLOCK_K weight bytes (= channels) per row and step; the row scale is applied once to the row's sum.
    int4: BLOCK_K // (GROUP // 2) whole groups per row and step, as a [BLOCK_N, groups, GROUP // 2] byte tile.
    The scale and zero point factor out of each group's sum, s * (sum(q * x) - z * sum(x)), so the
    per-element work is two nibble extractions and two FMAs, and scales are loaded once per group."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N  # rows past N wrap to valid rows; their results are dropped at the store
    if BITS == 8:
        offs_j = tl.arange(0, BLOCK_K)
        w_ptrs = W + rows[:, None].to(tl.int64) * KW + offs_j[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for j0 in range(0, KW, BLOCK_K):
            j_ok = offs_j < KW - j0
            b = tl.load(w_ptrs, mask=j_ok[None, :], other=0, eviction_policy="evict_first")  # read once
            x = tl.load(X + j0 + offs_j, mask=j_ok, other=0.0).to(tl.float32)
            acc += _s8_to_f32(b) * x[None, :]
            w_ptrs += BLOCK_K
        out = tl.sum(acc, axis=1) * tl.load(Scale + rows).to(tl.float32)
    else:
        half: tl.constexpr = GROUP // 2
        steps: tl.constexpr = BLOCK_K // half  # groups per step
        offs_g = tl.arange(0, steps)
        offs_i = tl.arange(0, half)
        in_step = offs_g[:, None] * half + offs_i[None, :]  # byte offsets [steps, half]
        w_ptrs = W + rows[:, None, None].to(tl.int64) * KW + in_step[None, :, :]
        acc = tl.zeros([BLOCK_N, steps], tl.float32)
        for g0 in range(0, n_groups, steps):
            g_ok = offs_g < n_groups - g0
            b = tl.load(w_ptrs, mask=g_ok[None, :, None], other=0, eviction_policy="evict_first")
            acc += int4_group_sums(b, X, Scale, Zero, rows, g0, offs_g, offs_i, g_ok, n_groups, GROUP)
            w_ptrs += steps * half
        out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(Bias + rows).to(tl.float32)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


# Nibbles to 16-bit floats with integer logic only (the trick of Marlin and tinygemm): a nibble q placed in the
# low mantissa bits under the exponent of 128 (bf16 0x4300; fp16 0x6400, 1024) reads as 128 + q (1024 + q)
# exactly. One PRMT, three shifts and four LOP3s turn 4 packed bytes (8 weights) into 4 registers of 16-bit
# pairs, 2 instructions per weight byte, where the shifts, masks and I2F conversions of the row kernel cost
# about 7. The offset stays in the tile: the group's sum then carries (128 + z) * sum(x), subtracted after the
# tensor cores (_int4_tc_kernel).
_UNPACK_ASM = """{
.reg .b32 t, s;
prmt.b32 t, $4, 0, 0x3120;
lop3.b32 $0, t, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, t, 8;
lop3.b32 $1, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, t, 4;
lop3.b32 $2, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, t, 12;
lop3.b32 $3, s, 0x000F000F, MAGIC, 0xEA;
}"""
UNPACK_BF16 = tl.constexpr(_UNPACK_ASM.replace("MAGIC", "0x43004300"))
UNPACK_FP16 = tl.constexpr(_UNPACK_ASM.replace("MAGIC", "0x64006400"))


@triton.jit
def _unpack_offset(b, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """b uint8 -> (offset + low nibble, offset + high nibble) in DT (bf16: offset 128, fp16: 1024), exact."""
    if USE_ASM:
        if DT == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(UNPACK_BF16, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(UNPACK_FP16, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
    else:  # the same bits by plain integer ops (the interpreter runs no PTX)
        magic: tl.constexpr = 0x4300 if DT == tl.bfloat16 else 0x6400
        lo = ((b & 15).to(tl.int16) | magic).to(DT, bitcast=True)
        hi = ((b >> 4).to(tl.int16) | magic).to(DT, bitcast=True)
    return lo, hi


@triton.jit
def _finish_rows(acc, Bias, Out, Partial, Count, rows, offs_n, offs_m, M, N, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr):
    """Store acc [BLOCK_N, BLOCK_M] (+ bias) as Out[m, n]; with SPLIT > 1, add it to the other splits' first."""
    n_ok = offs_n < N
    out_ptrs = Out + offs_m[None, :] * N + offs_n[:, None]
    ok = (offs_m < M)[None, :] & n_ok[:, None]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(Bias + rows).to(tl.float32)[:, None]
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=ok)
    else:
        # Per element, by the thread that holds it: add the partial, then count the arrival (release: the add is
        # visible before the count); the thread that counts last (acquire: every other add is visible) reads the
        # sum at L2 (an atomic add of zero) and puts both back to zero. No barrier and no cross-thread ordering,
        # so no fence by other threads to rely on (a CTA-wide counter taken by one thread raced in the first
        # GPU run: 4e-2 errors at 4 and 8 rows).
        p_ptrs = Partial + offs_m[None, :] * N + offs_n[:, None]
        c_ptrs = Count + offs_m[None, :] * N + offs_n[:, None]
        tl.atomic_add(p_ptrs, acc, mask=ok, sem="relaxed")
        arrived = tl.atomic_add(c_ptrs, 1, mask=ok, sem="acq_rel")
        last = ok & (arrived == SPLIT - 1)
        total = tl.atomic_add(p_ptrs, tl.zeros_like(acc), mask=last, sem="acquire")  # read at L2, after every add
        tl.store(p_ptrs, tl.zeros_like(acc), mask=last)  # every other add has landed: plain stores suffice
        tl.store(c_ptrs, tl.zeros_like(arrived), mask=last)
        if HAS_BIAS:
            total += tl.load(Bias + rows).to(tl.float32)[:, None]
        tl.store(out_ptrs, total.to(Out.dtype.element_ty), mask=last)


@triton.jit
def _int4_tc_kernel(X, W, Scale, Zero, Bias, Out, Partial, Count, M, N, KW, n_groups, stride_xm, groups_per_split,
                    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """out[:M] = x @ dequant(W).T for M <= BLOCK_M activation rows (decode, small batches) on tensor cores.

    Computed transposed, acc[BLOCK_N, BLOCK_M] (the weight tile is the register operand), one group per step:
    the tile of 128 + q (unpacked as above, no scale or zero applied per weight) meets the group's activation
    in two dots (low-nibble and high-nibble channels), and the group's scale and zero point apply to the
    [BLOCK_N, BLOCK_M] result: s * (dot - (offset + z) * sum(x)). Rows of x past M are zero, so their columns
    are dropped at the store. SPLIT > 1 splits K: each program adds its float32 partial into Partial, and the
    last of SPLIT programs to arrive at an output element (Count, arrivals per element) writes it and puts
    Partial and Count back to zero for the next call (so both are zeroed once, when allocated)."""
    half: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N  # rows past N wrap to valid rows; their results are dropped at the store
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_i = tl.arange(0, half)
    DT: tl.constexpr = X.dtype.element_ty
    offset: tl.constexpr = 128.0 if DT == tl.bfloat16 else 1024.0
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, n_groups)
    w_ptrs = W + rows[:, None].to(tl.int64) * KW + g_start * half + offs_i[None, :]
    x_ptrs = X + offs_m[:, None] * stride_xm + g_start * GROUP + offs_i[None, :]
    sz_ptrs = rows * n_groups + g_start
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for _ in tl.range(g_start, g_end, num_stages=NUM_STAGES):
        b = tl.load(w_ptrs, eviction_policy="evict_first")  # read once
        x_low = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        x_high = tl.load(x_ptrs + half, mask=m_ok[:, None], other=0.0)
        lo, hi = _unpack_offset(b, DT, USE_ASM)
        part = tl.dot(lo, tl.trans(x_low))
        part = tl.dot(hi, tl.trans(x_high), part)
        x_sum = tl.sum(x_low.to(tl.float32) + x_high.to(tl.float32), axis=1)
        s = tl.load(Scale + sz_ptrs).to(tl.float32)
        z = tl.load(Zero + sz_ptrs).to(tl.float32) + offset
        acc += s[:, None] * (part - z[:, None] * x_sum[None, :])
        w_ptrs += half
        x_ptrs += GROUP
        sz_ptrs += 1
    _finish_rows(acc, Bias, Out, Partial, Count, rows, offs_n, offs_m, M, N, HAS_BIAS, SPLIT)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped launch order: GROUP_M row blocks share each weight column
    block while it is in L2."""
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _wq_matmul_kernel(X, W, Scale, Zero, Bias, Out, M, N, K, KW, n_groups, stride_xm,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = x @ dequant(W).T on tiles. Computed transposed, acc[BLOCK_N, BLOCK_M] = dot(w, x.T): the
    weight tile is dequantized in registers, and Hopper's wgmma takes a register operand only on the left.
    int4 steps one group at a time (BLOCK_K is ignored): two dots, over its low-nibble and its high-nibble
    channels, each with the group's scale and zero point applied while dequantizing."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    m_ok = offs_m < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    if BITS == 8:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + rows[:, None].to(tl.int64) * KW + (k0 + offs_k)[None, :], mask=k_ok[None, :], other=0)
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=DOT_PRECISION)  # exact conversion: |q| <= 127
        acc *= tl.load(Scale + rows).to(tl.float32)[:, None]
    else:
        half: tl.constexpr = GROUP // 2
        offs_i = tl.arange(0, half)
        for g in range(0, n_groups):
            x_ptrs = X + offs_m[:, None] * stride_xm + g * GROUP + offs_i[None, :]
            x_low = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            x_high = tl.load(x_ptrs + half, mask=m_ok[:, None], other=0.0)
            b = tl.load(W + rows[:, None].to(tl.int64) * KW + g * half + offs_i[None, :])
            s = tl.load(Scale + rows * n_groups + g).to(tl.float32)[:, None]
            z = tl.load(Zero + rows * n_groups + g).to(tl.float32)[:, None]
            w_low = (((b & 15).to(tl.float32) - z) * s).to(x_low.dtype)
            w_high = (((b >> 4).to(tl.float32) - z) * s).to(x_low.dtype)
            acc = tl.dot(w_low, tl.trans(x_low), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(w_high, tl.trans(x_high), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + rows).to(tl.float32)[:, None]
    out_ptrs = Out + offs_m[None, :] * N + offs_n[:, None]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[None, :] & (offs_n < N)[:, None])


@triton.jit
def _dequantize_kernel(W, Scale, Zero, Out, N, KW, n_groups, BITS: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK: tl.constexpr):
    """The weight in Out's dtype, [N, K]: for matmuls with many rows, which cuBLAS runs faster than a
    dequantizing Triton GEMM (bench/results/quant_gemv_sweep_h100.json: 1.8-4x at 640 rows)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # byte index in W
    ok = offs < N * KW
    b = tl.load(W + offs, mask=ok, other=0)
    row = offs // KW
    if BITS == 8:
        tl.store(Out + offs, (b.to(tl.float32) * tl.load(Scale + row, mask=ok, other=0.0).to(tl.float32))
                 .to(Out.dtype.element_ty), mask=ok)
    else:
        half: tl.constexpr = GROUP // 2
        j = offs % KW
        g = j // half
        s = tl.load(Scale + row * n_groups + g, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(Zero + row * n_groups + g, mask=ok, other=0).to(tl.float32)
        k_low = row * (2 * KW) + g * GROUP + j % half
        tl.store(Out + k_low, (((b & 15).to(tl.float32) - z) * s).to(Out.dtype.element_ty), mask=ok)
        tl.store(Out + k_low + half, (((b >> 4).to(tl.float32) - z) * s).to(Out.dtype.element_ty), mask=ok)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    N, KW = weight.shape
    out = torch.empty(N, KW * (2 if bits == 4 else 1), device=weight.device, dtype=dtype)
    block = 1024 if weight.is_cuda else 64
    with torch.cuda.device(weight.device) if weight.is_cuda else nullcontext():
        _dequantize_kernel[(triton.cdiv(N * KW, block),)](
            weight, scale.contiguous(), scale if zero is None else zero.contiguous(), out, N, KW,
            max(out.shape[1] // max(group, 1), 1), BITS=bits, GROUP=max(group, 2), BLOCK=block)
    return out


class QuantConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# From bench/quant_gemv_sweep.py on an H100 (bench/results/quant_gemv_sweep_h100.json): the best summed time
# over a 7B decoder's shapes. One row: 4 weight rows x 512 bytes per step, 2 warps (int8 2.2-2.5 TB/s; int4
# 1.4 TB/s of packed weight, where the nibble arithmetic, not memory, is the limit). Up to 16 rows: a 16-row
# tile, 64 weight rows, 256 channels per step, 1.1-1.3x faster than cuBLAS on the bf16 weight at 8 rows.
GEMV_CONFIGS = {8: QuantConfig(1, 4, 512, 2, 1), 4: QuantConfig(1, 4, 512, 2, 1)}
MATMUL_CONFIG = QuantConfig(16, 64, 256, 4, 4)
# W8A8's GEMV quantizes each activation chunk in every program (exact float32 divisions): more weight rows per
# program share that work. Best summed time over 22016x4096, 4096x4096, 4096x11008 on an H100 (54.0, 10.8,
# 30.7 us; the int8 GEMV: 36.7, 12.2, 23.1).
W8A8_GEMV_CONFIG = QuantConfig(1, 16, 1024, 4, 1)
MAX_KERNEL_ROWS = 16  # more rows: dequantize once and use the library matmul
INTERPRETER_CONFIG = QuantConfig(16, 4, 32, 1, 1)


def supports(x: torch.Tensor, weight: torch.Tensor, bits: int, group: int = 0) -> bool:
    """x [M, K] float with unit stride along K; weight contiguous, int8 [N, K] or uint8 [N, K/2] with K a
    multiple of `group`; on a GPU or under the interpreter."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[0] < 1 or x.stride(1) != 1 or not weight.is_contiguous():
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.device != weight.device:
        return False
    K = x.shape[1]
    if bits == 8:
        ok = weight.dtype == torch.int8 and weight.shape[1] == K
    else:
        ok = bits == 4 and weight.dtype == torch.uint8 and group > 0 and K % group == 0 and weight.shape[1] * 2 == K
    return ok and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, bits: int = 8, group: int = 0,
           config: Optional[QuantConfig] = None) -> torch.Tensor:
    """x @ dequant(weight).T (+ bias) as a new contiguous [M, N] tensor in x.dtype, fp32 accumulation.
    Up to 16 rows the kernels above; more rows (prefill) on a GPU: the weight dequantized to x's dtype by one
    kernel, then the library matmul (a compute-bound shape, where cuBLAS is 1.8-4x faster than the GEMM here)."""
    assert supports(x, weight, bits, group), "quant_matmul: unsupported inputs"
    (M, K), N = x.shape, weight.shape[0]
    if M > MAX_KERNEL_ROWS and x.is_cuda and config is None:
        w = dequantize(weight, scale, zero, bits, group, x.dtype)
        return torch.mm(x, w.t()) if bias is None else torch.addmm(bias.to(x.dtype), x, w.t())
    if bits == 4 and x.is_cuda and config is None and x.dtype != torch.float32 and zero is not None:
        if M > 1:
            return int4_tc_linear(x, weight, scale, zero, bias, group, TC_CONFIG)
        choice = _one_row_int4(x, weight, scale, zero, bias, group)  # one row: as measured for this shape
        if choice[0] == "tc":
            return int4_tc_linear(x, weight, scale, zero, bias, group, TcConfig(*choice[1:]))
        config = QuantConfig(*choice[1:])
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    interpreter = not x.is_cuda
    n_groups = K // group if bits == 4 else 1
    zero_arg = scale if zero is None else zero.contiguous()
    common = dict(BITS=bits, GROUP=max(group, 2), HAS_BIAS=bias is not None)
    bias_arg = x if bias is None else bias.contiguous()
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        if M == 1:
            cfg = config or (INTERPRETER_CONFIG if interpreter else GEMV_CONFIGS[bits])
            grid = (triton.cdiv(N, cfg.block_n),)
            block_k = cfg.block_k if bits == 8 else max(cfg.block_k, group // 2)  # int4: whole groups per step
            _wq_gemv_kernel[grid](x, weight, scale.contiguous(), zero_arg, bias_arg, out, N, K, weight.shape[1],
                                  n_groups, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
        else:
            cfg = config or (INTERPRETER_CONFIG if interpreter else MATMUL_CONFIG)
            block_m = max(16, min(cfg.block_m, triton.next_power_of_2(M)))
            grid = (triton.cdiv(M, block_m) * triton.cdiv(N, cfg.block_n),)
            _wq_matmul_kernel[grid](x, weight, scale.contiguous(), zero_arg, bias_arg, out, M, N, K, weight.shape[1],
                                    n_groups, x.stride(0), BLOCK_M=block_m, BLOCK_N=cfg.block_n,
                                    BLOCK_K=cfg.block_k, GROUP_M=8,
                                    # fp32 inputs would otherwise be rounded to tf32 by the tensor cores
                                    DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg.num_warps,
                                    num_stages=cfg.num_stages, **common)
    return out


class TcConfig(NamedTuple):
    block_n: int
    split: int
    num_warps: int
    num_stages: int


# int4 with 2-16 activation rows (batched decode, speculative verify steps): `_int4_tc_kernel` at 64 weight rows
# per program, K split in 4, 4 warps, 3 stages, the best of 27 configurations on an H200 (bench/
# int4_gemv_variants.py, run 9): 22016x4096 31-34 us and 4096x4096 11 us at every row count from 1 to 16, where
# the dequantizing tl.dot GEMM above took 54 and 26 us from 2 rows on (cuBLAS on the bf16 weight: 53 and 15.5).
# With one row the two are level, each ahead on some shapes (_one_row_int4 measures which).
TC_CONFIG = TcConfig(64, 4, 4, 3)


# int4 with one activation row on CUDA: the row kernel (static config first) or the tensor-core kernel, measured
# per shape on first use (tuning.time_us: in a CUDA graph, L2 flushed; a candidate must beat the row kernel by tuning.MARGIN)
# and kept on disk. On the H200 neither won everywhere (bench/results/int4_gemv_variants_run9_h200.json, us):
# 12288x4096 tc 19.7 / row 21.5, 32000x4096 43.9 / 46.7, 22016x4096 32.5 / 33.7, but 4096x11008 23.0 / 21.4 and
# 4096x4096 10.2 / 9.5. Expected: about 3% off a LLaVA-7B int4 decode step; not yet timed end to end.
# MMACCEL_GEMV_TUNE=0 keeps the row kernel.
ONE_ROW_INT4_CANDIDATES = [("row", *GEMV_CONFIGS[4]), ("tc", *TC_CONFIG), ("tc", 128, 2, 8, 3)]
_one_row_choices = Choices("int4_one_row.json")


def _one_row_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bias: Optional[torch.Tensor], group: int) -> tuple:
    """The kernel and configuration for x [1, K] against this int4 weight: ("row", *QuantConfig) or
    ("tc", *TcConfig); the static row kernel while a CUDA graph is being captured before any measurement, or
    with MMACCEL_GEMV_TUNE=0."""
    if os.environ.get("MMACCEL_GEMV_TUNE", "1") == "0":
        return ONE_ROW_INT4_CANDIDATES[0]
    N, K = weight.shape[0], x.shape[1]
    key = f"v1|{device_name(x.device)}|{x.dtype}|1x{N}x{K}|g{group}|bias={bias is not None}"

    def measure(choice: tuple) -> float:
        if choice[0] == "tc":
            return time_us(lambda: int4_tc_linear(x, weight, scale, zero, bias, group, TcConfig(*choice[1:])))
        return time_us(lambda: linear(x, weight, scale, zero, bias, 4, group, QuantConfig(*choice[1:])))

    return tuned(_one_row_choices, key, lambda: ONE_ROW_INT4_CANDIDATES, measure, tuple)


_SPLIT_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_buffers(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 partial sums and int32 arrival counts [16, n] of split-K launches, zeroed once: each launch
    leaves them zero again. One pair per output width and device, shared by every launch in stream order."""
    key = (device, n)
    if key not in _SPLIT_BUFFERS:
        _SPLIT_BUFFERS[key] = (torch.zeros(16, n, device=device, dtype=torch.float32),
                               torch.zeros(16, n, device=device, dtype=torch.int32))
    return _SPLIT_BUFFERS[key]


def int4_tc_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bias: Optional[torch.Tensor], group: int, config: TcConfig,
                   use_asm: Optional[bool] = None) -> torch.Tensor:
    """x [M <= 16, K] (bf16 or fp16) @ dequant(int4 weight).T (+ bias) on tensor cores (`_int4_tc_kernel`)."""
    (M, K), N = x.shape, weight.shape[0]
    assert M <= 16 and x.dtype in (torch.bfloat16, torch.float16) and supports(x, weight, 4, group)
    n_groups = K // group
    tiles = triton.cdiv(N, config.block_n)
    per_split = triton.cdiv(n_groups, config.split)
    split = triton.cdiv(n_groups, per_split)
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    partial, count = _split_buffers(x.device, N) if split > 1 else (out, out)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _int4_tc_kernel[(tiles, split)](
            x, weight, scale.contiguous(), zero.contiguous(), x if bias is None else bias.contiguous(), out, partial,
            count, M, N, weight.shape[1], n_groups, x.stride(0), per_split, GROUP=group, HAS_BIAS=bias is not None,
            USE_ASM=x.is_cuda if use_asm is None else use_asm, SPLIT=split, BLOCK_N=config.block_n, BLOCK_M=16,
            NUM_STAGES=config.num_stages, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


@triton.jit
def _rint(v):
    """Round half to even, as torch.round, for |v| < 2**22: adding 1.5 * 2**23 leaves no fraction bits."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _w8a8_gemv_kernel(X, W, WScale, Bias, Out, N, K, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One activation row against the int8 weight with the activation quantized inside, as
    ops/w8a8_linear.py does it (its steps 1-3, in the same float32 operations): a first pass over x (from L2)
    for its range, then the int8 GEMV's loop with x quantized on the fly. (q - zero) * w products are exact
    and each lane sums fewer than 2**24 / (255 * 127) of them; only the final sum across lanes rounds."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    lo = tl.zeros([BLOCK_K], tl.float32)
    hi = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + k0 + offs_k, mask=offs_k < K - k0, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, x)
        hi = tl.maximum(hi, x)
    lo = tl.min(lo, axis=0)  # min(0, min x): the zeros start the range at 0, as the reference clamps
    hi = tl.max(hi, axis=0)
    r = 1.0
    if PER_TOKEN:
        r = tl.maximum(tl.maximum(-lo, hi), TINY)
        lo = tl.math.div_rn(lo, r)  # rounding is monotone: min(x / r) is min(x) / r
        hi = tl.math.div_rn(hi, r)
    scale = tl.where(hi > lo, tl.math.div_rn(hi - lo, 255.0), 1.0)
    zero = _rint(tl.minimum(tl.maximum(tl.math.div_rn(-lo, scale), 0.0), 255.0))
    w_ptrs = W + rows[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0, eviction_policy="evict_first")
        x = tl.load(X + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        if PER_TOKEN:
            x = tl.math.div_rn(x, r)
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, scale)) + zero, 0.0), 255.0)
        acc += _s8_to_f32(w) * (q - zero)[None, :]
        w_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1) * (scale * tl.load(WScale + rows).to(tl.float32))
    if PER_TOKEN:
        out = out * r
    if HAS_BIAS:
        out += tl.load(Bias + rows).to(tl.float32)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


def w8a8_gemv(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
              granularity: str, config: Optional[QuantConfig] = None) -> torch.Tensor:
    """x [1, K] @ (qweight * wscale).T with x quantized as w8a8_linear does, in one kernel."""
    cfg = config or (W8A8_GEMV_CONFIG if x.is_cuda else INTERPRETER_CONFIG)
    N, K = qweight.shape
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _w8a8_gemv_kernel[(triton.cdiv(N, cfg.block_n),)](
            x, qweight, wscale.contiguous(), x if bias is None else bias.contiguous(), out, N, K,
            PER_TOKEN=granularity == "token", HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
                granularity: str) -> torch.Tensor:
    """mmaccel::w8a8_linear (activation quantized at run time, ops/w8a8_linear.py) on x [M, K], without the
    epilogue, as a new [M, N] tensor in x.dtype. One row (decode): _w8a8_gemv_kernel. More rows: the op's
    reference, an exact integer matmul (int8 tensor cores through torch._int_mm) after the activation is
    quantized by torch ops."""
    from ...ops.w8a8_linear import w8a8_linear_reference

    if x.shape[0] == 1 and supports(x, qweight, 8):
        return w8a8_gemv(x, qweight, wscale, bias, granularity)
    return w8a8_linear_reference(x, qweight, wscale, bias, "none", None, granularity)


@triton.jit
def _fp8_rows_kernel(X, Q, S, K, stride_x, BLOCK_K: tl.constexpr):
    """One row of x per program, held in registers: s = max(absmax, tiny) / 448 and q = (x / s) in float8
    e4m3, round to nearest even (ops/fp8_linear.py quantize_fp8_activation, granularity "row"), one pass."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0), TINY) / 448.0
    tl.store(Q + row.to(tl.int64) * K + offs, tl.math.div_rn(x, s).to(Q.dtype.element_ty), mask=ok)
    tl.store(S + row, s)


@triton.jit
def _fp8_gemv_kernel(X, W, WScale, Bias, Out, N, K, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """One activation row against a float8 weight, BLOCK_N weight rows per program, the activation quantized
    inside: a first pass over x (K values, from L2) for its absmax and scale, then the int8 GEMV's loop with x
    rounded to e4m3 on the fly. Decode thus reads the fp8 weight once, in one kernel per linear."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        amax = tl.maximum(amax, tl.abs(tl.load(X + k0 + offs_k, mask=offs_k < K - k0, other=0.0).to(tl.float32)))
    sx = tl.maximum(tl.max(amax, axis=0), TINY) / 448.0
    w_ptrs = W + rows[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        x = tl.load(X + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        xq = tl.math.div_rn(x, sx).to(tl.float8e4nv).to(tl.float32)
        acc += w.to(tl.float32) * xq[None, :]
        w_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1) * sx * tl.load(WScale + rows).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(Bias + rows).to(tl.float32)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


def fp8_gemv(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
             config: Optional["QuantConfig"] = None) -> torch.Tensor:
    """x [1, K] @ (qweight * wscale).T with x quantized per token as fp8_linear does, on a CUDA GPU."""
    cfg = config or GEMV_CONFIGS[8]
    N, K = qweight.shape
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    with torch.cuda.device(x.device):
        _fp8_gemv_kernel[(triton.cdiv(N, cfg.block_n),)](
            x, qweight, wscale.float().expand(N).contiguous(), x if bias is None else bias.contiguous(), out, N, K,
            HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    return out


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq float8_e4m3fn [M, K] row-major, sx float32 [M, 1]) for x [M, K] on a CUDA GPU, in one kernel
    instead of the reference's four passes over x."""
    (M, K), block = x.shape, triton.next_power_of_2(x.shape[1])
    xq = torch.empty(M, K, device=x.device, dtype=torch.float8_e4m3fn)
    sx = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device):
        _fp8_rows_kernel[(M,)](x, xq, sx, K, x.stride(0), BLOCK_K=block, num_warps=min(max(block // 512, 1), 16))
    return xq, sx


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
               granularity: str) -> torch.Tensor:
    """mmaccel::fp8_linear on x [M, K] without the epilogue: on GPUs with fp8 tensor cores, one row in
    _fp8_gemv_kernel; more rows, per-token scales from quantize_fp8_rows and torch._scaled_mm (scales applied in
    the GEMM's epilogue), per-tensor scales through the reference's torch ops; elsewhere the op's reference
    (an exact emulation)."""
    from ...ops.fp8_linear import fp8_linear_reference, fp8_linear_scaled_mm, scaled_mm, scaled_mm_supported

    if not scaled_mm_supported(x, qweight) or x.shape[0] == 0:
        return fp8_linear_reference(x, qweight, wscale, bias, "none", None, granularity)
    if x.shape[0] == 1 and x.stride(1) == 1:  # one token: per-token and per-tensor scales are the same
        return fp8_gemv(x, qweight, wscale, bias)
    if granularity == "row" and x.stride(1) == 1:
        out = scaled_mm(*quantize_fp8_rows(x), qweight, wscale, x.dtype)
    else:
        out = fp8_linear_scaled_mm(x, qweight, wscale, None, "none", None, granularity)
    return out if bias is None else out + bias
