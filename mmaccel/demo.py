"""The main job: generate from a Hugging Face vision-language model (LLaVA-1.5's structure, a tiny config with
RANDOM weights: nothing is downloaded) through mmaccel.generate, check the tokens against HF's eager
generate(), and time both on this machine.

    python -m mmaccel.demo [--new-tokens 32] [--repeats 5] [--json out.json]

Where the speedup comes from on a CPU: at this size a decode step's arithmetic takes well under a
millisecond, and HF's generate() spends several more per token on the host (logits processors, stopping
criteria, cache bookkeeping, mask and position updates). mmaccel.generate runs the token choice, stop check
and cache write inside one compiled step and advances positions in the graph, so the host only calls it.
On a GPU the same step replays from a CUDA graph (Triton target).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import GenerationMixin, LlavaForConditionalGeneration

import mmaccel
from mmaccel.models.hf_configs import llava_config
from mmaccel.timing import times_ms


def build(text_tokens: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config, image_tokens = llava_config(tiny=True)
    config.text_config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).eval().requires_grad_(False)
    ids = torch.cat([torch.full((1, image_tokens), config.image_token_id),
                     torch.randint(3, 90, (1, text_tokens))], dim=1)
    vision = config.vision_config
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "pixel_values": torch.randn(1, 3, vision.image_size, vision.image_size)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args()
    # Matrices of 32x64: one thread does the work; more spin in OpenMP barriers (tens of ms a step on a
    # shared machine) and would time the barriers, not the generation loops.
    torch.set_num_threads(1)
    model, inputs = build(args.text_tokens)
    cfg = model.config
    print(f"LLaVA (HF transformers, tiny config, random weights): CLIP {cfg.vision_config.num_hidden_layers}x"
          f"{cfg.vision_config.hidden_size} -> Llama {cfg.text_config.num_hidden_layers}x{cfg.text_config.hidden_size}"
          f", vocab {cfg.text_config.vocab_size}; prompt: 1 image + {args.text_tokens} text tokens "
          f"({inputs['input_ids'].shape[1]} positions); {args.new_tokens} new tokens, greedy, no stop token")
    gen = dict(max_new_tokens=args.new_tokens, eos_token_id=[], pad_token_id=0)

    def hf() -> torch.Tensor:
        with torch.no_grad():
            return GenerationMixin.generate(model, **inputs, do_sample=False, **gen)

    def ours() -> torch.Tensor:
        return mmaccel.generate(model, **inputs, **gen)

    expected, actual = hf(), ours()  # the first mmaccel call compiles the prefill and decode steps
    match = torch.equal(actual, expected)
    print(f"\nHF eager tokens: {expected[0, -args.new_tokens:].tolist()}")
    print(f"mmaccel tokens:  {actual[0, -args.new_tokens:].tolist()}  -> {'MATCH' if match else 'MISMATCH'}")
    print(f"\n{mmaccel.generation_report(model)}")

    rows = {name: statistics.median(times_ms(fn, args.repeats, warmup=1)) for name, fn in
            (("HF generate() (eager)", hf), ("mmaccel.generate", ours))}
    base = rows["HF generate() (eager)"]
    print(f"\n{'':24} {'end-to-end ms':>14} {'ms / new token':>15} {'speedup':>8}   (CPU, {torch.get_num_threads()} "
          f"threads, median of {args.repeats})")
    for name, ms in rows.items():
        print(f"{name:24} {ms:14.1f} {ms / args.new_tokens:15.2f} {base / ms:7.2f}x")
    ok = match and rows["mmaccel.generate"] < base
    print("RESULT:", "OK: mmaccel.generate matches HF eager and is faster here" if ok else
          "FAILED" if not match else "tokens match, but mmaccel.generate was not faster on this run")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens_match": match, "end_to_end_ms": rows, "new_tokens": args.new_tokens}, f, indent=2)
    return 0 if match else 1


if __name__ == "__main__":
    raise SystemExit(main())
