"""Token merging's accuracy on a trained tower where tokens matter: the 64x64 digits ViT (models/digits_canvas.py: HF
ViTForImageClassification, 65 tokens, 6 blocks: a digit among three distractors), test accuracy against the share of
token-blocks kept (the speed proxy: on an H200, CLIP ViT-L/14@336 with r16% kept 12% of them and ran 1.87x faster
than lossless, r8% 25% and 1.15x; README "Token merging").

Rows (eager target: accuracy only, CPU latency on a shared machine would say little):
- mmaccel: lossless;
- r4% ... r40%: every block merges that share of the tower's tokens, one of the lever's options pinned on every
  block (merged_per_block: the r each block's option asks for; token-blocks and tokens_last_block: what ToMe's
  clamp r <= (N - 1) // 2 leaves of it);
- agree@b: tokens="merge" at accuracy_budget b, `metric` = the share of calibration argmaxes that change
  (bench/prune_accuracy.py's): the classification decision; the solver chooses an option per block, and where
  the mix chosen from each block's error alone measures over budget, upgrades it by errors measured in context
  (passes/lossy.py improve_in_context: "step(s) measured in context" in the mix);
- err@b: the same with the default metric (relative error of the logits);
calibration: training digits with their own distractors (never tested on), CALIBRATION batches of 90.
Then "similarity" rows, eager PyTorch (merged_logits): at each pinned r, the similarity measured on the block input
(the pass's choice; equal to the compiled rows), on the keys of the block before, and ToMe's own placement (merge
between attention and MLP on that block's keys): whether building keys into the pass would buy accuracy.

    nice -n 19 python bench/token_merge_accuracy.py [--out bench/results/token_merge_digits64_cpu.json]
    python bench/token_merge_accuracy.py --plot-only bench/results/token_merge_digits64_cpu.json
"""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch

from common import default_out, environment, plot_only, png_beside, write_json, write_png
from mmaccel.models import digits, digits_canvas
from mmaccel.ops.token_merge import token_merge_reference
from mmaccel.passes import tokens as token_pass
from prune_accuracy import argmax_disagreement
from tokens import compiled, fraction_of, token_blocks

BATCH = 90  # test (1080 images: 12 calls) and calibration batches share it: one static shape, one graph
CALIBRATION = 4  # 360 training images: agree@0.01 lets 3 of their argmaxes change
PINNED = ("r4%", "r8%", "r16%", "r24%", "r32%", "r40%")
ERROR_BUDGETS = (0.1, 0.3)
SIMILARITIES = ("input", "keys", "late", "tome")
AGREE_BUDGETS = (0.01, 0.03)  # agree@0.01: the 1-point cost, on calibration images


def pinned_settings() -> list[tuple[str, dict[str, Any]]]:
    return [("mmaccel", {}), *((r, {"r": r}) for r in PINNED)]


def solver_settings() -> list[tuple[str, dict[str, Any]]]:
    calibration = [(p,) for p in digits_canvas.load_canvas("train", 1, seed=2)[0][:CALIBRATION * BATCH].split(BATCH)]
    return [*((f"agree@{b:g}", {"budget": b, "calibration": calibration, "metric": argmax_disagreement})
              for b in AGREE_BUDGETS),
            *((f"err@{b:g}", {"budget": b, "calibration": calibration}) for b in ERROR_BUDGETS)]


def merged_per_block(result: Any, tokens: int, r: str | None, blocks: int) -> list[int]:
    """Tokens merged before each block: a pinned row's r everywhere, else what the solver chose per site."""
    if r is not None:
        return [round(tokens * fraction_of(r))] * blocks
    options = token_pass.MergeLever._options(tokens)
    if result is None or not result.details:
        return [0] * blocks
    return [options.get(row["precision"], 0) for row in result.details["layers"]]


def measure(name: str, how: dict[str, Any], model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor],
            lossless: torch.Tensor | None) -> dict[str, Any]:
    torch._dynamo.reset()
    config = model.config
    tokens, blocks = (config.image_size // config.patch_size) ** 2 + 1, config.num_hidden_layers
    fn, first_call = compiled(model, target="eager", **how)
    pixels, labels = test
    with torch.no_grad():
        result = first_call(pixels[:BATCH])
        predicted = torch.cat([fn(p).logits.argmax(-1) for p in pixels.split(BATCH)])
    merged = merged_per_block(result, tokens, how.get("r"), blocks)
    last, share = token_blocks(tokens, merged)
    return {"setting": name, "merged_per_block": merged, "tokens_last_block": last, "token_blocks": share,
            "accuracy": float((predicted == labels).float().mean()),
            "agreement": None if lossless is None else float((predicted == lossless).float().mean()),
            "measured": None if "r" in how or result is None else result.measured_error,
            "mix": result.changes[0].split("; constants")[0] if result is not None and result.changes else "",
            "predicted": predicted}


def run(settings: list[tuple[str, dict[str, Any]]], model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor],
        data: dict[str, Any], out: str) -> None:
    """A row per setting into data["results"] (the first: lossless), the JSON rewritten after each."""
    for name, how in settings:
        rows = data["results"]
        row = measure(name, how, model, test, rows[0]["predicted"] if rows else None)
        row["points_lost"] = 100 * (rows[0]["accuracy"] - row["accuracy"]) if rows else 0.0
        rows.append(row)
        measured = "-" if row["measured"] is None else f"{row['measured']:.3g}"
        print(f"{name:>12}  token-blocks {row['token_blocks']:4.0%}  last block {row['tokens_last_block']:2}  "
              f"accuracy {row['accuracy']:.4f} ({-row['points_lost']:+.2f})  agree {row['agreement'] or 1:.4f}  "
              f"measured {measured}  {row['mix'][:60]}", flush=True)
        write_json(out, {**data, "results": [{k: v for k, v in r.items() if k != "predicted"} for r in rows]},
                   indent=1)


