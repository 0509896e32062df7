"""CPU benchmark (one run): eager, Inductor, plain torch.onnx.export + ONNX Runtime, and mmaccel's ONNX +
ONNX Runtime, on a ViT-B/16 encoder (224, batch 1, fp32) and the VLM decode step.

    python bench/cpu_onnxruntime.py [--out bench/results/cpu_onnxruntime.json] [--repeats 30]
    python bench/cpu_onnxruntime.py --quick --out /tmp/cpu_onnxruntime.json    # tiny ViT, 3 repeats: a smoke test
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from typing import Callable

import onnxruntime as ort
import torch

import mmaccel
from common import default_out, environment, rel_err, write_json
from mmaccel.models import build
from mmaccel.timing import median_ms


def ort_session(model: str | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with every graph optimization on; `threads` intra-op threads (ONNX Runtime's default
    when None). Shared by the CPU benchmarks."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def bench_vit(repeats: int, rows: list[dict], tmp: str, size: str) -> None:
    torch.manual_seed(0)
    model, (pixels,) = build("vit", size=size, batch=1)  # real: ViT-B/16, 224
    name = "ViT-B/16 224 b1 fp32" if size == "real" else "ViT tiny b1 fp32"
    with torch.no_grad():
        ref = model(pixels)

        def add(variant: str, fn: Callable[[], torch.Tensor], setup_s: float) -> None:
            out = fn()
            rows.append({"case": name, "variant": variant, "median_ms": median_ms(fn, repeats),
                         "setup_s": setup_s, "rel_err_vs_eager": rel_err(out, ref)})
            print(f"{name:24} {variant:28} {rows[-1]['median_ms']:9.2f} ms  rel err {rows[-1]['rel_err_vs_eager']:.1e}",
                  flush=True)

        add("eager", lambda: model(pixels), 0.0)
        start = time.perf_counter()
        inductor = torch.compile(model)
        inductor(pixels)
        add("inductor", lambda: inductor(pixels), time.perf_counter() - start)

        plain_path = os.path.join(tmp, "plain.onnx")
        start = time.perf_counter()
        torch.onnx.export(model, (pixels,), plain_path, dynamo=True, opset_version=18, verbose=False)
        plain = ort_session(plain_path)
        feed = {plain.get_inputs()[0].name: pixels.numpy()}
        add("torch.onnx.export + ORT", lambda: torch.from_numpy(plain.run(None, feed)[0]),
            time.perf_counter() - start)

        mm_path = os.path.join(tmp, "mmaccel.onnx")
        start = time.perf_counter()
        mmaccel.export_onnx(model, (pixels,), mm_path)
        ours = ort_session(mm_path)
        feed = {ours.get_inputs()[0].name: pixels.numpy()}
        add("mmaccel.export_onnx + ORT", lambda: torch.from_numpy(ours.run(None, feed)[0]),
            time.perf_counter() - start)

        start = time.perf_counter()
        compiled = torch.compile(model, backend="mmaccel")  # auto on CPU: onnxruntime target
        compiled(pixels)
        add("torch.compile mmaccel (auto)", lambda: compiled(pixels), time.perf_counter() - start)


def bench_decode(repeats: int, rows: list[dict]) -> None:
    torch.manual_seed(0)
    model, inputs = build("vlm_decode", size="tiny", batch=1, seq=20)
    name = "tiny VLM decode step"
    eager_model = copy.deepcopy(model)
    with torch.no_grad():
        ref = eager_model(*inputs)
        variants = {"eager": eager_model, "inductor": torch.compile(copy.deepcopy(model)),
                    "mmaccel (auto: eager target)": torch.compile(copy.deepcopy(model), backend="mmaccel"),
                    "mmaccel target=onnxruntime": torch.compile(copy.deepcopy(model), backend="mmaccel",
                                                                 options={"target": "onnxruntime"})}
        for variant, fn in variants.items():
            start = time.perf_counter()
            out = fn(*inputs)
            setup = time.perf_counter() - start
            rows.append({"case": name, "variant": variant, "median_ms": median_ms(lambda: fn(*inputs), repeats),
                         "setup_s": setup, "rel_err_vs_eager": rel_err(out, ref)})
            print(f"{name:24} {variant:28} {rows[-1]['median_ms']:9.3f} ms  rel err {rows[-1]['rel_err_vs_eager']:.1e}",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out("cpu_onnxruntime.json"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="the tiny ViT and 3 repeats (checks the script)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        bench_vit(repeats, rows, tmp, "tiny" if args.quick else "real")
    bench_decode(repeats, rows)
    write_json(args.out, {"environment": environment("cpu", cpu_threads=torch.get_num_threads(), repeats=repeats),
                          "results": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
