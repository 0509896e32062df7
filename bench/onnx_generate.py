"""ONNX generation on CPU (issue 18): Hugging Face eager generate() against mmaccel.export_onnx(generation=True) +
mmaccel.onnx_generate, fp32, batch 1, a Llama-style decoder with RANDOM weights (no downloads: token values mean
nothing, timings do). Stop tokens are off, so both generate exactly --new tokens.

    python bench/onnx_generate.py                    # ~130M parameters (hidden 768, 12 layers), 64-token prompt
    python bench/onnx_generate.py --size 400m        # ~400M parameters (hidden 1024, 24 layers)
    python bench/onnx_generate.py --tiny             # tiny config: a quick check
    python bench/onnx_generate.py --int4             # and an int4 export (com.microsoft::MatMulNBits linears, int8
                                                     # token embedding), with its bytes and decode ratios to fp32

Per variant: first-token ms (generate with max_new_tokens=1), ms per new token ((end-to-end - first token) /
(new - 1)), the median of --repeats calls after one warm-up; the ONNX folder's bytes and the export's seconds;
whether the tokens equal HF eager's. Optimum ONNX and ONNX Runtime GenAI are not installed on this machine, so
the issue's comparison with them is not in this script. JSON under bench/results/ (or $OUT).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mmaccel
from mmaccel.timing import median_ms

from common import default_out, environment, write_json  # bench/ is on sys.path when a script here runs

SIZES = {  # (hidden, layers, heads, kv heads, intermediate, vocab)
    "tiny": (32, 2, 4, 2, 64, 100),
    "130m": (768, 12, 12, 4, 2048, 32000),
    "400m": (1024, 24, 16, 8, 2816, 32000),
}


def build(size: str) -> LlamaForCausalLM:
    hidden, layers, heads, kv_heads, intermediate, vocab = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def timings(generate: Callable[[int], Any], new: int, repeats: int) -> dict[str, float]:
    first = median_ms(lambda: generate(1), repeats, warmup=1)
    total = median_ms(lambda: generate(new), repeats, warmup=1)
    return {"first_token_ms": round(first, 2), "ms_per_token": round((total - first) / (new - 1), 2),
            "end_to_end_ms": round(total, 2)}


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def onnx_row(model: LlamaForCausalLM, ids: torch.Tensor, options: dict[str, Any], reference: torch.Tensor,
             args: argparse.Namespace) -> dict[str, Any]:
    """Export with `options`, then time onnx_generate on the folder."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "onnx")
        start = time.perf_counter()
        report = mmaccel.export_onnx(model, {"input_ids": ids}, folder, generation=True, **options)
        export_s = time.perf_counter() - start
        generator = mmaccel.OnnxGenerator(folder, intra_op_threads=args.threads)

        def onnx(new: int) -> Any:
            return mmaccel.onnx_generate(generator, ids, max_new_tokens=new, eos_token_id=[], pad_token_id=0)

        lossy = {p.name: {"changes": p.changes, "measured_error": p.measured_error, "near_misses": p.near_misses}
                 for p in report.graphs[0].passes if p.lossy}  # quantize, and quantize_embedding (the token table)
        return {**timings(onnx, args.new, args.repeats), "file_bytes": folder_bytes(folder),
                "export_s": round(export_s, 1), "tokens_equal_hf": bool((torch.from_numpy(onnx(args.new)) == reference).all()),
                **({"lossy": lossy} if lossy else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="130m")
    parser.add_argument("--tiny", action="store_true", help="same as --size tiny")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--int4", action="store_true", help="also int4 weights as MatMulNBits")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    size = "tiny" if args.tiny else args.size
    torch.set_num_threads(args.threads)
    model = build(size)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    params = sum(p.numel() for p in model.parameters())
    print(f"Llama {size}: {params / 1e6:.0f}M parameters, prompt {args.prompt}, {args.new} new tokens, "
          f"{args.threads} threads")

    def hf(new: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                  eos_token_id=[], pad_token_id=0)

    rows = {"HF eager generate()": timings(hf, args.new, args.repeats)}
    reference = hf(args.new)
    variants = {"mmaccel export + onnx_generate": {}}
    if args.int4:  # every linear int4 (budget 0.5 on random weights), run by ONNX Runtime's MatMulNBits
        variants["mmaccel int4 (MatMulNBits)"] = {"quantize": "int4_weight_only", "accuracy_budget": 0.5}
    for name, options in variants.items():
        rows[name] = onnx_row(model, ids, options, reference, args)
    print(f"{'variant':32} {'first token ms':>15} {'ms / token':>11} {'file MB':>8} {'export s':>9} tokens = HF")
    for name, row in rows.items():
        print(f"{name:32} {row['first_token_ms']:>15.1f} {row['ms_per_token']:>11.2f} "
              f"{row.get('file_bytes', 0) / 1e6:>8.1f} {row.get('export_s', 0):>9.1f} {row.get('tokens_equal_hf', '')}")
    fp32, int4 = rows["mmaccel export + onnx_generate"], rows.get("mmaccel int4 (MatMulNBits)")
    if int4 is not None:  # issue 18's targets: int4 files under 0.3x fp32's bytes, decode at least 2x faster
        print(f"int4 / fp32: folder bytes {int4['file_bytes'] / fp32['file_bytes']:.3f}x (target < 0.3x), decode "
              f"{fp32['ms_per_token'] / int4['ms_per_token']:.2f}x faster (target 2x)")
    path = args.out or default_out(f"onnx_generate_cpu_{size}.json")
    # the load average says how busy the (shared) CPU was while the timings ran
    write_json(path, {"environment": environment("cpu", threads=args.threads, size=size, parameters=params,
                                                 prompt=args.prompt, new_tokens=args.new, repeats=args.repeats,
                                                 load_average=os.getloadavg()),
                      "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
