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
    options = ort.SessionOptions()
    options.intra_op_num_threads = request["threads"]
    model = ORTModelForCausalLM.from_pretrained(request["folder"], session_options=options)
    ids = torch.tensor(request["ids"])

    def generate(new: int) -> torch.Tensor:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              eos_token_id=[], pad_token_id=0)

    row = {**timings(generate, request["new"], request["repeats"]), "file_bytes": folder_bytes(request["folder"]),
           "export_s": round(export_s, 1), "tokens": generate(request["new"]).tolist(),
           "versions": {name: metadata.version(name) for name in ("optimum-onnx", "optimum", "transformers")}}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
