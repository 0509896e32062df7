"""CPU quantization benchmark on ViT-B/16 (224, fp32 weights) with ONNX Runtime: the plain fp32 export, ONNX
Runtime's own dynamic int8 quantization of that file (default settings, QInt8 weights), and mmaccel's quantized
exports: accuracy_budget 0.05 (so that no variant rolls back: every linear at the cheapest precision), and
W8A8 with a budget under that error (0.008), where the solver measures each layer and keeps the sensitive
ones at per-token activation ranges or in fp32. Latency is the median of `--repeats` runs after
warm-up (ORT CPU provider, graph optimizations on, `--threads` intra-op threads); the variants are timed in
interleaved rounds so that load on a shared machine falls on all of them alike (the minimum is printed too).
Error is ||out - ref|| / ||ref|| against the fp32 PyTorch model; "pass err" is what mmaccel's pass promised.

    python bench/cpu_quantize.py [--batch 1] [--repeats 30] [--threads 2] [--out bench/results/cpu_quantize.json]
    python bench/cpu_quantize.py --quick --out /tmp/cpu_quantize.json    # tiny ViT, 3 repeats: a smoke test
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

import mmaccel
from common import default_out, environment, rel_err, write_json  # bench/ is on sys.path when a script here runs
from cpu_onnxruntime import ort_session
from mmaccel.models import build
from mmaccel.timing import interleaved_times_ms

def file_mb(path: str) -> float:
    folder, name = os.path.split(path)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith(name)) / 2**20


def op_counts(path: str) -> dict[str, int]:
    """Node types of the file as written (before ONNX Runtime's own fusions), the int8 ones only."""
    counts = collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
    return {k: v for k, v in sorted(counts.items())
            if k in ("DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear", "QuantizeLinear", "MatMul")}


def export_variants(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tmp: str) -> dict[str, dict]:
    """name -> {path, setup_s, pass_measured_error (mmaccel's quantized exports)}."""
    variants: dict[str, dict] = {}

    def timed(name: str, make: Callable[[str], object]) -> None:
        path = os.path.join(tmp, name.replace(" ", "_").replace("/", "_") + ".onnx")
        start = time.perf_counter()
        result = make(path)
        variants[name] = {"path": path, "setup_s": time.perf_counter() - start}
        graph = getattr(result, "graphs", None)
        if graph:
            quantize = [p for p in graph[0].passes if p.name == "quantize"]
            if quantize:
                variants[name]["pass_measured_error"] = quantize[0].measured_error

    timed("fp32 torch.onnx.export", lambda p: torch.onnx.export(model, inputs, p, dynamo=True, opset_version=18,
                                                                  verbose=False))
    plain = variants["fp32 torch.onnx.export"]["path"]
    timed("ORT quantize_dynamic QInt8", lambda p: quantize_dynamic(plain, p, weight_type=QuantType.QInt8))
    timed("mmaccel fp32", lambda p: mmaccel.export_onnx(model, inputs, p))
    timed("mmaccel int8_weight_only", lambda p: mmaccel.export_onnx(model, inputs, p, quantize="int8_weight_only",
                                                                    accuracy_budget=0.05))
    timed("mmaccel w8a8_dynamic", lambda p: mmaccel.export_onnx(model, inputs, p, quantize="w8a8_dynamic",
                                                                accuracy_budget=0.05))
    timed("mmaccel w8a8_dynamic b=0.008", lambda p: mmaccel.export_onnx(model, inputs, p, quantize="w8a8_dynamic",
                                                                       accuracy_budget=0.008))
    return variants


def bench(batch: int, repeats: int, threads: int, size: str = "real") -> list[dict]:
    torch.manual_seed(0)
    model, inputs = build("vit", size=size, batch=batch)  # real: ViTConfig.vit_b16, 224 px, patch 16, 12 layers
    case = f"ViT-B/16 224 b{batch}" if size == "real" else f"ViT tiny b{batch}"
    with torch.no_grad():
        ref = model(*inputs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = export_variants(model, inputs, tmp)
        runs: dict[str, Callable[[], np.ndarray]] = {}
        for name, v in variants.items():
            session = ort_session(v["path"], threads)
            feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
            runs[name] = lambda session=session, feed=feed: session.run(None, feed)[0]
            out = torch.from_numpy(runs[name]())
            rows.append({"case": case, "variant": name, "rel_err_vs_fp32_torch": rel_err(out, ref),
                         "file_mb": file_mb(v["path"]), "setup_s": v["setup_s"], "int8_ops": op_counts(v["path"]),
                         **({"pass_measured_error": v["pass_measured_error"]} if "pass_measured_error" in v else {})})
        times = interleaved_times_ms(runs, repeats)
    for row in rows:
        if row["variant"] in times:
            row["median_ms"] = statistics.median(times[row["variant"]])
            row["min_ms"] = min(times[row["variant"]])
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'case':18} {'variant':28} {'median ms':>10} {'min ms':>8} {'rel err':>9} {'pass err':>9} {'file MB':>8}")
    for r in rows:
        measured = f"{r['pass_measured_error']:9.2e}" if "pass_measured_error" in r else f"{'':9}"
        print(f"{r['case']:18} {r['variant']:28} {r['median_ms']:10.1f} {r['min_ms']:8.1f} "
              f"{r['rel_err_vs_fp32_torch']:9.2e} {measured} {r['file_mb']:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=default_out("cpu_quantize.json"))
    parser.add_argument("--quick", action="store_true", help="the tiny ViT and 3 repeats (checks the script)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    rows: list[dict] = []
    load_before = os.getloadavg()
    for batch in args.batch:
        rows += bench(batch, repeats, args.threads, "tiny" if args.quick else "real")
    print_table(rows)
    env = environment("cpu", load_avg_1_5_15_before=load_before, load_avg_1_5_15_after=os.getloadavg(),
                      intra_op_threads=args.threads, repeats=repeats,
                      vnni="avx512_vnni" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None)
    write_json(args.out, {"environment": env, "results": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
