"""Runs the int4 GEMV variants of bench/int4_gemv_variants.py once each on one shape, for a profiler:

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
        python bench/int4_gemv_profile.py [--shape 22016 4096]

(ncu from the CUDA toolkit; every kernel launch is profiled: the weight setup runs first, then one launch of
each variant in the order printed.)"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import int4_gemv_variants as V  # noqa: E402
from mmaccel.backends.triton import quant_matmul as qm  # noqa: E402

VARIANTS = {
    "current": lambda x, p, s, z, w32: qm.linear(x, p, s, z, bits=4, group=V.GROUP,
                                                  config=qm.QuantConfig(1, 4, 512, 2, 1)),
    "loadonly": lambda x, p, s, z, w32: V.lanes(x, p, s, z, 2, 4, 8, 4, 1),
    "words": lambda x, p, s, z, w32: V.words(x, w32, s, z, 16, 8, 4),
    "words_8_8_4": lambda x, p, s, z, w32: V.words(x, w32, s, z, 8, 8, 4),
    "words_t_16_4_1": lambda x, p, s, z, w32: V.words_t(x, w32, s, z, 16, 4, 1),
    "words_t_32_4_2": lambda x, p, s, z, w32: V.words_t(x, w32, s, z, 32, 4, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[22016, 4096])
    args = parser.parse_args()
    N, K = args.shape
    w, (p, s, z), _, _ = V.weights(N, K)
    w32 = V.pack_words(p, V.GROUP)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    for name, fn in VARIANTS.items():
        fn(x, p, s, z, w32)  # compile outside the profiled launch order below
    torch.cuda.synchronize()
    for name, fn in VARIANTS.items():
        print("variant", name, flush=True)
        fn(x, p, s, z, w32)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
