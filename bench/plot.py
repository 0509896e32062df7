"""PNG of bench/gpu_triton.py's results: a group of bars per case, a bar per variant, each bar the variant's median
time relative to eager (where eager failed, to the slowest variant; the tick label names the reference) on a log
scale, lower is faster, labelled with its ms; the case's roofline floor is a dashed line, a failed variant a red x.
Needs matplotlib; works from the JSON alone, so any machine can draw it.

    python bench/plot.py bench/results/gpu_triton.json [--out bench/results/gpu_triton.png]
    python bench/plot.py bench/results/token_auto_cpu.json    # tokens="auto" rows: the Pareto plot (plot_pareto)
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from common import png_beside, write_png


def plot_results(data: dict[str, Any], png_path: str) -> None:
    """Draw `data` (gpu_triton.py's JSON) to `png_path`; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    rows = data["results"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(2 + 1.9 * len(cases), 4.8))
    at_bottom = blended_transform_factory(ax.transData, ax.transAxes)
    labels, plotted = [], []
    for i, case in enumerate(cases):
        ms = {r["variant"]: r["median_ms"] for r in rows if r["case"] == case and "median_ms" in r}
        # Relative to eager; without an eager time, to the slowest variant that ran.
        base_name = "eager" if "eager" in ms else max(ms, key=ms.get, default=None)
        labels.append(f"{case}\nref: {base_name} {ms[base_name]:.3g} ms" if base_name else f"{case}\n(all failed)")
        for j, variant in enumerate(variants):
            x = i - 0.4 + (j + 0.5) * width
            if variant in ms:
                height = ms[variant] / ms[base_name]
                plotted.append(height)
                ax.bar(x, height, width, color=f"C{j}")
                ax.text(x, height, f"{ms[variant]:.3g}", ha="center", va="bottom", fontsize=6, rotation=90)
            elif any(r["case"] == case and r["variant"] == variant for r in rows):
                ax.text(x, 0.02, "x", ha="center", color="red", fontweight="bold", transform=at_bottom)
        floor = data.get("cases", {}).get(case, {}).get("floor_ms")
        if floor and base_name:
            ax.hlines(floor / ms[base_name], i - 0.45, i + 0.45, colors="black", linestyles="--")
            plotted.append(floor / ms[base_name])
    handles = [Patch(color=f"C{j}", label=variant) for j, variant in enumerate(variants)]
    handles.append(Line2D([], [], color="black", linestyle="--", label="roofline floor"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_yscale("log")
    if plotted:  # room below the lowest floor and above the tallest bar's label
        ax.set_ylim(min(plotted) / 1.5, max(plotted) * 1.6)
    ax.set_xticks(range(len(cases)), labels, fontsize=8)
    ax.set_ylabel("median time / ref (log; lower is faster)")
    env = data.get("environment", {})
    ax.set_title(f"{env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
                 f"{env.get('dtype', '')}; red x: failed", fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=150)
    plt.close(fig)


def plot_pareto(data: dict[str, Any], png_path: str) -> None:
    """tokens="auto" rows (bench/hf_generate.py, resolution_cpu.py: `tokens_candidates`): per row, each candidate's
    first-token error against its first-token ms, labelled, the Pareto front joined, the one chosen circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r.get("tokens_candidates")]
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 4.5), squeeze=False)
    for ax, row in zip(axes[0], rows):
        candidates = row["tokens_candidates"]
        for c in candidates:
            ax.scatter(c["first_token_ms"], c["error"], color="C0" if c["pareto"] else "C7", zorder=2)
            ax.annotate(f"{c['label']} ({c['tokens']})", (c["first_token_ms"], c["error"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        front = sorted((c["first_token_ms"], c["error"]) for c in candidates if c["pareto"])
        ax.plot(*zip(*front), color="C0", linestyle="--", zorder=1, label="Pareto front")
        chosen = next(c for c in candidates if c["chosen"])
        ax.scatter(chosen["first_token_ms"], chosen["error"], s=200, facecolors="none", edgecolors="C3",
                   linewidths=2, zorder=3, label=f"chosen: {chosen['label']}")
        ax.set_xlabel("first-token ms (median)")
        ax.set_ylabel("first-token error (relative, vs lossless)")
        ax.set_title(f"{row.get('model', '')} {row['variant']}".strip(), fontsize=9)
        ax.grid(alpha=0.3)
        ax.margins(x=0.3, y=0.1)  # room for the labels right of the points
        ax.legend(fontsize=7)
    env = data.get("environment", {})
    fig.suptitle(f"tokens='auto': candidates (image tokens per image)\n{env.get('device', '?')}, "
                 f"{env.get('dtype', '')}, weights {env.get('weights', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=150)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description="Plot bench/gpu_triton.py's JSON (or tokens='auto' rows) as a PNG.")
    p.add_argument("json_path")
    p.add_argument("--out", help="PNG path (default: the JSON path with .png)")
    args = p.parse_args()
    with open(args.json_path) as f:
        data = json.load(f)
    plot = plot_pareto if any(r.get("tokens_candidates") for r in data["results"]) else plot_results
    if write_png(plot, data, args.out or png_beside(args.json_path), "pip install matplotlib") is None:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
