"""One decode step of mmaccel's exported decoder against ONNX Runtime GenAI's builder output (issue 18), the
graphs alone: same model (bench/onnx_generate.py's), same past length, plain ONNX Runtime sessions, timed in
interleaved rounds so that the load of this shared machine falls on both alike (bench/onnx_generate.py times its
rows minutes apart, and the load average moved its GenAI fp32 row from 36 to 60 ms per token between two runs).
Also counts the nodes ONNX Runtime runs per step, after its own graph optimizations, and the kernel time.

    python bench/onnx_decode_step.py                # 125M Llama, fp32 and int4, past 80 positions
    python bench/onnx_decode_step.py --size tiny    # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

import mmaccel

from common import default_out, environment, write_json  # bench/ is on sys.path when a script here runs
from onnx_generate import add_model_arguments, build, past_shape
from onnx_peers import genai_build, save_for_peers


def step_session(path: str, past: tuple[int, int, int], threads: int,
                 profile: bool = False) -> tuple[ort.InferenceSession, dict]:
    """A session on the decoder at `path` and the feeds of one decode step after `past` = (positions, kv heads,
    head dim): the two layouts share input names (GenAI's has no position_ids: its GroupQueryAttention rotates
    from the mask)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling = threads, profile
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "onnx_decode_step_profile")
    session = ort.InferenceSession(path, options)
    feeds, rng, (length, kv_heads, head_dim) = {}, np.random.default_rng(0), past
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = np.array([[5]], np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, length + 1), np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.array([[length]], np.int64)
        else:  # past_key_values.{i}.key / value [1, kv heads, past, head dim]
            feeds[value.name] = rng.random((1, kv_heads, length, head_dim), np.float32)
    return session, feeds


def kernel_profile(path: str, past: tuple[int, int, int], threads: int, runs: int = 10) -> dict[str, Any]:
    """Nodes run per step, how many of each op, and the sum of each node's median kernel time (ms): the matmuls
    and the rest."""
    session, feeds = step_session(path, past, threads, profile=True)
    for _ in range(runs):
        session.run(None, feeds)
    profile = session.end_profiling()
    with open(profile) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    os.remove(profile)
    per_node: dict[tuple[str, str], list[float]] = {}
    for e in events:
        per_node.setdefault((e["name"], e["args"]["op_name"]), []).append(e["dur"] / 1e3)
    matmul = sum(statistics.median(v) for (_, op), v in per_node.items() if "MatMul" in op)
    rest = sum(statistics.median(v) for (_, op), v in per_node.items() if "MatMul" not in op)
    ops: dict[str, int] = {}
    for _, op in per_node:  # which ops make the node count (issue 18: ours against GenAI's)
        ops[op] = ops.get(op, 0) + 1
    return {"nodes_per_step": len(events) // runs, "kernel_ms_matmul": round(matmul, 2),
            "kernel_ms_other": round(rest, 2), "ops_per_step": dict(sorted(ops.items(), key=lambda o: -o[1]))}


def interleaved_ms(paths: dict[str, str], past: tuple[int, int, int], threads: int, rounds: int, calls: int) -> dict[str, dict]:
    """Each decoder's step wall ms: `rounds` rounds of `calls` calls, the decoders taking turns each round."""
    runs = {name: step_session(path, past, threads) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (session, feeds) in runs.items():
            session.run(None, feeds)  # warm-up after the other decoder's turn
            for _ in range(calls):
                start = time.perf_counter()
                session.run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"step_ms_median": round(statistics.median(t), 2), "step_ms_min": round(min(t), 2)}
            for name, t in times.items()}


def export_pair(model: torch.nn.Module, hf_folder: str, work: str, precision: str) -> dict[str, str]:
    """mmaccel's and GenAI's decoders of one precision (fp32 or int4): name -> ONNX file."""
    ours = os.path.join(work, f"mmaccel_{precision}")
    options = {"quantize": "int4_weight_only", "accuracy_budget": 0.5} if precision == "int4" else {}
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    mmaccel.export_onnx(model, {"input_ids": ids}, ours, generation=True, **options)
    return {f"mmaccel {precision}": os.path.join(ours, "decoder.onnx"),
            f"GenAI builder {precision}": os.path.join(genai_build(hf_folder, work, precision), "model.onnx")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, generation=False)
    parser.add_argument("--past", type=int, default=80, help="past positions (bench/onnx_generate.py: 64 + 32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.size, args.arch)
    past = past_shape(model.config, args.past)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as work:
        hf_folder = os.path.join(work, "hf")
        save_for_peers(model, hf_folder)
        for precision in ("fp32", "int4"):
            paths = export_pair(model, hf_folder, work, precision)
            for name, row in interleaved_ms(paths, past, args.threads, args.rounds, args.calls).items():
                rows[name] = {**row, **kernel_profile(paths[name], past, args.threads)}
    print(f"{'decoder':22} {'step ms median':>15} {'min':>7} {'nodes/step':>11} {'kernel ms: matmul':>18} {'other':>6}")
    for name, row in rows.items():
        print(f"{name:22} {row['step_ms_median']:>15.2f} {row['step_ms_min']:>7.2f} {row['nodes_per_step']:>11} "
              f"{row['kernel_ms_matmul']:>18.2f} {row['kernel_ms_other']:>6.2f}")
    path = args.out or default_out(f"onnx_decode_step_cpu_{args.size}.json")
    write_json(path, {"environment": environment("cpu", threads=args.threads, size=args.size, past=args.past,
                                                 rounds=args.rounds, calls=args.calls, load_average=os.getloadavg()),
                      "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