def _merge(x: torch.Tensor, size: torch.Tensor | None, r: int,
           metric: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    r = min(r, (x.shape[1] - 1) // 2)
    return (x, size) if r < 1 else token_merge_reference(x, size, None, r, metric)[:2]


@torch.no_grad()
def merged_logits(model: torch.nn.Module, pixels: torch.Tensor, r: int, similarity: str) -> torch.Tensor:
    """The HF ViT run block by block in eager PyTorch with r tokens merged per block (size-weighted attention through
    the mask, as the pass does), similarity measured on: "input" each block's input (what the pass does: these rows
    check it), "keys" the keys of the block before averaged over heads (its input for the first block), "late" as
    "input" but nothing merged before the first block, "tome" inside each block between attention and MLP on that
    block's keys (ToMe's own placement: attention runs unmerged)."""
    vit, heads = model.vit, model.config.num_attention_heads
    keys: list[torch.Tensor] = []
    hooks = [layer.attention.k_proj.register_forward_hook(lambda m, i, out: keys.append(out)) for layer in vit.layers]
    x, size = vit.embeddings(pixels), None
    try:
        for layer in vit.layers:
            if similarity != "tome" and (keys or similarity != "late"):
                metric = keys[-1].unflatten(-1, (heads, -1)).mean(2) if similarity == "keys" and keys else None
                x, size = _merge(x, size, r, metric)
            bias = None if size is None else size.log()[:, None, None, :]
            if similarity != "tome":
                x = layer(x, bias)
                continue
            x = x + layer.attention(layer.layernorm_before(x), bias)[0]
            x, size = _merge(x, size, r, keys[-1].unflatten(-1, (heads, -1)).mean(2))
            x = x + layer.mlp(layer.layernorm_after(x))
    finally:
        for hook in hooks:
            hook.remove()
    return model.classifier(vit.layernorm(x)[:, 0])


def _similarity_token_blocks(tokens: int, r: int, blocks: int, similarity: str) -> float:
    """Token-blocks kept: "late" merges before blocks 2.., "tome" runs each attention on the tokens before its
    block's merge and each MLP after it (half a block each)."""
    every, late = token_blocks(tokens, [r] * blocks)[1], token_blocks(tokens, [0] + [r] * (blocks - 1))[1]
    return {"late": late, "tome": (late + every) / 2}.get(similarity, every)


def similarity_rows(model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor],
                    lossless: float) -> list[dict[str, Any]]:
    """Test accuracy of each similarity at each pinned r (eager PyTorch, merged_logits)."""
    pixels, labels = test
    tokens, rows = (model.config.image_size // model.config.patch_size) ** 2 + 1, []
    blocks = model.config.num_hidden_layers
    for r in PINNED:
        for similarity in SIMILARITIES:
            merged = round(tokens * fraction_of(r))
            predicted = torch.cat([merged_logits(model, p, merged, similarity).argmax(-1) for p in pixels.split(BATCH)])
            accuracy = float((predicted == labels).float().mean())
            rows.append({"r": r, "similarity": similarity, "token_blocks": _similarity_token_blocks(tokens, merged,
                         blocks, similarity), "accuracy": accuracy, "points_lost": 100 * (lossless - accuracy)})
            print(f"  {r:>5} similarity {similarity:>5}: token-blocks {rows[-1]['token_blocks']:4.0%}  accuracy "
                  f"{accuracy:.4f} ({-rows[-1]['points_lost']:+.2f})", flush=True)
    return rows


def plot(data: dict[str, Any], png_path: str) -> None:
    """Test accuracy against token-blocks kept, a point per row, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in data["results"]:
        pinned = row["setting"].startswith("r") or row["setting"] == "mmaccel"
        ax.scatter(100 * row["token_blocks"], 100 * row["accuracy"], color="C0" if pinned else "C3", zorder=2)
        ax.annotate(row["setting"], (100 * row["token_blocks"], 100 * row["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("token-blocks kept (% of the unmerged tower's)")
    ax.set_ylabel("test accuracy (%, 1080 images)")
    ax.set_title("token merging on the 64x64 digits ViT (65 tokens, 6 blocks); blue: r pinned, red: solver",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=150)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=default_out("token_merge_digits64_cpu.json"))
    p.add_argument("--plot-only", metavar="JSON", help="only draw the PNG of an existing JSON")
    args = p.parse_args()
    if args.plot_only:
        return plot_only(args.plot_only, plot, "bench/token_merge_accuracy.py")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    model, test = digits_canvas.load_classifier(), digits_canvas.load_canvas("test")
    data = {"environment": environment("cpu", threads=args.threads, batch=BATCH, calibration_batches=CALIBRATION),
            "results": [], "similarity": []}
    run(pinned_settings(), model, test, data, args.out)
    data["similarity"] = similarity_rows(model, test, data["results"][0]["accuracy"])
    run(solver_settings(), model, test, data, args.out)
    for row in data["results"]:
        del row["predicted"]
    data["environment"]["total_s"] = time.perf_counter() - start
    write_json(args.out, data, indent=1)
    print(f"wrote {args.out}")
    write_png(plot, data, png_beside(args.out), f"python bench/token_merge_accuracy.py --plot-only {args.out}")


if __name__ == "__main__":
    main()
