"""Accuracy against kept linear-weight bytes against CPU latency of structural pruning, on models with trained
weights: the digits ViT classifier (test accuracy), the digits captioner (exact-match greedy captions) and
all-MiniLM-L6-v2 (lowest cosine similarity of sentence embeddings to fp32's, and whether each text ranks the others
by similarity as fp32 does), side by side with Torch-Pruning at equal kept parameters.

Rows (each compiled for the onnxruntime target after torch._dynamo.reset(), with the calibration samples of
bench/quantize_accuracy.py's cases; the classifier's from the whole training set instead (CLASSIFIER_CALIBRATION);
MiniLM's instead: ~26,000 tokens of standard-library docstring sentences, enough for the refit of its 1536-channel
MLPs, and ~13,000 of random sentences of its vocabulary's words (MINILM_VOCABULARY_TOKENS); its cosine measured
on the 8 texts and on held-out docstring sentences, never calibrated on):
- fp32: mmaccel without pruning;
- mlp-25% / mlp-50% / heads-50%: every MLP (attention) at one fraction removed, whatever the error (the option's
  fixed-fraction form, prune={"mlp_channels": 0.25}, at budget 0.99): the fixed points Torch-Pruning is compared at;
- auto@b: prune="auto" (MLP channels, heads, blocks in one solve) at accuracy_budget b;
- agree@b: the same with a user metric (the `metric` option): the fraction of the calibration outputs' argmax
  (class, or next token at each position) that differs from the unpruned graph's, at most b; the
  classifier and captioner (MiniLM's output has no argmax: skipped);
- tp mlp-25% / tp mlp-50%: Torch-Pruning 1.6 (MagnitudeImportance, L2, the tool's default; no calibration, no
  refit), the same MLP intermediate channels removed from every MLP, then compiled by mmaccel unpruned. Skipped
  with a note when torch_pruning is not installed (`pip install torch-pruning`: a bench-only dependency).
"kept": linear-weight bytes of the last compiled graph (the weights its matmuls read) over fp32's, for every row.
Latency: median of `--repeats` calls after warm-up.

    python bench/prune_accuracy.py [--models classifier,captioner,minilm] [--mixes auto@0.1,...] [--repeats 10]
                                   [--threads 2] [--out bench/results/prune_accuracy_cpu.json]
    python bench/prune_accuracy.py --quick --out /tmp/prune_accuracy.json    # a smoke test
    python bench/prune_accuracy.py --plot-only bench/results/prune_accuracy_cpu.json
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Callable

import torch

import mmaccel
from common import accuracy_bench_parser, environment, plot_only, run_models
from mmaccel.models import minilm
from quantize_accuracy import CASES, Case, classifier_case, latency_ms

# MiniLM calibration: the refit of a 1536-channel MLP needs 16 tokens per channel (prune.REFIT_TOKENS_PER_CHANNEL),
# 24,576; the bench's 16 texts hold 256 (no refit: lowest cosine 0.83 at mlp-25%)
MINILM_CALIBRATION_TOKENS = 26_000
# ... plus this many tokens of minilm.vocabulary_sentences: docstrings alone never reach the words of the 8 texts
# (guitars, dogs, revenue), and the channels that answer those words look idle, so they go first and the refit
# cannot move their work: at mlp-25% the texts' tokens (every kind, not [CLS] or [SEP] alone) came out with
# relative error 0.36-0.55 (0.22 for the text on quantized weights) against 0.18 on average for held-out
# docstrings, the removed channels 15-35% more active on the texts than in calibration, relative to the kept ones.
# Measured on the module (prune.removal_order and refit_columns as the pass runs them; lowest cosine texts /
# held-out, mlp-25%): docstrings 26,000 tokens 0.842 / 0.952; + 13,000 vocabulary tokens 0.926 / 0.950;
# docstrings 13,000 + vocabulary 13,000 0.920 / 0.928; docstrings 39,000 + vocabulary 20,000 0.930 / 0.946;
# vocabulary alone 26,000 0.839 / 0.770. The mix was picked from these by the bench's own metric (the texts
# themselves are never calibrated on; no sentence was chosen).
MINILM_VOCABULARY_TOKENS = 13_000
# The classifier calibrated on 15 training batches of 90 (1350 of the 1437 training images), not the quantization
# bench's 2: at 2 (180 predictions) agree@0.01 changed 0.6% of them yet 1.4 points of the 360 test images; at 15 it
# changes 0.5% and costs 0.55 test points (fine MLP steps, 30% of linear weights removed), and every refit sees
# 23,000 tokens instead of 3,000. Its rows take ~2 min in all.
CLASSIFIER_CALIBRATION = 15
MINILM_HELD_OUT = 120  # docstring sentences (every 10th, from the first) measured and never calibrated on
AUTO_BUDGETS = (0.03, 0.1, 0.3)
AGREE_BUDGETS = (0.01, 0.02)  # agree@0.01: at most 1% of the calibration argmaxes change (the issue's 1-point drop)
FIXED_BUDGET = 0.99  # fixed fractions: applied whatever the error (the one option below ORIGINAL is always cheapest)
FIXED: dict[str, dict[str, float]] = {  # mix -> the prune option: a fixed fraction of one structure removed
    "mlp-25%": {"mlp_channels": 0.25},
    "mlp-50%": {"mlp_channels": 0.5},
    "mlp-75%": {"mlp_channels": 0.75},
    "heads-50%": {"heads": 0.5},
}
TORCH_PRUNING = {"tp mlp-25%": 0.25, "tp mlp-50%": 0.5}
QUICK_MIXES = ("fp32", "mlp-25%", "tp mlp-25%")


def graph_linear_bytes(report: mmaccel.CompileReport) -> int:
    """Bytes of the weights the last graph's matmuls read (fused_linear, mm, addmm on a constant)."""
    gm = report.graphs[-1].final_graph
    seen, total = set(), 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(k in str(node.target) for k in ("fused_linear", "aten.mm", "addmm")):
            for arg in node.args[:3]:
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and arg.target not in seen:
                    value = getattr(gm, arg.target)
                    if value.dim() == 2:
                        seen.add(arg.target)
                        total += value.numel() * value.element_size()
    return total


