"""Why the int4 decode GEMV (backends/triton/quant_matmul.py `_wq_gemv_kernel`) reads its packed weight at
~1.5 TB/s on an H200 while the int8 and bf16 GEMVs reach 2.3-3.3 TB/s: one GPU run (about a minute) that
puts the candidate causes side by side.

    python bench/int4_gemv_variants.py [--out $OUT/int4_gemv_variants.json] [--budget-s 300]

Variants, one activation row against an int4 weight (group 128, packing of ops/int4_linear.py unless noted):
  current   the shipped kernel: per step, each group's sum is reduced across lanes (shuffles), then scaled;
  acc       no per-step reduction: every lane keeps its own running sums, s * ((q - z) * x) per element,
            reduced once after the K loop; nibbles converted with I2F;
  magic     as acc, nibbles converted without I2F: (q | 0x4B000000) as float32 is 2**23 + q, so one integer
            LOP3 plus one float subtraction (of 2**23 + z, folding the zero point in) gives q - z exactly;
            the high nibble is kept in place (16q) and the activation it meets is pre-divided by 16 (exact);
  v2        magic with each lane's 8 bytes summed within the lane, then scaled per group, no masks;
  prefetch  current's arithmetic with the packed weight read one or two steps before it is used;
  dot       tensor cores: the row padded to 16, the weight tile dequantized to bf16 by (q | 0x4300) - (128 + z)
            (exact) times s (one rounding, as the reference), one group per step; dot_f32: dequantized in fp32;
  loadonly  the same weight loads, integer sums only: the ceiling of this access pattern.
Times: GPU time per call in a CUDA graph, L2 flushed before each (backends/triton/tuning.time_us); GB/s counts
packed weight + scales + zero points + activation. Errors against the op's reference (dequantize_int4).

  splitk    an activation chunk held in registers across many weight rows, float32 partials added after;
  words     the weight repacked as int32 words (pack_words: nibble t of word j is channel t * GROUP/8 + j), so a
            thread's 4 words meet 8 runs of 4 consecutive activations; each nibble becomes fp32 1 + q/128 by one
            PRMT under exponent byte 0x3F, then one FMA; scale and zero point applied per thread (no cross-thread
            reduction per step); words_p1s1 reads the next step's weight ahead, words_p0s2/s3 Triton's pipeliner;
  words_t   words with the tile ordered [groups, rows, quads, words], so a warp's threads span rows and quads.
Times: GPU time per call in a CUDA graph, L2 flushed before each (backends/triton/tuning.time_us); GB/s counts
packed weight + scales + zero points + activation. Errors against the op's reference (dequantize_int4).

Measured (H200, bench/results/int4_gemv_variants_run*_h200.json), 22016x4096 in us:
current 31.3-33.6, acc 35.1, magic 33.8-35.0, v2 32.5, prefetch 33.1, dot 39.1-42.7, dot_f32 51.6, splitk 40.4
(run 4, with its combine kernel), words 31.0-32.4 (run 5, 7), words_p1s1 31.7, words_p0s2/s3 185-203,
words_t 27.1-27.5 (run 8; 32000x4096 35.1 against current's 46.6, but 4096x4096 15.6 against 9.5),
loadonly 9.6-15.4 (3.0-4.9 TB/s), cuBLAS on the bf16 weight 52-56.
What decided what (sm_90 SASS offline; ncu on the H200, bench/results/int4_gemv_ncu*_h200.txt, run through
bench/int4_gemv_profile.py):
- Instruction count is not the limit: words halves it (7.1-7.9 instructions per weight byte against current's
  14.3, no shared-memory layout conversion and no barrier in the K loop, where current has 11) and is as slow.
- Ablations of words (run 6): without the activation loads 28.3-29.6 us, without the scale and zero-point loads
  27.3-30.1, without both 23.7-24.6: the extra loads cost about 4 us each, and the arithmetic that waits on
  the weight costs the rest over loadonly's 15 (no overlap of load and arithmetic at this occupancy).
- ncu: current is issue-bound (SM 72%, 0.78 instructions per scheduler per cycle, DRAM 24%); words is bound
  by L1 (L1/TEX 86%, DRAM 24%): a warp's activation load is eight 32-byte runs 256 bytes apart; words_t makes
  it one run shared by the warp's rows and is 18-24% faster on the wide shapes, but still L1/TEX 79% and
  long-scoreboard stalls at 9 warps per SM. Reading ahead (prefetch, words_p1s1) buys nothing because the
  registers it needs cost occupancy; Triton's pipeliner stages the activation through shared memory per row.
- Not shipped: a win on two of five shapes needs the repacked layout in the prefill kernel too, and is still
  1.7-1.9 TB/s. What is left is the tinygemm/Marlin design: dequantize to bf16 pairs (one LOP3 and one HFMA2
  per two weights) straight into tensor-core fragments, the activation as the B fragment, so the FMA work
  leaves the FP32 pipe and the activation leaves L1."""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmaccel  # noqa: E402,F401
