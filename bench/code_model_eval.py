"""Speculative decoding and cascading on the TRAINED code-model pair (bench/train_code_model.py, issue 16), in one
run on one machine, on prompts from the held-out stdlib files (never trained on).

    python bench/code_model_eval.py --train                 # CUDA: train both models (~5 min), then evaluate
    python bench/code_model_eval.py --weights DIR           # evaluate models trained before
    python bench/code_model_eval.py --tiny --train          # CPU: tiny models, a mechanism check (~1-2 min)

(a) Speculative: plain mmaccel.generate, then draft=<the trained draft> and the drafts derived from the target
(--self-draft: default "layers:N", self-speculation on the target's early-exit layer, N from its training.json;
also e.g. "pruned:0.5+int4_weight_only"), each with speculative_k 4 and "auto"; per prompt as
bench/speculative.py times it (after a warm-up call that compiles, median of --repeats calls; ms/token =
(end-to-end - first token) / (new tokens - 1)), then the median over prompts. "same": prompts whose tokens equal
plain greedy's (bf16 rounding can flip a near-tie: the k+1-position verify rounds differently from a one-token
step). Acceptance: mean over prompts of generation_report(target).speculative's acceptance rate.
(b) Cascade: mmaccel.cascade(draft, target) calibrated on held-out prompt set A under accuracy_budget, once
against agreement with the target and once against set A's true next bytes (references=), evaluated on a
disjoint set B against the GROUND TRUTH: a request
is correct when its --answer-bytes new bytes equal the file's next bytes exactly (per-byte accuracy reported too),
for the target alone, the draft alone and the cascade; latency: mean ms per request (the cascade's includes the
small model's confidence forward and, when not routed, the target's answer); saved = 1 - cascade / target.

Prompts: --prompt-bytes bytes ending at evenly spaced offsets of the held-out bytes (speculative: --prompts of
them; cascade: 2 * --cascade-prompts more, alternately to A and B). JSON under $OUT/ (or bench/results/) and a
short table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import train_code_model as training
from common import default_out, environment, write_json
from speculative import bench_method
from transformers import LlamaForCausalLM

import mmaccel


def prompts(held_out: torch.Tensor, count: int, length: int, answer: int, phase: float) -> list[torch.Tensor]:
    """`count` windows of length + answer bytes ending at evenly spaced offsets (shifted by `phase` of a gap)."""
    gap = (len(held_out) - length - answer) / count
    starts = [int((i + phase) * gap) for i in range(count)]
    return [held_out[s:s + length + answer] for s in starts]


def load(folder: Path, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return model.eval().requires_grad_(False)


def speculative_methods(target, draft, derived: list[str], ks: list[str], options: dict[str, Any]
                        ) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    common = dict(eos_token_id=[], pad_token_id=training.PAD, do_sample=False, options=options)
    methods = {"plain": lambda ids, n: mmaccel.generate(target, ids, max_new_tokens=n, **common)}
    for name, draft_arg in (("draft", draft), *((d, d) for d in derived)):
        for k in ks:
            methods[f"{name} k={k}"] = lambda ids, n, d=draft_arg, sk=(k if k == "auto" else int(k)): \
                mmaccel.generate(target, ids, max_new_tokens=n, draft=d, speculative_k=sk, **common)
    return methods


def speculative_rows(target, draft, windows: list[torch.Tensor], args, device: str) -> list[dict[str, Any]]:
    rows, plain_tokens = [], []
    for method, run in speculative_methods(target, draft, args.self_draft, args.k, args.options).items():
        per_prompt = []
        for index, window in enumerate(windows):
            ids = window[None, :args.prompt_bytes].to(device)
            mmaccel.generation_report(target, **args.options).speculative = None
            per_prompt.append(bench_method(lambda n, ids=ids: run(ids, n), target, args.new_tokens, args.repeats,
                                           device, args.options))
            if method == "plain":
                plain_tokens.append(per_prompt[-1]["tokens"])
        if method == "plain":
            rows_check = one_call_per_step_check(target, windows[0][None, :args.prompt_bytes].to(device),
                                                 plain_tokens[0], args)
        same = sum(bool(torch.equal(r["tokens"], p)) for r, p in zip(per_prompt, plain_tokens))
        accept = [r["speculative"]["acceptance_rate"] for r in per_prompt if r["speculative"]]
        rows.append({**(rows_check if method == "plain" else {}), "method": method, "ms_per_token": statistics.median(r["ms_per_token"] for r in per_prompt),
                     "first_token_ms": statistics.median(r["first_token_ms"] for r in per_prompt),
                     "setup_s": per_prompt[0]["setup_s"], "same_prompts": same, "prompts": len(per_prompt),
                     "acceptance_rate": statistics.mean(accept) if accept else None,
                     "k_used": [r["speculative"]["k"] for r in per_prompt] if accept else None})
        print_speculative(rows[-1], rows[0]["ms_per_token"])
    return rows


def one_call_per_step_check(target, ids: torch.Tensor, tokens: torch.Tensor, args) -> dict[str, Any]:
    """The recorded decode blocks (compiler/step_graphs.py) against one compiled call per step and no CUDA graph
    at all (cuda_graphs=False; the same generated kernels): the tokens must be identical."""
    per_step = mmaccel.generate(target, ids, max_new_tokens=tokens.shape[1] - ids.shape[1], eos_token_id=[],
                                pad_token_id=training.PAD, do_sample=False,
                                options={**args.options, "cuda_graphs": False})
    same = bool(torch.equal(per_step.cpu(), tokens.cpu()))
    print(f"decode blocks vs one call per step (no CUDA graphs): {'identical' if same else 'DIFFERENT'} tokens")
    return {"blocks_equal_one_call_per_step": same}


def print_speculative(row: dict[str, Any], plain_ms: float) -> None:
    row["speedup"] = plain_ms / row["ms_per_token"]
    accept = "" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
    print(f"{row['method']:18} {row['ms_per_token']:9.3f} {row['speedup']:7.2f}x {accept:>7} "
          f"{row['first_token_ms']:9.1f} {row['setup_s']:7.1f} {row['same_prompts']:>4}/{row['prompts']}", flush=True)


def answer_scores(tokens: torch.Tensor, window: torch.Tensor, prompt: int) -> tuple[bool, float]:
    """(all answer bytes equal the ground truth, fraction of them that do)."""
    answer, truth = tokens[0, prompt:].cpu(), window[prompt:]
    hits = answer[:len(truth)] == truth[:len(answer)]
    return len(answer) == len(truth) and bool(hits.all()), float(hits.float().mean())


def timed(run: Callable[[], torch.Tensor], device: str) -> tuple[torch.Tensor, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens, (time.perf_counter() - start) * 1e3


def cascade_rows(target, draft, set_a: list[torch.Tensor], set_b: list[torch.Tensor], args,
                 device: str) -> list[dict[str, Any]]:
    gen = dict(max_new_tokens=args.answer_bytes, eos_token_id=[], pad_token_id=training.PAD, options=args.options)
    prompt = args.prompt_bytes
    requests = [w[None, :prompt].to(device) for w in set_b]
    alone = {}
    for name, model in (("target", target), ("draft", draft)):
        mmaccel.generate(model, requests[0], **gen)  # compiles
        answers = [timed(lambda r=r: mmaccel.generate(model, r, **gen), device) for r in requests]
        alone[name] = summary([answer_scores(t, w, prompt) for (t, _), w in zip(answers, set_b)],
                              [ms for _, ms in answers])
    rows = [{"method": f"{name} alone", **value} for name, value in alone.items()]
    calibration = [w[None, :prompt].to(device) for w in set_a]
    for budget in args.budgets:
        for against, references in (("agreement", None), ("truth", [w[prompt:] for w in set_a])):
            pair = mmaccel.cascade(draft, target, calibration=calibration, references=references,
                                   accuracy_budget=budget, **gen)
            rows.append(cascade_row(pair, requests, set_b, prompt, device, alone["target"]))
            rows[-1]["method"] = f"cascade {against} {budget}"
            rows[-1]["calibration_accuracy"] = pair.report.calibration_accuracy
    for row in rows:
        print_cascade(row)
    return rows


def cascade_row(pair, requests: list[torch.Tensor], set_b: list[torch.Tensor], prompt: int, device: str,
                target_alone: dict[str, float]) -> dict[str, Any]:
    """The calibrated cascade on set B: accuracy, the fraction the draft served, latency against the target's."""
    scores, served, latencies = [], 0, []
    for request, window in zip(requests, set_b):
        before = pair.report.routed
        tokens, ms = timed(lambda r=request: pair(r), device)
        served += pair.report.routed - before
        scores.append(answer_scores(tokens, window, prompt))
        latencies.append(ms)
    row = {**summary(scores, latencies), "served_by_draft": served / len(set_b), "threshold": pair.report.threshold,
           "calibration_routed": pair.report.calibration_routed,
           "calibration_loss_vs_target": pair.report.calibration_loss}
    row["accuracy_loss_points"] = 100 * (target_alone["exact_match"] - row["exact_match"])
    row["latency_saved"] = 1 - row["ms_per_request"] / target_alone["ms_per_request"]
    return row


