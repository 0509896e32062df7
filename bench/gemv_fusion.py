"""What riding along costs the decode GEMV (backends/triton/decode_fusion.py): each linear of a 7B decoder layer
(and the lm_head) at one activation row in bf16, the plain GEMV beside the GEMV with the fusion the Triton target
gives it (RMSNorm in front, SiLU(gate) * up, residual add), and the output error of the fused one against its
fp32 reference. One GPU run of under a minute:

    python bench/gemv_fusion.py [--out $OUT/gemv_fusion.json]

Times are GPU time per call inside a CUDA graph with the L2 flushed before each call (the method of the Triton
target's matmul autotuner, backends/triton/matmul.py). GB/s counts the weight bytes read once. The fused call
replaces the plain GEMV and one generated kernel of a few microseconds (bench/results/profile_decode_quant_h100.txt)
plus the launch gap between them; the "extra us" column is what the fusion adds to the GEMV.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmaccel  # noqa: E402,F401
from common import default_out, environment, gb_per_s, rel_err, write_json  # noqa: E402
from mmaccel.backends.triton.gemv import Fusion, fused_reference, gemv  # noqa: E402
from mmaccel.backends.triton.tuning import time_us  # noqa: E402

# (name, N weight rows, K, fusion): a LLaMA-2-7B layer's linears after parallel-linear fusion, and the lm_head
LINEARS = [("qkv", 12288, 4096, "norm"), ("o_proj", 4096, 4096, "residual"), ("gate_up", 22016, 4096, "norm+glu"),
           ("down", 4096, 11008, "residual"), ("lm_head", 32000, 4096, "norm")]


def fusion_for(kind: str, N: int, K: int) -> Fusion:
    width = N // 2 if "glu" in kind else N
    return Fusion(norm_weight=torch.randn(K, device="cuda", dtype=torch.bfloat16) if "norm" in kind else None,
                  eps=1e-5, glu="glu" in kind,
                  residual=torch.randn(1, width, device="cuda", dtype=torch.bfloat16) if "residual" in kind else None)


def measure(name: str, N: int, K: int, kind: str) -> dict:
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    fusion = fusion_for(kind, N, K)
    err = rel_err(gemv(x, w, None, fusion), fused_reference(x, w, None, fusion))
    plain = min(time_us(lambda: gemv(x, w)) for _ in range(3))
    fused = min(time_us(lambda: gemv(x, w, None, fusion)) for _ in range(3))
    nbytes = N * K * w.element_size()
    return {"linear": name, "N": N, "K": K, "fusion": kind, "plain_us": plain, "fused_us": fused,
            "plain_gbps": gb_per_s(nbytes, plain), "fused_gbps": gb_per_s(nbytes, fused), "rel_err": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_out("gemv_fusion.json"))
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    rows = [measure(*linear) for linear in LINEARS]
    print(f"{'linear':8} {'N x K':>12} {'fusion':>9} {'plain us':>9} {'fused us':>9} {'extra us':>9} "
          f"{'plain GB/s':>10} {'fused GB/s':>10} {'rel err':>8}")
    for r in rows:
        print(f"{r['linear']:8} {r['N']:>6}x{r['K']:<5} {r['fusion']:>9} {r['plain_us']:9.1f} {r['fused_us']:9.1f} "
              f"{r['fused_us'] - r['plain_us']:9.1f} {r['plain_gbps']:10.0f} {r['fused_gbps']:10.0f} {r['rel_err']:8.1e}")
    write_json(args.out, {"environment": environment("cuda"), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
