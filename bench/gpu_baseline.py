"""GPU baseline: eager vs Inductor (default, reduce-overhead) vs mmaccel on the 7B-dims decode step and the
ViT-L/14@336 encoder, bf16, one run. Checks mmaccel's outputs against eager.

    python bench/gpu_baseline.py --layers 16 --out bench/results/gpu_baseline.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import mmaccel
from mmaccel.models import Decoder, DecoderConfig, ViT, ViTConfig


def time_ms(fn, warmup: int = 5, iters: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_case(name, model, inputs, rows):
    with torch.no_grad():
        ref = model(*inputs).clone()
        variants = {
            "eager": model,
            "inductor": torch.compile(model),
            "inductor_cudagraphs": torch.compile(model, mode="reduce-overhead"),
            "mmaccel": torch.compile(model, backend="mmaccel"),
        }
        for label, fn in variants.items():
            start = time.perf_counter()
            out = fn(*inputs).clone()
            compile_s = time.perf_counter() - start
            ms = time_ms(lambda: fn(*inputs))
            rows.append({"case": name, "variant": label, "median_ms": ms, "first_call_s": compile_s,
                         "rel_err_vs_eager": rel_err(out, ref)})
            print(f"{name:24} {label:22} {ms:9.3f} ms  first call {compile_s:6.1f}s  rel err {rows[-1]['rel_err_vs_eager']:.2e}",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--out", default="gpu_baseline.json")
    p.add_argument("--skip-vit", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    rows: list[dict] = []
    dev = torch.device("cuda")
    with dev:
        dec = Decoder(DecoderConfig.llama_7b(layers=args.layers))
    dec = dec.to(torch.bfloat16).eval().requires_grad_(False)
    dec.setup_cache(1, dtype=torch.bfloat16, device=dev)
    token, pos = torch.randint(0, 32000, (1, 1), device=dev), torch.tensor([1000], device=dev)
    run_case(f"decode 7B-dims L{args.layers} b1", dec, (token, pos), rows)
    del dec
    torch.cuda.empty_cache()
    if not args.skip_vit:
        with dev:
            vit = ViT(ViTConfig.vit_l14_336())
        vit = vit.to(torch.bfloat16).eval().requires_grad_(False)
        pixels = torch.randn(8, 3, 336, 336, device=dev, dtype=torch.bfloat16)
        run_case("ViT-L/14@336 b8", vit, (pixels,), rows)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "mmaccel": mmaccel.__version__, "mmaccel_target": "eager (auto on cuda until the Triton target lands)"}
    with open(args.out, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
