"""Token merging (tokens="merge"): latency against error for each r, on an HF CLIP vision tower with random weights
(built from its config, nothing downloaded), and the trained digits ViT classifier's test accuracy against r.

Rows: HF eager; Inductor (torch.compile default, --baselines); mmaccel lossless; mmaccel tokens="merge" with one r
for every block (each of the lever's options, r40% to r4% of the tower's tokens, clamped by ToMe's rule to
(N - 1) // 2 of the tokens that reach a block; README's tables predate r24-40%: r16%, r8%, r4%). A row pins its r by narrowing the lever's options to one (passes/tokens.py FRACTIONS) and switching
the budget check off; a user chooses through accuracy_budget instead (the digits rows "merge@budget" show the
solver's choice). Random weights make every token unlike its neighbours, so the errors of the CLIP rows are an upper
bound of what a trained tower gives; the digits accuracy is the trained model's. Error: ||out - eager|| / ||eager||
of last_hidden_state (every token, unmerged) and of pooler_output (the class token) on a held-out batch.

    python bench/tokens.py                                   # CPU: CLIP ViT-B/16 at 224, batch 1, float32
    python bench/tokens.py --model l14-336 --batch 8 --device cuda --dtype bfloat16 --baselines eager,inductor \\
        --out $OUT/tokens_h200.json                          # GPU: LLaVA-1.5's tower, CUDA graphs
    python bench/tokens.py --model tiny --repeats 3 --out /tmp/tokens.json             # a smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from typing import Any, Callable
from unittest import mock

import torch

import mmaccel
from common import default_out, environment, rel_err, write_json
from mmaccel.models import digits
from mmaccel.passes import lossy, tokens as token_pass
from mmaccel.timing import median_ms

CONFIGS = {  # CLIPVisionConfig arguments
    "b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16),
    "l14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8),
}
DIGITS_BUDGETS = (0.05, 0.1, 0.2, 0.5)  # the solver's own choice on the trained model


def clip_vision(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**CONFIGS[name], attn_implementation="sdpa"))
    return model.eval().requires_grad_(False).to(device, dtype)


def compiled(model: Callable, r: str | None = None, budget: float | None = None,
             **options: Any) -> tuple[Callable, Callable[..., Any]]:
    """(the compiled model, its first call: compiles and returns the lossy pass's result or None). `r`: every block
    merges that r (an option's name, or "r24%": a fraction beyond the lever's options): the lever's options narrowed
    to it and the budget check switched off (the mechanism's metric reads 0), so the row times that r everywhere; its error is what this script measures on a held-out batch.
    `budget`: tokens="merge" at that accuracy_budget, the solver's choice."""
    if r is None and budget is None:
        fn = mmaccel.compile(model, **options)
        return fn, lambda *a: (fn(*a), None)[1]
    fn = mmaccel.compile(model, tokens="merge", accuracy_budget=budget or 0.5, **options)

    def first_call(*args: Any) -> Any:
        with contextlib.ExitStack() as pins:
            if r is not None:
                pins.enter_context(mock.patch.dict(token_pass.FRACTIONS, {r: fraction_of(r)}, clear=True))
                pins.enter_context(mock.patch.object(lossy, "pooled_relative_error", lambda out, ref: 0.0))
            fn(*args)
        return next((p for g in fn.mmaccel_report.graphs for p in g.passes if p.lossy), None)
    return fn, first_call


def fraction_of(r: str) -> float:
    """A pinned row's r as a fraction of the tower's tokens: "r16%" -> 0.16."""
    return token_pass.FRACTIONS.get(r) or float(r.removeprefix("r").removesuffix("%")) / 100


def token_blocks(tokens: int, merged: list[int]) -> tuple[int, float]:
    """(tokens entering the last block, token-blocks as a fraction of the unmerged tower's) when block i merges
    merged[i] tokens before it, clamped as the pass clamps it."""
    counts, n = [], tokens
    for r in merged:
        n -= min(r, (n - 1) // 2)
        counts.append(n)
    return counts[-1], sum(counts) / (tokens * len(merged))


def clip_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = getattr(torch, args.dtype)
    model = clip_vision(args.model, args.device, dtype)
    size = CONFIGS[args.model]["image_size"]
    calibration, held_out = (torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
                              .to(args.device, dtype) for seed in (0, 1))
    with torch.no_grad():
        reference = model(held_out)
    # made one at a time, after torch._dynamo.reset(): compiles of one model share Dynamo's cache on its code
    runs: list[tuple[str, Callable[[], tuple[Callable, Any]]]] = [("eager", lambda: (model, None))]
    if "inductor" in args.baselines:
        runs.append(("inductor", lambda: (torch.compile(model), None)))
    runs.append(("mmaccel", lambda: compiled(model, None, target=args.target)))
    runs += [(f"merge {r}", lambda r=r: compiled(model, r, target=args.target)) for r in token_pass.FRACTIONS]
    rows = []
    for name, make_run in runs:
        torch._dynamo.reset()
        fn, first_call = make_run()
        start = time.perf_counter()
        with torch.no_grad():
            result = first_call(calibration) if first_call else fn(calibration) and None  # no lossy pass
            compile_s = time.perf_counter() - start
            out = fn(held_out)
            ms = median_ms(lambda: fn(held_out), args.repeats, 2, args.device)
        config = CONFIGS[args.model]
        tokens = (config["image_size"] // config["patch_size"]) ** 2 + 1
        fraction = token_pass.FRACTIONS.get(name.removeprefix("merge "), 0.0)
        last, share = token_blocks(tokens, [round(tokens * fraction)] * config["num_hidden_layers"])
        rows.append({"setting": name, "ms": ms, "compile_s": compile_s, "tokens_last_block": last,
                     "token_blocks": share,
                     "error_tokens": rel_err(out.last_hidden_state, reference.last_hidden_state),
                     "error_pooled": rel_err(out.pooler_output, reference.pooler_output),
                     "reported": None if name.startswith("merge") else getattr(result, "measured_error", None),
                     "mix": _mix(result)})
        print(_line(rows[-1], rows), flush=True)
    return rows


def digits_rows() -> list[dict[str, Any]]:
    """The trained digits ViT (17 tokens, 3 blocks): test accuracy at each r (r16% = 3 tokens a block, r8% = r4% =
    1), and the solver's choice at a few budgets (calibration: 90 training images)."""
    model = digits.load_classifier().eval()
    pixels, labels = digits.load_digits("test")
    settings = [("mmaccel", {}), *((r, {"r": r}) for r in token_pass.FRACTIONS),
                *((f"merge@{b:g}", {"budget": b}) for b in DIGITS_BUDGETS)]
    rows = []
    for name, how in settings:
        torch._dynamo.reset()
        fn, first_call = compiled(model, target="eager", **how)
        with torch.no_grad():
            result = first_call(digits.load_digits("train")[0][:90])
            rows.append({"setting": name, "accuracy": digits.accuracy(fn, pixels, labels),
                         "reported": None if "r" in how or result is None else result.measured_error,
                         "mix": _mix(result)})
        print(f"digits {name:>10}  accuracy {rows[-1]['accuracy']:.4f}  {rows[-1]['mix'][:110]}", flush=True)
    return rows


def _mix(result: Any) -> str:
    """What the pass chose ("merge: 12 of 12 block(s) merging tokens (r8% x12)"), without its error (a pinned
    row's reads 0: its check was off) and constants."""
    return result.changes[0].split("; constants")[0] if result is not None and result.changes else ""


def _line(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    reported = "-" if row["reported"] is None else f"{row['reported']:.3f}"
    lossless = next((r["ms"] for r in rows if r["setting"] == "mmaccel"), None)
    versus = f"x{lossless / row['ms']:5.2f} vs mmaccel" if lossless else " " * 16
    return (f"{row['setting']:>10}  {row['ms']:9.2f} ms  x{rows[0]['ms'] / row['ms']:5.2f} vs eager  {versus}  "
            f"last block {row['tokens_last_block']:4} tokens ({row['token_blocks']:.0%} token-blocks)  error tokens "
            f"{row['error_tokens']:.3f} pooled {row['error_pooled']:.3f} (reported {reported})  {row['mix'][:70]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(CONFIGS), default="b16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--target", default="auto")
    p.add_argument("--baselines", default="eager", help="comma-separated: eager is always run; inductor")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    out = args.out or default_out(f"tokens_{args.model}_{args.device}.json")
    settings = {k: v for k, v in vars(args).items() if k != "device"}
    data = {"environment": environment(args.device, **settings), "clip": clip_rows(args)}
    write_json(out, data)
    if args.device == "cpu":
        data["digits"] = digits_rows()
    write_json(out, data)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
