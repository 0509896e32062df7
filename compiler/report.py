"""What happened during compilation, in words: returned by mmaccel.explain, kept on mmaccel.compile results."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.fx as fx

from ..passes.contract import PassContext, PassResult
from .options import CompileOptions


@dataclass
class GraphReport:
    index: int
    status: str = "compiling"  # "optimized" | "fallback" | "stale" (its frozen weights changed: runs unfrozen)
    reason: str = ""  # why a graph fell back
    inputs: list[str] = field(default_factory=list)
    dynamo_nodes: int = 0
    aten_nodes: int = 0
    final_nodes: int = 0
    frozen: int = 0
    frozen_bytes: int = 0
    # Storage bytes behind the final graph's constants, and the part of them the model does not share (its own
    # copies: quantized weights, folded constants; issue 21)
    graph_weight_bytes: int = 0
    own_weight_bytes: int = 0
    # weights="release": bytes of the model's parameters freed after this graph's lossy passes replaced them
    released_bytes: int = 0
    freeze_note: str = ""
    calibration_note: str = ""
    passes: list[PassResult] = field(default_factory=list)
    target: str = ""
    target_reason: str = ""
    kernels: dict | None = None  # Triton target: generated kernels, fused nodes, source file
    compile_seconds: float = 0.0
    # The post-pass graph and the context it was optimized in: for tests and debugging.
    final_graph: fx.GraphModule | None = field(default=None, repr=False)
    context: PassContext | None = field(default=None, repr=False)

    def pass_result(self, name: str) -> PassResult:
        """The last run of pass `name` (cleanup passes run twice)."""
        return [p for p in self.passes if p.name == name][-1]

    def matched(self, name: str) -> int:
        """Pattern instances pass `name` rewrote, summed over its runs."""
        return sum(p.matched for p in self.passes if p.name == name)

    def count(self, target: Any) -> int:
        """How many nodes of the final graph call `target` (an op overload or packet)."""
        if self.final_graph is None:
            return 0
        return sum(1 for n in self.final_graph.graph.nodes if n.op == "call_function"
                   and (n.target is target or getattr(n.target, "overloadpacket", None) is target))


@dataclass
class CompileReport:
    options: CompileOptions
    graphs: list[GraphReport] = field(default_factory=list)
    graph_breaks: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": {"target": self.options.target, "passes": dict(self.options.passes),
                        "cuda_graphs": self.options.cuda_graphs},
            "graph_breaks": self.graph_breaks,
            "graphs": [{
                "index": i, "status": g.status, "reason": g.reason, "inputs": g.inputs,
                "target": g.target, "kernels": g.kernels, "nodes": {"dynamo": g.dynamo_nodes, "aten": g.aten_nodes, "final": g.final_nodes},
                "frozen": g.frozen, "frozen_bytes": g.frozen_bytes, "graph_weight_bytes": g.graph_weight_bytes,
                "own_weight_bytes": g.own_weight_bytes, "released_bytes": g.released_bytes,
                "compile_seconds": round(g.compile_seconds, 3),
                "passes": [{"name": p.name, "matched": p.matched, "changes": p.changes, "error": p.error,
                            "lossy": p.lossy, "seconds": round(p.seconds, 4), "measured_error": p.measured_error,
                            "details": p.details, "near_misses": p.near_misses} for p in g.passes],
            } for i, g in enumerate(self.graphs)],
        }

    def __str__(self) -> str:
        lines = [f"mmaccel report: {len(self.graphs)} graph(s) compiled, "
                 f"{sum(self.graph_breaks.values())} graph break(s)"]
        for reason, n in self.graph_breaks.items():
            lines.append(f"  graph break x{n}: {reason}")
        for i, g in enumerate(self.graphs):
            lines.append("")
            lines.append(f"graph {i}: {g.status}" + (f" ({g.reason})" if g.reason else "")
                         + f", compiled in {g.compile_seconds:.2f}s")
            if g.inputs:
                lines.append(f"  inputs: {', '.join(g.inputs)}")
            if g.status == "fallback":
                continue
            lines.append(f"  nodes: dynamo {g.dynamo_nodes} -> aten {g.aten_nodes} -> optimized {g.final_nodes}; "
                         f"frozen weights: {g.frozen} ({g.frozen_bytes / 2**20:.1f} MiB)"
                         + (f"; {g.freeze_note}" if g.freeze_note else ""))
            lines.append(f"  weights held by the optimized graph: {g.graph_weight_bytes / 2**20:.1f} MiB, of which "
                         f"{g.own_weight_bytes / 2**20:.1f} MiB not shared with the model"
                         + (f"; model parameters released: {g.released_bytes / 2**20:.1f} MiB" if g.released_bytes
                            else ""))
            lines.append(f"  target: {g.target} ({g.target_reason})")
            if g.kernels:
                k = g.kernels
                lines.append(f"  generated: {k['kernels']} Triton kernel(s) for {k['fused_nodes']} fused node(s), "
                             f"CUDA graphs {'on' if k.get('cuda_graphs') else 'off'}; source {k['source_path']}")
                if k.get("gemv_fusions") or k.get("gemv_near_misses"):
                    lines.append(f"  decode GEMVs with norm / SiLU*up / residual fused in: {k['gemv_fusions']}"
                                 + "".join(f"\n    near-miss: {why}" for why in k["gemv_near_misses"]))
            lines.append(f"  {'pass':34} {'matched':>7} {'nodes':>11} {'ms':>7}  what changed")
            for p in g.passes:
                what = "; ".join(p.changes) or ("-" if not p.error else f"FAILED, skipped: {p.error}")
                lines.append(f"  {p.name:34} {p.matched:>7} {p.nodes_before:>5}->{p.nodes_after:<5} "
                             f"{p.seconds * 1e3:>7.1f}  {what}")
            lines.extend(_near_misses(g.passes))
            if g.calibration_note:
                lines.append(f"  calibration: {g.calibration_note}")
            for p in g.passes:
                if p.details and p.details.get("layers"):
                    lines.extend(_layer_table(p.details))
        return "\n".join(lines)


def _near_misses(passes: list[PassResult]) -> list[str]:
    """Each place a pass's pattern almost matched (layer, node) and the check that failed, per pass."""
    misses = [p for p in passes if p.near_misses]
    if not misses:
        return []
    lines = ["  near-misses (pattern almost matched, left alone):"]
    for p in misses:
        lines.append(f"    {p.name}:")
        lines.extend(f"      {m}" for m in p.near_misses)
    return lines


