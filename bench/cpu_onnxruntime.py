"""CPU benchmark (one run): eager, Inductor, plain torch.onnx.export + ONNX Runtime, and mmaccel's ONNX +
ONNX Runtime, on a ViT-B/16 encoder (224, batch 1, fp32) and the VLM decode step.

    python bench/cpu_onnxruntime.py [--out bench/results/cpu_onnxruntime.json] [--repeats 30]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

import mmaccel
from mmaccel.timing import median_ms
from mmaccel.models import build


def ort_session(model: str | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with every graph optimization on; `threads` intra-op threads (ONNX Runtime's default
    when None). Shared by the CPU benchmarks."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def write_results(path: str, environment: dict, rows: list[dict]) -> None:
    """{"environment": ..., "results": ...} as JSON at `path`, folders made as needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment, "results": rows}, f, indent=2)
    print(f"\nwrote {path}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_vit(repeats: int, rows: list[dict], tmp: str) -> None:
    torch.manual_seed(0)
    model, (pixels,) = build("vit", size="real", batch=1)  # ViT-B/16, 224
    name = "ViT-B/16 224 b1 fp32"
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/cpu_onnxruntime.json")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        bench_vit(args.repeats, rows, tmp)
    bench_decode(args.repeats, rows)
    env = {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": ort.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "mmaccel": mmaccel.__version__,
           "numpy": np.__version__}
    write_results(args.out, env, rows)


if __name__ == "__main__":
    main()
