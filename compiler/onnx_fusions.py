"""ONNX Runtime's fused contrib ops in an exported decoder (issue 18): each Llama-style layer's attention with
its past K/V becomes one com.microsoft GroupQueryAttention that rotates q and k itself and reads them packed
(packed_qkv; heads not a multiple of 16: RotaryEmbedding nodes before it), each residual add followed by an
RMSNorm one com.microsoft SkipSimplifiedLayerNormalization, and each linear reads its 3D input
(linears_on_3d_inputs); then a fused linear that a Split parts becomes one MatMul per part (split_linears),
and a tied head's embedding gathers rows of a table ONNX Runtime transposes once (tied_table_rows).

Why: ONNX Runtime GenAI's builder writes these ops; our standard-op decoder ran 799 nodes per step against its
129 on the 125M Llama of bench/onnx_generate.py, and with kernel time alike (matmul-bound) the difference was the
graph around the matmuls (bench/onnx_decode_step.py: 4.0-4.9 ms of other kernels per step against 1.0-1.5).

Matched on the graph torch.onnx writes for HF's sdpa attention (eager attention arrives as SDPA too, through
attention_fusion), each piece checked, a failed check kept as a near-miss with its reason:
    q4 = Transpose(Reshape(q3, [B, S, H, D]), [0, 2, 1, 3])      q3 [B, S, H*D]; k4, v4 alike with Hkv heads
    rot(x4) = x4 * Unsqueeze(cos) + Concat(-x4[..., D/2:], x4[..., :D/2]) * Unsqueeze(sin)
    cos = Cos(Concat(f, f)) (times a constant), f = position_ids * inv_freq: the model's rotary table
    present.i.key = Concat(past_key_values.i.key, rot(k4)), present.i.value = Concat(past..., v4) (dim 2)
    scores = Where(mask, MatMul(rot(q4), K^T) * scale, -inf)   (eager attention: ... * scale + float mask)
    out = Reshape(Transpose(MatMul([Where(any,] Softmax(scores) [, 0)], V), [0, 2, 1, 3]), [B, S, H*D])
                                                                  K, V: the presents, repeated per group
becomes
    out, present.i.key, present.i.value = GroupQueryAttention(q3, k3, v3, past key, past value,
        seqlens_k = T - 1, T, cos, sin, position_ids, attention_bias = Where(mask, 0, float min) | float mask,
        query_seqlens = S, do_rotary=1)                 (q3, k3, v3: then one packed value, when one Split made them)
The mask (causal and padding, as HF built it) is kept whole as attention_bias, so left-padded batches attend
as before: GroupQueryAttention's own causal mask is the same one (query s sits at position past + s), and its
seqlens_k counts every position, pads included. float min, not -inf: a pad query row sees no position, and
with -inf its softmax is NaN, which the next layer's K/V would carry into every row; with float min that row
averages (finite, and never read), and real rows give masked positions exp(min - max) = 0. The rotation
reads cos/sin tables [positions, D/2] computed here from the graph's own inv_freq (and scale) for
`max_positions` positions (the config's max_position_embeddings); the loop refuses to go past them
(compiler/onnx_generate.py).

The rewritten file is kept only when ONNX Runtime's outputs on the given feeds (a prompt and a decode step)
equal the unfused file's within TOLERANCE; it still runs in a plain ONNX Runtime session (contrib ops it ships).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..passes.contract import PassResult
from .errors import warn_once
from .onnx_rewrites import compact_external_data

NAME = "onnx_contrib_fusion"
MS = "com.microsoft"
# fp32 kernels that sum in another order: fused against unfused, ONNX Runtime 1.32, prompts and decode steps
# (left-padded too), tiny and 125M Llama: 2-4e-7 relative. A wrong match, tried on the tiny Llama: the rotation
# reversed 0.2-1, the softmax scale 1.25x off 5e-3-4e-2.
TOLERANCE = 1e-4


class Constants(dict):
    """name -> numpy value of a graph's initializers and Constant nodes, each read when first asked for: a
    decoder's weights are most of them and the patterns read only small ones (a norm's weight, a shape), and
    weights stored beside the model (external data, a model over 1.8 GB) resolve against `base_dir`."""

    def __init__(self, graph: Any, base_dir: str) -> None:
        super().__init__()
        self.tensors = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.tensors[node.output[0]] = node.attribute[0].t
        self.base_dir = base_dir

    def __missing__(self, name: str) -> Any:
        from onnx import numpy_helper

        self[name] = value = numpy_helper.to_array(self.tensors[name], self.base_dir)
        return value

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self.tensors else default


class Graph:
    """An onnx GraphProto with its producers, readers, constants and value shapes indexed; `base_dir`: the
    folder external data resolves against (the file's own)."""

    def __init__(self, graph: Any, base_dir: str = "") -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.constants = Constants(graph, base_dir)
        self.shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                       for v in [*graph.value_info, *graph.input, *graph.output]}
        self.inputs = {v.name for v in graph.input}
        self.outputs = {v.name for v in graph.output}

    def node(self, name: str, op_type: str) -> Any:
        """The node making `name` if it is an `op_type` of the standard domain, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        found = [a for a in node.attribute if a.name == name]
        return helper.get_attribute_value(found[0]) if found else default

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        return float(value) if value is not None and value.size == 1 else None

    def ints(self, name: str) -> list[int] | None:
        value = self.constants.get(name)
        return [int(v) for v in value.reshape(-1)] if value is not None else None


class NoMatch(Exception):
    """A pattern check failed; the message says which and why."""


def need(condition: Any, reason: str) -> None:
    if not condition:
        raise NoMatch(reason)


def operands(g: Graph, node: Any, op_type: str) -> tuple[Any, str]:
    """For a commutative binary node: (the input made by an `op_type` node, the other input's name)."""
    for mine, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        if g.node(mine, op_type) is not None:
            return g.node(mine, op_type), other
    raise NoMatch(f"{node.name}: no {op_type} input")


@dataclass
class Rotary:
    """The model's rotary table, read off the graph: cos/sin = cos/sin(position * inv_freq) * scale."""
    cos: str  # the [B, S, D] value the layers read
    sin: str
    inv_freq: np.ndarray
    scale: float


def rotary_of(g: Graph, x4: str, add: Any) -> Rotary:
    """Check that `add` is rot(x4) (module docstring) and return its table."""
    need(add is not None, f"{x4}: the rotated value is not an Add")
    direct = [n for n in (g.node(i, "Mul") for i in add.input) if n is not None and x4 in n.input]
    need(len(direct) == 1, f"{add.name}: no Mul of {x4} by cos")
    turned = g.node(next(i for i in add.input if i != direct[0].output[0]), "Mul")
    need(turned is not None, f"{add.name}: no Mul by sin")
    half, sin_u = operands(g, turned, "Concat")
    cos_u = next(i for i in direct[0].input if i != x4)
    neg, low = g.node(half.input[0], "Neg"), g.node(half.input[1], "Slice") if len(half.input) == 2 else None
    need(neg is not None and low is not None and g.attr(half, "axis") in (-1, 3), f"{half.name}: not rotate_half")
    high = g.node(neg.input[0], "Slice")
    width = (g.shapes.get(x4) or [0])[-1]
    need(high is not None and isinstance(width, int) and width % 2 == 0, f"{neg.name}: not -x[..., D/2:]")
    need(slice_of(g, high, x4) == (width // 2, width) and slice_of(g, low, x4) == (0, width // 2),
         f"{half.name}: not the halves of {x4}'s last dim")
    cos, cos_scale, f = rotary_table(g, cos_u, "Cos")
    sin, sin_scale, f_sin = rotary_table(g, sin_u, "Sin")
    need(f == f_sin and cos_scale == sin_scale, f"{add.name}: cos and sin of different angles")
    return Rotary(cos, sin, angle_frequencies(g, f, width), cos_scale)


def slice_of(g: Graph, node: Any, x: str) -> tuple[int, int] | None:
    """(start, end) of a Slice of x along its last dim, step 1, end clamped to the dim; else None."""
    parts = [g.ints(n) for n in node.input[1:]]
    if node.input[0] != x or len(node.input) < 4 or None in parts or (len(parts) > 3 and parts[3] != [1]):
        return None
    (start,), (end,), (axis,) = parts[:3]
    width = g.shapes[x][-1]
    return (start, min(end, width)) if axis in (-1, len(g.shapes[x]) - 1) else None


def rotary_table(g: Graph, unsqueezed: str, op_type: str) -> tuple[str, float, str]:
    """Unsqueeze(T, [1]) with T = op_type(angles) or op_type(angles) * c: (T, c, angles)."""
    unsqueeze = g.node(unsqueezed, "Unsqueeze")
    need(unsqueeze is not None and g.ints(unsqueeze.input[1]) == [1], f"{unsqueezed}: not Unsqueeze(table, 1)")
    table, scale = unsqueeze.input[0], 1.0
    if g.node(table, "Mul") is not None:
        trig, other = operands(g, g.node(table, "Mul"), op_type)
        scale = g.scalar(other)
        need(scale is not None, f"{table}: {op_type} scaled by a non-constant")
    else:
        trig = g.node(table, op_type)
    need(trig is not None, f"{table}: not {op_type}(angles)")
    return table, scale, trig.input[0]


def angle_frequencies(g: Graph, angles: str, width: int) -> np.ndarray:
    """angles = Concat(f, f) on the last dim, f = position_ids (cast, unsqueezed) * inv_freq [D/2]: inv_freq."""
    concat = g.node(angles, "Concat")
    need(concat is not None and list(concat.input) == [concat.input[0]] * 2, f"{angles}: not Concat(f, f)")
    mul = g.node(concat.input[0], "Mul")
    need(mul is not None, f"{concat.input[0]}: not positions * inv_freq")
    frequencies = [g.constants.get(i) for i in mul.input]
    source = [i for i, f in zip(mul.input, frequencies) if f is None]
    inv_freq = next((f for f in frequencies if f is not None), None)
    need(inv_freq is not None and inv_freq.size == width // 2 and len(source) == 1, f"{mul.name}: no inv_freq")
    while source[0] not in g.inputs:
        step = g.node(source[0], "Cast") or g.node(source[0], "Unsqueeze")
        need(step is not None, f"{mul.name}: angles not from position_ids")
        source = [step.input[0]]
    need(source[0] == "position_ids", f"{mul.name}: angles from {source[0]}, not position_ids")
    return inv_freq.reshape(-1).astype(np.float32)


@dataclass
class Attention:
    """One layer's attention, matched: its 3D q/k/v [B, S, heads*D], past and present names, geometry."""
    q3: str
    k3: str
    v3: str
    past: tuple[str, str]
    present: tuple[str, str]
    out: str
    mask: str
    additive_mask: bool
    scale: float
    heads: int
    kv_heads: int
    head_dim: int
    rotary: Rotary
    removed: list[Any]  # the nodes whose outputs the fused nodes now make


def attention_at(g: Graph, softmax: Any) -> Attention:
    """Match the attention around `softmax` (module docstring)."""
    need(g.attr(softmax, "axis", -1) in (-1, 3), f"{softmax.name}: not over the last axis")
    scaled, mask, additive = masked_scores(g, softmax.input[0])
    qk, scale_name = operands(g, scaled, "MatMul")
    scale = g.scalar(scale_name)
    need(scale is not None, f"{qk.name}: scores scaled by a non-constant")
    keys_t = g.node(qk.input[1], "Transpose")
    need(keys_t is not None and list(g.attr(keys_t, "perm")) == [0, 1, 3, 2], f"{qk.name}: not Q @ K^T")
    pv = weights_times_values(g, softmax.output[0])
    out = merged_heads(g, pv.output[0])
    present_k, present_v = (repeated_source(g, name) for name in (keys_t.input[0], pv.input[1]))
    past_k, k_rot, concat_k = appended(g, present_k)
    past_v, v4, concat_v = appended(g, present_v)
    q_add, k_add = g.node(qk.input[0], "Add"), g.node(k_rot, "Add")
    need(q_add is not None and k_add is not None, f"{qk.name}: q or k not rotated")
    (q3, heads, width), (k3, kv_heads, _), (v3, v_heads, _) = (split_heads(g, x4) for x4 in
                                                               (rotated(g, q_add), rotated(g, k_add), v4))
    rotary = rotary_of(g, rotated(g, q_add), q_add)
    k_rotary = rotary_of(g, rotated(g, k_add), k_add)
    need((k_rotary.cos, k_rotary.sin) == (rotary.cos, rotary.sin), f"{k_add.name}: k rotated by another table")
    need(v_heads == kv_heads and heads % kv_heads == 0, f"{qk.name}: {heads} query heads, {kv_heads}/{v_heads} kv")
    return Attention(q3, k3, v3, (past_k, past_v), (present_k, present_v), out.output[0], mask, additive, scale,
                     heads, kv_heads, width, rotary, [concat_k, concat_v, out])


def masked_scores(g: Graph, scores: str) -> tuple[Any, str, bool]:
    """scores = Where(mask, s, -inf) (HF's sdpa: a boolean mask) or s + mask (HF's eager attention, fused into
    SDPA: an additive float mask), s = Mul(Q @ K^T, scale): (the Mul, the mask, whether it is additive)."""
    where, add = g.node(scores, "Where"), g.node(scores, "Add")
    if where is not None:
        need(g.scalar(where.input[2]) == -np.inf, f"{scores}: scores not masked by -inf")
        scaled, mask, additive = g.node(where.input[1], "Mul"), where.input[0], False
    else:
        need(add is not None, f"{scores}: scores neither masked by Where nor added a mask")
        scaled, mask = operands(g, add, "Mul")
        additive = True
    need(scaled is not None, f"{scores}: scores not scaled by a Mul")
    return scaled, mask, additive


def weights_times_values(g: Graph, probs: str) -> Any:
    """The MatMul(probs, V) reading the softmax, through torch's Where(row has a position, probs, 0)."""
    readers = g.readers.get(probs, [])
    need(len(readers) == 1, f"{probs}: read {len(readers)} times")
    if readers[0].op_type == "Where" and readers[0].input[1] == probs and g.scalar(readers[0].input[2]) == 0.0:
        return weights_times_values(g, readers[0].output[0])
    need(readers[0].op_type == "MatMul" and readers[0].input[0] == probs, f"{probs}: not probs @ V")
    return readers[0]


def merged_heads(g: Graph, attended: str) -> Any:
    """Reshape(Transpose(attended, [0, 2, 1, 3]), [B, S, H*D]): the Reshape node."""
    readers = g.readers.get(attended, [])
    need(len(readers) == 1 and readers[0].op_type == "Transpose"
         and list(g.attr(readers[0], "perm")) == [0, 2, 1, 3], f"{attended}: heads not moved back")
    after = g.readers.get(readers[0].output[0], [])
    need(len(after) == 1 and after[0].op_type == "Reshape" and len(g.shapes.get(after[0].output[0], [])) == 3,
         f"{readers[0].output[0]}: not reshaped to [B, S, H*D]")
    return after[0]


def repeated_source(g: Graph, name: str) -> str:
    """K or V as attention reads it: Reshape(Expand(Unsqueeze(x, 2))) (heads repeated per group), or x itself."""
    reshape = g.node(name, "Reshape")
    expand = g.node(reshape.input[0], "Expand") if reshape is not None else None
    unsqueeze = g.node(expand.input[0], "Unsqueeze") if expand is not None else None
    if unsqueeze is None:
        return name
    need(g.ints(unsqueeze.input[1]) == [2], f"{unsqueeze.name}: heads not repeated on dim 2")
    return unsqueeze.input[0]


def appended(g: Graph, present: str) -> tuple[str, str, Any]:
    """present = Concat(past input, new, dim 2), a graph output: (past, new, the Concat)."""
    concat = g.node(present, "Concat")
    need(concat is not None and present in g.outputs and len(concat.input) == 2 and concat.input[0] in g.inputs
         and g.attr(concat, "axis") in (2, -2), f"{present}: not Concat(past input, new) on dim 2 as an output")
    return concat.input[0], concat.input[1], concat


def rotated(g: Graph, add: Any) -> str:
    """The [B, heads, S, D] value rot() turns in `add`: the one Transpose output its Muls read."""
    found = {i for m in (g.node(n, "Mul") for n in add.input) if m is not None for i in m.input
             if g.node(i, "Transpose") is not None}
    need(len(found) == 1, f"{add.name}: no single rotated Transpose")
    return found.pop()


def split_heads(g: Graph, x4: str) -> tuple[str, int, int]:
    """x4 = Transpose(Reshape(x3, [B, S, H, D]), [0, 2, 1, 3]), x3 [B, S, H*D]: (x3, H, D)."""
    transpose = g.node(x4, "Transpose")
    reshape = g.node(transpose.input[0], "Reshape") if transpose is not None else None
    need(reshape is not None and list(g.attr(transpose, "perm")) == [0, 2, 1, 3], f"{x4}: heads not split")
    shape, x3 = g.shapes.get(x4, []), reshape.input[0]
    need(len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[1::2]), f"{x4}: heads/dim unknown")
    need(len(g.shapes.get(x3, [])) == 3 and g.shapes[x3][2] == shape[1] * shape[3], f"{x3}: not [B, S, H*D]")
    return x3, shape[1], shape[3]


@dataclass
class RmsNorm:
    """y = x / Sqrt(ReduceMean(x^2, -1) + eps) * weight; `residual`: the Add(a, b) making x, or None."""
    x: str
    weight: str
    epsilon: float
    out: Any  # the Mul making y
    residual: Any


def rms_norm_at(g: Graph, mul: Any) -> RmsNorm:
    """Match the RMSNorm ending in `mul` (its Div form: compiler/onnx_rewrites.py)."""
    divide, weight = operands(g, mul, "Div")
    need(weight in g.constants and g.constants[weight].ndim == 1, f"{mul.name}: weight not a 1D constant")
    x, root = divide.input[0], g.node(divide.input[1], "Sqrt")
    add = g.node(root.input[0], "Add") if root is not None else None
    need(add is not None, f"{divide.name}: not x / Sqrt(mean + eps)")
    mean, eps_name = operands(g, add, "ReduceMean")
    square = g.node(mean.input[0], "Pow")
    axes = g.ints(mean.input[1]) if len(mean.input) > 1 else g.attr(mean, "axes")
    rank = len(g.shapes.get(x, []))
    need(square is not None and square.input[0] == x and g.scalar(square.input[1]) == 2.0
         and list(axes or []) in ([-1], [rank - 1]) and g.attr(mean, "keepdims", 1) == 1,
         f"{mean.name}: not the mean of x^2 over the last dim")
    epsilon = g.scalar(eps_name)
    need(epsilon is not None and g.shapes.get(x, [None])[-1] == g.constants[weight].size, f"{add.name}: eps/width")
    residual = g.node(x, "Add")
    if residual is not None:  # the skip form needs both terms [B, S, hidden]
        shapes = [shape_of(g, i) for i in residual.input]
        need(shapes[0] == shapes[1] == g.shapes.get(x) and len(shapes[0] or []) == 3,
             f"{residual.name}: residual terms of shapes {shapes}, not both [B, S, hidden]")
    return RmsNorm(x, weight, epsilon, mul, residual)


def shape_of(g: Graph, name: str) -> list[Any] | None:
    """The value's shape from the file, or for a MatMulNBits output (torch.onnx writes none) its A's with N last."""
    node = g.producer.get(name)
    if name not in g.shapes and node is not None and node.op_type == "MatMulNBits" and node.input[0] in g.shapes:
        return [*g.shapes[node.input[0]][:-1], g.attr(node, "N")]
    return g.shapes.get(name)


def skip_norm_node(g: Graph, norm: RmsNorm) -> Any:
    from onnx import helper

    others = [r for r in g.readers.get(norm.x, []) if r.op_type not in ("Pow", "Div")] or norm.x in g.outputs
    return helper.make_node("SkipSimplifiedLayerNormalization", [*norm.residual.input, norm.weight],
                            [norm.out.output[0], "", "", norm.x if others else ""], domain=MS,
                            name=f"{norm.out.name}_skip_rms_norm", epsilon=norm.epsilon)


class Shared:
    """Values the fused layers share, made once: seqlens_k and T from attention_mask, each mask's bias, the
    rotary tables."""

    def __init__(self, g: Graph, max_positions: int, padding_masks: bool = True) -> None:
        self.g, self.max_positions, self.nodes, self.made, self.near = g, max_positions, [], {}, []
        self.padding_masks = padding_masks

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.made:
            self.g.graph.initializer.append(numpy_helper.from_array(value, name))
            self.made[name] = name
        return name

    def lengths(self) -> tuple[str, str, str]:
        """(seqlens_k int32 [B] = T - 1 for every row, T int32 scalar, query_seqlens int32 [B] = S for every
        row), T = attention_mask's length, S = position_ids'."""
        from onnx import helper

        need("attention_mask" in self.g.inputs, "no attention_mask input")
        if "seqlens_k" not in self.made:
            one = self.constant("_fusion_int32_1", np.array(1, np.int32))
            self.nodes += [helper.make_node("Shape", ["attention_mask"], ["_fusion_mask_shape"]),
                           helper.make_node("Cast", ["_fusion_mask_shape"], ["_fusion_mask_shape32"], to=6),
                           helper.make_node("Gather", ["_fusion_mask_shape32", one], ["_fusion_total"], axis=0),
                           helper.make_node("Gather", ["_fusion_mask_shape", self.constant(
                               "_fusion_int64_0", np.array([0], np.int64))], ["_fusion_batch"], axis=0),
                           helper.make_node("Sub", ["_fusion_total", one], ["_fusion_last"]),
                           helper.make_node("Expand", ["_fusion_last", "_fusion_batch"], ["_fusion_seqlens_k"]),
                           helper.make_node("Shape", ["position_ids"], ["_fusion_new"], start=1, end=2),
                           helper.make_node("Cast", ["_fusion_new"], ["_fusion_new32"], to=6),
                           helper.make_node("Expand", ["_fusion_new32", "_fusion_batch"], ["_fusion_query_seqlens"])]
            self.made["seqlens_k"] = "_fusion_seqlens_k"
        return "_fusion_seqlens_k", "_fusion_total", "_fusion_query_seqlens"

    def bias(self, mask: str, additive: bool) -> str:
        """attention_bias for HF's `mask`: padding_bias() when the mask's values come from attention_mask's alone
        (HF's causal + padding mask: the causal part is GroupQueryAttention's own), else the mask itself in
        additive form, Where(mask, 0, float min) for a boolean one (float min: module docstring)."""
        from onnx import helper

        reads = value_inputs(self.g, mask)
        if reads == {"attention_mask"} and self.padding_masks:
            return self.padding_bias()
        name = f"{mask}_bias"
        if name not in self.made:  # once per mask, which every layer reads
            why = "not attention_mask alone" if reads != {"attention_mask"} else "the model has sliding windows"
            self.near.append(f"mask {mask} reads {sorted(reads)}, {why}: kept whole as the bias")
            self.nodes += [] if additive else [helper.make_node("Where", [mask, *self.float_limits()], [name])]
            self.made[name] = name
        return mask if additive else name

    def float_limits(self) -> tuple[str, str]:
        return (self.constant("_fusion_float_0", np.array(0.0, np.float32)),
                self.constant("_fusion_float_min", np.array(np.finfo(np.float32).min, np.float32)))

    def padding_bias(self) -> str:
        """[B, 1, S, T]: 0 where attention_mask is nonzero, float min at pads; 5 nodes where HF's mask took 33
        per step (125M Llama; its causal part is the query's position past + s, as GroupQueryAttention's)."""
        from onnx import helper

        self.lengths()  # _fusion_new: [S]
        if "padding_bias" not in self.made:
            ones = self.constant("_fusion_int64_1_1", np.ones(2, np.int64))
            one = self.constant("_fusion_int64_1", np.ones(1, np.int64))
            self.nodes += [helper.make_node("Cast", ["attention_mask"], ["_fusion_keep"], to=9),
                           helper.make_node("Unsqueeze", ["_fusion_keep", self.constant(
                               "_fusion_axes_1_2", np.array([1, 2], np.int64))], ["_fusion_keep4"]),
                           helper.make_node("Where", ["_fusion_keep4", *self.float_limits()], ["_fusion_pad_bias"]),
                           helper.make_node("Concat", [ones, "_fusion_new", one], ["_fusion_bias_shape"], axis=0),
                           helper.make_node("Expand", ["_fusion_pad_bias", "_fusion_bias_shape"],
                                            ["_fusion_padding_bias"])]
            self.made["padding_bias"] = "_fusion_padding_bias"
        return "_fusion_padding_bias"

    def tables(self, rotary: Rotary) -> tuple[str, str]:
        """cos/sin caches [max_positions, D/2] of the model's own angles, in float32 as the graph computes them:
        nodes over constants (Range of the positions times inv_freq, then Cos and Sin) that ONNX Runtime folds
        into initializers when a session loads, so the file holds inv_freq and not the tables. Stored, the tables
        were 0.5 MB of the 125M Llama's folder and put it 0.3 MB over Optimum's (499.4 against 499.1 MB)."""
        from onnx import helper

        key = f"_fusion_rotary_{rotary.cos}"
        if key not in self.made:
            # "_fusion_float_0" is float_limits()' zero too: constant() makes each name once
            limits = [self.constant(f"_fusion_float_{v}", np.array(v, np.float32)) for v in (0, 1)]
            last = self.constant(f"_fusion_float_{self.max_positions}", np.array(self.max_positions, np.float32))
            inv_freq = self.constant(f"{key}_inv_freq", np.asarray(rotary.inv_freq, np.float32).reshape(-1))
            self.nodes += [helper.make_node("Range", [limits[0], last, limits[1]], [f"{key}_positions"]),
                           helper.make_node("Unsqueeze", [f"{key}_positions", self.constant(
                               "_fusion_int64_axis_1", np.array([1], np.int64))], [f"{key}_column"]),
                           helper.make_node("Mul", [f"{key}_column", inv_freq], [f"{key}_angles"])]
            scale = np.float32(rotary.scale)
            for fn in ("Cos", "Sin"):
                out = f"{key}_{fn.lower()}_cache"
                if scale == 1:
                    self.nodes.append(helper.make_node(fn, [f"{key}_angles"], [out]))
                else:
                    self.nodes += [helper.make_node(fn, [f"{key}_angles"], [out + "_unscaled"]),
                                   helper.make_node("Mul", [out + "_unscaled", self.constant(
                                       f"{key}_scale", np.array(scale, np.float32))], [out])]
            self.made[key] = key
        return f"{key}_cos_cache", f"{key}_sin_cache"


def value_inputs(g: Graph, name: str) -> set[str]:
    """The graph inputs whose values `name` is computed from (an input read only through Shape is not one)."""
    found, seen, todo = set(), set(), [name]
    while todo:
        value = todo.pop()
        node = g.producer.get(value)
        if value in g.inputs:
            found.add(value)
        elif node is not None and id(node) not in seen and node.op_type != "Shape":
            seen.add(id(node))
            todo += [i for i in node.input if i]
    return found


# ONNX Runtime 1.32's CPU GroupQueryAttention rotates only head sizes that are multiples of 16 (its error
# otherwise: "head_size shall be a multiple of 16"); other sizes get RotaryEmbedding nodes before it
ROTARY_INSIDE_HEAD_MULTIPLE = 16


def attention_nodes(att: Attention, shared: Shared) -> list[Any]:
    """GroupQueryAttention rotating q and k itself at the positions position_ids gives each query row (a
    RotaryEmbedding node per q and k first where it cannot). query_seqlens (S for every row) is what makes ONNX
    Runtime read position_ids per row on a prompt too: without it a prompt's rows all start at
    position_ids[0, 0], wrong for left-padded rows (measured, ONNX Runtime 1.32)."""
    from onnx import helper

    cos, sin = shared.tables(att.rotary)
    seqlens_k, total, query_seqlens = shared.lengths()
    bias = shared.bias(att.mask, att.additive_mask)
    q, k, rotate, rotary_inputs = att.q3, att.k3, [], [cos, sin, "position_ids"]
    if att.head_dim % ROTARY_INSIDE_HEAD_MULTIPLE:
        q, k, rotary_inputs = f"{att.q3}_rotary", f"{att.k3}_rotary", ["", "", ""]
        rotate = [helper.make_node("RotaryEmbedding", [x3, "position_ids", cos, sin], [x], domain=MS,
                                   name=f"{x}_node", interleaved=0) for x3, x in ((att.q3, q), (att.k3, k))]
    return [*rotate, helper.make_node(
        "GroupQueryAttention", [q, k, att.v3, *att.past, seqlens_k, total, *rotary_inputs, bias, *[""] * 5,
                                query_seqlens],
        [att.out, *att.present], domain=MS, name=f"{att.out}_group_query_attention", num_heads=att.heads,
        kv_num_heads=att.kv_heads, scale=att.scale, do_rotary=int(not rotate), rotary_interleaved=0)]


LINEARS = {("", "MatMul"), ("com.microsoft", "MatMulNBits")}


def linears_on_3d_inputs(graph: Any, base_dir: str = "") -> tuple[int, list[str]]:
    """Reshape(x [B, S, K], [-1, K]) -> MatMul | MatMulNBits [-> Add(bias)] -> Split(dim 1) -> each part
    Reshape(d, [B, S, n]) (or one Reshape): the matmul reads x itself and splits its last dim, so the Reshapes
    go. torch.onnx flattens every linear's input so; those Reshapes were 85 of the 288 nodes a 125M Llama int4
    step ran after the fusions, 0.38 of its 5.0 ms of kernels (ONNX Runtime's profile). Same arithmetic: a
    MatMul flattens leading dims itself. Returns (groups rewritten, near-misses)."""
    g, rewritten, near, reshaped = Graph(graph, base_dir), 0, [], set()
    for flatten in [n for n in graph.node if n.op_type == "Reshape" and n.domain in ("", "ai.onnx")]:
        x_shape, target = g.shapes.get(flatten.input[0], []), g.ints(flatten.input[1])
        if len(x_shape) != 3 or target != [-1, x_shape[2]]:
            continue
        try:
            plans = [unflatten_plan(g, linear, x_shape) for linear in g.readers.get(flatten.output[0], [])]
        except NoMatch as reason:
            near.append(f"3D linear at {flatten.name} left alone: {reason}")
            continue
        for linear, last, split, reshapes in plans:
            linear.input[0] = flatten.input[0]
            if split is not None:
                set_attr(split, "axis", -1)
                split.output[:] = [r.output[0] for r in reshapes]
            else:  # the linear (or its bias Add) makes the 3D value itself
                last.output[0] = reshapes[0].output[0]
            reshaped |= {linear.output[0], last.output[0]}
            for node in reshapes:
                graph.node.remove(node)
        rewritten += 1
    drop_value_info(graph, reshaped)
    drop_dead_nodes(graph)
    return rewritten, near


def unflatten_plan(g: Graph, linear: Any, x_shape: list[Any]) -> tuple[Any, Any, Any, list[Any]]:
    """For a linear reading the flattened x: (linear, the linear or its bias Add, the Split or None, the
    Reshapes back to [B, S, n])."""
    need((linear.domain or "", linear.op_type) in LINEARS and linear.input[0] != linear.input[-1],
         f"{linear.name}: not a linear")
    last = linear
    bias = g.readers.get(linear.output[0], [])
    if len(bias) == 1 and bias[0].op_type == "Add" and any(g.constants.get(i) is not None and
                                                           g.constants[i].ndim == 1 for i in bias[0].input):
        last = bias[0]
    out = last.output[0]
    readers = g.readers.get(out, [])
    need(len(readers) == 1 and out not in g.outputs, f"{out}: read {len(readers)} times")
    split = readers[0] if readers[0].op_type == "Split" else None
    need(split is None or g.attr(split, "axis", 0) in (1, -1), f"{out}: split on dim {g.attr(split, 'axis', 0)}")
    parts = list(split.output) if split is not None else [out]
    reshapes = [g.readers.get(p, []) for p in parts]
    need(all(len(r) == 1 and r[0].op_type == "Reshape" and r[0].input[0] == p and p not in g.outputs
             and len(g.shapes.get(r[0].output[0], [])) == 3 and g.shapes[r[0].output[0]][:2] == x_shape[:2]
             for p, r in zip(parts, reshapes)), f"{out}: parts not each reshaped to [B, S, n]")
    return linear, last, split, [r[0] for r in reshapes]


def packed_qkv(graph: Any, base_dir: str = "") -> tuple[int, list[str]]:
    """GroupQueryAttention(q, k, v) where q, k, v are the parts of one Split on the last dim, in that order and
    read by it alone -> GroupQueryAttention(the split value): ONNX Runtime splits packed QKV itself, as ONNX
    Runtime GenAI's builder writes it (one Split node fewer per layer, 12 of the 69 nodes per step our 125M Llama
    ran beyond GenAI's). Run after linears_on_3d_inputs (the parts are 3D then). Returns (packed, near-misses)."""
    g, packed, near = Graph(graph, base_dir), 0, []
    for attention in [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == MS]:
        q, k, v = attention.input[:3]
        split = g.producer.get(q)
        heads, kv_heads = g.attr(attention, "num_heads"), g.attr(attention, "kv_num_heads")
        if not k or split is None or split.op_type != "Split":
            continue
        sizes = g.ints(split.input[1]) if len(split.input) > 1 else None
        width = (sizes or [0])[0] // heads
        reason = ("parts not q, k, v in order" if list(split.output) != [q, k, v]
                  else f"split on dim {g.attr(split, 'axis', 0)}" if g.attr(split, "axis", 0) != -1
                  else f"split sizes {sizes}" if sizes != [heads * width, kv_heads * width, kv_heads * width]
                  else "a part read elsewhere" if any(len(g.readers.get(x, [])) != 1 or x in g.outputs
                                                      for x in (q, k, v)) else None)
        if reason is not None:
            near.append(f"packed QKV at {attention.name} left alone: {reason}")
            continue
        attention.input[:3] = [split.input[0], "", ""]
        graph.node.remove(split)
        packed += 1
    return packed, near


def split_linears(graph: Any, base_dir: str = "") -> tuple[int, list[str]]:
    """MatMul(x, W [K, n1 + n2 + ...]) -> Split(last dim, [n1, n2, ...]) -> one MatMul(x, W[:, part]) per
    part, each making the value its Split output made (parallel_linear_fusion's gate/up, passes/fusion.py, and
    q/k/v where GroupQueryAttention does not read them packed). The same products (each output column is the
    same dot product over K), the same weight bytes read once per step, and no Split node copying the outputs
    apart: ONNX Runtime's CPU MatMul costs what it reads, so two of them cost what the fused one did, and the
    Split is a node per layer that ONNX Runtime GenAI's builder's decoder, which writes gate and up apart, does
    not run (125M Qwen2, one decode step, 25 interleaved rounds: 16.34 ms median against 16.55 with the
    Splits). Parts of a weight stored beside the model (external data) are appended to
    its data file, which the caller then compacts (fuse_for_onnxruntime). Run after linears_on_3d_inputs (its
    Split then splits the last dim of the 3D output). Returns (rewritten, near-misses)."""
    from onnx import helper, numpy_helper

    g, rewritten, near = Graph(graph, base_dir), 0, []
    initializers = {t.name: t for t in graph.initializer}
    for split in [n for n in graph.node if n.op_type == "Split" and n.domain in ("", "ai.onnx")]:
        linear = g.node(split.input[0], "MatMul")
        weight = initializers.get(linear.input[1]) if linear is not None else None
        if weight is None or len(weight.dims) != 2:
            continue
        sizes = g.ints(split.input[1]) if len(split.input) > 1 else None
        shape = g.shapes.get(linear.input[0]) or []
        reason = ("its output read elsewhere too" if len(g.readers.get(split.input[0], [])) != 1
                  or split.input[0] in g.outputs
                  else f"split on dim {g.attr(split, 'axis', 0)} of rank {len(shape) or '?'}"
                  if g.attr(split, "axis", 0) != -1 and g.attr(split, "axis", 0) != len(shape) - 1
                  else f"split sizes {sizes} not of its {weight.dims[1]} columns"
                  if sizes is None or sum(sizes) != weight.dims[1] or len(sizes) != len(split.output)
                  else None)
        if reason is not None:
            near.append(f"linear {linear.name} split by {split.name} left fused: {reason}")
            continue
        columns = np.cumsum([0, *sizes])
        values = g.constants[weight.name]
        at = list(graph.node).index(linear)
        for i, (part, lo, hi) in enumerate(zip(split.output, columns, columns[1:])):
            name = f"{weight.name}_columns_{lo}_{hi}"
            tensor = numpy_helper.from_array(np.ascontiguousarray(values[:, lo:hi]), name)
            if weight.data_location == weight.EXTERNAL:  # beside it too (the proto stays under 2 GB)
                append_external(tensor, base_dir, next(e.value for e in weight.external_data if e.key == "location"))
            graph.initializer.append(tensor)
            graph.node.insert(at + i, helper.make_node("MatMul", [linear.input[0], name], [part],
                                                       name=f"{linear.name}_columns_{lo}_{hi}"))
        graph.node.remove(linear)
        graph.node.remove(split)
        rewritten += 1
    drop_dead_nodes(graph)  # the fused weights
    return rewritten, near


def append_external(tensor: Any, base_dir: str, location: str, alignment: int = 4096) -> None:
    """Move `tensor`'s raw data to the end of the external data file `location` (in `base_dir`), at an offset
    aligned as ONNX's own writer aligns large tensors; `tensor` then references it there."""
    from onnx.external_data_helper import set_external_data

    data = tensor.raw_data
    with open(os.path.join(base_dir, location), "ab") as f:
        f.write(b"\0" * (-f.tell() % alignment))
        offset = f.tell()
        f.write(data)
    set_external_data(tensor, location, offset, len(data))
    tensor.data_location = tensor.EXTERNAL
    tensor.ClearField("raw_data")


def tied_table_rows(graph: Any) -> tuple[int, list[str]]:
    """Gather(T [D, V], ids, axis=1) -> Transpose to [*ids, D], T an initializer (share_tied_embedding's
    embedding of a tied head, compiler/onnx_rewrites.py) -> Gather(Transpose(T) [V, D], ids): ONNX Runtime folds
    the Transpose of an initializer at session start (its constant folding), so a step gathers each token's row
    of D contiguous values where it read D values 4V bytes apart, a cache and TLB miss each (125M Qwen2, V 32000:
    the Gather 75 us of kernel time per step against 7 us for the rows; ONNX Runtime GenAI's builder writes
    its tied embedding so). The file still holds one table; in memory ONNX Runtime holds the folded [V, D] copy
    beside the head's weight, as it does for GenAI's file. Returns (rewritten, near-misses)."""
    from onnx import helper

    g, rewritten, near = Graph(graph), 0, []
    initializers = {t.name: t for t in graph.initializer}
    for gather in [n for n in graph.node if n.op_type == "Gather" and n.domain in ("", "ai.onnx")]:
        table = initializers.get(gather.input[0])
        if table is None or len(table.dims) != 2 or g.attr(gather, "axis", 0) != 1:
            continue
        readers = g.readers.get(gather.output[0], [])
        transpose = readers[0] if len(readers) == 1 else None
        perm = g.attr(transpose, "perm") if transpose is not None and transpose.op_type == "Transpose" else None
        if perm is None or perm != [*range(1, len(perm)), 0] or gather.output[0] in g.outputs:
            near.append(f"tied table rows at {gather.name} left alone: its columns are not only moved last")
            continue
        rows = f"{table.name}_rows"
        at = list(graph.node).index(gather)
        if rows not in g.producer:  # one folded table for every Gather of it
            graph.node.insert(at, helper.make_node("Transpose", [table.name], [rows], perm=[1, 0],
                                                   name=f"{table.name}_rows_transpose"))
            g.producer[rows] = graph.node[at]
        gather.input[0] = rows
        set_attr(gather, "axis", 0)
        gather.output[0] = transpose.output[0]
        graph.node.remove(transpose)
        rewritten += 1
    return rewritten, near


def set_attr(node: Any, name: str, value: Any) -> None:
    from onnx import helper

    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


def drop_value_info(graph: Any, names: set[str]) -> None:
    """Forget the recorded shapes of `names`, 2D before a rewrite made them 3D (ONNX Runtime infers them)."""
    kept = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def fuse_contrib_ops(graph: Any, max_positions: int, base_dir: str = "", padding_masks: bool = True
                     ) -> tuple[dict[str, int], list[str]]:
    """Rewrite every matching attention and RMSNorm of an onnx GraphProto in place: (fused op -> count,
    near-misses with their reasons). base_dir: where its external data is (the file's folder). padding_masks:
    whether a mask computed from attention_mask alone is HF's causal + padding mask, which Shared.padding_bias
    stands for; not so for a model with sliding windows, whose window mask is also a function of attention_mask
    (its length) alone: a tiny Mistral with an 8-token window, fused so (when its export was first allowed),
    gave other tokens than HF from its second new token (the check on a prompt and one decode step, inside the
    window, passed)."""
    g, removed, new, near = Graph(graph, base_dir), [], [], []
    shared = Shared(g, max_positions, padding_masks)
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        try:
            att = attention_at(g, softmax)
            new += attention_nodes(att, shared)
            removed += att.removed
        except NoMatch as reason:
            near.append(f"attention at {softmax.name} left alone: {reason}")
    for mul in [n for n in graph.node if n.op_type == "Mul" and is_rms_norm_end(g, n)]:
        try:
            norm = rms_norm_at(g, mul)
        except NoMatch as reason:
            near.append(f"RMSNorm at {mul.name} left alone: {reason}")
            continue
        if norm.residual is not None:  # without one, ONNX Runtime's SimplifiedLayerNormFusion takes it
            new.append(skip_norm_node(g, norm))
            removed += [mul, norm.residual]
    near += shared.near
    if not new:
        return {}, near
    for node in removed:
        graph.node.remove(node)
    graph.node.extend([*shared.nodes, *new])
    drop_dead_nodes(graph)
    sort_nodes(graph)
    counts: dict[str, int] = {}
    for node in new:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    linears, linear_near = linears_on_3d_inputs(graph, base_dir)
    packed, packed_near = packed_qkv(graph, base_dir)
    split, split_near = split_linears(graph, base_dir)
    rows, rows_near = tied_table_rows(graph)
    counts.update({"3D linear groups": linears} if linears else {})
    counts.update({"packed QKV": packed} if packed else {})
    counts.update({"split linears": split} if split else {})
    counts.update({"tied table rows": rows} if rows else {})
    return counts, near + linear_near + packed_near + split_near + rows_near


def is_rms_norm_end(g: Graph, mul: Any) -> bool:
    """A Mul of x / Sqrt(...): the end of an RMSNorm, or a near-miss worth a reason."""
    divides = [g.node(i, "Div") for i in mul.input]
    return any(d is not None and g.node(d.input[1], "Sqrt") is not None for d in divides)


def drop_dead_nodes(graph: Any) -> None:
    """Remove the nodes no graph output depends on (the unfused attention and norm pieces), and the
    initializers no node reads any more."""
    producer = {out: node for node in graph.node for out in node.output}
    live, todo = set(), [v.name for v in graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in live:
            live.add(id(node))
            todo += list(node.input)
    for node in [n for n in graph.node if id(n) not in live]:
        graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in read]:  # inv_freq, the scale, ...
        graph.initializer.remove(tensor)


def sort_nodes(graph: Any) -> None:
    """Topological order (the fused nodes were appended), otherwise the order the nodes had."""
    ready = {v.name for v in [*graph.input, *graph.initializer]} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"onnx_fusions: a cycle or a missing input at {waiting[0].name}")
        pending = waiting
    graph.ClearField("node")
    graph.node.extend(ordered)


def fuse_for_onnxruntime(path: str, feeds: Sequence[dict[str, np.ndarray]], max_positions: int,
                         padding_masks: bool = True) -> PassResult:
    """Fuse the ONNX file at `path` (fuse_contrib_ops), keeping the result only when ONNX Runtime's outputs on
    each of `feeds` equal the unfused file's within TOLERANCE; rewrites `path` only then."""
    import onnx

    start = time.perf_counter()
    proto = onnx.load(path, load_external_data=False)  # the weights stay in their external file, untouched
    result = PassResult(name=NAME, nodes_before=len(proto.graph.node))
    base_dir = os.path.dirname(os.path.abspath(path))
    data_bytes = external_bytes(proto, base_dir)
    counts, result.near_misses = fuse_contrib_ops(proto.graph, max_positions, base_dir, padding_masks)
    result.nodes_after = len(proto.graph.node)
    if counts:
        if MS not in {o.domain for o in proto.opset_import}:
            proto.opset_import.append(onnx.helper.make_opsetid(MS, 1))
        candidate = path + ".fused.onnx"  # beside `path`, so the external data file resolves the same
        onnx.save(proto, candidate)
        try:
            keep_if_equal(path, candidate, feeds, counts, result)
        finally:
            if os.path.exists(candidate):
                os.remove(candidate)
            if external_bytes(proto, base_dir) != data_bytes:  # split_linears appended parts: kept or not,
                kept = onnx.load(path, load_external_data=False)  # the data file keeps only what `path` reads
                compact_external_data(kept, base_dir)
                onnx.save(kept, path)
    result.seconds = time.perf_counter() - start
    return result


def external_bytes(proto: Any, base_dir: str) -> int:
    """The size of the external data files `proto` references (0 when its weights are inline)."""
    from onnx.external_data_helper import uses_external_data

    files = {next(e.value for e in t.external_data if e.key == "location")
             for t in proto.graph.initializer if uses_external_data(t)}
    return sum(os.path.getsize(os.path.join(base_dir, f)) for f in files)


def keep_if_equal(path: str, candidate: str, feeds: Sequence[dict[str, np.ndarray]], counts: dict[str, int],
                  result: PassResult) -> None:
    fused = ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))
    try:
        want = run_file(path, feeds)
        error = max(relative_difference(got, w) for got, w in zip(run_file(candidate, feeds), want))
        measured = f"ONNX Runtime's outputs {error:.1e} from the unfused file's (relative, max over outputs)"
    except Exception as failure:  # noqa: BLE001 (any ONNX Runtime refusal of the fused file: keep the unfused one)
        error, measured = float("nan"), f"ONNX Runtime failed on the fused file: {str(failure)[-300:]}"
    if error <= TOLERANCE:  # NaN is not
        shared = share_buffer_check(candidate, feeds, want)
        os.replace(candidate, path)
        result.matched, result.changes = sum(counts.values()), [f"{fused}; {measured}; {shared}"]
        result.details = {"past_present_share_buffer": shared.startswith(SHARES)}
    else:
        warn_once(f"mmaccel: ONNX Runtime contrib fusion rolled back ({fused}): {measured} (tolerance {TOLERANCE:g})")
        result.nodes_after = result.nodes_before
        result.changes = [f"rolled back: {measured} (tolerance {TOLERANCE:g})"]