def _layer_table(details: dict[str, Any]) -> list[str]:
    """Each lossy site's option (a precision, the channels an MLP keeps, the tokens merged), cost and sensitivity (the model's
    error with only that site changed)."""
    lines = [f"  {'layer':52} {'option':>10} {'cost':>14}  sensitivity (model error, this site alone)"]
    for row in details["layers"]:
        sens = ", ".join(f"{p} {e:.1e}" for p, e in row["sensitivity"].items()) or "-"
        sens += "".join(f"; {name} {value:.4f}" for name, value in row.get("score", {}).items())  # a block's cosine
        cost = f"{row['cost'] / 2**20:.2f} MiB" if row["unit"] == "bytes" else f"{row['cost']} {row['unit']}"
        lines.append(f"  {row['layer'][:52]:52} {row['precision']:>10} {cost:>14}  {sens}")
    for level, groups in details.get("sensitivity_by", {}).items():
        worst = sorted(groups.items(), key=lambda kv: -kv[1])[:4]
        lines.append(f"  most sensitive {level}: " + ", ".join(f"{name} {e:.1e}" for name, e in worst))
    return lines


_active: contextvars.ContextVar[tuple[CompileReport, ...]] = contextvars.ContextVar("mmaccel_reports", default=())


@contextlib.contextmanager
def collect_reports(report: CompileReport | None = None) -> Iterator[CompileReport]:
    """Every graph any mmaccel backend compiles inside this block (backend="mmaccel" included) is also
    recorded in the yielded report: `with mmaccel.collect_reports() as report: ...; print(report)`."""
    if report is None:
        report = CompileReport(CompileOptions())
    token = _active.set(_active.get() + (report,))
    try:
        yield report
    finally:
        _active.reset(token)


def active_reports() -> tuple[CompileReport, ...]:
    return _active.get()
