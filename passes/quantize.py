"""quantize (lossy, opt-in with options quantize=...): linear layers with frozen weights get quantized weights,
made once at compile time from the frozen weights, each layer at the cheapest precision that keeps the whole
model within options.accuracy_budget.

Precisions (cheapest first) and the schemes that may use them:
    int4_g128, int4_g64, int4_g32   int4 weight-only, asymmetric, per group of 128/64/32 input channels
    int8                            int8 weight-only, symmetric, per output channel
    w8a8_tensor, w8a8_token         the int8 weight of int8, and the activation quantized to 8 bits at run time
                                    (one range per tensor, or per token: ops/w8a8_linear.py); integer matmul
    fp8_row                         float8 e4m3 weight and activation (quantized at run time), one scale per
                                    output row and per token (ops/fp8_linear.py); fp8 matmul
    original                        the layer as it was (always allowed: it is how a budget is met)
    quantize="int8_weight_only": int8 | original;  "int4_weight_only": int4_* | original;
    "w8a8_dynamic": w8a8_tensor | w8a8_token | original;  "fp8": fp8_row | original;
    "auto": the weight-only precisions (int4_*, int8).
"auto" leaves W8A8 and fp8 out: their weight bytes are those of int8, so a solver that prices bytes would never
prefer them; they are chosen by name where their matmuls are the fast path (W8A8: ONNX Runtime on CPU; fp8: GPUs
with fp8 tensor cores, decode and prefill). W8A8 per tensor and per token cost the same bytes; per tensor is
measured first (ONNX Runtime fuses it into one kernel), per token is the upgrade when a layer's tokens have very
different ranges. fp8 takes per-row scales only: on the GPU a token's scale and its fp8 values come from one pass
over the token, while one scale for the tensor needs a pass over all tokens first, and e4m3's relative step makes
per-row never the coarser.

The solver (hierarchy-aware mixed precision):
1. Every layer at its cheapest precision; the model's error is measured on the calibration inputs (the
   relative output error ||out - ref|| / ||ref|| against the unquantized graph, pooled over the inputs). Within
   the budget: done, one measurement.
2. Otherwise each layer's sensitivity is measured: the model's error with only that layer quantized, at each
   of its precisions (a progress bar counts them). Sensitivities are aggregated over the model's hierarchy
   (modality tower, block, layer kind: the report shows which parts of the model are fragile).
3. Greedy assignment: independent errors add roughly in squares, so starting from the cheapest precisions the
   solver upgrades, one step at a time, the layer that removes the most squared error per byte added, until
   the estimate is within a target. The assembled mix is then measured for real; over budget, the target is
   tightened by the measured overshoot and the solver reruns (a few rounds); nothing fits: nothing is
   quantized, with one warning.
The report lists each layer's precision, its measured sensitivity and the model's measured error.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..compiler.errors import warn_once
from ..ops.fp8_linear import fp8_matmul_available, quantize_fp8_weight
from ..ops.int4_linear import quantize_int4_groupwise
from ..ops.int8_linear import quantize_per_channel
from .patterns import add_constant, constant_value, is_constant, layer_name
from .contract import PassContext, PassResult
from .graph import clone_module

FUSED_LINEAR = torch.ops.mmaccel.fused_linear.default
ORIGINAL = "original"
LADDERS = {
    "int8_weight_only": ("int8", ORIGINAL),
    "int4_weight_only": ("int4_g128", "int4_g64", "int4_g32", ORIGINAL),
    "w8a8_dynamic": ("w8a8_tensor", "w8a8_token", ORIGINAL),
    "fp8": ("fp8_row", ORIGINAL),
    "auto": ("int4_g128", "int4_g64", "int4_g32", "int8", ORIGINAL),
}
MAX_ROUNDS = 4


@dataclass
class Layer:
    """One linear layer the pass may quantize, and what each precision costs and does to the model."""
    node: str
    name: str
    shape: tuple[int, int]
    original_bytes: int
    precisions: tuple[str, ...]
    sensitivity: dict[str, float]  # precision -> model error with only this layer quantized to it
    chosen: str = ORIGINAL

    @property
    def hierarchy(self) -> tuple[str, str, str]:
        return split_hierarchy(self.name)


def split_hierarchy(name: str) -> tuple[str, str, str]:
    """(tower, block, kind) of a layer name: "vlm.vision.layers.3.attn.q_proj" -> ("vlm.vision",
    "vlm.vision.layers.3", "attn.q_proj"); no numbered block: ("vlm.decoder", "-", "lm_head")."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)), None)
    if index is None:
        return ".".join(parts[:-1]) or "-", "-", parts[-1]
    return ".".join(parts[:max(index - 1, 1)]), ".".join(parts[:index + 1]), ".".join(parts[index + 1:]) or "-"


