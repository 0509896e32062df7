"""ONNX generation on CPU (issue 18): Hugging Face eager generate(), mmaccel.export_onnx(generation=True) +
mmaccel.onnx_generate, and the peers: Optimum ONNX's export + ORTModelForCausalLM.generate and ONNX Runtime
GenAI's model builder + its generator loop, in one run, on the same model (a Llama-style decoder with RANDOM
weights, saved with save_pretrained into a temp folder that both peers read; no downloads: token values mean
nothing, timings do), the same prompt, the same new tokens and the same threads. Batch 1. Stop tokens are off,
so every loop generates exactly --new tokens.

    python bench/onnx_generate.py                    # ~130M parameters (hidden 768, 12 layers), 64-token prompt
    python bench/onnx_generate.py --size 400m        # ~400M parameters (hidden 1024, 24 layers)
    python bench/onnx_generate.py --tiny             # tiny config: a quick check
    python bench/onnx_generate.py --int4             # and int4 rows: mmaccel (com.microsoft::MatMulNBits linears,
                                                     # int8 token embedding) and GenAI's builder (-p int4)
    python bench/onnx_generate.py --spinning-too     # mmaccel's rows also with ONNX Runtime's spinning threads,
                                                     # Optimum's also with OnnxGenerator's 20 us

Per row: first-token ms (generate with max_new_tokens=1), ms per new token ((end-to-end - first token) /
(new - 1)), the median of --repeats calls after one warm-up; the folder's bytes and the export's seconds;
whether the tokens equal HF eager's. Peers are bench-only dependencies (pip install -e '.[bench]' brings
onnxruntime-genai; Optimum ONNX needs transformers < 4.58 and so lives in its own venv:
./bench/setup_optimum_venv.sh); a peer that is not installed gets a row saying so. JSON under bench/results/
(or $OUT).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import mmaccel

from common import default_out, environment, write_json  # bench/ is on sys.path when a script here runs
from onnx_peers import folder_bytes, genai_row, optimum_row, same_tokens, save_for_peers, timings

SIZES = {  # (hidden, layers, heads, kv heads, intermediate, vocab)
    "tiny": (64, 2, 4, 2, 128, 100),  # head_dim 16: GenAI's GroupQueryAttention needs a multiple of 16
    "130m": (768, 12, 12, 4, 2048, 32000),
    "400m": (1024, 24, 16, 8, 2816, 32000),
}


ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM),
         # Qwen2 at the same dimensions: q/k/v projections with biases and a tied LM head, as Qwen2 ships them
         "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def build(size: str, arch: str = "llama") -> LlamaForCausalLM:
    hidden, layers, heads, kv_heads, intermediate, vocab = SIZES[size]
    torch.manual_seed(0)
    config_class, model_class = ARCHS[arch]
    config = config_class(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          **({"tie_word_embeddings": True} if arch == "qwen2" else {}))
    return model_class(config).eval().requires_grad_(False)


def add_model_arguments(parser: argparse.ArgumentParser, generation: bool = True) -> None:
    """The arguments the ONNX benches here share: model size, threads, output path; with `generation`, the
    prompt's length and the new tokens."""
    parser.add_argument("--size", choices=sorted(SIZES), default="130m")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama", help="the decoder's family")
    if generation:
        parser.add_argument("--prompt", type=int, default=64)
        parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--out", default=None)


def past_shape(config: LlamaConfig, positions: int) -> tuple[int, int, int]:
    """(positions, KV heads, head dim): the past K/V of one decode step (bench/onnx_decode_step.step_session)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return positions, config.num_key_value_heads, head_dim


def onnx_row(model: LlamaForCausalLM, ids: torch.Tensor, options: dict[str, Any], reference: torch.Tensor,
             args: argparse.Namespace) -> dict[str, Any]:
    """Export with `options`, then time onnx_generate on the folder."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "onnx")
        start = time.perf_counter()
        report = mmaccel.export_onnx(model, {"input_ids": ids}, folder, generation=True, **options)
        export_s = time.perf_counter() - start

        def loop(spin_us: int | None) -> Any:
            generator = mmaccel.OnnxGenerator(folder, intra_op_threads=args.threads, spin_us=spin_us)
            return lambda new: mmaccel.onnx_generate(generator, ids, max_new_tokens=new, eos_token_id=[],
                                                     pad_token_id=0)

        onnx = loop(spin_us=20)  # OnnxGenerator's default
        lossy = {p.name: {"changes": p.changes, "measured_error": p.measured_error, "near_misses": p.near_misses}
                 for p in report.graphs[0].passes if p.lossy}  # quantize, and quantize_embedding (the token table)
        # the loop as it ran before its sessions spun 20 us at most (bench/onnx_spinning.py), timed right after
        spinning = ({"with_ort_spinning": timings(loop(spin_us=None), args.new, args.repeats)}
                    if args.spinning_too else {})
        return {**timings(onnx, args.new, args.repeats), "file_bytes": folder_bytes(folder),
                "export_s": round(export_s, 1), "tokens_equal_hf": same_tokens(onnx(args.new), reference),
                **spinning, **({"lossy": lossy} if lossy else {})}


