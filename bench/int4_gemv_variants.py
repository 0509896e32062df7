"""Why the int4 decode GEMV (backends/triton/quant_matmul.py `_wq_gemv_kernel`) reads its packed weight at
~1.2 TB/s on an H200 while the int8 and bf16 GEMVs reach 2.3-2.9 TB/s: one GPU run that separates the causes.

    python bench/int4_gemv_variants.py [--out $OUT/int4_gemv_variants.json] [--budget-s 300]

Variants, one activation row against an int4 weight (group 128, packing of ops/int4_linear.py):
  current   the shipped kernel: per step, each group's sum is reduced across lanes (shuffles), then scaled;
  acc       no per-step reduction: every lane keeps its own running sums, s * ((q - z) * x) per element,
            reduced once after the K loop; nibbles converted with I2F;
  magic     as acc, nibbles converted without I2F: (q | 0x4B000000) as float32 is 2**23 + q, so one integer
            LOP3 plus one float subtraction (of 2**23 + z, folding the zero point in) gives q - z exactly;
            the high nibble is kept in place (16q) and the activation it meets is pre-divided by 16 (exact);
  loadonly  the same loads, integer sums only: the ceiling of this access pattern.
Each over BLOCK_N rows x bytes per step x warps x pipeline stages, on 22016x4096 and 4096x4096, then the best
of each on a LLaVA-7B decoder's five shapes. Times: GPU time per call in a CUDA graph, L2 flushed before
each (backends/triton/matmul._time_us); GB/s counts packed weight + scales + zero points + activation."""
from __future__ import annotations

import argparse
import itertools
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
from mmaccel.backends.triton.matmul import _time_us  # noqa: E402
from mmaccel.ops.int4_linear import quantize_int4_groupwise  # noqa: E402

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
    return w, (p, s, z), p.numel() + s.numel() * 2 + z.numel() + K * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out("int4_gemv_variants.json"))
    parser.add_argument("--budget-s", type=float, default=300)
    args = parser.parse_args()
    started = time.time()
    results = {**environment("cuda"), "phase1": [], "best": []}
    modes = {"acc": 0, "magic": 1, "loadonly": 2}
    grid = list(itertools.product([4, 8, 16], [4, 8, 16], [2, 4], [1, 3]))  # block_n, steps, warps, stages

    def variants():
        for cfg in [(1, 4, 512, 2, 1), (1, 8, 512, 4, 1), (1, 4, 1024, 4, 1), (1, 16, 512, 4, 1)]:
            c = qm.QuantConfig(*cfg)
            yield "current", cfg, lambda x, p, s, z, c=c: qm.linear(x, p, s, z, bits=4, group=GROUP, config=c)
        for name, (bn, st, wp, sg) in itertools.product(modes, grid):
            if bn * st * GROUP // 2 > 16384:
                continue
            yield name, (bn, st, wp, sg), lambda x, p, s, z, m=modes[name], a=(bn, st, wp, sg): lanes(x, p, s, z, m, *a)

    def measure(name, cfg, fn, N, K, data):
        w, (p, s, z), nbytes = data
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        try:
            out = fn(x, p, s, z)
            err = None if name == "loadonly" else rel_err(out, x.float() @ w.float().T)
            us = min(_time_us(lambda: fn(x, p, s, z)) for _ in range(2))
        except Exception as e:
            return {"variant": name, "cfg": cfg, "N": N, "K": K, "error": f"{type(e).__name__}: {e}"[:300]}
        return {"variant": name, "cfg": cfg, "N": N, "K": K, "us": us, "gbps": gb_per_s(nbytes, us), "err_vs_bf16": err}

    data = {shape: weights(*shape) for shape in SHAPES}
    for (N, K) in SHAPES:  # the bf16 weight through cuBLAS, for scale
        w = data[(N, K)][0]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        us = _time_us(lambda: x @ w.T)
        results.setdefault("cublas_bf16", []).append({"N": N, "K": K, "us": us, "gbps": gb_per_s(N * K * 2, us)})
    for name, cfg, fn in variants():
        if time.time() - started > args.budget_s * 0.7:
            results["phase1"].append({"variant": name, "cfg": cfg, "skipped": "budget"})
            continue
        for N, K in PHASE1:
            results["phase1"].append(measure(name, cfg, fn, N, K, data[(N, K)]))
    print(f"{'variant':9} {'cfg':22} " + " ".join(f"{n}x{k:>5}" for n, k in PHASE1))
    best = {}
    for name in ["current", *modes]:
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
              + "  err " + " ".join(f"{r.get('err_vs_bf16') or 0:.3f}" for r in rows))
    print("cublas   " + " ".join(f"{r['us']:6.1f}/{r['gbps']:4.0f}" for r in results["cublas_bf16"]))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
