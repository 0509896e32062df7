"""Accuracy against latency of each quantization precision mix, on CPU, on models with trained weights: the digits
ViT classifier (test accuracy), the digits captioner (exact-match greedy captions) and all-MiniLM-L6-v2 (sentence
embeddings: the lowest cosine similarity to fp32's over a fixed set of texts).

Mixes: fp32 (no quantize), quantize="int8_weight_only", "int4_weight_only", "w8a8_dynamic" and "fp8" (at a loose
budget, so the scheme quantizes every layer it can; fp8 has no fast CPU kernel: its latency here is an
emulation's, its accuracy is fp8's), and quantize="auto" at several accuracy budgets. Each mix is compiled for the eager
and the onnxruntime targets, after torch._dynamo.reset(), with calibration samples of the shapes the measured calls
have (so the quantize pass measures its error on them). Where the pass rolls back (no mix within the budget), the
row says "not applied". Latency: median of `--repeats` calls on a fixed batch after warm-up, torch.set_num_threads.

    python bench/quantize_accuracy.py [--models classifier,captioner,minilm] [--repeats 10] [--threads 2]
                                      [--out bench/results/quantize_accuracy_cpu.json]
    python bench/quantize_accuracy.py --plot-only bench/results/quantize_accuracy_cpu.json
    python bench/quantize_accuracy.py --quick --out /tmp/quantize_accuracy.json    # a smoke test

The JSON is written after each model; the PNG (needs matplotlib) beside it at the end.
"""
from __future__ import annotations

import collections
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

import mmaccel
from common import accuracy_bench_parser, environment, plot_only, run_models
from mmaccel.models import digits, minilm
from mmaccel.timing import times_ms

# The fixed schemes ask for "every layer the scheme can take": a budget loose enough that the pass never upgrades.
FIXED_SCHEME_BUDGET = 0.5
AUTO_BUDGETS = (0.005, 0.02, 0.05)
MIXES: list[tuple[str, dict[str, Any]]] = [
    ("fp32", {}),
    ("int8", {"quantize": "int8_weight_only", "accuracy_budget": FIXED_SCHEME_BUDGET}),
    ("int4", {"quantize": "int4_weight_only", "accuracy_budget": FIXED_SCHEME_BUDGET}),
    ("w8a8", {"quantize": "w8a8_dynamic", "accuracy_budget": FIXED_SCHEME_BUDGET}),
    ("fp8", {"quantize": "fp8", "accuracy_budget": FIXED_SCHEME_BUDGET}),
    *[(f"auto@{b:g}", {"quantize": "auto", "accuracy_budget": b}) for b in AUTO_BUDGETS],
]
QUICK_MIXES = ("fp32", "int8", "auto@0.02")  # --quick: the classifier, a fixed scheme and the solver
TARGETS = ("eager", "onnxruntime")
CLASSIFIER_BATCH = 90  # the 360 test images in 4 calls; calibration: training batches of the same shape
CLASSIFIER_CALIBRATION_BATCHES = 2
CAPTION_IMAGES = 96  # accuracy, timing and calibration batch (a calibration sample per prefix length)

MINILM_CALIBRATION_TEXTS = [  # not the measured texts, padded to their shape
    ["A woman is reading a book in the park.", "Stock prices fell sharply on Monday.",
     "The train to the airport leaves every ten minutes.", "She plays the violin beautifully.",
     "Le chat dort sur le canapé.", "Where can I find the nearest pharmacy?",
     "The recipe calls for two cups of flour and an egg.", "Children are building a sandcastle."],
    ["The committee approved the new budget.", "A red car is parked outside the house.",
     "Compilers turn graphs into fast kernels.", "It snowed heavily in the mountains last night.",
     "Der Hund spielt im Garten.", "How long does shipping take?",
     "The team celebrated their victory late into the night.", "An old man feeds pigeons in the square."],
]


@dataclass
class Case:
    """A trained model, its measured call and its accuracy metric (higher is better)."""
    name: str
    model: torch.nn.Module
    metric_name: str
    metric: Callable[[Callable], float]  # compiled model -> metric (its first call compiles)
    timed_call: Callable[[Callable], Callable[[], object]]  # compiled model -> the call to time
    calibration: list[tuple[torch.Tensor, ...]]
    batch: str
    extras: Callable[[Callable], dict[str, float]] | None = None  # compiled model -> more numbers for its row


