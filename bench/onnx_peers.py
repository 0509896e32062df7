"""The peers of bench/onnx_generate.py (issue 18): ONNX Runtime GenAI's model builder + its generator loop, run in
this process, and Optimum ONNX's export + ORTModelForCausalLM.generate, run by bench/optimum_peer.py in
bench/.optimum-venv (Optimum ONNX 0.1.0 needs transformers < 4.58; bench/setup_optimum_venv.sh builds it). Both
read the model from a save_pretrained folder. Neither is imported by mmaccel; a peer that is not installed gives
a row saying so.

The generation timing every row uses (`timings`, `folder_bytes`) lives here too, so that bench/optimum_peer.py
times Optimum's loop exactly as bench/onnx_generate.py times the others.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from mmaccel.timing import median_ms

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
OPTIMUM_PYTHON = os.path.join(BENCH_DIR, ".optimum-venv", "bin", "python")
NOT_INSTALLED = {"status": "not installed"}


def timings(generate: Callable[[int], Any], new: int, repeats: int) -> dict[str, float]:
    """First-token ms (generate(1)), ms per new token ((generate(new) - first) / (new - 1)): medians of `repeats`."""
    first = median_ms(lambda: generate(1), repeats, warmup=1)
    total = median_ms(lambda: generate(new), repeats, warmup=1)
    return {"first_token_ms": round(first, 2), "ms_per_token": round((total - first) / (new - 1), 2),
            "end_to_end_ms": round(total, 2)}


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def save_for_peers(model: torch.nn.Module, folder: str) -> None:
    """`model` saved as a Hugging Face folder, with a word-level tokenizer over its vocabulary: the GenAI builder
    loads a tokenizer and nothing can be downloaded here (token i is the word 't{i}'; the loops feed ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.config.vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t0").save_pretrained(folder)


def genai_row(hf_folder: str, work: str, precision: str, ids: torch.Tensor, reference: torch.Tensor,
              args: Any) -> dict[str, Any]:
    """ONNX Runtime GenAI's builder (`precision` fp32 or int4, execution provider cpu), timed in its own loop."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return NOT_INSTALLED
    start = time.perf_counter()
    folder = genai_build(hf_folder, work, precision)
    export_s = time.perf_counter() - start
    bytes_ = folder_bytes(folder)  # before the config edit below, which only changes a few characters
    generate = genai_loop(folder, ids, args.threads)
    tokens = generate(args.new)
    return {**timings(generate, args.new, args.repeats), "file_bytes": bytes_, "export_s": round(export_s, 1),
            "tokens_equal_hf": same_tokens(tokens, reference), **genai_graph(folder),
            "versions": {"onnxruntime-genai": og.__version__}}


def genai_loop(folder: str, ids: torch.Tensor, threads: int) -> Callable[[int], np.ndarray]:
    """generate(new) -> tokens [1, prompt + new]: GenAI's generator loop, greedy, on the builder's `folder`."""
    import onnxruntime_genai as og

    configure_genai(folder, threads)
    model = og.Model(folder)
    prompt = ids.numpy().astype(np.int32)

    def generate(new: int) -> np.ndarray:
        params = og.GeneratorParams(model)
        # the KV buffer (shared past/present) is sized by max_length: prompt + new, as the other loops grow to
        params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
        return np.asarray(generator.get_sequence(0))[None]

    return generate


def genai_build(hf_folder: str, work: str, precision: str) -> str:
    """GenAI's model builder (its command line, as users run it) on `hf_folder`; the folder it wrote."""
    folder = os.path.join(work, f"genai_{precision}")
    run_quietly([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_folder, "-o", folder,
                 "-p", precision, "-e", "cpu", "-c", os.path.join(work, "genai_cache")])
    return folder


def configure_genai(folder: str, threads: int) -> None:
    """The same thread count as the other rows, and no stop token (HF's and ours run with eos_token_id=[])."""
    path = os.path.join(folder, "genai_config.json")
    with open(path) as f:
        config = json.load(f)
    config["model"]["eos_token_id"] = []
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def genai_graph(folder: str) -> dict[str, Any]:
    """What the builder emitted: op counts of the contrib ops that matter, and MatMulNBits' accuracy_level."""
    import onnx

    graph = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    return {"ops": {k: v for k, v in sorted(ops.items()) if k not in ("Constant",)},
            **({"matmulnbits_accuracy_level": sorted(levels)} if levels else {})}


def optimum_row(hf_folder: str, work: str, ids: torch.Tensor, reference: torch.Tensor, args: Any) -> dict[str, Any]:
    """Optimum ONNX's fp32 export, timed by bench/optimum_peer.py in Optimum's own venv."""
    if not os.path.exists(OPTIMUM_PYTHON):
        return {**NOT_INSTALLED, "note": "run bench/setup_optimum_venv.sh"}
    request = os.path.join(work, "optimum_request.json")
    with open(request, "w") as f:
        json.dump({"hf_folder": hf_folder, "folder": os.path.join(work, "optimum"), "ids": ids.tolist(),
                   "new": args.new, "repeats": args.repeats, "threads": args.threads,
                   "spinning_too": args.spinning_too}, f)
    root = os.path.dirname(BENCH_DIR)  # mmaccel.timing, through onnx_generate.timings
    stdout = run_quietly([OPTIMUM_PYTHON, os.path.join(BENCH_DIR, "optimum_peer.py"), request],
                         env={**os.environ, "PYTHONPATH": root})
    row = json.loads(stdout.strip().splitlines()[-1])
    row["tokens_equal_hf"] = same_tokens(np.asarray(row.pop("tokens")), reference)
    return row


def run_quietly(command: list[str], **kwargs: Any) -> str:
    """`command`'s stdout; its progress bars and warnings hidden unless it fails, then its stderr's end is raised."""
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def same_tokens(tokens: np.ndarray, reference: torch.Tensor) -> bool:
    return tokens.shape == tuple(reference.shape) and bool((tokens == reference.numpy()).all())
