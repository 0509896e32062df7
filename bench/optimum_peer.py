"""Optimum ONNX's row of bench/onnx_generate.py, run by bench/.optimum-venv's python (Optimum ONNX 0.1.0 needs
transformers < 4.58, mmaccel's venv has 5.x): `python bench/optimum_peer.py request.json` exports the
save_pretrained folder with optimum.exporters.onnx.main_export (task text-generation-with-past, fp32, no
optimization level: what `optimum-cli export onnx` writes by default), times ORTModelForCausalLM.generate on the
request's prompt with onnx_peers.timings, and prints one JSON line: the row, with the generated tokens.
Optimum ONNX 0.1.0 has no int4 export (its ORTQuantizer quantizes to int8 only), so it has no int4 row.
"""
from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from typing import Callable

import onnxruntime as ort
import torch
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTModelForCausalLM

from onnx_peers import folder_bytes, timings  # this folder is on sys.path when the script runs


def main() -> None:
    with open(sys.argv[1]) as f:
        request = json.load(f)
    torch.set_num_threads(request["threads"])
    start = time.perf_counter()
    main_export(request["hf_folder"], request["folder"], task="text-generation-with-past", device="cpu")
    export_s = time.perf_counter() - start
    ids = torch.tensor(request["ids"])
    generate = loop(request, ids, spin_us=None)  # ONNX Runtime's default spinning, which Optimum keeps
    # the same loop with the session option mmaccel.onnx_generate sets (bench/onnx_spinning.py says why)
    quiet = ({"spin_20us": timings(loop(request, ids, spin_us=20), request["new"], request["repeats"])}
             if request.get("spinning_too") else {})
    row = {**timings(generate, request["new"], request["repeats"]), "file_bytes": folder_bytes(request["folder"]),
           "export_s": round(export_s, 1), "tokens": generate(request["new"]).tolist(), **quiet,
           "versions": {name: metadata.version(name) for name in ("optimum-onnx", "optimum", "transformers")}}
    print(json.dumps(row))


def loop(request: dict, ids: torch.Tensor, spin_us: int | None) -> Callable[[int], torch.Tensor]:
    """ORTModelForCausalLM.generate on the exported folder, `request['threads']` intra-op threads, workers
    spinning `spin_us` at most (None: ONNX Runtime's default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = request["threads"]
    if spin_us is not None:
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
    model = ORTModelForCausalLM.from_pretrained(request["folder"], session_options=options)
    return lambda new: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                      eos_token_id=[], pad_token_id=0)


if __name__ == "__main__":
    main()
