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
    int8_rows                       token embedding tables (any scheme), with weights="release" only: int8 per
                                    row, gathered then scaled (ops/int8_embedding.py). A gather reads one row
                                    per token, so a smaller table gains no speed, only memory, and only once the
                                    original table is freed; without release it would add bytes. A table that
                                    anything else reads too (an lm_head tied to it) stays whole (a near-miss).
                                    At Llama-2-7B dims with 8 layers the table is 7% of the weights: with it in
                                    bf16, int8 weight-only held 0.588x of the bf16 bytes, over issue 21's 0.55x.
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

The lever's own craft lives here (which linears, how each precision quantizes a weight and rewrites the node);
measuring, solving under accuracy_budget, verifying and the report are the lossy mechanism's (passes/lossy.py).
The report lists each layer's precision, its measured sensitivity and the model's measured error.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..compiler._torch_internals import storage_id
from ..compiler.errors import warn_once
from ..ops.fp8_linear import fp8_matmul_available, quantize_fp8_weight
from ..ops.int4_linear import quantize_int4_groupwise
from ..ops.int8_embedding import quantize_embedding_rows
from ..ops.int8_linear import quantize_per_channel
from .contract import PassContext
from .lossy import ORIGINAL, REPLAYED, Site
from .patterns import add_constant, constant_value, is_constant, layer_name

FUSED_LINEAR = torch.ops.mmaccel.fused_linear.default
EMBEDDING = torch.ops.aten.embedding.default
EMBEDDING_OPTIONS = ("int8_rows", ORIGINAL)
LADDERS = {
    "int8_weight_only": ("int8", ORIGINAL),
    "int4_weight_only": ("int4_g128", "int4_g64", "int4_g32", ORIGINAL),
    "w8a8_dynamic": ("w8a8_tensor", "w8a8_token", ORIGINAL),
    "fp8": ("fp8_row", ORIGINAL),
    "auto": ("int4_g128", "int4_g64", "int4_g32", "int8", ORIGINAL),
}


def _weight_format(precision: str, w8a8_bits: int = 8) -> str:
    """The quantized weight a precision uses: W8A8 multiplies int8's weight (per tensor and per token alike), or
    with w8a8_bits=7 (PassContext.w8a8_weight_bits) a 7-bit one that ONNX Runtime's x86 kernels cannot saturate."""
    if precision.startswith("w8a8_"):
        return "int7" if w8a8_bits == 7 else "int8"
    return precision


def _quantized_args(precision: str, weight: torch.Tensor) -> tuple[Any, list[torch.Tensor]] | None:
    """(op, constant tensors in argument order) for `precision`, or None when the weight does not fit it."""
    if precision in ("int8", "int7"):
        qmax = 127 if precision == "int8" else 63
        return torch.ops.mmaccel.int8_linear.default, list(quantize_per_channel(weight, qmax))
    if precision == "int8_rows":
        return torch.ops.mmaccel.int8_embedding.default, list(quantize_embedding_rows(weight))
    if precision.startswith("fp8_"):
        return torch.ops.mmaccel.fp8_linear.default, list(quantize_fp8_weight(weight, precision.removeprefix("fp8_")))
    group = int(precision.removeprefix("int4_g"))
    if weight.shape[1] % group:
        return None
    return torch.ops.mmaccel.int4_linear.default, list(quantize_int4_groupwise(weight, group))


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Candidates:
    """Quantized weights per (layer, weight format, weight), shared by every graph the solver measures and by the
    precisions that use the same weight. The weight is the one the node reads in the graph being rewritten: an
    earlier lever may have replaced it (prune's smaller down projection). Kept made: each layer's cheapest
    format (the first mix measured is all of them: the quantized model itself) and the last one made, so that the
    sensitivity measurement holds one extra layer's candidates at a time (issue 21: keeping every layer's every
    precision made the compile-time peak 1.3x the weights above the model)."""

    def __init__(self, gm: fx.GraphModule, w8a8_bits: int = 8) -> None:
        self.gm, self.w8a8_bits = gm, w8a8_bits
        self.cheapest: dict[str, str] = {}  # node -> weight format of its cheapest precision that fits
        self.made: dict[tuple, tuple[Any, list[torch.Tensor]] | None] = {}
        self.last: tuple[tuple, tuple[Any, list[torch.Tensor]] | None] | None = None

    def get(self, node: fx.Node, precision: str, module: fx.GraphModule | None = None
            ) -> tuple[Any, list[torch.Tensor]] | None:
        weight = constant_value(module or self.gm, _weight_node(node).target)
        key = (node.name, _weight_format(precision, self.w8a8_bits), weight.data_ptr(), tuple(weight.shape))
        if key in self.made:
            made = self.made[key]
        elif self.last is not None and self.last[0] == key:
            made = self.last[1]
        else:
            made = _quantized_args(key[1], weight)
            if key[1] == self.cheapest.get(node.name):
                self.made[key] = made
            else:
                self.last = key, made
        if made is None or not precision.startswith("w8a8_"):
            return made
        return torch.ops.mmaccel.w8a8_linear.default, made[1]


