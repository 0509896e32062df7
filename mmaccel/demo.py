"""The main job: generate from a Hugging Face vision-language model (LLaVA-1.5's structure, a tiny config with
RANDOM weights: nothing is downloaded) through mmaccel.generate, check the tokens against HF's eager
generate(), and time both on this machine.

    python -m mmaccel.demo [--new-tokens 32] [--repeats 5] [--json out.json]

Where the speedup comes from on a CPU: at this size a decode step's arithmetic takes well under a
millisecond, and HF's generate() spends several more per token on the host (logits processors, stopping
criteria, cache bookkeeping, mask and position updates). mmaccel.generate runs the token choice, stop check
and cache write inside one compiled step and advances positions in the graph, so the host only calls it.
On a GPU the same step replays from a CUDA graph (Triton target).

Part 2 is where mmaccel wins on a CPU today: the vision tower of a VLM at a real size (CLIP ViT-B/16, 224 px,
random weights) through torch.compile(backend="mmaccel") (fused graph on ONNX Runtime) and with the opt-in
W8A8 quantization (the accuracy it cost is measured and printed), against eager PyTorch, timed interleaved.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, GenerationMixin, LlavaForConditionalGeneration

import mmaccel
from mmaccel.models.hf_configs import llava_config
from mmaccel.timing import interleaved_times_ms, times_ms


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
    parser.add_argument("--skip-vision", action="store_true", help="only the generation part")
    args = parser.parse_args()
    # Matrices of 32x64: one thread does the work; more spin in OpenMP barriers (tens of ms a step on a
    # shared machine) and would time the barriers, not the generation loops.
    threads = torch.get_num_threads()
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
    vision = vision_tower(args.repeats, threads) if not args.skip_vision else {}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens_match": match, "end_to_end_ms": rows, "new_tokens": args.new_tokens,
                       "vision_tower": vision}, f, indent=2)
    return 0 if match and all(r["rel_err"] <= r["budget"] for r in vision.values()) else 1


def vision_tower(repeats: int, threads: int) -> dict[str, dict[str, float]]:
    """CLIP ViT-B/16 (HF CLIPVisionModel, random weights), batch 1: eager vs mmaccel vs mmaccel W8A8."""
    torch.set_num_threads(threads)  # real matmuls here: every core helps
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16, attn_implementation="sdpa")
    model = CLIPVisionModel(config).eval().requires_grad_(False)
    pixels = torch.randn(1, 3, 224, 224)
    print(f"\nVision tower: HF CLIPVisionModel ViT-B/16 at 224 px (random weights), batch 1, "
          f"{torch.get_num_threads()} threads; compiling (ONNX export, about a minute) ...")
    with torch.no_grad():
        reference = model(pixels).pooler_output
        models = {"eager PyTorch": model,
                  "mmaccel (lossless)": torch.compile(model, backend="mmaccel"),
                  "mmaccel W8A8 (budget 0.05)": mmaccel.compile(model, quantize="w8a8_dynamic", accuracy_budget=0.05)}
        calls = {name: (lambda m=m: m(pixels).pooler_output) for name, m in models.items()}
        errors = {name: float((call() - reference).norm() / reference.norm()) for name, call in calls.items()}
        budgets = {name: 0.05 if "W8A8" in name else 1e-4 for name in calls}
        times = interleaved_times_ms(calls, repeats, warmup=2)
    base = statistics.median(times["eager PyTorch"])
    print(f"{'':28} {'median ms':>10} {'speedup':>8} {'rel. error vs eager':>20}")
    results = {}
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"{name:28} {ms:10.1f} {base / ms:7.2f}x {errors[name]:20.1e}")
        results[name] = {"median_ms": ms, "rel_err": errors[name], "budget": budgets[name]}
    return results


if __name__ == "__main__":
    raise SystemExit(main())
