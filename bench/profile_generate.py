"""Where the time of one `mmaccel.generate` call goes (GPU): wall time against GPU kernel time, CUDA-graph
launches against plain kernel launches, and the kernels that take the most time. A decode that runs from CUDA
graphs shows one graph launch per step and kernel time close to wall time; a host-bound one shows many launches
and a wall time well above its kernel time.

    python bench/profile_generate.py --model whisper --layers 8 --new-tokens 64    # Whisper large-v3 dims
    python bench/profile_generate.py --model llava --layers 8
    python bench/profile_generate.py --model llama --tiny                          # CPU smoke test of the script

Same models and inputs as bench/hf_generate.py (random weights, bf16 on CUDA). Two warm-up calls (compile,
CUDA-graph recording), then one profiled call. JSON under $OUT (or bench/results/) when --out is given.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import mmaccel
from mmaccel.timing import times_ms
from common import environment, write_json
from hf_generate import build, variant_runner  # the same models, inputs and recipe as the generation benchmark

GRAPH_LAUNCH = "cudaGraphLaunch"
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("llava", "llama", "whisper"), default="whisper")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU: checks the script runs")
    p.add_argument("--step", action="store_true", help="also list one decode step's kernels in launch order (the "
                   "ones between the last two argmax kernels); with MMACCEL_PDL=0 their times are their own, with "
                   "PDL each includes its wait for the kernel before")
    p.add_argument("--host", action="store_true", help="also profile the host side of the first token alone "
                   "(max_new_tokens=1, warm): its median wall ms over 10 calls, and the Python functions where those "
                   "calls spend their time (cProfile, cumulative)")
    p.add_argument("--recipe", action="store_true", help="profile Hugging Face's compiled recipe instead of "
                   "mmaccel.generate: model.forward = torch.compile(model.forward, backend='mmaccel'), then "
                   "generate(cache_implementation='static') (bench/hf_generate.py's 'mmaccel (HF recipe)'); --host "
                   "then profiles whole calls, since that recipe's host work is per token")
    p.add_argument("--variants", default="", help="comma list of bench/hf_generate.py variants to profile one after "
                   "another on the same model (for example mmaccel.generate,mmaccel.generate@keep50); overrides --recipe")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, inputs, what = build(args.model, args.tiny, device, dtype, args.layers)
    new = min(args.new_tokens, 8) if args.tiny else args.new_tokens

    variants = args.variants.split(",") if args.variants else ["mmaccel (HF recipe)" if args.recipe else "mmaccel.generate"]
    rows = []
    for variant in variants:
        rows.append(profile_variant(variant, model, inputs, what, new, device, args))
    if args.out:
        write_json(args.out, {"environment": environment(device, layers=args.layers), "rows": rows})
        print(f"wrote {args.out}")


def profile_variant(variant: str, model: torch.nn.Module, inputs: dict, what: str, new: int, device: str,
                    args: argparse.Namespace) -> dict:
    """One variant: two warm-up calls, then one profiled call of `new` tokens (see the module docstring)."""
    generate = variant_runner(variant, model, inputs)
    recipe = "recipe" in variant

    def call() -> torch.Tensor:
        return generate(new)

    for _ in range(2):
        call()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000
    events = prof.key_averages()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    count = {e.key: e.count for e in events if e.device_type == torch.autograd.DeviceType.CPU}
    row = {
        "model": args.model, "loop": variant, "prompt": what,
        "new_tokens": new, "wall_ms": round(wall_ms, 2),
        "kernel_ms": round(sum(e.self_device_time_total for e in gpu) / 1000, 2),
        "kernels": sum(e.count for e in gpu),
        "graph_launches": count.get(GRAPH_LAUNCH, 0),
        "kernel_launches": sum(count.get(k, 0) for k in KERNEL_LAUNCHES),
        "top_kernels": [(e.key[:90], e.count, round(e.self_device_time_total / 1000, 3))
                        for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:args.rows]],
    }
    print(f"{args.model} ({what}), {variant}, {new} new tokens: wall {row['wall_ms']} ms ({wall_ms / new:.3f} "
          f"ms/token), GPU kernel time {row['kernel_ms']} ms, {row['kernels']} kernels; {row['graph_launches']} "
          f"CUDA-graph launches, {row['kernel_launches']} kernel launches from the host")
    for key, n, ms in row["top_kernels"]:
        print(f"  {ms:9.3f} ms {n:6d}x  {key}")
    if args.step:
        row["step"] = decode_step(prof)
        print(f"one decode step: {len(row['step'])} kernels, {sum(us for _, us in row['step']):.1f} us of kernel time")
        for key, us in row["step"]:
            print(f"  {us:8.2f} us  {key}")
    if args.host:
        # mmaccel.generate: the first token alone, whose host work comes before the GPU's; the recipe: whole calls
        row["host"] = host_profile(generate, new if recipe else 1, device, args.rows * 3)
    return row


def host_profile(generate, new: int, device: str, rows: int) -> dict:
    """generate(new), warm: median wall ms (synchronized) and cProfile's top functions by cumulative time."""
    import cProfile
    import io
    import pstats
    import statistics

    def one_call() -> None:
        generate(new)
        if device == "cuda":
            torch.cuda.synchronize()

    walls = times_ms(one_call, 10, warmup=3)  # wall clock (no device given): one_call() waits for the GPU itself
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        one_call()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(rows)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    print(f"{new} new token(s): median {statistics.median(walls):.2f} ms wall over 10 calls; cProfile of 10 calls:")
    print("\n".join(lines))
    return {"new_tokens": new, "wall_ms": round(statistics.median(walls), 3), "cprofile_10_calls": lines}


def decode_step(prof) -> list[tuple[str, float]]:
    """(kernel, us) of the GPU kernels between the last two argmax kernels, in start order."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    ends = [i for i, e in enumerate(kernels) if "ArgMax" in e.name or "_argmax_rows_kernel" in e.name]
    if len(ends) < 2:
        return []
    return [(e.name[:80], round(e.time_range.elapsed_us(), 2)) for e in kernels[ends[-2] + 1:ends[-1] + 1]]


if __name__ == "__main__":
    main()