def classifier_case(calibration_batches: int = CLASSIFIER_CALIBRATION_BATCHES) -> Case:
    test_pixels, test_labels = digits.load_digits("test")
    train_pixels, _ = digits.load_digits("train")
    calibration = [(train_pixels[i * CLASSIFIER_BATCH:(i + 1) * CLASSIFIER_BATCH],) for i in range(calibration_batches)]

    def metric(run: Callable) -> float:
        chunks = [digits.accuracy(run, p, y) * len(y) for p, y in
                  zip(test_pixels.split(CLASSIFIER_BATCH), test_labels.split(CLASSIFIER_BATCH))]
        return sum(chunks) / len(test_labels)

    fixed = test_pixels[:CLASSIFIER_BATCH]
    return Case("digits ViT classifier", digits.load_classifier(), "test accuracy", metric,
                lambda run: lambda: run(fixed), calibration, f"pixels [{CLASSIFIER_BATCH}, 1, 8, 8]")


def captioner_case() -> Case:
    test_pixels, test_labels = digits.load_digits("test")
    pixels, labels = test_pixels[:CAPTION_IMAGES], test_labels[:CAPTION_IMAGES]
    train_pixels, train_labels = digits.load_digits("train")
    calib_pixels, calib_labels = train_pixels[:CAPTION_IMAGES], train_labels[:CAPTION_IMAGES]
    ids = digits.caption_ids(calib_labels)
    # The prefixes greedy decoding calls the model on, in its order: BOS alone (a graph of its own), then 2..6
    # tokens (one graph dynamic in the text length): each graph is measured on the samples that reach it.
    longest = 1 + max(len(n) for n in digits.DIGIT_NAMES)
    calibration = [(calib_pixels, ids[:, :t]) for t in range(1, longest + 1)]
    return Case("digits captioner", digits.load_captioner(), "caption exact match",
                lambda run: digits.caption_accuracy(run, pixels, labels),
                lambda run: lambda: digits.caption(run, pixels), calibration,
                f"greedy caption of {CAPTION_IMAGES} images (prefix 1..6)")