def prune_summary(report: mmaccel.CompileReport) -> dict[str, Any]:
    graph = report.graphs[-1]
    lossy = [p for p in graph.passes if p.lossy]
    if not lossy:
        return {"applied": None}
    result = lossy[-1]
    layers = result.details.get("layers", []) if result.details else []
    return {"applied": result.matched > 0, "measured_error": result.measured_error,
            "choices": {f"{r['layer']} ({r['lever']})": r["precision"] for r in layers},
            "change": result.changes[0] if result.changes else ""}


def minilm_case() -> Case:
    """all-MiniLM-L6-v2 calibrated on docstring and vocabulary sentences (minilm.length_batches: no padding);
    metric: the lowest cosine to fp32 over minilm.TEXTS and MINILM_HELD_OUT held-out sentences (extras: each
    set's, and the ranking)."""
    model, tokenizer = minilm.load()
    model.requires_grad_(False)
    sentences = minilm.docstring_sentences()
    calibration = (minilm.length_batches(tokenizer, [s for i, s in enumerate(sentences) if i % 10],
                                         MINILM_CALIBRATION_TOKENS)
                   + minilm.length_batches(tokenizer, minilm.vocabulary_sentences(tokenizer, 2000),
                                           MINILM_VOCABULARY_TOKENS))
    texts = minilm.TEXTS + sentences[::10][:MINILM_HELD_OUT]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    timed = tokenizer(minilm.TEXTS, padding=True, return_tensors="pt")

    def cosines(run: Callable) -> torch.Tensor:
        with torch.no_grad():
            return (minilm.sentence_embeddings(run, ids, mask) * reference).sum(-1)

    reference = minilm.sentence_embeddings(model, ids, mask).detach()

    def extras(run: Callable) -> dict[str, float]:
        cos, n = cosines(run), len(minilm.TEXTS)
        return {"min_cosine_texts": float(cos[:n].min()), "min_cosine_held_out": float(cos[n:].min()),
                "mean_cosine": float(cos.mean()), "same_ranking": minilm_ranking(run)}

    return Case("all-MiniLM-L6-v2", model, "min cosine to fp32 (texts and held-out docstrings)",
                lambda run: float(cosines(run).min()),
                lambda run: lambda: run(timed["input_ids"], timed["attention_mask"]), calibration,
                f"ids, mask [{timed['input_ids'].shape[0]}, {timed['input_ids'].shape[1]}]", extras)


