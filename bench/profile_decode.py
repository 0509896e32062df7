"""Where a decode step's GPU time goes: kernel-level profile of one 7B-dims decode step (bf16), for mmaccel's
Triton target (without CUDA graphs, so kernels are visible), the same with the decode GEMV fusions off
(MMACCEL_GEMV_FUSION=0, backends/triton/decode_fusion.py) and Inductor; with --quantize, mmaccel with that
quantization scheme (every layer at the scheme's cheapest precision) beside bf16 mmaccel.

    python bench/profile_decode.py --layers 16 --batch 1 [--quantize int8_weight_only,fp8]
"""
from __future__ import annotations

import argparse
import os
from unittest.mock import patch

import torch
from torch.profiler import ProfilerActivity, profile

import mmaccel  # noqa: F401  (registers backend="mmaccel" in a source checkout)
from gpu_triton import build_case  # same model, cache position and inputs as the benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, choices=(1, 8))
    p.add_argument("--rows", type=int, default=14)
    p.add_argument("--quantize", default="", help="comma list of quantize schemes to profile instead of Inductor")
    args = p.parse_args()
    case = build_case("decode_b1" if args.batch == 1 else "decode_b8", layers=args.layers)
    model, inputs = case.model, case.inputs
    plain = {"target": "triton", "cuda_graphs": False}
    variants = {"mmaccel": dict(backend="mmaccel", options=plain)}
    if args.quantize:  # random weights: a loose budget puts every layer at the scheme's cheapest precision
        variants.update({f"mmaccel {scheme}": dict(backend="mmaccel", options={
            **plain, "quantize": scheme, "accuracy_budget": 0.5}) for scheme in args.quantize.split(",")})
    else:
        variants["mmaccel, GEMV fusions off"] = dict(backend="mmaccel", options=plain)
        variants["inductor"] = dict()
    for label, kwargs in variants.items():
        torch._dynamo.reset()
        fn = torch.compile(model, **kwargs)
        # the Triton target reads the switch when it compiles, on the first call
        with torch.no_grad(), patch.dict(os.environ, {"MMACCEL_GEMV_FUSION": "0" if "fusions off" in label else "1"}):
            for _ in range(3):
                fn(*inputs)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn(*inputs)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in events) / 3
        kernels = sum(e.count for e in events) / 3
        print(f"\n== {label}: {total / 1000:.3f} ms of kernel time per step, {kernels:.0f} kernels per step")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.rows]:
            print(f"{e.self_device_time_total / 3 / 1000:8.3f} ms {e.count // 3:5d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