def _cost(precision: str, weight: torch.Tensor) -> int | None:
    """Bytes of the weight at `precision` (None: it does not fit), from shapes alone: made on the meta device."""
    made = _quantized_args(_weight_format(precision), torch.empty_like(weight, device="meta"))  # int7: int8's bytes
    return None if made is None else _bytes(made[1])


def _weight_node(node: fx.Node) -> fx.Node:
    """The node's frozen weight: an embedding's table, a linear's weight."""
    return node.args[0] if node.target is EMBEDDING else node.args[1]


def _replace(graph: fx.Graph, node: fx.Node, precision: str, op: Any, tensors: list[torch.Tensor],
             add: Callable[[str, torch.Tensor], str]) -> fx.Node:
    with graph.inserting_before(node):
        if op is torch.ops.mmaccel.int8_embedding.default:
            q, scale = (graph.get_attr(add(f"_int8_embedding_{part}", t)) for part, t in zip(("weight", "scale"), tensors))
            new = graph.call_function(op, (node.args[1], q, scale))
        else:
            new = graph.call_function(op, _linear_args(graph, node, precision, op, tensors, add))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _linear_args(graph: fx.Graph, node: fx.Node, precision: str, op: Any, tensors: list[torch.Tensor],
                 add: Callable[[str, torch.Tensor], str]) -> tuple[Any, ...]:
    x, _, bias, activation, residual = node.args
    if op is torch.ops.mmaccel.int8_linear.default:
        q, scale = (graph.get_attr(add(f"_int8_{part}", t)) for part, t in zip(("weight", "scale"), tensors))
        return x, q, scale, bias, activation, residual
    if op in (torch.ops.mmaccel.w8a8_linear.default, torch.ops.mmaccel.fp8_linear.default):
        kind, granularity = precision.split("_")
        q, scale = (graph.get_attr(add(f"_{kind}_{part}", t)) for part, t in zip(("weight", "scale"), tensors))
        return x, q, scale, bias, activation, residual, granularity
    # int4: packed [N, K/2], scale and zero [N, K/group]
    packed, scale, zero = (graph.get_attr(add(f"_int4_{part}", t)) for part, t in zip(("weight", "scale", "zero"), tensors))
    group = tensors[0].shape[1] * 2 // tensors[1].shape[1]
    return x, packed, scale, zero, group, bias, activation, residual


def _linears(gm: fx.GraphModule) -> list[fx.Node]:
    """The linears with a frozen floating-point weight: the lever's sites."""
    return [node for node in gm.graph.find_nodes(op="call_function", target=FUSED_LINEAR)
            if is_constant(node.args[1]) and constant_value(gm, node.args[1].target).is_floating_point()]


