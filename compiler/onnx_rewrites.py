"""Rewrites of an exported ONNX graph that let ONNX Runtime's own fusions match it (issue 18).

ONNX Runtime's SimplifiedLayerNormFusion (its RMSNorm kernel, applied at session start) matches
x / Sqrt(ReduceMean(x^2) + eps) * weight. torch.onnx translates HF's RMSNorm, x * torch.rsqrt(...), as
x * Reciprocal(Sqrt(...)), which it does not match, so every norm stayed 7 nodes. Rewriting Mul(x, Reciprocal(s))
into Div(x, s) lets it fuse: the 125M Llama's decoder step runs 799 nodes instead of 949 in ONNX Runtime
(bench/onnx_decode_step.py counts them). x / s is x * (1 / s) with one rounding instead of two.
"""
from __future__ import annotations

from typing import Any


def divide_by_square_roots(graph: Any) -> int:
    """Mul(x, Reciprocal(Sqrt(...))) -> Div(x, Sqrt(...)) in an onnx GraphProto, where the Reciprocal feeds only
    that Mul (another reader would still need it). Returns how many were rewritten."""
    import onnx

    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    rewritten = 0
    for reciprocal in [n for n in graph.node if n.op_type == "Reciprocal" and n.domain in ("", "ai.onnx")]:
        source = producers.get(reciprocal.input[0])
        users = readers.get(reciprocal.output[0], [])
        if source is None or source.op_type != "Sqrt" or len(users) != 1 or users[0].op_type != "Mul" \
                or reciprocal.output[0] in outputs or users[0].input[0] == users[0].input[1]:
            continue
        mul = users[0]
        other = mul.input[1] if mul.input[0] == reciprocal.output[0] else mul.input[0]
        nodes = list(graph.node)
        divide = onnx.helper.make_node("Div", [other, reciprocal.input[0]], list(mul.output), name=f"{mul.name}_div")
        graph.node.insert(nodes.index(mul), divide)
        graph.node.remove(mul)
        graph.node.remove(reciprocal)
        rewritten += 1
    return rewritten