MMACCEL_FP32, MMACCEL_INT4 = "mmaccel fp32", "mmaccel int4 (MatMulNBits)"


def export_rows(model: LlamaForCausalLM, ids: torch.Tensor, reference: torch.Tensor, hf_folder: str, work: str,
                args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    rows = {MMACCEL_FP32: onnx_row(model, ids, {}, reference, args),
            "Optimum ONNX fp32": optimum_row(hf_folder, work, ids, reference, args),
            "GenAI builder fp32": genai_row(hf_folder, work, "fp32", ids, reference, args)}
    if args.int4:  # every linear int4 (budget 0.5 on random weights), run by ONNX Runtime's MatMulNBits
        rows[MMACCEL_INT4] = onnx_row(model, ids, {"quantize": "int4_weight_only", "accuracy_budget": 0.5},
                                      reference, args)
        rows["Optimum ONNX int4"] = {"status": "not offered (Optimum ONNX 0.1.0 quantizes to int8 only)"}
        rows["GenAI builder int4"] = genai_row(hf_folder, work, "int4", ids, reference, args)
    return rows


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    print(f"{'variant':28} {'first token ms':>15} {'ms / token':>11} {'file MB':>8} {'export s':>9} tokens = HF")
    for name, row in rows.items():
        if "status" in row:
            print(f"{name:28} {row['status']}")
            continue
        print(f"{name:28} {row['first_token_ms']:>15.1f} {row['ms_per_token']:>11.2f} "
              f"{row.get('file_bytes', 0) / 1e6:>8.1f} {row.get('export_s', 0):>9.1f} {row.get('tokens_equal_hf', '')}")
        variants = (("with_ort_spinning", "  same, ORT spinning"), ("spin_20us", "  same, spinning 20 us"))
        for key, label in variants:
            if key in row:
                print(f"{label:28} {row[key]['first_token_ms']:>15.1f} {row[key]['ms_per_token']:>11.2f}")
    fp32, int4 = rows[MMACCEL_FP32], rows.get(MMACCEL_INT4)
    if int4 is not None:  # issue 18's targets: int4 files under 0.3x fp32's bytes, decode at least 2x faster
        print(f"mmaccel int4 / fp32: folder bytes {int4['file_bytes'] / fp32['file_bytes']:.3f}x (target < 0.3x), "
              f"decode {fp32['ms_per_token'] / int4['ms_per_token']:.2f}x faster (target 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tiny", action="store_true", help="same as --size tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int4", action="store_true", help="also int4 weights as MatMulNBits")
    parser.add_argument("--spinning-too", action="store_true",
                        help="also time mmaccel's rows with ONNX Runtime's default spinning (the loop before), "
                             "and Optimum's with OnnxGenerator's 20 us")
    args = parser.parse_args()
    size = "tiny" if args.tiny else args.size
    torch.set_num_threads(args.threads)
    model = build(size, args.arch)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch} {size}: {params / 1e6:.0f}M parameters, prompt {args.prompt}, {args.new} new tokens, "
          f"{args.threads} threads")

    def hf(new: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                  eos_token_id=[], pad_token_id=0)

    rows = {"HF eager generate()": timings(hf, args.new, args.repeats)}
    reference = hf(args.new)
    with tempfile.TemporaryDirectory() as work:
        hf_folder = os.path.join(work, "hf")
        save_for_peers(model, hf_folder)
        rows.update(export_rows(model, ids, reference, hf_folder, work, args))
    print_table(rows)
    path = args.out or default_out(f"onnx_generate_cpu_{size}.json")
    # the load average says how busy the (shared) CPU was while the timings ran
    write_json(path, {"environment": environment("cpu", threads=args.threads, arch=args.arch, size=size,
                                                 parameters=params,
                                                 prompt=args.prompt, new_tokens=args.new, repeats=args.repeats,
                                                 load_average=os.getloadavg()),
                      "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
