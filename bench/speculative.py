"""Speculative decoding (issue 16): ms per new token and acceptance rate of mmaccel.generate with a draft, against
plain mmaccel.generate, HF eager generate() and HF assisted generation (generate(assistant_model=draft)), in one
run. Target: Llama-3-8B dims with --layers decoder layers (bf16 on a GPU), batch 1, greedy, stop tokens off.

Weights are RANDOM (no downloads), so a draft's acceptance on the "random" model means nothing about real text.
The "agreeing" model is the same with the output projections (o_proj, down_proj) of every layer past the
draft's scaled by --agree-scale (0: those layers add nothing, so the draft 'layers:N' proposes the target's own
tokens up to rounding): its acceptance is near 1 by construction, which shows the mechanics' speed ceiling,
not what a trained model would reach. The acceptance rate is printed for every row, as measured.

    python bench/speculative.py                        # GPU: 8 layers, draft layers:2, 128 new tokens
    python bench/speculative.py --tiny                 # CPU check: tiny config, a few tokens
    python bench/speculative.py --mid --models agreeing # CPU: hidden 1024, vocab 32000, 8 layers, fp32
    python bench/speculative.py --models agreeing --k 4 auto --out /tmp/spec.json

Timing as bench/hf_generate.py: after one warm-up call (which compiles), the median of --repeats calls (CUDA
events on a GPU); ms/token = (end-to-end - first-token) / (new tokens - 1), first-token = max_new_tokens=1.
"same" = the tokens equal plain mmaccel.generate's (greedy; bf16 rounding can flip a near-tie).
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
from common import default_out, environment, memory_row, png_beside, start_memory, write_json, write_png
from transformers import LlamaForCausalLM

import mmaccel
from mmaccel.compiler.drafts import resolve_draft
from mmaccel.models.hf_configs import llama_config
from mmaccel.timing import median_ms


def build(size: str, layers: int, draft_layers: int, agree_scale: float | None, device: str,
          dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights; with `agree_scale`, the layers past the draft's write their outputs scaled by it."""
    torch.manual_seed(0)
    config = llama_config(size == "tiny")
    if size == "mid":  # big enough that a CPU step is bound by its weights, not by per-call overhead
        config.update(dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                           vocab_size=32000, max_position_embeddings=1024))
    config.num_hidden_layers = layers
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    if agree_scale is not None:
        for layer in model.model.layers[draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(agree_scale)
            layer.mlp.down_proj.weight.mul_(agree_scale)
    return model


def runners(model: LlamaForCausalLM, ids: torch.Tensor, draft: str, ks: list[str]) -> dict[str, Callable]:
    """generate(new tokens) for each method, most wanted first (--budget-s skips the last); each returns the
    prompt + new tokens."""
    common = dict(eos_token_id=[], pad_token_id=0, do_sample=False)
    hf = dict(attention_mask=torch.ones_like(ids), min_new_tokens=1, **common)
    assistant, _ = resolve_draft(model, draft)
    methods = {"mmaccel": lambda n: mmaccel.generate(model, ids, max_new_tokens=n, **common)}
    for k in ks:
        speculative_k = k if k == "auto" else int(k)
        methods[f"mmaccel {draft} k={k}"] = lambda n, sk=speculative_k: mmaccel.generate(
            model, ids, max_new_tokens=n, draft=draft, speculative_k=sk, **common)
    methods["hf eager"] = lambda n: model.generate(ids, max_new_tokens=n, **hf)
    methods[f"hf assisted ({draft})"] = lambda n: model.generate(ids, max_new_tokens=n, assistant_model=assistant,
                                                                 **hf)
    return methods


def bench_method(run: Callable[[int], torch.Tensor], model, new: int, repeats: int, device: str,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`options`: the mmaccel options `run` passes (they key the session whose report holds the acceptance)."""
    start_memory(device)
    start = time.perf_counter()
    with torch.no_grad():
        tokens = run(new)  # compiles
        setup_s = time.perf_counter() - start
        timer = "cuda" if device == "cuda" else None
        e2e = median_ms(lambda: run(new), repeats, warmup=1, device=timer)
        tokens_again = run(new)
        report = mmaccel.generation_report(model, **(options or {})).speculative  # of a full-length call
        first = median_ms(lambda: run(1), repeats, warmup=1, device=timer)
    return {"ms_per_token": (e2e - first) / (new - 1), "first_token_ms": first, "end_to_end_ms": e2e,
            "setup_s": setup_s, "tokens": tokens_again.cpu(), "deterministic": bool(torch.equal(tokens, tokens_again)),
            "speculative": report, **memory_row(device)}


def bench_model(name: str, model, ids, args, device: str, deadline: float) -> list[dict[str, Any]]:
    rows, plain = [], None
    for method, run in runners(model, ids, args.draft, args.k).items():
        row = {"model": name, "method": method}
        if time.perf_counter() > deadline:
            rows.append({**row, "skipped": "past its share of --budget-s"})
            continue
        try:
            mmaccel.generation_report(model).speculative = None
            result = bench_method(run, model, args.new_tokens, args.repeats, device)
        except Exception as e:  # a failing method is a result, not the end of the run
            rows.append({**row, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        tokens = result.pop("tokens")
        plain = tokens if method == "mmaccel" else plain
        speculative = result.pop("speculative") if "k=" in method else None
        row.update(result, same=None if plain is None else bool(torch.equal(tokens, plain)),
                   acceptance_rate=speculative and speculative["acceptance_rate"],
                   tokens_per_round=speculative and speculative["tokens_per_round"],
                   k_used=speculative and speculative["k"])
        rows.append(row)
    base = next((r["ms_per_token"] for r in rows if r["method"] == "mmaccel" and "ms_per_token" in r), None)
    for row in rows:
        if base and "ms_per_token" in row:
            row["speedup_vs_mmaccel"] = base / row["ms_per_token"]
    return rows


def print_row(row: dict[str, Any]) -> None:
    head = f"{row['model']:9} {row['method']:28}"
    if "ms_per_token" not in row:
        print(f"{head} {row.get('skipped') or 'FAILED ' + row['error'][:150]}", flush=True)
        return
    accept = "" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
    print(f"{head} {row['ms_per_token']:9.3f} {row.get('speedup_vs_mmaccel', 0):7.2f}x {accept:>7} "
          f"{row['tokens_per_round'] or '':>7} {row['first_token_ms']:9.1f} {row['setup_s']:7.1f}  "
          f"{'-' if row['same'] is None else 'yes' if row['same'] else 'NO'}", flush=True)


def plot(data: dict[str, Any], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in data["results"] if "ms_per_token" in r]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    labels = [f"{r['model']}: {r['method']}" for r in rows]
    ax.barh(labels, [r["ms_per_token"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms per new token (lower is better)")
    ax.set_title(f"speculative decoding, random weights ({data['environment']['device']})")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config, a few tokens (CPU check)")
    parser.add_argument("--mid", action="store_true", help="CPU: Llama dims scaled to hidden 1024, vocab 32000")
    parser.add_argument("--models", nargs="+", default=["random", "agreeing"], choices=["random", "agreeing"])
    parser.add_argument("--layers", type=int, default=None, help="target decoder layers (default 8; 4 with --tiny)")
    parser.add_argument("--draft", default=None, help="default layers:2 (layers:1 with --tiny)")
    parser.add_argument("--k", nargs="+", default=["4", "auto"], help="speculative_k values ('auto' allowed)")
    parser.add_argument("--agree-scale", type=float, default=0.0)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (12 with --tiny)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 with --tiny)")
    parser.add_argument("--budget-s", type=float, default=540, help="skip what is left past this many seconds")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/ or bench/results/speculative_*.json)")
    args = parser.parse_args()
    size = "tiny" if args.tiny else "mid" if args.mid else "8b"
    device = "cuda" if torch.cuda.is_available() and size == "8b" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.layers = args.layers or (4 if args.tiny else 8)
    args.draft = args.draft or ("layers:1" if args.tiny else "layers:2")
    args.new_tokens = args.new_tokens or (12 if args.tiny else 128)
    args.repeats = args.repeats or (2 if args.tiny else 5)
    out = args.out or default_out(f"speculative_{'' if size == '8b' else size + '_'}{device}.json")
    env = environment(device, dtype=str(dtype), layers=args.layers, draft=args.draft, new_tokens=args.new_tokens,
                      prompt_tokens=args.prompt_tokens, agree_scale=args.agree_scale, weights="random")
    ids = torch.randint(3, 90, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    print(f"{'model':9} {'method':28} {'ms/token':>9} {'speedup':>8} {'accept':>7} {'tok/rnd':>7} "
          f"{'first ms':>9} {'setup s':>7}  same")
    started, rows = time.perf_counter(), []
    for index, name in enumerate(args.models):
        share = (args.budget_s - (time.perf_counter() - started)) / (len(args.models) - index)
        scale = args.agree_scale if name == "agreeing" else None
        model = build(size, args.layers, int(args.draft.split(":")[1]), scale, device, dtype)
        for row in bench_model(name, model, ids, args, device, time.perf_counter() + share):
            rows.append(row)
            print_row(row)
        write_json(out, {"environment": env, "results": rows})  # after each model: a cut run keeps its rows
        del model
    print(f"wrote {out}")
    write_png(plot, {"environment": env, "results": rows}, png_beside(out), f"python bench/plot.py {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