from common import default_out, environment, gb_per_s, rel_err, write_json  # noqa: E402
from mmaccel.backends.triton import quant_matmul as qm  # noqa: E402
from mmaccel.backends.triton.tuning import time_us  # noqa: E402
from mmaccel.ops.int4_linear import dequantize_int4, quantize_int4_groupwise  # noqa: E402

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]
PHASE1 = [(22016, 4096), (4096, 4096)]
GROUP = 128


@triton.jit
def _int4_gemv_lanes(X, W, Scale, Zero, Out, N, KW, n_groups, MODE: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, STEPS: tl.constexpr, NUM_STAGES: tl.constexpr):
    """MODE 0: acc (I2F), 1: magic, 2: loadonly. STEPS groups of each of BLOCK_N rows per K step."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    half: tl.constexpr = GROUP // 2
    offs_g = tl.arange(0, STEPS)
    offs_i = tl.arange(0, half)
    in_step = offs_g[:, None] * half + offs_i[None, :]
    w_ptrs = W + rows[:, None, None].to(tl.int64) * KW + in_step[None, :, :]
    acc = tl.zeros([BLOCK_N, STEPS, half], tl.float32)
    iacc = tl.zeros([BLOCK_N, STEPS, half], tl.int32)
    for g0 in tl.range(0, n_groups, STEPS, num_stages=NUM_STAGES):
        g_ok = offs_g < n_groups - g0
        b = tl.load(w_ptrs, mask=g_ok[None, :, None], other=0, eviction_policy="evict_first")
        if MODE == 2:
            iacc += b.to(tl.int32)
        else:
            k_low = (g0 + offs_g)[:, None] * GROUP + offs_i[None, :]
            x_low = tl.load(X + k_low, mask=g_ok[:, None], other=0.0).to(tl.float32)
            x_high = tl.load(X + k_low + half, mask=g_ok[:, None], other=0.0).to(tl.float32)
            sz = rows[:, None] * n_groups + (g0 + offs_g)[None, :]
            s = tl.load(Scale + sz, mask=g_ok[None, :], other=0.0).to(tl.float32)
            z = tl.load(Zero + sz, mask=g_ok[None, :], other=0).to(tl.float32)
            if MODE == 0:
                lo = (b & 15).to(tl.float32) - z[:, :, None]
                hi = (b >> 4).to(tl.float32) - z[:, :, None]
                acc += s[:, :, None] * (lo * x_low[None, :, :] + hi * x_high[None, :, :])
            else:
                bi = b.to(tl.int32)
                lo = ((bi & 15) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)[:, :, None]
                hi = ((bi & 240) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + 16.0 * z)[:, :, None]
                acc += s[:, :, None] * (lo * x_low[None, :, :] + hi * (x_high * 0.0625)[None, :, :])
        w_ptrs += STEPS * half
    if MODE == 2:
        out = tl.sum(tl.sum(iacc, axis=2), axis=1).to(tl.float32)
    else:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


def lanes(x, p, s, z, mode, block_n, steps, warps, stages):
    N, KW = p.shape
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    _int4_gemv_lanes[(triton.cdiv(N, block_n),)](x, p, s, z, out, N, KW, KW * 2 // GROUP, MODE=mode, GROUP=GROUP,
                                                 BLOCK_N=block_n, STEPS=steps, NUM_STAGES=stages,
                                                 num_warps=warps, num_stages=stages)
    return out


def weights(N, K):
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    p, s, z = quantize_int4_groupwise(w, GROUP)
    return w, (p, s, z), p.numel() + s.numel() * 2 + z.numel() + K * 2, dequantize_int4(p, s, z, GROUP).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out("int4_gemv_variants.json"))
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--variants", nargs="*", help="only these variants (and current, for scale)")
    parser.add_argument("--batches-only", action="store_true",
                        help="only the small-batch table: the shipped path against cuBLAS, 1-16 rows")
    args = parser.parse_args()
    started = time.time()
    results = {**environment("cuda"), "phase1": [], "best": []}
    modes = {"acc": 0, "magic": 1, "loadonly": 2}

    def variants():
        # each variant's best configurations over runs 1-3 (bench/results/int4_gemv_variants_run*_h200.json)
        for cfg in [(1, 4, 512, 2, 1), (1, 8, 512, 4, 1)]:
            c = qm.QuantConfig(*cfg)
            yield "current", cfg, lambda x, p, s, z, c=c: qm.linear(x, p, s, z, bits=4, group=GROUP, config=c)
        for name, cfg in [("loadonly", (4, 8, 4, 1)), ("acc", (4, 4, 2, 3)), ("magic", (4, 4, 2, 3)),
                          ("magic", (8, 4, 4, 1))]:
            yield name, cfg, lambda x, p, s, z, m=modes[name], a=cfg: lanes(x, p, s, z, m, *a)
        for cfg in [(8, 4, 2, 1), (8, 8, 4, 1)]:
            yield "v2", cfg, lambda x, p, s, z, a=cfg: v2(x, p, s, z, *a)
        for cfg in [(8, 4, 4, 1), (4, 8, 4, 1), (4, 8, 2, 2)]:
            yield "prefetch", cfg, lambda x, p, s, z, a=cfg: prefetch(x, p, s, z, *a)
        for cfg in itertools.product([8, 16], [2, 4, 8], [4, 8, 16], [2, 4]):  # block_n, steps, row tiles, warps
            yield "splitk", cfg, lambda x, p, s, z, a=cfg: splitk(x, p, s, z, *a)
        for cfg in itertools.product([8, 16, 32, 64], [2, 4, 8], [2, 4, 8]):  # block_n, groups per step, warps
            yield "words", cfg, lambda x, p, s, z, a=cfg: words(x, packed_words(p), s, z, *a)
        for cfg in itertools.product([8, 16, 32, 64], [1, 2, 4], [1, 2, 4]):  # block_n, groups per step, warps
            yield "words_t", cfg, lambda x, p, s, z, a=cfg: words_t(x, packed_words(p), s, z, *a)
        for (prefetch, stages), cfg in itertools.product([(1, 1), (0, 2), (0, 3)],
                                                         [(16, 8, 4), (8, 8, 4), (8, 4, 4), (16, 4, 4), (8, 8, 2)]):
            yield f"words_p{prefetch}s{stages}", cfg, \
                lambda x, p, s, z, a=cfg, b=(prefetch, stages): words(x, packed_words(p), s, z, *a, *b)
        for bn, split, (warps, stages) in itertools.product([32, 64, 128], [1, 2, 4], [(4, 3), (4, 4), (8, 3)]):
            yield "tc", (bn, split, warps, stages), lambda x, p, s, z, c=qm.TcConfig(bn, split, warps, stages): \
                qm.int4_tc_linear(x, p, s, z, None, GROUP, c)
        for cfg in [(64, 1, 4, 3), (64, 2, 4, 3), (128, 1, 8, 3)]:
            yield "tc_noasm", cfg, lambda x, p, s, z, c=qm.TcConfig(*cfg): \
                qm.int4_tc_linear(x, p, s, z, None, GROUP, c, use_asm=False)
        for (bn, warps, stages), magic in itertools.product([(64, 4, 3), (64, 4, 4), (128, 8, 3)], [True, False]):
            yield "dot" if magic else "dot_f32", (bn, warps, stages), \
                lambda x, p, s, z, a=(bn, magic, warps, stages): dot(x, p, s, z, *a)

    repacked = {}

    def packed_words(p):  # the words variant's layout, made once per weight (outside the timed call)
        if p.data_ptr() not in repacked:
            repacked[p.data_ptr()] = pack_words(p, GROUP)
        return repacked[p.data_ptr()]

    def measure(name, cfg, fn, N, K, data):
        w, (p, s, z), nbytes, exact_weight = data
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        try:
            out = fn(x, p, s, z)
            err = None if name == "loadonly" else rel_err(out, x.float() @ exact_weight.T)  # the op's reference
            us = min(time_us(lambda: fn(x, p, s, z)) for _ in range(2))
        except Exception as e:
            return {"variant": name, "cfg": cfg, "N": N, "K": K, "error": f"{type(e).__name__}: {e}"[:300]}
        return {"variant": name, "cfg": cfg, "N": N, "K": K, "us": us, "gbps": gb_per_s(nbytes, us), "err_vs_reference": err}

    data = {shape: weights(*shape) for shape in SHAPES}
    for (N, K) in SHAPES:  # the bf16 weight through cuBLAS, for scale
        w = data[(N, K)][0]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        us = time_us(lambda: x @ w.T)
        results.setdefault("cublas_bf16", []).append({"N": N, "K": K, "us": us, "gbps": gb_per_s(N * K * 2, us)})
    for name, cfg, fn in variants():
        if args.batches_only:
            break
        if args.variants and name not in args.variants + ["current"]:
            continue
        if time.time() - started > args.budget_s * 0.7:
            results["phase1"].append({"variant": name, "cfg": cfg, "skipped": "budget"})
            continue
        for N, K in PHASE1:
            results["phase1"].append(measure(name, cfg, fn, N, K, data[(N, K)]))
    print(f"{'variant':9} {'cfg':22} " + " ".join(f"{n}x{k:>5}" for n, k in PHASE1))
    best = {}
    for name in ["current", "loadonly", "acc", "magic", "v2", "prefetch", "dot", "dot_f32", "splitk", "words",
                 "words_p1s1", "words_p0s2", "words_p0s3", "words_t", "tc", "tc_noasm"]:
        by_cfg = {}
        for r in results["phase1"]:
            if r["variant"] == name and "us" in r:
                by_cfg.setdefault(tuple(r["cfg"]), []).append(r)
        ranked = sorted((sum(r["us"] for r in v), k, v) for k, v in by_cfg.items() if len(v) == len(PHASE1))
        for total, key, rows in ranked[:3]:
            print(f"{name:9} {str(key):22} " + " ".join(f"{r['us']:7.1f}us {r['gbps']:6.0f}GB/s" for r in rows))
        if ranked:
            best[name] = ranked[0][1]
    for name, key in best.items():
        fn = next(f for n, c, f in variants() if n == name and tuple(c) == key)
        for N, K in SHAPES:
            results["best"].append(measure(name, key, fn, N, K, data[(N, K)]))
    print(f"{'variant':9} " + " ".join(f"{n:>6}x{k:<5}" for n, k in SHAPES) + "   (us; GB/s)")
    for name in best:
        rows = [r for r in results["best"] if r["variant"] == name]
        print(f"{name:9} " + " ".join(f"{r.get('us', float('nan')):6.1f}/{r.get('gbps', 0):4.0f}" for r in rows)
              + "  err " + " ".join(f"{r.get('err_vs_reference') or 0:.1e}" for r in rows))
    print("cublas   " + " ".join(f"{r['us']:6.1f}/{r['gbps']:4.0f}" for r in results["cublas_bf16"]))
    # Small batches (issue 17: 2-32 rows near the floor): the shipped path (the row kernel at 1, the dequantizing
    # tl.dot GEMM up to 16), tc at its best configuration, and cuBLAS on the bf16 weight.
    tc_key = best.get("tc") or (tuple(qm.TC_CONFIG) if args.batches_only else None)
    for (N, K), M in itertools.product(SHAPES if args.batches_only else PHASE1, [1, 2, 3, 4, 8, 16]):
        w, (p, s, z), nbytes, exact = data[(N, K)]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ exact.T
        row = {"N": N, "K": K, "M": M, "cublas_us": time_us(lambda: x @ w.T),
               "shipped_us": time_us(lambda: qm.linear(x, p, s, z, bits=4, group=GROUP)),
               "shipped_err": rel_err(qm.linear(x, p, s, z, bits=4, group=GROUP), ref)}
        if M > 1:  # the dequantizing tl.dot GEMM that ran 2-16 rows before the tensor-core kernel
            row["dequant_gemm_us"] = time_us(lambda: qm.linear(x, p, s, z, bits=4, group=GROUP, config=qm.MATMUL_CONFIG))
        if tc_key:
            c = qm.TcConfig(*tc_key)
            row.update(tc_us=time_us(lambda: qm.int4_tc_linear(x, p, s, z, None, GROUP, c)),
                       tc_err=rel_err(qm.int4_tc_linear(x, p, s, z, None, GROUP, c), ref))
        results.setdefault("batches", []).append(row)
        print(f"M={M:2} {N}x{K}: cublas {row['cublas_us']:6.1f} shipped {row['shipped_us']:6.1f} "
              f"(err {row['shipped_err']:.1e}) dequant-gemm {row.get('dequant_gemm_us', float('nan')):6.1f} "
              f"tc {row.get('tc_us', float('nan')):6.1f} us  err {row.get('tc_err') or 0:.1e}")
    write_json(args.out, results)



@triton.jit
def _int4_gemv_v2(X, W, Scale, Zero, Out, N, KW, n_groups, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                  STEPS: tl.constexpr, NUM_STAGES: tl.constexpr):
    half: tl.constexpr = GROUP // 2
    chunks: tl.constexpr = half // 8
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    offs_g = tl.arange(0, STEPS)
    offs_c = tl.arange(0, chunks)
    offs_e = tl.arange(0, 8)
    in_step = (offs_g[:, None, None] * half + offs_c[None, :, None] * 8 + offs_e[None, None, :])  # [S, C, 8]
    w_ptrs = W + rows[:, None, None, None].to(tl.int64) * KW + in_step[None, :, :, :]
    x_off = offs_g[:, None, None] * GROUP + offs_c[None, :, None] * 8 + offs_e[None, None, :]
    acc = tl.zeros([BLOCK_N, STEPS, chunks], tl.float32)
    for g0 in tl.range(0, n_groups, STEPS, num_stages=NUM_STAGES):
        b = tl.load(w_ptrs, eviction_policy="evict_first").to(tl.int32)
        x_low = tl.load(X + g0 * GROUP + x_off).to(tl.float32)
        x_high = tl.load(X + g0 * GROUP + half + x_off).to(tl.float32) * 0.0625
        sz = rows[:, None] * n_groups + (g0 + offs_g)[None, :]
        s = tl.load(Scale + sz).to(tl.float32)
        z = tl.load(Zero + sz).to(tl.float32)
        lo = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)[:, :, None, None]
        hi = ((b & 240) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + 16.0 * z)[:, :, None, None]
        t = tl.sum(lo * x_low[None, :, :, :] + hi * x_high[None, :, :, :], axis=3)  # within each lane
        acc += s[:, :, None] * t
        w_ptrs += STEPS * half
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


def v2(x, p, s, z, block_n, steps, warps, stages):
    N, KW = p.shape
    n_groups = KW * 2 // GROUP
    steps = math.gcd(steps, n_groups)  # whole steps: the kernel has no masks
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    _int4_gemv_v2[(triton.cdiv(N, block_n),)](x, p, s, z, out, N, KW, n_groups, GROUP=GROUP, BLOCK_N=block_n,
                                              STEPS=steps, NUM_STAGES=stages, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _int4_gemv_dot(X, W, Scale, Zero, Out, N, KW, n_groups, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_STAGES: tl.constexpr, BF16_MAGIC: tl.constexpr):
    """Tensor cores for one activation row: the row padded to 16 (rows 1-15 zero), the weight tile dequantized
    to bf16 in registers, one group per step (a dot over its low-nibble and one over its high-nibble channels).
    BF16_MAGIC: (q | 0x4300) as bf16 is 128 + q, minus (128 + z) exactly, times s in bf16: one rounding, as the
    reference's fp32 product rounded to bf16."""
    half: tl.constexpr = GROUP // 2
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    offs_m = tl.arange(0, 16)
    offs_i = tl.arange(0, half)
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    w_ptrs = W + rows[:, None].to(tl.int64) * KW + offs_i[None, :]
    for g in tl.range(0, n_groups, num_stages=NUM_STAGES):
        x_ptrs = X + g * GROUP + offs_i[None, :] + offs_m[:, None] * 0
        x_low = tl.load(x_ptrs, mask=offs_m[:, None] == 0, other=0.0)
        x_high = tl.load(x_ptrs + half, mask=offs_m[:, None] == 0, other=0.0)
        b = tl.load(w_ptrs, eviction_policy="evict_first")
        s = tl.load(Scale + rows * n_groups + g)[:, None]
        z = tl.load(Zero + rows * n_groups + g)[:, None]
        if BF16_MAGIC:
            zb = (z.to(tl.float32) + 128.0).to(tl.bfloat16)
            w_low = (((b & 15).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True) - zb) * s
            w_high = (((b >> 4).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True) - zb) * s
        else:
            w_low = (((b & 15).to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)).to(x_low.dtype)
            w_high = (((b >> 4).to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)).to(x_low.dtype)
        acc = tl.dot(w_low, tl.trans(x_low), acc)
        acc = tl.dot(w_high, tl.trans(x_high), acc)
        w_ptrs += half
    out = tl.sum(acc, axis=1)  # columns 1-15 are zero
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


