"""tokens="resolution" and "prune" on CPU (issue 15): first-token and per-token CPU time of mmaccel.generate on a
mid-sized LLaVA-1.5 layout (CLIP 336px in 14px patches: 576 image tokens, + 64 text tokens; a small tower and a
4-layer, 1024-wide Llama decoder, vocab 32064, fp32, random weights), lossless against each image side and
each fraction of the image tokens kept.

    python bench/resolution_cpu.py            # about 2 minutes on 1 thread; bench/results/resolution_cpu.json
    python bench/resolution_cpu.py --variants mmaccel.generate mmaccel.generate@keep50 \
        mmaccel.generate@keep25 --out bench/results/token_pruning_cpu
    python bench/resolution_cpu.py --variants mmaccel.generate mmaccel.generate@auto \
        --out bench/results/token_auto_cpu    # tokens="auto": its Pareto table printed, plotted to <out>.png

CPU time (time.process_time), one thread, sides interleaved, median of 3: on a shared machine wall time
measures the neighbours. The GPU run at LLaVA-1.5-7B dims is bench/hf_generate.py's @<side>px variants.
tokens="auto" times its candidates itself, on the first call, by wall clock (mmaccel/timing.py, the one the
library uses on CPU): its table's ms are that, the rows' CPU ms are this script's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mmaccel
from common import write_png
from hf_generate import RESULTS, environment, generate_options, tokens_row  # bench/ is on sys.path here
from mmaccel.compiler.resolution import pareto_table
from plot import plot_pareto

SIDES = ("mmaccel.generate", "mmaccel.generate@280px", "mmaccel.generate@224px", "mmaccel.generate@168px")
# tokens={"prune": fraction kept}, hf_generate.py's names: mmaccel.generate@keep75, @keep50, @keep25


def mid_llava() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                       num_attention_heads=16, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000)
    config.text_config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).eval().requires_grad_(False)
    ids = torch.cat([torch.full((1, 576), 32000), torch.randint(3, 1000, (1, 64))], dim=1)
    pixels = torch.randn(1, 3, 336, 336)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def cpu_ms(fn) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(RESULTS, "resolution_cpu"))
    parser.add_argument("--variants", nargs="+", default=list(SIDES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, inputs = mid_llava()
    new = args.new_tokens

    variants = args.variants
    options = {v: {"target": "eager", **generate_options(v)} for v in variants}

    def run(variant: str, n: int) -> torch.Tensor:
        return mmaccel.generate(model, **inputs, max_new_tokens=n, eos_token_id=[], pad_token_id=0,
                                options=options[variant])
    times = {v: {"first": [], "e2e": []} for v in variants}
    with torch.no_grad():
        model(**inputs)  # transformers 5.2x installs its output-capturing hooks on the first eager call
        for variant in variants:  # compiles
            run(variant, 1), run(variant, new)
        for _ in range(3):
            for variant in variants:
                times[variant]["first"].append(cpu_ms(lambda: run(variant, 1)))
                times[variant]["e2e"].append(cpu_ms(lambda: run(variant, new)))
    rows = []
    for variant in variants:
        first, e2e = statistics.median(times[variant]["first"]), statistics.median(times[variant]["e2e"])
        rows.append({"variant": variant, "first_token_cpu_ms": first, "cpu_ms_per_token": (e2e - first) / (new - 1),
                     **tokens_row(model, options[variant], inputs, new)})
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()
               if k != "tokens_candidates"}, flush=True)
        print(pareto_table(rows[-1]["tokens_candidates"]) if rows[-1].get("tokens_candidates") else "", flush=True)
    data = {"environment": environment("cpu", torch.float32, 0.0, False), "results": rows}
    with open(args.out + ".json", "w") as f:
        json.dump(data, f, indent=2)
    if any(row.get("tokens_candidates") for row in rows):
        write_png(plot_pareto, data, args.out + ".png", f"python bench/plot.py {args.out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
