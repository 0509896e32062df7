"""The main job: compile the tiny LLaVA-style VLM with backend="mmaccel" on CPU, generate tokens from an
image and a prompt, check tokens and logits against eager, and show what the compiler did.

    python -m mmaccel.demo [--new-tokens 8] [--prompt-len 12] [--repeats 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

import mmaccel
from mmaccel.timing import median_ms
from mmaccel.models import VLM, VLMConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    vlm = VLM(VLMConfig.tiny()).eval().requires_grad_(False)
    cfg = vlm.config
    image = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    prompt = torch.randint(0, cfg.text.vocab, (1, args.prompt_len))
    print(f"tiny VLM: ViT {cfg.vision.layers}x{cfg.vision.hidden} ({cfg.num_image_tokens} image tokens) -> "
          f"decoder {cfg.text.layers}x{cfg.text.hidden}, vocab {cfg.text.vocab}; prompt of {args.prompt_len} tokens")

    vlm.setup_cache(1)
    eager_tokens, eager_logits = vlm.generate(image, prompt, args.new_tokens)

    # The plain torch.compile spelling; collect_reports() records what the backend did to each graph.
    with mmaccel.collect_reports() as report:
        prefill = torch.compile(vlm.prefill, backend="mmaccel", dynamic=True)
        decode = torch.compile(vlm.decode, backend="mmaccel")
        vlm.setup_cache(1)
        start = time.perf_counter()
        tokens, logits = vlm.generate(image, prompt, args.new_tokens, prefill_fn=prefill, decode_fn=decode)
        first_run_s = time.perf_counter() - start
    compile_s = sum(g.compile_seconds for g in report.graphs)

    tokens_match = torch.equal(tokens, eager_tokens)
    max_err = max(float((a - b).abs().max()) for a, b in zip(logits, eager_logits))
    scale = max(float(b.abs().max()) for b in eager_logits)
    logits_match = max_err <= 1e-4 * max(1.0, scale)
    print(f"\neager tokens:    {eager_tokens.tolist()[0]}")
    print(f"mmaccel tokens:  {tokens.tolist()[0]}  -> {'MATCH' if tokens_match else 'MISMATCH'}")
    print(f"logits: max |mmaccel - eager| = {max_err:.2e} (logit scale {scale:.2f}) -> "
          f"{'MATCH' if logits_match else 'MISMATCH'}")

    print(f"\n{report}\n")

    # Steady-state latency of the two steps generation is made of (same inputs, caches rewritten in place).
    ids_pos = torch.arange(cfg.num_image_tokens + args.prompt_len)
    step_token, step_pos = tokens[:, :1], torch.tensor([cfg.num_image_tokens + args.prompt_len])
    rows = []
    with torch.no_grad():
        for label, eager_fn, compiled_fn in (
            ("prefill", lambda: vlm.prefill(image, prompt, ids_pos), lambda: prefill(image, prompt, ids_pos)),
            ("decode step", lambda: vlm.decode(step_token, step_pos), lambda: decode(step_token, step_pos)),
        ):
            e, c = median_ms(eager_fn, args.repeats), median_ms(compiled_fn, args.repeats)
            rows.append({"step": label, "eager_ms": e, "mmaccel_ms": c, "speedup": e / c})
    print(f"{'step':12} {'eager ms':>9} {'mmaccel ms':>11} {'speedup':>8}   (CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; target {report.graphs[0].target if report.graphs else '-'})")
    for r in rows:
        print(f"{r['step']:12} {r['eager_ms']:>9.3f} {r['mmaccel_ms']:>11.3f} {r['speedup']:>7.2f}x")
    print(f"\ngraphs compiled: {len(report.graphs)}, total compile time {compile_s:.1f}s "
          f"(first compiled generate call {first_run_s:.1f}s)")
    ok = tokens_match and logits_match and all(g.status == "optimized" for g in report.graphs)
    print("RESULT:", "OK: compiled generation matches eager" if ok else "FAILED")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens_match": tokens_match, "max_logit_error": max_err, "latency": rows,
                       "compile_seconds": compile_s, "report": report.to_dict()}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