def _weight_format(precision: str) -> str:
    """The quantized weight a precision uses: W8A8 multiplies int8's weight (per tensor and per token alike)."""
    return "int8" if precision.startswith("w8a8_") else precision


def _quantized_args(precision: str, weight: torch.Tensor) -> tuple[Any, list[torch.Tensor]] | None:
    """(op, constant tensors in argument order) for `precision`, or None when the weight does not fit it."""
    if precision == "int8":
        return torch.ops.mmaccel.int8_linear.default, list(quantize_per_channel(weight))
    if precision.startswith("fp8_"):
        return torch.ops.mmaccel.fp8_linear.default, list(quantize_fp8_weight(weight, precision.removeprefix("fp8_")))
    group = int(precision.removeprefix("int4_g"))
    if weight.shape[1] % group:
        return None
    return torch.ops.mmaccel.int4_linear.default, list(quantize_int4_groupwise(weight, group))


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Candidates:
    """Quantized weights per (layer, weight format), made once and shared by every graph the solver measures
    and by the precisions that use the same weight."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.made: dict[tuple[str, str], tuple[Any, list[torch.Tensor]] | None] = {}

    def get(self, node: fx.Node, precision: str) -> tuple[Any, list[torch.Tensor]] | None:
        key = (node.name, _weight_format(precision))
        if key not in self.made:
            self.made[key] = _quantized_args(key[1], constant_value(self.gm, node.args[1].target))
        made = self.made[key]
        if made is None or not precision.startswith("w8a8_"):
            return made
        return torch.ops.mmaccel.w8a8_linear.default, made[1]


def _replace(graph: fx.Graph, node: fx.Node, precision: str, op: Any, tensors: list[torch.Tensor],
             add: Callable[[str, torch.Tensor], str]) -> None:
    x, weight, bias, activation, residual = node.args
    with graph.inserting_before(node):
        if op is torch.ops.mmaccel.int8_linear.default:
            q, scale = (graph.get_attr(add(f"_int8_{part}", t)) for part, t in zip(("weight", "scale"), tensors))
            args = (x, q, scale, bias, activation, residual)
        elif op in (torch.ops.mmaccel.w8a8_linear.default, torch.ops.mmaccel.fp8_linear.default):
            kind, granularity = precision.split("_")
            q, scale = (graph.get_attr(add(f"_{kind}_{part}", t)) for part, t in zip(("weight", "scale"), tensors))
            args = (x, q, scale, bias, activation, residual, granularity)
        else:  # int4: packed [N, K/2], scale and zero [N, K/group]
            packed, scale, zero = (graph.get_attr(add(f"_int4_{part}", t))
                                   for part, t in zip(("weight", "scale", "zero"), tensors))
            group = tensors[0].shape[1] * 2 // tensors[1].shape[1]
            args = (x, packed, scale, zero, group, bias, activation, residual)
        new = graph.call_function(op, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _assemble(gm: fx.GraphModule, candidates: _Candidates, choice: dict[str, str]) -> fx.GraphModule:
    """A separate GraphModule with the layers in `choice` quantized (gm is left as it is)."""
    graph = fx.Graph()  # not owned by gm: its new constants live in `root`
    graph.output(graph.graph_copy(gm.graph, {}))
    root: dict[str, Any] = {n.target: constant_value(gm, n.target) for n in graph.find_nodes(op="get_attr")}

    def add(prefix: str, tensor: torch.Tensor) -> str:
        name = f"{prefix}_{len(root)}"
        root[name] = tensor
        return name

    nodes = {n.name: n for n in graph.nodes}
    for node_name, precision in choice.items():
        if precision != ORIGINAL:
            _replace(graph, nodes[node_name], precision, *candidates.get(nodes[node_name], precision), add)
    return fx.GraphModule(root, graph)


def quantize_linears(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    scheme = ctx.options.quantize
    if scheme not in LADDERS:
        raise NotImplementedError(f"quantize={scheme!r}")
    samples = list(ctx.calibration) if ctx.calibration else ([list(ctx.example_inputs)] if ctx.example_inputs else [])
    if not samples:
        raise ValueError("quantize needs the graph's example inputs or calibration data to measure its error")
    budget = ctx.options.accuracy_budget
    references = [_run(gm, s) for s in samples]
    candidates = _Candidates(gm)
    layers = []
    for node in gm.graph.find_nodes(op="call_function", target=FUSED_LINEAR):
        weight = node.args[1]
        if not is_constant(weight) or not constant_value(gm, weight.target).is_floating_point():
            continue
        w = constant_value(gm, weight.target)
        precisions = tuple(p for p in LADDERS[scheme] if p == ORIGINAL or candidates.get(node, p) is not None)
        layers.append(Layer(node.name, layer_name(node), tuple(w.shape), _bytes([w]), precisions, {ORIGINAL: 0.0}))
    if not layers:
        return PassResult(changes=["no linear layer with a frozen weight"])
    if scheme == "fp8" and not fp8_matmul_available(w.device):
        warn_once(f"mmaccel: quantize='fp8' on {w.device}, which has no fp8 matmul (CUDA GPUs of compute capability "
                  "8.9 or newer have one): the fp8 layers run an exact float32 emulation, slower than the original "
                  "model. On this device use quantize='w8a8_dynamic' or 'int8_weight_only'.")
    if scheme == "w8a8_dynamic" and w.device.type == "cuda":
        warn_once("mmaccel: quantize='w8a8_dynamic' on a CUDA GPU: one-token decode has a fused kernel, but more "
                  "tokens quantize activations with unfused torch ops; measured slower than the unquantized model "
                  "on an H100 (bench/results/gpu_triton_w8a8_h100.json). On GPUs use 'int8_weight_only' (decode) "
                  "or 'fp8' (decode and prefill); W8A8 is the fast path on CPU (ONNX Runtime).")
    by_node = {n.name: n for n in gm.graph.nodes}

    def cost(layer: Layer, precision: str) -> int:
        if precision == ORIGINAL:
            return layer.original_bytes
        return _bytes(candidates.get(by_node[layer.node], precision)[1])

    def measure(choice: dict[str, str]) -> float:
        module = _assemble(gm, candidates, choice)
        return _pooled_error([_run(module, s) for s in samples], references)

    cheapest = {layer.node: layer.precisions[0] for layer in layers}
    error = cheapest_error = measure(cheapest)
    chosen, rounds, measured_layers = cheapest, 1, False
    if not error <= budget:  # NaN counts as over budget
        _measure_sensitivities(layers, measure)
        measured_layers = True
        target = budget
        for rounds in range(1, MAX_ROUNDS + 1):
            chosen = _solve(layers, cost, target)
            error = measure(chosen) if any(p != ORIGINAL for p in chosen.values()) else 0.0
            if error <= budget:
                break
            target *= 0.8 * budget / error if error > 0 and math.isfinite(error) else 0.5
    for layer in layers:
        layer.chosen = chosen[layer.node]
    quantized = [layer for layer in layers if layer.chosen != ORIGINAL]
    before = sum(layer.original_bytes for layer in layers)
    after = sum(cost(layer, layer.chosen) for layer in layers)
    if not error <= budget or not quantized:
        for layer in layers:
            layer.chosen = ORIGINAL
        summary = (f"{scheme}: no precision mix within the budget {budget:g} (cheapest: measured relative output "
                   f"error {cheapest_error:.2e} on {len(samples)} input(s))")
        warn_once(f"mmaccel: quantization not applied: {summary}. Raise accuracy_budget to accept some loss.")
        return PassResult(matched=0, changes=[f"rolled back, over budget: {summary}"], measured_error=cheapest_error,
                          details=_details(layers, cost, measured_layers))
    for layer in quantized:  # the chosen mix, now for real
        node = by_node[layer.node]
        _replace(gm.graph, node, layer.chosen, *candidates.get(node, layer.chosen),
                 lambda p, t: add_constant(gm, p, t))
    gm.recompile()
    mix = ", ".join(f"{p} x{n}" for p, n in _count(layer.chosen for layer in layers).items())
    summary = (f"{scheme}: {len(quantized)} of {len(layers)} linear(s) quantized ({mix}); weights "
               f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB; measured relative output error {error:.2e} on "
               f"{len(samples)} calibration input(s) (budget {budget:g})"
               + (f"; per-layer sensitivities measured, {rounds} solver round(s)" if measured_layers else ""))
    return PassResult(matched=len(quantized), changes=[summary], measured_error=error,
                      details=_details(layers, cost, measured_layers))


def _measure_sensitivities(layers: list[Layer], measure: Callable[[dict[str, str]], float]) -> None:
    from ..compiler.progress import progress

    jobs = [(layer, p) for layer in layers for p in layer.precisions if p != ORIGINAL]
    for layer, precision in progress(jobs, desc="mmaccel: quantization sensitivity (layer x precision)"):
        layer.sensitivity[precision] = measure({layer.node: precision})


def _solve(layers: list[Layer], cost: Callable[[Layer, str], int], target: float) -> dict[str, str]:
    """Cheapest precisions, then upgrades by squared error removed per byte added until the root of the
    summed squared sensitivities is within target."""
    level = {layer.node: 0 for layer in layers}

    def err2(layer: Layer) -> float:
        e = layer.sensitivity[layer.precisions[level[layer.node]]]
        return e * e if math.isfinite(e) else math.inf

    total = sum(err2(layer) for layer in layers)
    while total > target * target:
        # any higher precision of any layer, not only the next one: measured errors are not always monotone
        # in precision (int4 with groups of 32 may measure worse than groups of 64), and a step that looks
        # bad must not hide the step after it
        best, best_gain = None, -math.inf
        for layer in layers:
            i = level[layer.node]
            for j in range(i + 1, len(layer.precisions)):
                removed = err2(layer) - layer.sensitivity[layer.precisions[j]] ** 2
                added = max(cost(layer, layer.precisions[j]) - cost(layer, layer.precisions[i]), 1)
                if removed / added > best_gain:
                    best, best_gain = (layer, j), removed / added
        if best is None:
            break
        layer, j = best
        total -= err2(layer)
        level[layer.node] = j
        total += err2(layer)
        if not math.isfinite(total):
            total = sum(err2(layer) for layer in layers)
    return {layer.node: layer.precisions[level[layer.node]] for layer in layers}


def _details(layers: list[Layer], cost: Callable[[Layer, str], int], measured: bool) -> dict[str, Any]:
    rows = [{"layer": layer.name, "tower": layer.hierarchy[0], "block": layer.hierarchy[1],
             "kind": layer.hierarchy[2], "shape": list(layer.shape), "precision": layer.chosen,
             "bytes": cost(layer, layer.chosen), "original_bytes": layer.original_bytes,
             "sensitivity": {p: e for p, e in layer.sensitivity.items() if p != ORIGINAL}} for layer in layers]
    aggregates: dict[str, dict[str, float]] = {}
    if measured:  # mean sensitivity at each layer's cheapest precision, per tower / block / kind
        for level, key in (("tower", 0), ("block", 1), ("kind", 2)):
            groups: dict[str, list[float]] = {}
            for layer in layers:
                cheapest = layer.precisions[0]
                if cheapest != ORIGINAL:
                    groups.setdefault(layer.hierarchy[key], []).append(layer.sensitivity[cheapest])
            aggregates[level] = {name: sum(v) / len(v) for name, v in groups.items()}
    return {"layers": rows, "sensitivity_by": aggregates}


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _run(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The graph's outputs on the eager target, on copies of the inputs (a graph may write them in place)."""
    from ..backends.eager import compile_graph

    run = compile_graph(clone_module(gm))
    with torch.no_grad():
        out = run([a.clone() if isinstance(a, torch.Tensor) else a for a in inputs])
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]


def _pooled_error(actual: list[list[torch.Tensor]], expected: list[list[torch.Tensor]]) -> float:
    """Worst over the graph's float outputs of ||out - ref|| / ||ref||, norms pooled over the samples."""
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