def summary(scores: list[tuple[bool, float]], latencies: list[float]) -> dict[str, float]:
    return {"exact_match": statistics.mean(float(s[0]) for s in scores),
            "byte_accuracy": statistics.mean(s[1] for s in scores), "ms_per_request": statistics.mean(latencies)}


def print_cascade(row: dict[str, Any]) -> None:
    extra = "" if "served_by_draft" not in row else (
        f"  served by draft {row['served_by_draft']:.0%}, loss {row['accuracy_loss_points']:+.1f} pt, "
        f"latency saved {row['latency_saved']:.0%}")
    print(f"{row['method']:22} exact {row['exact_match']:.3f} bytes {row['byte_accuracy']:.3f} "
          f"{row['ms_per_request']:8.1f} ms{extra}", flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU (mechanism only)")
    p.add_argument("--train", action="store_true", help="train the pair first (bench/train_code_model.py)")
    p.add_argument("--train-budget-s", type=float, nargs=2, default=None, metavar=("TARGET", "DRAFT"),
                   help="training seconds of each model (default: bench/train_code_model.py's)")
    p.add_argument("--weights", type=Path, default=None, help="folder with target/ and draft/")
    p.add_argument("--prompts", type=int, default=None, help="speculative prompts (16; 2 with --tiny)")
    p.add_argument("--prompt-bytes", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=None, help="speculative new tokens (128; 16 with --tiny)")
    p.add_argument("--k", nargs="+", default=["4", "auto"])
    p.add_argument("--self-draft", nargs="+", default=None,
                   help="drafts derived from the target, e.g. layers:4 pruned:0.5+int4_weight_only (default "
                        "layers:<the target's early-exit layer>)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per prompt (3; 1 with --tiny)")
    p.add_argument("--cascade-prompts", type=int, default=None, help="per set A and B (100; 8 with --tiny)")
    p.add_argument("--answer-bytes", type=int, default=8, help="cascade answer length, scored by exact match")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01])
    p.add_argument("--target", default=None, help="mmaccel target (default: mmaccel's auto)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/ or bench/results/code_model_*.json)")
    p.add_argument("--parts", nargs="+", choices=["speculative", "cascade"], default=["speculative", "cascade"],
                   help="which parts to run (both by default)")
    args = p.parse_args(argv)
    tiny = args.tiny
    for name, value in dict(prompts=(2 if tiny else 16), new_tokens=(16 if tiny else 128), repeats=(1 if tiny else 3),
                            cascade_prompts=(8 if tiny else 100), weights=training.default_dir(tiny)).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.options = {"target": args.target} if args.target else {}
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.train:
        budget = [] if args.train_budget_s is None else \
            ["--budget-s", str(args.train_budget_s[0]), "--draft-budget-s", str(args.train_budget_s[1])]
        training.main(["--out", str(args.weights), *budget, *(["--tiny"] if args.tiny else [])])
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    target, draft = load(args.weights / "target", device, dtype), load(args.weights / "draft", device, dtype)
    return evaluate(args, target, draft)