def minilm_case() -> Case:
    model, tokenizer = minilm.load()
    model.requires_grad_(False)
    batch = tokenizer(minilm.TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    calibration = []
    for texts in MINILM_CALIBRATION_TEXTS:
        b = tokenizer(texts, padding="max_length", truncation=True, max_length=ids.shape[1], return_tensors="pt")
        calibration.append((b["input_ids"], b["attention_mask"]))

    def embed(run: Callable) -> torch.Tensor:
        with torch.no_grad():
            return minilm.sentence_embeddings(run, ids, mask)

    reference = embed(model)
    return Case("all-MiniLM-L6-v2", model, "min cosine to fp32",
                lambda run: float((embed(run) * reference).sum(-1).min()),
                lambda run: lambda: run(ids, mask), calibration, f"ids, mask [{ids.shape[0]}, {ids.shape[1]}]")


CASES = {"classifier": classifier_case, "captioner": captioner_case, "minilm": minilm_case}


def quantize_summary(report: mmaccel.CompileReport) -> dict[str, Any]:
    """The quantize pass of the last graph (the one most calls run; per brief), plus one line per graph."""
    per_graph = []
    for graph in report.graphs:
        if not any(p.name == "quantize" for p in graph.passes):
            per_graph.append({"graph": graph.index, "status": graph.status, "target": graph.target,
                              "quantize": None, "calibration_note": graph.calibration_note})
            continue
        result = graph.pass_result("quantize")
        layers = result.details.get("layers", []) if result.details else []
        per_graph.append({
            "graph": graph.index, "status": graph.status, "target": graph.target,
            "applied": result.matched > 0, "matched": result.matched, "measured_error": result.measured_error,
            "precisions": dict(collections.Counter(r["precision"] for r in layers)),
            "weight_bytes": sum(r["bytes"] for r in layers),
            "weight_bytes_before": sum(r["original_bytes"] for r in layers),
            "layers": [{"layer": r["layer"], "shape": r["shape"], "precision": r["precision"], "bytes": r["bytes"]}
                       for r in layers],
            "change": result.changes[0] if result.changes else "", "calibration_note": graph.calibration_note})
    last = per_graph[-1] if per_graph else {}
    summary = {"graphs": len(report.graphs), "targets_run": sorted({g.target for g in report.graphs}),
               "per_graph": per_graph}
    if "applied" in last:
        summary.update({k: last[k] for k in ("applied", "measured_error", "precisions", "weight_bytes",
                                              "weight_bytes_before", "change")})
    return summary


def latency_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median (the number reported) and min of `repeats` calls after warm-up; on a shared machine the min shows
    how much of a median is other load."""
    times = times_ms(fn, repeats, warmup)
    return {"latency_ms": statistics.median(times), "latency_min_ms": min(times)}


def linear_weight_bytes(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def run_case(case: Case, repeats: int, mixes: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    fp32_bytes = linear_weight_bytes(case.model)
    rows = []
    torch._dynamo.reset()
    with torch.no_grad():
        row = {"model": case.name, "mix": "fp32", "target": "pytorch (uncompiled)", "metric_name": case.metric_name,
               "metric": case.metric(case.model), "applied": None, "measured_error": None, "precisions": {},
               "weight_bytes": fp32_bytes, "weight_bytes_before": fp32_bytes, "batch": case.batch,
               **latency_ms(case.timed_call(case.model), repeats)}
    rows.append(row)
    print_row(row)
    for mix, options in mixes:
        for target in TARGETS:
            row = {"model": case.name, "mix": mix, "target": target, "options": options, "metric_name": case.metric_name,
                   "batch": case.batch}
            start = time.perf_counter()
            torch._dynamo.reset()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    kwargs = dict(options, calibration=case.calibration) if options else {}
                    compiled = mmaccel.compile(case.model, target=target, **kwargs)
                    row["metric"] = case.metric(compiled)  # first call: compiles
                row["compile_and_metric_s"] = time.perf_counter() - start
                row.update(quantize_summary(compiled.mmaccel_report))
                if not options:
                    row.update(applied=None, measured_error=None, precisions={}, weight_bytes=fp32_bytes,
                               weight_bytes_before=fp32_bytes)
                row["warnings"] = sorted({str(w.message).splitlines()[0][:300] for w in caught
                                          if "mmaccel" in str(w.message)})
                graphs_before = len(compiled.mmaccel_report.graphs)
                with torch.no_grad():
                    row.update(latency_ms(case.timed_call(compiled), repeats))
                if len(compiled.mmaccel_report.graphs) != graphs_before:
                    row["recompiled_while_timing"] = len(compiled.mmaccel_report.graphs) - graphs_before
            except Exception as e:  # one failing (mix, target) costs its row only
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
            print_row(row)
    return rows


def status(row: dict[str, Any]) -> str:
    if "error" in row:
        return "ERROR"
    if row.get("applied") is None:
        return "-"
    return "applied" if row["applied"] else "not applied"


def print_row(row: dict[str, Any]) -> None:
    prec = ",".join(f"{p}x{n}" for p, n in sorted(row.get("precisions", {}).items()))
    err = row.get("measured_error")
    metric = row.get("metric")
    mib = row.get("weight_bytes")
    ms = row.get("latency_ms")
    print(f"{row['model']:<22} {row['mix']:<10} {row['target']:<20} {status(row):<11} "
          f"{'' if metric is None else f'{metric:.4f}':>7} {'' if err is None else f'{err:.2e}':>9} "
          f"{'' if mib is None else f'{mib / 2**20:.3f}':>7} {'' if ms is None else f'{ms:.2f}':>8}  "
          f"{prec}{'  ' + row['error'] if 'error' in row else ''}", flush=True)


def print_header() -> None:
    print(f"{'model':<22} {'mix':<10} {'target':<20} {'quantize':<11} {'metric':>7} {'meas.err':>9} "
          f"{'W MiB':>7} {'ms':>8}  precisions (last graph)")


def plot_results(data: dict[str, Any], png_path: str) -> None:
    """Per model: accuracy metric against linear-weight MiB (top, labelled by mix) and against latency (bottom,
    log), a point per (mix, target): color = mix, marker = target, hollow = quantize rolled back. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in data["results"] if "error" not in r and r.get("metric") is not None]
    models = list(dict.fromkeys(r["model"] for r in data["results"]))
    mixes = list(dict.fromkeys(r["mix"] for r in data["results"]))
    targets = list(dict.fromkeys(r["target"] for r in data["results"]))
    markers = dict(zip(targets, ("s", "o", "^", "D")))
    colors = {m: f"C{i}" for i, m in enumerate(mixes)}
    fig, axes = plt.subplots(2, len(models), figsize=(5.2 * len(models), 8.4), squeeze=False)
    for j, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        for i, (key, label) in enumerate((("weight_bytes", "linear weights (MiB)"),
                                          ("latency_ms", "median latency (ms, log)"))):
            ax = axes[i][j]
            points = []
            for r in mine:
                if r.get(key) is None:
                    continue
                x = r[key] / 2**20 if key == "weight_bytes" else r[key]
                hollow = r.get("applied") is False
                ax.scatter(x, r["metric"], marker=markers[r["target"]], s=55, zorder=3, alpha=0.85,
                           facecolors="none" if hollow else colors[r["mix"]], edgecolors=colors[r["mix"]])
                # top panel only (both targets share the weights: one label per mix); below, colors tell
                if key == "weight_bytes" and r["target"] == targets[-1]:
                    points.append((x, r["metric"], r["mix"] + (" (rolled back)" if hollow else ""), colors[r["mix"]]))
            if key == "latency_ms":
                ax.set_xscale("log")
            _label_points(ax, points, log_x=key == "latency_ms")
            ax.set_xlabel(label)
            ax.set_ylabel(mine[0]["metric_name"] if mine else "")
            ax.grid(alpha=0.3, which="both")
            if i == 0:
                ax.set_title(f"{model}\n{mine[0]['batch'] if mine else ''}", fontsize=9)
            ax.margins(x=0.2, y=0.2)
    handles = [Line2D([], [], marker=markers[t], linestyle="", color="grey", label=t) for t in targets]
    handles += [Line2D([], [], marker="o", linestyle="", color=colors[m], label=m) for m in mixes]
    handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="grey",
                          label="quantize rolled back"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    env = data.get("environment", {})
    fig.suptitle(f"Quantization: accuracy vs weight bytes and latency, CPU ({env.get('cpu_count', '?')} cores, "
                 f"{env.get('torch_threads', '?')} threads, shared machine)\ntorch {env.get('torch', '?')}, "
                 f"onnxruntime {env.get('onnxruntime', '?')}; higher is better, left is cheaper", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(png_path, dpi=130)
    plt.close(fig)


def _label_points(ax: Any, points: list[tuple[float, float, str, str]], log_x: bool) -> None:
    """Label each point; labels of points that sit close together are stacked downwards rather than overprinted."""
    import math

    if not points:
        return
    xs = [math.log10(p[0]) if log_x and p[0] > 0 else p[0] for p in points]
    ys = [p[1] for p in points]
    x_span = (max(xs) - min(xs)) or 1.0
    y_span = (max(ys) - min(ys)) or 1.0
    order = sorted(range(len(points)), key=lambda k: (xs[k], -ys[k]))
    placed: list[int] = []
    for k in order:
        stack = sum(1 for q in placed if abs(xs[q] - xs[k]) < 0.2 * x_span and abs(ys[q] - ys[k]) < 0.05 * y_span)
        placed.append(k)
        x, y, text, color = points[k]
        ax.annotate(text, (x, y), xytext=(6, 3 - 8 * stack), textcoords="offset points", fontsize=6.5, color=color)


def main() -> None:
    p = accuracy_bench_parser(__doc__.splitlines()[0], CASES, "quantize_accuracy_cpu.json",
                              f"the classifier, mixes {', '.join(QUICK_MIXES)}, 2 repeats (checks the script)")
    args = p.parse_args()
    if args.plot_only:
        return plot_only(args.plot_only, plot_results, __file__)
    models, repeats, mixes = args.models.split(","), args.repeats, MIXES
    if args.quick:
        models, repeats, mixes = ["classifier"], 2, [m for m in MIXES if m[0] in QUICK_MIXES]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment("cpu", torch_threads=args.threads, repeats=repeats, fixed_scheme_budget=FIXED_SCHEME_BUDGET,
                      auto_budgets=list(AUTO_BUDGETS),
                      weight_bytes="linear layers the quantize pass may take (last graph), after / before")
    print_header()
    run_models(models, lambda name: run_case(CASES[name](), repeats, mixes), {"environment": env, "results": []},
               args.out, plot_results, __file__)


if __name__ == "__main__":
    main()