def minilm_ranking(run: Callable) -> float:
    """Fraction of the texts that rank the other texts by embedding similarity exactly as fp32 does."""
    model, tokenizer = minilm.load()
    batch = tokenizer(minilm.TEXTS, padding=True, return_tensors="pt")

    def order(fn: Callable) -> torch.Tensor:
        with torch.no_grad():
            e = minilm.sentence_embeddings(fn, batch["input_ids"], batch["attention_mask"])
        return (e @ e.T).fill_diagonal_(-2).argsort(dim=1, descending=True)

    return float((order(run) == order(model)).all(dim=1).double().mean())


def torch_pruned(model: torch.nn.Module, example: tuple[torch.Tensor, ...], ratio: float) -> torch.nn.Module:
    """A copy of `model` with `ratio` of every MLP's intermediate channels removed by Torch-Pruning (magnitude)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).requires_grad_(True)  # Torch-Pruning's graph skips parameters without grad
    ups = {m: ratio for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
           and (name.endswith("fc1") or name.endswith("intermediate.dense"))}
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.0, pruning_ratio_dict=ups,
                                  ignored_layers=[m for m in model.modules() if isinstance(m, torch.nn.Embedding)])
    pruner.step()
    return model.requires_grad_(False)


def measure(case: Case, mix: str, compiled: Callable, repeats: int, extra: dict[str, Any]) -> dict[str, Any]:
    row = {"model": case.name, "mix": mix, "target": "onnxruntime", "metric_name": case.metric_name,
           "batch": case.batch, **extra}
    row["metric"] = case.metric(compiled)  # the first call compiles
    if case.extras is not None:
        row.update(case.extras(compiled))
    if hasattr(compiled, "mmaccel_report"):
        row.setdefault("weight_bytes", graph_linear_bytes(compiled.mmaccel_report))
        row.update(prune_summary(compiled.mmaccel_report))
    with torch.no_grad():
        row.update(latency_ms(case.timed_call(compiled), repeats))
    return row


def run_mix(case: Case, pristine: torch.nn.Module, mix: str, repeats: int) -> dict[str, Any]:
    torch._dynamo.reset()
    if mix == "fp32":
        return measure(case, mix, mmaccel.compile(case.model, target="onnxruntime"), repeats, {})
    if mix in TORCH_PRUNING:
        try:
            small = torch_pruned(pristine, case.calibration[-1], TORCH_PRUNING[mix])
        except ImportError:
            return {"model": case.name, "mix": mix, "skipped": "torch_pruning is not installed"}
        return measure(case, mix, mmaccel.compile(small, target="onnxruntime"), repeats, {})
    if mix in FIXED:
        compiled = mmaccel.compile(case.model, target="onnxruntime", prune=FIXED[mix],
                                   accuracy_budget=FIXED_BUDGET, calibration=case.calibration)
        return measure(case, mix, compiled, repeats, {})
    budget = float(mix.split("@")[1])
    if mix.startswith("agree@"):
        if case.name == "all-MiniLM-L6-v2":
            return {"model": case.name, "mix": mix, "skipped": "embeddings have no argmax to agree on"}
        compiled = mmaccel.compile(case.model, target="onnxruntime", prune="auto", accuracy_budget=budget,
                                   calibration=case.calibration, metric=argmax_disagreement)
        return measure(case, mix, compiled, repeats, {})
    compiled = mmaccel.compile(case.model, target="onnxruntime", prune="auto", accuracy_budget=budget,
                               calibration=case.calibration)
    return measure(case, mix, compiled, repeats, {})


def argmax_disagreement(outputs: list[list[torch.Tensor]], references: list[list[torch.Tensor]]) -> float:
    """The `metric` of the agree@b rows: the fraction of argmaxes over the last dimension of the graph's first
    output (classes, or vocabulary at each position) that differ from the reference's."""
    pairs = [(out[0].argmax(-1), ref[0].argmax(-1)) for out, ref in zip(outputs, references)]
    return float(sum(int((a != b).sum()) for a, b in pairs)) / sum(b.numel() for _, b in pairs)