def token_embeddings(gm: fx.GraphModule) -> tuple[list[fx.Node], list[str]]:
    """The embeddings of a frozen floating-point table that only embeddings read (any constant sharing its
    storage counts as the table), and near-misses for the tables something else reads too."""
    readers: dict[int, list[fx.Node]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = constant_value(gm, node.target)
        if isinstance(value, torch.Tensor):
            readers.setdefault(storage_id(value), []).extend(node.users)
    found, near_misses = [], []
    for node in gm.graph.find_nodes(op="call_function", target=EMBEDDING):
        table = constant_value(gm, node.args[0].target) if is_constant(node.args[0]) else None
        if table is None or not table.is_floating_point() or table.dim() != 2:
            continue
        others = [u for u in readers[storage_id(table)] if u.target is not EMBEDDING]
        if others:
            near_misses.append(f"quantize: embedding {layer_name(node)} table {tuple(table.shape)} left whole: "
                               f"{others[0].name} ({layer_name(others[0])}) reads it too (a tied lm_head)")
        else:
            found.append(node)
    return found, near_misses


class QuantizeLever:
    """The quantize lever of the lossy mechanism: each linear with a frozen floating-point weight is a site, its
    options the precisions of the scheme's ladder that fit its weight; with weights="release", each token
    embedding table that only embeddings read is one too (int8_rows or original)."""
    name, noun, unit, cost_unit = "quantize", "quantization", "weight(s) quantized", "bytes"

    def __init__(self, scheme: str) -> None:
        if scheme not in LADDERS:
            raise NotImplementedError(f"quantize={scheme!r} has no precision ladder; choose one of {sorted(LADDERS)}")
        self.label = scheme
        self.near_misses: list[str] = []
        self.candidates: _Candidates | None = None
        self.costs: dict[tuple[str, str], int] = {}  # (node, precision) -> bytes of its unpruned weight

    def sites(self, gm: fx.GraphModule, ctx: PassContext) -> list[Site]:
        self.candidates = _Candidates(gm, ctx.w8a8_weight_bits)
        if ctx.w8a8_weight_bits == 7 and any(p.startswith("w8a8_") for p in LADDERS[self.label]):
            self.unit = (f"{QuantizeLever.unit}, W8A8 weights in 7 bits (int8 matmuls on x86 CPUs without VNNI "
                         "saturate 8-bit ones)")
        sites = []
        for node in _linears(gm):
            w = constant_value(gm, node.args[1].target)
            costs = {p: _cost(p, w) for p in LADDERS[self.label] if p != ORIGINAL}
            precisions = (*(p for p, c in costs.items() if c is not None), ORIGINAL)
            self.candidates.cheapest[node.name] = _weight_format(precisions[0], ctx.w8a8_weight_bits)
            self.costs.update({(node.name, p): costs[p] for p in precisions if p != ORIGINAL})
            sites.append(Site(node.name, layer_name(node), tuple(w.shape), _bytes([w]), precisions, {ORIGINAL: 0.0}))
        if sites:
            self._warn_slow_scheme(w.device)
        if ctx.released is not None:  # a smaller table saves memory only once the original is freed
            embeddings, self.near_misses = token_embeddings(gm)
            for node in embeddings:
                table = constant_value(gm, node.args[0].target)
                self.candidates.cheapest[node.name] = EMBEDDING_OPTIONS[0]
                self.costs[(node.name, EMBEDDING_OPTIONS[0])] = _cost(EMBEDDING_OPTIONS[0], table)
                sites.append(Site(node.name, layer_name(node), tuple(table.shape), _bytes([table]), EMBEDDING_OPTIONS,
                                  {ORIGINAL: 0.0}))
        return sites

    def cost(self, site: Site, option: str) -> int:
        return self.costs[(site.node, option)]

    def rewrite(self, graph: fx.Graph, node: fx.Node, option: str, add: Callable[[str, torch.Tensor], str]) -> str:
        made = self.candidates.get(node, option, graph.owning_module)
        if made is None:  # an earlier lever (prune) left a width this precision's groups do not divide
            return ORIGINAL
        _replace(graph, node, option, *made, add)
        return option

    def replaced(self, gm: fx.GraphModule, node: fx.Node, option: str) -> list[tuple[torch.Tensor, Any]]:
        made = self.candidates.get(node, option)
        return [(constant_value(gm, _weight_node(node).target), None if made is None else (option, *made))]

    def replay(self, gm: fx.GraphModule, released: Any) -> str:
        """Each linear whose weight an earlier graph quantized under this scheme (and weights="release" then
        freed), rebuilt from that graph's quantized weights: same precision, same tensors, nothing measured."""
        rebuilt = 0
        for node in [*_linears(gm), *token_embeddings(gm)[0]]:
            made = released.recall(constant_value(gm, _weight_node(node).target), self.label)
            if made is not None:
                option, op, tensors = made
                new = _replace(gm.graph, node, option, op, tensors, lambda p, t: add_constant(gm, p, t))
                new.meta[REPLAYED] = option
                rebuilt += 1
        return (f"{self.label}: {rebuilt} weight(s) rebuilt from the quantized weights of an earlier graph "
                "(weights released; nothing measured)")

    def _warn_slow_scheme(self, device: torch.device) -> None:
        if self.label == "fp8" and not fp8_matmul_available(device):
            warn_once(f"mmaccel: quantize='fp8' on {device}, which has no fp8 matmul (CUDA GPUs of compute "
                      "capability 8.9 or newer have one): the fp8 layers run an exact float32 emulation, slower "
                      "than the original model. On this device use quantize='w8a8_dynamic' or 'int8_weight_only'.")
        if self.label == "w8a8_dynamic" and device.type == "cuda":
            warn_once("mmaccel: quantize='w8a8_dynamic' on a CUDA GPU: one-token decode has a fused kernel, but "
                      "more tokens quantize activations with unfused torch ops; measured slower than the "
                      "unquantized model on an H100 (bench/results/gpu_triton_w8a8_h100.json). On GPUs use "
                      "'int8_weight_only' (decode) or 'fp8' (decode and prefill); W8A8 is the fast path on CPU "
                      "(ONNX Runtime).")