def evaluate(args: argparse.Namespace, target: LlamaForCausalLM, draft: LlamaForCausalLM) -> dict[str, Any]:
    """Both parts on the loaded pair; the JSON is written after each."""
    device, dtype = target.device.type, target.dtype
    trained = {name: json.loads((args.weights / name / "training.json").read_text()) for name in ("target", "draft")}
    args.self_draft = args.self_draft or [f"layers:{trained['target']['early_exit_layer']}"]
    held_out = training.encode(training.source_files()[1])
    spec_windows = prompts(held_out, args.prompts, args.prompt_bytes, 0, 0.25)
    cascade_windows = prompts(held_out, 2 * args.cascade_prompts, args.prompt_bytes, args.answer_bytes, 0.75)
    out = args.out or default_out(f"code_model_{'tiny_' if args.tiny else ''}{device}.json")
    data = {"environment": environment(device, dtype=str(dtype), weights=str(args.weights),
                                       **{k: v for k, v in vars(args).items() if k not in ("weights", "train")}),
            "training": trained}
    if "speculative" in args.parts:
        print(f"{'method':18} {'ms/token':>9} {'speedup':>8} {'accept':>7} {'first ms':>9} {'setup s':>7} same")
        data["speculative"] = speculative_rows(target, draft, spec_windows, args, device)
        write_json(out, data)  # a failing cascade keeps the speculative rows
    if "cascade" in args.parts:
        data["cascade"] = cascade_rows(target, draft, cascade_windows[0::2], cascade_windows[1::2], args, device)
        write_json(out, data)
    print(f"wrote {out}")
    return data


if __name__ == "__main__":
    main()