def run_case(case: Case, repeats: int, mixes: list[str]) -> list[dict[str, Any]]:
    case.model.requires_grad_(False)
    # Torch-Pruning prunes a copy made before any compile: mmaccel rebinds the module's Q/K/V and gate/up
    # parameters as views of its fused weights (issue 21), which Torch-Pruning's tracing cannot take
    pristine = copy.deepcopy(case.model)
    rows, fp32_bytes = [], None
    for mix in mixes:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row = run_mix(case, pristine, mix, repeats)
            row["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                      if "mmaccel" in str(w.message)})
        except Exception as e:  # one failing mix costs its row only
            row = {"model": case.name, "mix": mix, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        row["seconds"] = time.perf_counter() - start
        if mix == "fp32":
            fp32_bytes = row.get("weight_bytes")
        if fp32_bytes and row.get("weight_bytes"):
            row["kept"] = row["weight_bytes"] / fp32_bytes
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    def fmt(key: str, spec: str) -> str:
        return format(row[key], spec) if row.get(key) is not None else ""

    note = row.get("error") or row.get("skipped") or ""
    print(f"{row['model']:<22} {row['mix']:<11} {fmt('metric', '.4f'):>7} {fmt('same_ranking', '.2f'):>5} "
          f"{fmt('kept', '.3f'):>6} {fmt('latency_ms', '.2f'):>8} {fmt('measured_error', '.2e'):>9}  {note}",
          flush=True)


def plot(data: dict[str, Any], png_path: str) -> None:
    """Per model: the metric against kept linear-weight bytes (top) and against latency (bottom), a labelled point
    per mix; Torch-Pruning's rows hollow. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r.get("metric") is not None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(5.2 * len(models), 8), squeeze=False)
    for j, model in enumerate(models):
        for i, (key, label) in enumerate((("kept", "kept linear-weight bytes (fraction of fp32)"),
                                          ("latency_ms", "median latency (ms)"))):
            ax = axes[i][j]
            for k, r in enumerate(r for r in rows if r["model"] == model and r.get(key) is not None):
                tp_row = r["mix"] in TORCH_PRUNING
                ax.scatter(r[key], r["metric"], s=45, color=f"C{k}", facecolors="none" if tp_row else f"C{k}")
                ax.annotate(r["mix"], (r[key], r["metric"]), xytext=(5, 3), textcoords="offset points", fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel(next(r["metric_name"] for r in rows if r["model"] == model))
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(model, fontsize=9)
    env = data.get("environment", {})
    fig.suptitle(f"Structural pruning: accuracy vs kept weights and latency, CPU ({env.get('torch_threads', '?')} "
                 "threads, onnxruntime target; hollow: Torch-Pruning, magnitude)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(png_path, dpi=130)
    plt.close(fig)


def main() -> None:
    p = accuracy_bench_parser(__doc__.splitlines()[0], CASES, "prune_accuracy_cpu.json",
                              f"the classifier, mixes {', '.join(QUICK_MIXES)}, 2 repeats")
    p.add_argument("--mixes", help="comma-separated: only these rows (fp32 is always measured: the reference)")
    args = p.parse_args()
    if args.plot_only:
        return plot_only(args.plot_only, plot, __file__)
    mixes = ["fp32", *FIXED, *[f"auto@{b:g}" for b in AUTO_BUDGETS], *[f"agree@{b:g}" for b in AGREE_BUDGETS],
             *TORCH_PRUNING]
    models, repeats = args.models.split(","), args.repeats
    if args.quick:
        models, repeats, mixes = ["classifier"], 2, [m for m in mixes if m in QUICK_MIXES]
    if args.mixes:
        mixes = ["fp32", *[m for m in args.mixes.split(",") if m != "fp32"]]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment("cpu", torch_threads=args.threads, repeats=repeats, auto_budgets=list(AUTO_BUDGETS),
                      classifier_calibration_batches=CLASSIFIER_CALIBRATION,
                      weight_bytes="linear weights the last compiled graph's matmuls read")
    print(f"{'model':<22} {'mix':<11} {'metric':>7} {'rank':>5} {'kept':>6} {'ms':>8} {'meas.err':>9}")
    cases = {**CASES, "classifier": lambda: classifier_case(CLASSIFIER_CALIBRATION), "minilm": minilm_case}
    run_models(models, lambda name: run_case(cases[name](), repeats, mixes), {"environment": env, "results": []},
               args.out, plot, __file__)


if __name__ == "__main__":
    main()
