"""The lossy-pass mechanism, shared by every lossy lever (token merging, structural pruning, quantization): one
pass, one accuracy_budget, one report table.

A lever (the `Lever` protocol) knows its own craft: which sites of the graph it may change (a linear layer, a
head, a token stream), the options at each site cheapest first and ending with ORIGINAL (the site as it is,
always allowed: it is how a budget is met), what each option costs in the lever's unit (`cost_unit`: bytes for
quantize and prune, token-blocks for token merging), and how to rewrite a node to an option. The mechanism
knows the rest:
1. Every site of every lever at its cheapest option; the model's error is measured on the calibration samples
   (by default the relative output error ||out - ref|| / ||ref|| against the graph before the levers, pooled
   over the samples: `pooled_relative_error`; a `Metric` callable may replace it). Within the budget: done,
   one measurement.
2. Otherwise each site's sensitivity is measured: the model's error with only that site changed, at each of its
   options (a progress bar counts them). Sensitivities are aggregated over the model's hierarchy (modality
   tower, block, layer kind: the report shows which parts of the model are fragile).
3. Greedy assignment across all levers: independent errors add roughly in squares, so starting from the
   cheapest options the solver upgrades, one step at a time, the site that removes the most squared error per
   cost added, until the estimate is within a target. Costs in different units are compared as fractions of
   their unit's whole (all sites at ORIGINAL): bytes against bytes as they are, a tenth of the weight bytes
   against a tenth of the token-blocks (a proxy: neither is latency; the measured error, not the cost, decides
   what is within the budget). The assembled mix is then measured for real; over budget, the target is
   tightened by the measured overshoot and the solver reruns (a few rounds).
4. Still over budget: the sites interact (token merges compound; the estimate said the mix fits), so the last
   mix is upgraded one site at a time by errors measured in its context (improve_in_context); nothing fits:
   the graph is left as it was, with one warning.
Every measurement runs the graph that will run (the assembled graph goes through the cleanup that the pipeline
runs after the lossy pass) against the graph the user gave (ctx.reference: the graph before any pass). Found by
Hypothesis: a float16 program reported 6.06e-4 and gave the user 8.57e-4, the lossless passes' own float16
rounding (up to 5e-4 relative) having been left out of the measurement.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.fx as fx

from ..compiler.errors import warn_once
from .contract import PassContext, PassResult
from .graph import clone_module
from .patterns import add_constant, constant_value, writes_in_place

ORIGINAL = "original"
MAX_ROUNDS = 4
# mixes measured in context (improve_in_context) before giving up, per sensitivity measured (site x option): a
# step measures about as many mixes as the sensitivities did (the digits tower's 6 blocks x 6 merge options: 36
# sensitivities, 32 moves in the step it needed at budget 0.01, 15 s on 2 CPU threads), so 2 allows about two
# steps and at most triples what a compile spends measuring
IN_CONTEXT_PER_SENSITIVITY = 2
# (outputs per sample, reference outputs per sample) -> the model's error; lower is better, NaN is over budget
Metric = Callable[[list[list[torch.Tensor]], list[list[torch.Tensor]]], float]
Cleanup = Callable[[fx.GraphModule, PassContext], Any]


@dataclass
class Site:
    """One place a lever may change, and what each of its options costs and does to the model."""
    node: str
    name: str
    shape: tuple[int, ...]
    original_cost: int  # at ORIGINAL, in the lever's cost_unit
    options: tuple[str, ...]  # cheapest first, ORIGINAL last
    sensitivity: dict[str, float]  # option -> model error with only this site at that option
    chosen: str = ORIGINAL
    lever: str = ""
    score: dict[str, float] = field(default_factory=dict)  # a lever's own measure, reported (a block's cosine)

    @property
    def key(self) -> tuple[str, str]:
        return self.lever, self.node

    @property
    def hierarchy(self) -> tuple[str, str, str]:
        return split_hierarchy(self.name)


class Lever(Protocol):
    name: str  # the lever's name in reports ("quantize")
    label: str  # the user's choice, first in the summary ("int8_weight_only")
    noun: str  # what the warning says was not applied ("quantization")
    unit: str  # what its sites are and what happened to them ("linear(s) quantized")
    near_misses: list[str]  # after sites(): places it almost took, each with the reason it did not
    cost_unit: str  # what cost() counts: "bytes" (held by the model), "token-blocks" (tokens through a block)

    def sites(self, gm: fx.GraphModule, ctx: PassContext) -> list[Site]:
        """The sites of gm this lever may change; each with its options and original_cost."""

    def cost(self, site: Site, option: str) -> int:
        """What the site costs at `option`, in cost_unit."""

    def rewrite(self, graph: fx.Graph, node: fx.Node, option: str, add: Callable[[str, torch.Tensor], str]) -> str:
        """Rewrite `node` of `graph` (the graph given to sites(), or a measurement copy of it) to `option`; new
        constants are stored with add(prefix, tensor), which returns the attribute name to read them with; the
        constants a node reads now (perhaps made by an earlier lever) are those of graph.owning_module. Returns
        the option applied: `option`, or ORIGINAL where an earlier lever's change left it no room (int4 groups
        that no longer divide a pruned width); the report shows what was applied."""

    def replaced(self, gm: fx.GraphModule, node: fx.Node, option: str) -> list[tuple[torch.Tensor, Any]]:
        """Before `node` of gm is rewritten to `option`: the constants it stops reading, each with what rebuilds
        its replacement without it (for a recompile after weights="release"), or None."""

    def replay(self, gm: fx.GraphModule, released: Any) -> str:
        """On a graph whose released parameters are stand-ins (compiler/release.py): rewrite each site an
        earlier graph changed, from the record `released.recall(source weight, self.label)` gives, without
        reading a weight; returns what it did, for the report."""


class UnrecordedOnRelease:
    """replaced/replay for a lever that keeps no records to rebuild its rewrite from (token merging, heads,
    blocks): it frees nothing under weights="release", and a recompile after release, which cannot measure (the
    reference needs the freed weights), leaves its sites whole: lossless for this lever, only larger or slower;
    the report says so."""
    label: str

    def replaced(self, gm: fx.GraphModule, node: fx.Node, option: str) -> list[tuple[torch.Tensor, Any]]:
        return []

    def replay(self, gm: fx.GraphModule, released: Any) -> str:
        return f"{self.label}: not re-applied on a graph compiled after weights='release' (nothing to measure against)"


def split_hierarchy(name: str) -> tuple[str, str, str]:
    """(tower, block, kind) of a layer name: "vlm.vision.layers.3.attn.q_proj" -> ("vlm.vision",
    "vlm.vision.layers.3", "attn.q_proj"); no numbered block: ("vlm.decoder", "-", "lm_head")."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)), None)
    if index is None:
        return ".".join(parts[:-1]) or "-", "-", parts[-1]
    return ".".join(parts[:max(index - 1, 1)]), ".".join(parts[:index + 1]), ".".join(parts[index + 1:]) or "-"