def dot(x, p, s, z, block_n, magic, warps, stages):
    N, KW = p.shape
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    _int4_gemv_dot[(triton.cdiv(N, block_n),)](x, p, s, z, out, N, KW, KW * 2 // GROUP, GROUP=GROUP, BLOCK_N=block_n,
                                               NUM_STAGES=stages, BF16_MAGIC=magic, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _int4_gemv_prefetch(X, W, Scale, Zero, Out, N, KW, n_groups, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        STEPS: tl.constexpr, AHEAD: tl.constexpr):
    """The shipped kernel's arithmetic (quant_matmul.int4_group_sums) with the packed weight read AHEAD (1 or 2)
    steps before it is used. The hypothesis it tested: the shipped kernel holds ~89 registers per lane, so ~11
    programs per SM and ~22 KB of weight reads in flight per SM, ~2.9 MB over the GPU, which at ~2 us loaded
    latency would cap it near 1.5 TB/s (Little's law); raw bytes cost 4 registers per 16, their unpacked floats
    16. Measured (run 3): no faster, so that is not the cap."""
    half: tl.constexpr = GROUP // 2
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    offs_g = tl.arange(0, STEPS)
    offs_i = tl.arange(0, half)
    in_step = offs_g[:, None] * half + offs_i[None, :]
    w_ptrs = W + rows[:, None, None].to(tl.int64) * KW + in_step[None, :, :]
    acc = tl.zeros([BLOCK_N, STEPS], tl.float32)
    b_a = tl.load(w_ptrs, mask=(offs_g < n_groups)[None, :, None], other=0, eviction_policy="evict_first")
    b_b = b_a
    if AHEAD == 2:
        b_b = tl.load(w_ptrs + STEPS * half, mask=(offs_g < n_groups - STEPS)[None, :, None], other=0,
                      eviction_policy="evict_first")
    for g0 in range(0, n_groups, STEPS):
        g_ok = offs_g < n_groups - g0
        b = b_a
        if AHEAD == 2:
            b_a = b_b
            b_b = tl.load(w_ptrs + 2 * STEPS * half, mask=(offs_g < n_groups - g0 - 2 * STEPS)[None, :, None],
                          other=0, eviction_policy="evict_first")
        else:
            b_a = tl.load(w_ptrs + STEPS * half, mask=(offs_g < n_groups - g0 - STEPS)[None, :, None], other=0,
                          eviction_policy="evict_first")
        acc += qm.int4_group_sums(b, X, Scale, Zero, rows, g0, offs_g, offs_i, g_ok, n_groups, GROUP)
        w_ptrs += STEPS * half
    out = tl.sum(acc, axis=1)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


def prefetch(x, p, s, z, block_n, steps, warps, ahead):
    N, KW = p.shape
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    _int4_gemv_prefetch[(triton.cdiv(N, block_n),)](x, p, s, z, out, N, KW, KW * 2 // GROUP, GROUP=GROUP,
                                                    BLOCK_N=block_n, STEPS=steps, AHEAD=ahead, num_warps=warps,
                                                    num_stages=1)
    return out


@triton.jit
def _int4_gemv_splitk(X, W, Scale, Zero, Part, N, KW, n_groups, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                      STEPS: tl.constexpr, ROW_TILES: tl.constexpr):
    """Split-K order: program (k, n) takes STEPS groups of the activation once, into registers (with their
    sums), then walks ROW_TILES tiles of BLOCK_N weight rows over that K chunk, writing float32 partial sums
    Part[k, row]; the caller adds them over k. Each activation byte is read once per ROW_TILES * BLOCK_N rows
    instead of once per BLOCK_N (the shipped kernel): the hypothesis left by the variants above."""
    half: tl.constexpr = GROUP // 2
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    g0 = pid_k * STEPS
    offs_g = tl.arange(0, STEPS)
    offs_i = tl.arange(0, half)
    k_low = (g0 + offs_g)[:, None] * GROUP + offs_i[None, :]
    x_low = tl.load(X + k_low).to(tl.float32)
    x_high = tl.load(X + k_low + half).to(tl.float32)
    x_sum = tl.sum(x_low + x_high, axis=1)
    in_step = (g0 * half + offs_g[:, None] * half + offs_i[None, :])
    for t in range(ROW_TILES):
        offs_n = (pid_n * ROW_TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n % N
        b = tl.load(W + rows[:, None, None].to(tl.int64) * KW + in_step[None, :, :], eviction_policy="evict_first")
        qx = (b & 15).to(tl.float32) * x_low[None, :, :] + (b >> 4).to(tl.float32) * x_high[None, :, :]
        sz = rows[:, None] * n_groups + (g0 + offs_g)[None, :]
        s = tl.load(Scale + sz).to(tl.float32)
        z = tl.load(Zero + sz).to(tl.float32)
        part = tl.sum(s * (tl.sum(qx, axis=2) - z * x_sum[None, :]), axis=1)
        tl.store(Part + pid_k * N + offs_n, part, mask=offs_n < N)


def splitk(x, p, s, z, block_n, steps, row_tiles, warps):
    N, KW = p.shape
    n_groups = KW * 2 // GROUP
    steps = math.gcd(steps, n_groups)
    part = torch.empty(n_groups // steps, N, device=x.device, dtype=torch.float32)
    grid = (n_groups // steps, triton.cdiv(N, block_n * row_tiles))
    _int4_gemv_splitk[grid](x, p, s, z, part, N, KW, n_groups, GROUP=GROUP, BLOCK_N=block_n, STEPS=steps,
                            ROW_TILES=row_tiles, num_warps=warps, num_stages=1)
    return part.sum(0, keepdim=True).to(x.dtype)  # the combine: one more kernel, N float32 per K chunk


# One 32-bit word holds 8 nibbles of one group; nibble t of word j is channel t * (GROUP // 8) + j, so the activation
# of nibble t over a thread's 4 consecutive words is 4 consecutive channels (one 8-byte load, in the weight tile's
# own layout: no shared-memory layout conversion) and shared by every row the thread holds.
def pack_words(p, group):
    """The ops/int4_linear.py packing (byte i of a group: channels i and group/2 + i) as int32 words [N, K/8]."""
    N, wpg = p.shape[0], group // 8
    b = p.reshape(N, -1, group // 2)
    nib = torch.cat([b & 15, b >> 4], -1).reshape(N, b.shape[1], 8, wpg).transpose(2, 3)  # [N, groups, j, t]
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous().view(torch.int32).reshape(N, -1)


@triton.jit
def _nibble_f32(v, k: tl.constexpr, magic, USE_ASM: tl.constexpr):
    """fp32 1 + q/128 from byte k of v (each byte 0x80 | q): the byte placed under the sign-and-exponent byte 0x3F
    of `magic` (0x3F000000), one PRMT. magic is a kernel argument because with an immediate ptxas puts the
    selector in a register and reloads it before every PRMT (sm_90 SASS: 9.5 instead of 7.9 instructions per
    weight byte)."""
    if USE_ASM:
        c = tl.full(v.shape, 0, tl.int32) + magic
        if k == 0:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7044;", "=r,r,r", [v, c], dtype=tl.int32,
                                          is_pure=True, pack=1)
        elif k == 1:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7144;", "=r,r,r", [v, c], dtype=tl.int32,
                                          is_pure=True, pack=1)
        elif k == 2:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7244;", "=r,r,r", [v, c], dtype=tl.int32,
                                          is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7344;", "=r,r,r", [v, c], dtype=tl.int32,
                                          is_pure=True, pack=1)
    else:  # the interpreter has no inline PTX
        r = (((v >> (8 * k)) & 0xFF) << 16) | magic
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _words_step(acc, b, x_ptrs, s, z, magic, WPG: tl.constexpr, USE_ASM: tl.constexpr):
    lo = (b & 0x0F0F0F0F) | -2139062144  # 0x80808080: each byte 0x80 | q
    hi = ((b >> 4) & 0x0F0F0F0F) | -2139062144
    x0 = tl.load(x_ptrs).to(tl.float32)
    x1 = tl.load(x_ptrs + WPG).to(tl.float32)
    x2 = tl.load(x_ptrs + 2 * WPG).to(tl.float32)
    x3 = tl.load(x_ptrs + 3 * WPG).to(tl.float32)
    x4 = tl.load(x_ptrs + 4 * WPG).to(tl.float32)
    x5 = tl.load(x_ptrs + 5 * WPG).to(tl.float32)
    x6 = tl.load(x_ptrs + 6 * WPG).to(tl.float32)
    x7 = tl.load(x_ptrs + 7 * WPG).to(tl.float32)
    # one expression: one FMUL and seven FMAs per word (a zero-initialized sum adds an FADD per term)
    p = (x0 * _nibble_f32(lo, 0, magic, USE_ASM) + x1 * _nibble_f32(hi, 0, magic, USE_ASM)
         + x2 * _nibble_f32(lo, 1, magic, USE_ASM) + x3 * _nibble_f32(hi, 1, magic, USE_ASM)
         + x4 * _nibble_f32(lo, 2, magic, USE_ASM) + x5 * _nibble_f32(hi, 2, magic, USE_ASM)
         + x6 * _nibble_f32(lo, 3, magic, USE_ASM) + x7 * _nibble_f32(hi, 3, magic, USE_ASM))
    xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    return acc + s.to(tl.float32) * (128.0 * tl.sum(p, axis=3, keep_dims=True)
                                     - (128.0 + z.to(tl.float32)) * tl.sum(xs, axis=3, keep_dims=True))


@triton.jit
def _words_k_loop(acc, w_ptrs, x_ptrs, s_ptrs, z_ptrs, n_groups, magic, G: tl.constexpr, GROUP: tl.constexpr,
                  USE_ASM: tl.constexpr, NS: tl.constexpr):
    WPG: tl.constexpr = GROUP // 8
    for g0 in tl.range(0, n_groups, G, num_stages=NS):
        b = tl.load(w_ptrs, eviction_policy="evict_first")
        acc = _words_step(acc, b, x_ptrs, tl.load(s_ptrs), tl.load(z_ptrs), magic, WPG, USE_ASM)
        w_ptrs += G * WPG
        x_ptrs += G * GROUP
        s_ptrs += G
        z_ptrs += G
    return acc


@triton.jit
def _int4_gemv_words(X, W, Scale, Zero, Out, N, KW4, n_groups, magic, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     G: tl.constexpr, USE_ASM: tl.constexpr, PREFETCH: tl.constexpr = 0, NS: tl.constexpr = 1):
    """Tile [BLOCK_N rows, G groups, quads, 4 words]; each thread loads 4 words of a row (16 bytes) and the 8
    activation runs those words need (loaded once for all the rows it holds). Per word: two masks, eight PRMTs
    and eight FMAs; the group's s * (128 * sum(x * (1 + q/128)) - (128 + z) * sum(x)) is applied per thread before
    any cross-thread reduction, so the scale and zero point load in the tile's own layout.
    PREFETCH: the next step's loads are issued before this step's arithmetic (registers); NS: Triton's pipeliner.
    The caller picks G dividing n_groups: no masks (masked activation loads were not shared across rows)."""
    WPG: tl.constexpr = GROUP // 8
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    og = tl.arange(0, G)[:, None, None]
    oq = tl.arange(0, WPG // 4)[None, :, None]
    oe = tl.arange(0, 4)[None, None, :]
    w_ptrs = W + rows[:, None, None, None].to(tl.int64) * KW4 + (og * WPG + oq * 4 + oe)[None]
    # rows * 0: the activation pointer has the weight tile's shape, so its load gets the tile's layout; the
    # compiler loads it once per thread, not once per row (checked in the SASS)
    x_ptrs = X + (rows * 0)[:, None, None, None] + (og * GROUP + oq * 4 + oe)[None]
    sz = rows[:, None, None, None] * n_groups + (og + oq * 0)[None]
    acc = tl.zeros([BLOCK_N, G, WPG // 4, 1], tl.float32)
    if PREFETCH:  # the weight, scale and zero point only: a carried activation is kept once per row
        b = tl.load(w_ptrs, eviction_policy="evict_first")
        s, z = tl.load(Scale + sz), tl.load(Zero + sz)
        for g0 in range(0, n_groups, G):
            step = tl.where(g0 + G < n_groups, G, 0)  # the last step re-reads its own tile instead of past the end
            nb = tl.load(w_ptrs + step * WPG, eviction_policy="evict_first")
            ns, nz = tl.load(Scale + sz + step), tl.load(Zero + sz + step)
            acc = _words_step(acc, b, x_ptrs, s, z, magic, WPG, USE_ASM)
            b, s, z = nb, ns, nz
            w_ptrs += step * WPG
            x_ptrs += G * GROUP
            sz += step
    else:
        acc = _words_k_loop(acc, w_ptrs, x_ptrs, Scale + sz, Zero + sz, n_groups, magic, G, GROUP, USE_ASM, NS)
    out = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _int4_gemv_words_t(X, W, Scale, Zero, Out, N, KW4, n_groups, magic, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, G: tl.constexpr, USE_ASM: tl.constexpr):
    """words with the tile as [G groups, BLOCK_N rows, quads, 4 words]: a warp's threads span quads and rows
    (not quads and groups), so each activation load of a warp is one 32-byte run shared by its rows (one L1
    wavefront) instead of eight runs 256 bytes apart (ncu, words 8x8x4 on the H200: L1/TEX 86% busy, DRAM 24%)."""
    WPG: tl.constexpr = GROUP // 8
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    og = tl.arange(0, G)[:, None, None, None]
    orow = rows[None, :, None, None]
    oq = tl.arange(0, WPG // 4)[None, None, :, None]
    oe = tl.arange(0, 4)[None, None, None, :]
    w_ptrs = W + orow.to(tl.int64) * KW4 + og * WPG + oq * 4 + oe
    x_ptrs = X + orow * 0 + og * GROUP + oq * 4 + oe
    sz = orow * n_groups + og + oq * 0
    acc = tl.zeros([G, BLOCK_N, WPG // 4, 1], tl.float32)
    acc = _words_k_loop(acc, w_ptrs, x_ptrs, Scale + sz, Zero + sz, n_groups, magic, G, GROUP, USE_ASM, 1)
    out = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=0)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=offs_n < N)


def words_t(x, w32, s, z, block_n, g, warps):
    N, KW4 = w32.shape
    n_groups = KW4 * 8 // GROUP
    g = math.gcd(g, n_groups)
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    _int4_gemv_words_t[(triton.cdiv(N, block_n),)](x, w32, s, z, out, N, KW4, n_groups, 0x3F000000, GROUP=GROUP,
                                                   BLOCK_N=block_n, G=g, USE_ASM=x.is_cuda, num_warps=warps,
                                                   num_stages=1)
    return out


def words(x, w32, s, z, block_n, g, warps, prefetch=0, stages=1):
    N, KW4 = w32.shape
    n_groups = KW4 * 8 // GROUP
    g = math.gcd(g, n_groups)
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    _int4_gemv_words[(triton.cdiv(N, block_n),)](x, w32, s, z, out, N, KW4, n_groups, 0x3F000000, GROUP=GROUP,
                                                 BLOCK_N=block_n, G=g, USE_ASM=x.is_cuda, PREFETCH=prefetch, NS=stages,
                                                 num_warps=warps, num_stages=1)
    return out


if __name__ == "__main__":
    main()
