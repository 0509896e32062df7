"""Sweep of the weight-only quantized matmul kernels (backends/triton/quant_matmul.py) on a 7B decoder's shapes,
against the bf16 GEMV and cuBLAS bf16 and a copy of the quantized weight. One GPU run of a few minutes:

    python bench/quant_gemv_sweep.py [--out $OUT/quant_gemv_sweep.json] [--budget-s 400]

Decode (M = 1): every GEMV config (BLOCK_N weight rows x BLOCK_K weight bytes per step, warps) for int8 and
int4 (group 128) on two shapes, then the best few on all five shapes and the other group sizes.
Prefill (M = 640) and decode batch 8 (M = 8): a few tiled GEMM configs against cuBLAS bf16.
Times are GPU time per call inside a CUDA graph with the L2 flushed before each call (the method the Triton
target's matmul autotuner uses, backends/triton/matmul.py). GB/s counts the bytes a call must read
(quantized weight + scales + activation); "vs copy" divides by a copy's read+write bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmaccel  # noqa: E402,F401
from common import default_out, environment, gb_per_s, rel_err, write_json  # noqa: E402
from mmaccel.backends.triton import quant_matmul as qm  # noqa: E402
from mmaccel.backends.triton import gemv as gemv_kernel  # noqa: E402
from mmaccel.backends.triton.tuning import time_us  # noqa: E402
from mmaccel.ops.int4_linear import quantize_int4_groupwise  # noqa: E402
from mmaccel.ops.int8_linear import quantize_per_channel  # noqa: E402

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]
PHASE1 = [(22016, 4096), (4096, 4096)]


def weights(N, K, bits, group=128):
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    if bits == 8:
        q, s = quantize_per_channel(w)
        return w, (q, s, None), q.numel() + s.numel() * 2
    p, s, z = quantize_int4_groupwise(w, group)
    return w, (p, s, z), p.numel() + s.numel() * 2 + z.numel()


def timed(fn):
    return min(time_us(fn) for _ in range(2))


def gemv_configs(bits):
    out = []
    for bn, bk, warps in itertools.product([1, 2, 4, 8, 16, 32], [64, 128, 256, 512, 1024, 2048], [2, 4, 8]):
        if bn * bk > 16384 or bn * bk < 256 or (bits == 4 and bk > 1024) or (bits == 8 and bk < 256):
            continue
        out.append(qm.QuantConfig(1, bn, bk, warps, 1))
    return out


def matmul_configs():
    return [qm.QuantConfig(bm, bn, bk, w, s) for bm, bn, bk, w, s in [
        (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4),
        (128, 128, 128, 8, 3), (64, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 4)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out("quant_gemv_sweep.json"))
    parser.add_argument("--budget-s", type=float, default=400)
    args = parser.parse_args()
    start = time.time()
    results = {**environment("cuda"), "gemv": [], "best": [], "matmul": [], "reference": []}

    def over():
        return time.time() - start > args.budget_s

    # references: bf16 GEMV, cuBLAS, copy of the bf16 weight
    for N, K in SHAPES:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        copy = torch.empty_like(w)
        row = {"N": N, "K": K, "bf16_gemv_us": timed(lambda: gemv_kernel.gemv(x, w)),
               "cublas_us": timed(lambda: x @ w.T), "copy_bf16_us": timed(lambda: copy.copy_(w))}
        row["copy_gbps"] = gb_per_s(2 * N * K * 2, row["copy_bf16_us"])
        results["reference"].append(row)
        print(row, flush=True)

    # phase 1: every config on two shapes
    for bits in (8, 4):
        for N, K in PHASE1:
            w, (q, s, z), nbytes = weights(N, K, bits)
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ w.float().T)
            for cfg in gemv_configs(bits):
                if over():
                    break
                try:
                    out = qm.linear(x, q, s, z, bits=bits, group=128, config=cfg)
                    err = rel_err(out, ref)
                    us = timed(lambda: qm.linear(x, q, s, z, bits=bits, group=128, config=cfg))
                except Exception as e:  # a config that does not compile is a data point, not a crash
                    results["gemv"].append({"bits": bits, "N": N, "K": K, "cfg": cfg._asdict(), "error": str(e)[:200]})
                    continue
                results["gemv"].append({"bits": bits, "N": N, "K": K, "cfg": cfg._asdict(), "us": us,
                                        "gbps": gb_per_s(nbytes + K * 2, us), "rel_err": err})
    # phase 2: best 4 configs (by summed time over phase-1 shapes) on all shapes and group sizes
    for bits in (8, 4):
        by_cfg = {}
        for r in results["gemv"]:
            if r["bits"] == bits and "us" in r:
                by_cfg.setdefault(tuple(r["cfg"].values()), []).append(r["us"])
        ranked = sorted((sum(v), k) for k, v in by_cfg.items() if len(v) == len(PHASE1))[:4]
        for _, key in ranked:
            cfg = qm.QuantConfig(*key)
            for (N, K), group in itertools.product(SHAPES, [128] if bits == 8 else [32, 64, 128]):
                if over():
                    break
                w, (q, s, z), nbytes = weights(N, K, bits, group)
                x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
                us = timed(lambda: qm.linear(x, q, s, z, bits=bits, group=group, config=cfg))
                copy = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
                src = torch.empty_like(copy)
                copy_us = timed(lambda: copy.copy_(src))
                results["best"].append({"bits": bits, "group": group, "N": N, "K": K, "cfg": cfg._asdict(), "us": us,
                                        "gbps": gb_per_s(nbytes + K * 2, us), "copy_us": copy_us,
                                        "vs_copy": (nbytes + K * 2) / us / (2 * nbytes / copy_us)})
                print(results["best"][-1], flush=True)
    # tiled GEMM: prefill (640 rows) and decode batch 8, against cuBLAS bf16
    for M, bits, (N, K) in itertools.product([8, 640], [8, 4], [(12288, 4096), (4096, 11008)]):
        w, (q, s, z), _ = weights(N, K, bits)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        cublas = timed(lambda: x @ w.T)
        dequant = timed(lambda: x @ (q.to(x.dtype) * s[:, None]).T) if bits == 8 else None
        for cfg in matmul_configs():
            if over():
                break
            try:
                us = timed(lambda: qm.linear(x, q, s, z, bits=bits, group=128, config=cfg))
            except Exception as e:
                results["matmul"].append({"M": M, "bits": bits, "N": N, "K": K, "cfg": cfg._asdict(), "error": str(e)[:200]})
                continue
            results["matmul"].append({"M": M, "bits": bits, "N": N, "K": K, "cfg": cfg._asdict(), "us": us,
                                      "cublas_bf16_us": cublas, "dequant_then_cublas_us": dequant})
        best = min((r for r in results["matmul"] if r.get("M") == M and r["bits"] == bits and r["N"] == N and "us" in r),
                   key=lambda r: r["us"], default=None)
        print("matmul", M, bits, N, K, "cublas", round(cublas, 1), "best", best and (round(best["us"], 1), best["cfg"]), flush=True)
    write_json(args.out, results, indent=1)
    # short table: best phase-1 config per bits
    for bits in (8, 4):
        rows = sorted((r for r in results["gemv"] if r["bits"] == bits and "us" in r and r["N"] == 22016),
                      key=lambda r: r["us"])[:5]
        for r in rows:
            print(f"int{bits} 22016x4096 {r['cfg']} {r['us']:.1f} us {r['gbps']:.0f} GB/s err {r['rel_err']:.3f}")
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