def calibration_samples(ctx: PassContext) -> list[Sequence[Any]]:
    samples = list(ctx.calibration) if ctx.calibration else ([list(ctx.example_inputs)] if ctx.example_inputs else [])
    if not samples:
        raise ValueError("a lossy pass needs the graph's example inputs or calibration data to measure its error")
    return samples


class _Measurement:
    """The model's error under a choice of options, on the calibration samples, after the post-lossy cleanup."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, levers: dict[str, Lever], metric: Metric,
                 cleanup: Sequence[Cleanup]) -> None:
        self.gm, self.ctx, self.levers, self.metric, self.cleanup = gm, ctx, levers, metric, cleanup
        self.samples = calibration_samples(ctx)
        self.references = [_reference(ctx.reference or gm, s, i) for i, s in enumerate(self.samples)]
        self.measured: dict[tuple[tuple[tuple[str, str], str], ...], float] = {}

    def __call__(self, choice: dict[tuple[str, str], str]) -> float:
        key = tuple((site, option) for site, option in choice.items() if option != ORIGINAL)
        if key not in self.measured:  # the solver's rounds and steps may come back to a mix measured already
            module = self.assemble(choice)
            for step in self.cleanup:
                step(module, self.ctx)
            self.measured[key] = self.metric([run_graph(module, s) for s in self.samples], self.references)
        return self.measured[key]

    def assemble(self, choice: dict[tuple[str, str], str]) -> fx.GraphModule:
        """A separate GraphModule with the sites in `choice` changed (gm is left as it is), rewritten in the
        order of `choice` (the levers' order: a later lever reads what an earlier one made, through the
        graph's owning module)."""
        graph = fx.Graph()
        graph.output(graph.graph_copy(self.gm.graph, {}))
        root: dict[str, Any] = {n.target: constant_value(self.gm, n.target) for n in graph.find_nodes(op="get_attr")}
        module = fx.GraphModule(root, graph)  # shares gm's constants; the new ones are added to it
        nodes = {n.name: n for n in module.graph.nodes}
        for (lever, node), option in choice.items():
            if option != ORIGINAL:
                self.levers[lever].rewrite(module.graph, nodes[node], option,
                                           lambda p, t: add_constant(module, p, t))
        module.recompile()
        return module


def apply_levers(gm: fx.GraphModule, ctx: PassContext, levers: Sequence[Lever], cleanup: Sequence[Cleanup] = (),
                 metric: Metric | None = None) -> PassResult:
    """Run the levers as one lossy pass under ctx.options.accuracy_budget; `cleanup`: the passes the pipeline
    runs after this one (measurements run them too)."""
    if ctx.released is not None and ctx.released.reads_stand_ins(gm):
        return _replay(gm, ctx, levers)
    budget = ctx.options.accuracy_budget
    sites = []
    for lever in levers:
        for site in lever.sites(gm, ctx):
            site.lever = lever.name
            sites.append(site)
    near_misses = [miss for lever in levers for miss in lever.near_misses]
    if not sites:
        return PassResult(changes=[f"{lever.label}: nothing to change" for lever in levers], near_misses=near_misses)
    by_name = {lever.name: lever for lever in levers}
    measure = _Measurement(gm, ctx, by_name, metric or pooled_relative_error, cleanup)

    def cost(site: Site, option: str) -> int:
        return site.original_cost if option == ORIGINAL else by_name[site.lever].cost(site, option)

    whole: dict[str, int] = {}
    for site in sites:
        unit = by_name[site.lever].cost_unit
        whole[unit] = whole.get(unit, 0) + site.original_cost

    def share(site: Site, option: str) -> float:
        """The cost as a fraction of its unit's whole: what the solver compares across levers."""
        return cost(site, option) / max(whole[by_name[site.lever].cost_unit], 1)

    # Two options of one site at the same cost (prune_heads.BY_REFIT) are told apart by their measured errors
    measured_sites = any(len({cost(site, p) for p in site.options}) < len(site.options) for site in sites)
    if measured_sites:
        measure_sensitivities(sites, measure)
    cheapest = {site.key: _undominated(site, cost)[0] if measured_sites else site.options[0] for site in sites}
    error = cheapest_error = measure(cheapest)
    chosen, rounds, steps = cheapest, 1, 0
    if not error <= budget:  # NaN counts as over budget
        if not measured_sites:
            measure_sensitivities(sites, measure)
            measured_sites = True
        target = budget
        for rounds in range(1, MAX_ROUNDS + 1):
            chosen = solve(sites, share, target)
            error = measure(chosen) if any(p != ORIGINAL for p in chosen.values()) else 0.0
            if error <= budget:
                break
            target *= 0.8 * budget / error if error > 0 and math.isfinite(error) else 0.5
        if not error <= budget:
            chosen, error, steps = improve_in_context(sites, chosen, error, budget, share, measure)
    for site in sites:
        site.chosen = chosen[site.key]
    changed = [site for site in sites if site.chosen != ORIGINAL]
    n = len(measure.samples)
    labels = ", ".join(lever.label for lever in levers)
    measured = "metric" if metric is not None else "relative output error"
    if not error <= budget or not changed:
        for site in sites:
            site.chosen = ORIGINAL
        summary = (f"{labels}: no mix within the budget {budget:g} (cheapest: measured {measured} "
                   f"{cheapest_error:.2e} on {n} input(s))")
        warn_once(f"mmaccel: {' and '.join(lever.noun for lever in levers)} not applied: {summary}. Raise "
                  "accuracy_budget to accept some loss.")
        return PassResult(matched=0, changes=[f"rolled back, over budget: {summary}"], measured_error=cheapest_error,
                          details=report_table(sites, cost, by_name, measured_sites), near_misses=near_misses)
    before = live_constant_bytes(gm)
    by_node = {node.name: node for node in gm.graph.nodes}
    for site in changed:  # the chosen mix, now for real, in the levers' order (the order measured)
        lever = by_name[site.lever]
        replaced = lever.replaced(gm, by_node[site.node], site.chosen) if ctx.released is not None else []
        site.chosen = lever.rewrite(gm.graph, by_node[site.node], site.chosen, lambda p, t: add_constant(gm, p, t))
        for weight, made in replaced if site.chosen != ORIGINAL else ():
            ctx.released.replace(weight, lever.label, made)
    changed = [site for site in sites if site.chosen != ORIGINAL]
    gm.recompile()
    details = report_table(sites, cost, by_name, measured_sites)
    after = live_constant_bytes(gm)
    mixes = "; ".join(_lever_summary(lever, [s for s in sites if s.lever == lever.name]) for lever in levers)
    summary = (f"{mixes}; constants {before / 2**20:.2f} -> {after / 2**20:.2f} MiB; measured {measured} "
               f"{error:.2e} on {n} calibration input(s) (budget {budget:g})"
               + (f"; per-layer sensitivities measured, {rounds} solver round(s)" if measured_sites else "")
               + (f", {steps} step(s) measured in context" if steps else ""))
    return PassResult(matched=len(changed), changes=[summary], measured_error=error, details=details,
                      near_misses=near_misses)


def _replay(gm: fx.GraphModule, ctx: PassContext, levers: Sequence[Lever]) -> PassResult:
    """A graph compiled after weights="release" freed parameters it reads (a recompile): each lever rebuilds what
    an earlier graph chose from its records, nothing is measured (the reference would need the freed weights).
    What no record rebuilds stops the compile (compiler/release.py check_no_stand_ins)."""
    changes = [lever.replay(gm, ctx.released) for lever in levers]
    gm.recompile()
    return PassResult(matched=sum(1 for n in gm.graph.nodes if n.meta.get(REPLAYED)), changes=changes)


REPLAYED = "mmaccel_replayed"  # a node a lever rebuilt from an earlier graph's records


def live_constant_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the constants the graph's outputs and in-place writes read: what the model holds, measured rather
    than summed per site (the sites of two levers may share a weight: a pruned MLP's down projection quantized
    too; a dropped block's weights are still in the graph, unread, until the cleanup after the levers)."""
    live, stack = set(), [n for n in gm.graph.nodes if n.op == "output" or writes_in_place(n)]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    targets = {n.target for n in live if n.op == "get_attr"}
    return sum(t.numel() * t.element_size() for t in (constant_value(gm, name) for name in targets)
               if isinstance(t, torch.Tensor))


def _lever_summary(lever: Lever, sites: list[Site]) -> str:
    changed = sum(site.chosen != ORIGINAL for site in sites)
    mix = ", ".join(f"{p} x{n}" for p, n in _count(site.chosen for site in sites).items())
    return f"{lever.label}: {changed} of {len(sites)} {lever.unit} ({mix})"


def measure_sensitivities(sites: list[Site], measure: Callable[[dict[tuple[str, str], str]], float]) -> None:
    from ..compiler.progress import progress

    jobs = [(site, p) for site in sites for p in site.options if p != ORIGINAL]
    for site, option in progress(jobs, desc="mmaccel: lossy sensitivity (site x option)"):
        site.sensitivity[option] = measure({site.key: option})


def solve(sites: list[Site], cost: Callable[[Site, str], float], target: float) -> dict[tuple[str, str], str]:
    """Cheapest options, then upgrades by squared error removed per cost added until the root of the summed
    squared sensitivities is within target. An option that costs no less than another of its site and measured
    no better is never chosen (two ways to keep the same heads, prune_heads.BY_REFIT)."""
    options = {site.key: _undominated(site, cost) for site in sites}
    level = {site.key: 0 for site in sites}

    def err2(site: Site) -> float:
        e = site.sensitivity[options[site.key][level[site.key]]]
        return e * e if math.isfinite(e) else math.inf

    total = sum(err2(site) for site in sites)
    while total > target * target:
        # any higher option of any site, not only the next one: measured errors are not always monotone
        # in precision (int4 with groups of 32 may measure worse than groups of 64), and a step that looks
        # bad must not hide the step after it
        best, best_gain = None, -math.inf
        for site in sites:
            i, ladder = level[site.key], options[site.key]
            for j in range(i + 1, len(ladder)):
                removed = err2(site) - site.sensitivity[ladder[j]] ** 2
                added = max(cost(site, ladder[j]) - cost(site, ladder[i]), 1e-12)
                if removed / added > best_gain:
                    best, best_gain = (site, j), removed / added
        if best is None:
            break
        site, j = best
        total -= err2(site)
        level[site.key] = j
        total += err2(site)
        if not math.isfinite(total):
            total = sum(err2(site) for site in sites)
    return {site.key: options[site.key][level[site.key]] for site in sites}


def improve_in_context(sites: list[Site], chosen: dict[tuple[str, str], str], error: float, budget: float,
                       cost: Callable[[Site, str], float], measure: Callable[[dict[tuple[str, str], str]], float]
                       ) -> tuple[dict[tuple[str, str], str], float, int]:
    """When the mix solve() chose from the sites' errors alone measures over budget, those errors do not add: the
    sites interact. Token merges compound (a merge before block 0 changes what every later block holds; on the
    trained digits tower, bench/token_merge_accuracy.py, r8% before block 0 flips no calibration argmax alone and
    4 of 360 with r40% after it). Then the mix is upgraded one site at a time by errors measured in that context:
    each step measures every site moved to each of its higher options (all of them: an option that measured no
    better alone may measure better here) with the rest of the mix as it is, and takes the one that removes the
    most error per cost added, or where none removes any, the lowest error, until within budget; at most
    IN_CONTEXT_PER_SENSITIVITY measurements per sensitivity. Returns the mix, its measured error and the steps."""
    from ..compiler.progress import progress

    chosen, steps, spent = dict(chosen), 0, 0
    limit = IN_CONTEXT_PER_SENSITIVITY * sum(len(site.options) - 1 for site in sites)
    while not error <= budget:
        moves = [(site, p) for site in sites for p in site.options[site.options.index(chosen[site.key]) + 1:]]
        if not moves or spent + len(moves) > limit:
            break
        spent += len(moves)
        measured = [(measure({**chosen, site.key: p}), site, p)
                    for site, p in progress(moves, desc=f"mmaccel: lossy step {steps + 1} in context (site x option)")]

        def gain(move: tuple[float, Site, str]) -> tuple[float, float, float]:
            e, site, p = move
            removed = error - e if math.isfinite(error) else (math.inf if math.isfinite(e) else 0.0)
            added = max(cost(site, p) - cost(site, chosen[site.key]), 1e-12)
            if removed > 0:
                return removed / added, 0.0, 0.0
            return -math.inf, -e if math.isfinite(e) else -math.inf, -added

        best, site, p = max(measured, key=gain)
        chosen[site.key], error, steps = p, best, steps + 1
    return chosen, error, steps


def _undominated(site: Site, cost: Callable[[Site, str], float]) -> list[str]:
    """The site's options (cheapest first) less those with another option no dearer and no worse measured, the
    earlier one kept where two tie."""
    def error(option: str) -> float:
        e = site.sensitivity[option]
        return e if math.isfinite(e) else math.inf

    return [p for i, p in enumerate(site.options)
            if not any(cost(site, q) <= cost(site, p) and error(q) <= error(p) and (error(q) < error(p) or j < i)
                       for j, q in enumerate(site.options) if q != p)]


def report_table(sites: list[Site], cost: Callable[[Site, str], int], levers: dict[str, Lever],
                 measured: bool) -> dict[str, Any]:
    """PassResult.details: one row per site (its cost in its lever's unit; "bytes" too where that is the unit),
    and mean sensitivities per tower / block / kind."""
    rows = []
    for site in sites:
        unit = levers[site.lever].cost_unit
        rows.append({"layer": site.name, "lever": site.lever, "tower": site.hierarchy[0],
                     "block": site.hierarchy[1], "kind": site.hierarchy[2], "shape": list(site.shape),
                     "precision": site.chosen, "unit": unit, "cost": cost(site, site.chosen),
                     "original_cost": site.original_cost,
                     **({"bytes": cost(site, site.chosen), "original_bytes": site.original_cost}
                        if unit == "bytes" else {}),
                     "sensitivity": {p: e for p, e in site.sensitivity.items() if p != ORIGINAL},
                     **({"score": site.score} if site.score else {})})
    aggregates: dict[str, dict[str, float]] = {}
    if measured:  # mean sensitivity at each site's cheapest option, per tower / block / kind
        for level, key in (("tower", 0), ("block", 1), ("kind", 2)):
            groups: dict[str, list[float]] = {}
            for site in sites:
                cheapest = site.options[0]
                if cheapest != ORIGINAL:
                    groups.setdefault(site.hierarchy[key], []).append(site.sensitivity[cheapest])
            aggregates[level] = {name: sum(v) / len(v) for name, v in groups.items()}
    return {"layers": rows, "sensitivity_by": aggregates}


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _reference(gm: fx.GraphModule, sample: Sequence[Any], index: int) -> list[torch.Tensor]:
    """The reference outputs of one sample; a sample the graph cannot take is named, with the reason."""
    try:
        return run_graph(gm, sample)
    except Exception as e:
        shapes = [list(a.shape) if isinstance(a, torch.Tensor) else a for a in sample]
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"calibration sample {index} (graph inputs {shapes}) does not fit the graph being "
                         f"optimized: {type(e).__name__}: {first}") from e


def run_graph(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The graph's outputs on the eager target, on copies of the inputs (a graph may write them in place)."""
    from ..backends.eager import compile_graph

    run = compile_graph(clone_module(gm))
    with torch.no_grad():
        out = run([a.clone() if isinstance(a, torch.Tensor) else a for a in inputs])
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]


def pooled_relative_error(actual: list[list[torch.Tensor]], expected: list[list[torch.Tensor]]) -> float:
    """The default Metric: worst over the graph's float outputs of ||out - ref|| / ||ref||, norms pooled over
    the samples (absolute where the reference is all zeros)."""
    worst = 0.0
    for i in range(len(expected[0])):
        diff2 = ref2 = 0.0
        for a_sample, e_sample in zip(actual, expected):
            a, e = a_sample[i], e_sample[i]
            if not e.is_floating_point() or e.numel() == 0:
                continue
            diff2 += float((a.double() - e.double()).pow(2).sum())
            ref2 += float(e.double().pow(2).sum())
        if diff2 or ref2:
            worst = max(worst, math.sqrt(diff2 / ref2) if ref2 > 0 else math.sqrt(diff2))
    return worst