SHARES = "past and present share one buffer"


def share_buffer_check(path: str, feeds: Sequence[dict[str, np.ndarray]], want: list[list[np.ndarray]]) -> str:
    """Whether onnx_generate may run the fused file at `path` with one K/V buffer for past and present
    (compiler/onnx_generate.py SharedCache): every present must be a GroupQueryAttention's output, and ONNX
    Runtime's outputs so, on each of `feeds` (their past copied into a buffer 2 positions longer than the
    step needs), must equal `want`, the unfused file's. SHARES and the measured difference, or why not."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    presents = [o.name for o in graph.output if o.name.startswith("present")]
    if not presents or any(producer.get(name) != "GroupQueryAttention" for name in presents):
        return "past and present apart: a present is not a GroupQueryAttention's output"
    try:
        error = max(relative_difference(got, w) for got, w in zip(run_shared(path, feeds), want))
    except Exception as failure:  # noqa: BLE001 (ONNX Runtime refusing the shared buffer: the loop grows the past)
        return f"past and present apart: ONNX Runtime failed with them in one buffer: {str(failure)[-300:]}"
    if not error <= TOLERANCE:  # NaN included
        return f"past and present apart: their outputs in one buffer {error:.1e} from the unfused file's"
    return f"{SHARES} ({error:.1e} from the unfused file's)"


def run_file(path: str, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """ONNX Runtime's outputs of the file at `path` for each of `feeds` (one session: ~1 s to load the 125M
    Llama), at the positions attention_mask keeps."""
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    return [kept_positions(names, session.run(None, feed), feed) for feed in feeds]


def run_shared(path: str, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """run_file's outputs, each feed run as onnx_generate's SharedCache runs a step: its past copied into the
    buffer's first positions, the presents read back from it."""
    from .onnx_generate import SharedCache, past_name

    session = _session(path)
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    runs = []
    for feed in feeds:
        total, past = feed["attention_mask"].shape[1], feed[inputs[3]]
        shape = (*past.shape[:2], total + 2, past.shape[3])
        cache = SharedCache(session, inputs, outputs, feed["attention_mask"], shape, past.dtype)
        for name, buffer in cache.buffers.items():
            buffer[:, :, :past.shape[2]] = feed[name]
        logits = cache.run(feed[inputs[0]], total, feed[inputs[2]])
        presents = [cache.buffers[past_name(name)][:, :, :total] for name in outputs[1:]]
        runs.append(kept_positions(outputs, [logits, *presents], feed))
    return runs


def _session(path: str) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def kept_positions(names: list[str], values: list[np.ndarray], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Output `values` (named `names`), each at the positions attention_mask keeps: a pad's row is read by no
    real row, and its value differs between attention forms (HF's zeros, GroupQueryAttention's average over
    float-min scores)."""
    mask = feeds.get("attention_mask")
    kept = []
    for name, value in zip(names, values):
        if mask is None or value.ndim < 2 or len(value) != len(mask):
            kept.append(value)
        elif name.startswith("present") and value.ndim == 4 and value.shape[2] == mask.shape[1]:
            kept += [row[:, keep != 0] for row, keep in zip(value, mask)]  # [B, heads, T, D]
        elif not name.startswith("present"):  # [B, S, ...]: logits
            kept += [row[keep[-value.shape[1]:] != 0] for row, keep in zip(value, mask)]
        else:  # cross-attention K/V (Whisper's), positions not attention_mask's
            kept.append(value)
    return kept


def relative_difference(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) if b.size else 0.0
               for a, b in zip(got, want))
