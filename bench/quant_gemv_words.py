"""Weight-only GEMV at the memory floor (issue 17 item 2): the word kernel (quant_matmul._wq_words_kernel, the op's
packed weight read as int32 words) against the byte kernels it replaces, torch's tinygemm int4 kernel
(aten._weight_int4pack_mm, what torchao's int4 weight-only runs) and cuBLAS on the bf16 weight, on a 7B
decoder's shapes, 1 and 8 activation rows. One GPU run of a few minutes:

    python bench/quant_gemv_words.py --out $OUT/quant_gemv_words.json [--budget-s 420]

Part 1 (table): per shape, rows and scheme: us per call (CUDA graph, L2 flushed: backends/triton/matmul.py's
_time_us), GB/s of weight bytes read (quantized weight + scales + zero points; bf16 for cuBLAS) and that over
the copy bandwidth of the same bytes (read + write, torch copy_), and each result's relative error against the
op's reference in bf16 (int4_linear_reference / int8_linear_reference) and against the unquantized weight.
Part 2: candidate word-kernel configs per (bits, rows) on two shapes; prints the WORDS_CONFIGS table it would
choose.
"""
from __future__ import annotations

import functools
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmaccel  # noqa: E402,F401
from common import environment, gb_per_s, rel_err, write_json  # noqa: E402
from quant_gemv_sweep import SHAPES, budget_args, timed, weights  # noqa: E402
from mmaccel.backends.triton import quant_matmul as qm  # noqa: E402
from mmaccel.ops.int4_linear import int4_linear_reference, unpack_int4  # noqa: E402
from mmaccel.ops.int8_linear import int8_linear_reference  # noqa: E402

GROUP = 128
SWEEP_SHAPES = [(4096, 4096), (22016, 4096)]


def tinygemm(packed, scale, zero):
    """torch's int4 kernel on our quantized values: tinygemm dequantizes (q - 8) * s + m, so m = (8 - z) * s
    gives our (q - z) * s. Raises where this torch has no CUDA tinygemm."""
    q = unpack_int4(packed, GROUP).to(torch.int32)
    try:
        w_uint8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        w_tiny = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)  # inner_k_tiles=8, torchao's default
    except (RuntimeError, TypeError):
        w_tiny = torch.ops.aten._convert_weight_to_int4pack(q, 8)  # torch < 2.5 took int32 values
    s = scale.to(torch.bfloat16)
    m = (8 - zero.to(torch.bfloat16)) * s
    scales_and_zeros = torch.stack([s, m], dim=2).transpose(0, 1).contiguous()  # [K / GROUP, N, 2]
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, w_tiny, GROUP, scales_and_zeros)


def variants(bits, w, q, s, z):
    """name -> (fn(x), weight bytes it reads) for one weight."""
    qbytes = q.numel() + s.numel() * 2 + (z.numel() if z is not None else 0)

    def byte_kernel(x):  # the kernels linear() ran before the word kernel: the GEMV, the tiled GEMM past 1 row
        config = qm.GEMV_CONFIGS[bits] if x.shape[0] == 1 else qm.MATMUL_CONFIG
        return qm.linear(x, q, s, z, bits=bits, group=GROUP, config=config)

    out = {"byte_kernel": (byte_kernel, qbytes),
           "word_kernel": (lambda x: qm.linear(x, q, s, z, bits=bits, group=GROUP), qbytes),
           "cublas_bf16": (lambda x: x @ w.T, w.numel() * 2)}
    if bits == 4:
        try:
            out["tinygemm_int4"] = (tinygemm(q, s, z), qbytes)
        except Exception as e:  # noqa: BLE001 - a torch without it is a data point
            print("tinygemm unavailable:", str(e)[:200], flush=True)
    return out


def reference(bits, x, q, s, z):
    if bits == 8:
        return int8_linear_reference(x, q, s, None, "none", None)
    return int4_linear_reference(x, q, s, z, GROUP, None, "none", None)


@functools.lru_cache(maxsize=None)
def copy_gbps(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return gb_per_s(2 * nbytes, timed(lambda: dst.copy_(src)))


def table(results, over):
    for (N, K), bits in itertools.product(SHAPES, (4, 8)):
        torch.manual_seed(0)
        w, (q, s, z), _ = weights(N, K, bits, GROUP)
        for M, (name, (fn, nbytes)) in itertools.product((1, 8), variants(bits, w, q, s, z).items()):
            if over():
                return
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            out = fn(x)
            us = timed(lambda: fn(x))
            row = {"bits": bits, "N": N, "K": K, "M": M, "variant": name, "us": us, "gbps": gb_per_s(nbytes, us),
                   "vs_copy": gb_per_s(nbytes, us) / copy_gbps(nbytes),
                   "err_vs_op_reference": rel_err(out, reference(bits, x, q, s, z)),
                   "err_vs_unquantized": rel_err(out, x.float() @ w.float().T)}
            results["table"].append(row)
            print(f"int{bits} {N:5}x{K:<5} M={M} {name:14} {us:8.1f} us {row['gbps']:6.0f} GB/s "
                  f"{row['vs_copy']:5.2f} of copy  err vs op {row['err_vs_op_reference']:.1e} "
                  f"vs bf16 weight {row['err_vs_unquantized']:.1e}", flush=True)


def candidates(m):
    return [qm.WordsConfig(m, bn, words, warps, 1) for bn, words, warps in
            [(4, 128, 4), (8, 32, 2), (8, 64, 2), (8, 128, 4), (16, 32, 1), (16, 32, 4), (16, 64, 2), (16, 64, 4),
             (16, 128, 4), (32, 64, 4), (32, 128, 8)]
            if m * bn * words <= 2048 * warps]  # partial sums in registers, as the default configs


def sweep(results, over):
    best = {}
    for bits, m in itertools.product((4, 8), (1, 2, 4, 8)):
        totals = {}
        for N, K in SWEEP_SHAPES:
            torch.manual_seed(0)
            _, (q, s, z), _ = weights(N, K, bits, GROUP)
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            for cfg in candidates(m):
                if over():
                    return best
                us = timed(lambda: qm.linear(x, q, s, z, bits=bits, group=GROUP, config=cfg))
                results["sweep"].append({"bits": bits, "M": m, "N": N, "K": K, "cfg": cfg._asdict(), "us": us})
                totals[cfg] = totals.get(cfg, 0.0) + us
        best[(bits, m)] = min(totals, key=totals.get)
        print(f"int{bits} M={m}: best {best[(bits, m)]} ({totals[best[(bits, m)]]:.1f} us summed), default "
              f"{qm.WORDS_CONFIGS[(bits, m)]} ({totals.get(qm.WORDS_CONFIGS[(bits, m)], float('nan')):.1f} us)",
              flush=True)
    return best


def main() -> None:
    args = budget_args(__doc__, "quant_gemv_words.json", 420)
    start = time.time()
    results = {**environment("cuda"), "table": [], "sweep": []}

    def over():
        return time.time() - start > args.budget_s

    table(results, over)
    write_json(args.out, results, indent=1)
    best = sweep(results, over)
    results["chosen"] = {f"int{b} M={m}": cfg._asdict() for (b, m), cfg in best.items()}
    write_json(args.out, results, indent=1)
    print("WORDS_CONFIGS = {" + ", ".join(f"({b}, {m}): WordsConfig{tuple(cfg)}" for (b, m), cfg in best.items())
          + "}")
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
