"""Rewrites of an exported ONNX graph that let ONNX Runtime's own fusions match it, or that it runs with fewer
nodes (issue 18).

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


def drop_zero_biases(graph: Any, base_dir: str = "") -> list[str]:
    """A linear's bias that is all zeros, exactly, leaves: Add(MatMul(x, W [K, N]), b [N]) -> the MatMul's
    output, and Gemm(A, B, C) -> Gemm(A, B). x + 0 is x (but for -0.0, which stays -0.0 rather than becoming
    +0.0), so the outputs are the same values, with one node fewer per linear (the Add) at each step. Which
    models have such biases: freshly initialized ones (Hugging Face zeroes every nn.Linear bias at init, so a
    random-weight Qwen2's q/k/v biases are zeros, as bench/onnx_fusion_peers.py's are; ONNX Runtime GenAI's
    builder skips them too); trained weights rarely. Also MatMulNBits (its N attribute), and a bias of one
    value (broadcast). Returns one line per bias dropped. Tensors stored beside the model resolve against
    `base_dir`."""
    from onnx import numpy_helper

    tensors = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {v.name for v in graph.output}

    def zeros(name: str, width: int | None = None) -> bool:
        """An initializer of zeros only; with `width`, also of shape [width] or [1] (an Add's bias that does
        not broadcast the matmul's output wider)."""
        tensor = tensors.get(name)
        if tensor is None or (width is not None and list(tensor.dims) not in ([width], [1])):
            return False
        return not numpy_helper.to_array(tensor, base_dir).any()

    def columns(node: Any) -> int | None:
        """N of a linear's output [..., N] with a constant weight, else None."""
        if node is None:
            return None
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            weight = tensors.get(node.input[1])
            return weight.dims[1] if weight is not None and len(weight.dims) == 2 else None
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            return next((a.i for a in node.attribute if a.name == "N"), None)
        return None

    dropped, biases = [], set()
    for node in list(graph.node):
        if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and len(node.input) == 3 and zeros(node.input[2]):
            dropped.append(f"Gemm {node.name}: bias {node.input[2]} all zeros")  # C broadcasts to A B's shape
            biases.add(node.input.pop())
            continue
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        for x, bias in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            linear = producers.get(x)
            width = columns(linear)
            # the linear's output read elsewhere too, or a graph output: it keeps its name, and the Add stays
            if width is None or x in outputs or readers.get(x) != 1 or not zeros(bias, width):
                continue
            linear.output[list(linear.output).index(x)] = node.output[0]
            producers[node.output[0]] = linear
            graph.node.remove(node)
            dropped.append(f"Add {node.name}: bias {bias} of {linear.name} all zeros")
            biases.add(bias)
            break
    read = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name in biases - read]:
        graph.initializer.remove(tensor)
    return dropped


def share_tied_embedding(graph: Any, base_dir: str) -> list[str]:
    """A tied LM head (Qwen2, Gemma, GPT-2, ...) reaches the file twice: the embedding's Gather reads the table W
    [V, D] and torch.onnx folds the head's MatMul(x, Transpose(W)) into a second initializer W^T (a 125M Qwen2:
    499 MB where ONNX Runtime GenAI's builder writes 402). Gather(W, ids) -> Transpose(Gather(W^T, ids, axis=1)),
    and W leaves the file: the same values (compared exactly before the rewrite), one table. The Transpose moves
    one [D, tokens] slice per call; the column Gather reads D values 4V bytes apart, so the fused decoder gathers
    rows of a Transpose of W^T that ONNX Runtime folds at load instead (compiler/onnx_fusions.py
    tied_table_rows). Returns what was shared, one line each. Tensors stored beside the model
    (external data) are read from `base_dir`; the caller compacts that file (compact_external_data)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    shared = []
    for gather in [n for n in graph.node if n.op_type == "Gather" and n.domain in ("", "ai.onnx")]:
        table = initializers.get(gather.input[0])
        axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or len(table.dims) != 2 or len(readers.get(table.name, [])) != 1:
            continue
        vocab, width = table.dims
        candidates = [t for t in graph.initializer if list(t.dims) == [width, vocab] and t.data_type == table.data_type
                      and t.name != table.name]
        if not candidates:
            continue
        values = numpy_helper.to_array(table, base_dir)
        twin = next((t for t in candidates if np.array_equal(numpy_helper.to_array(t, base_dir), values.T)), None)
        if twin is None:
            continue
        ids = next((v for v in list(graph.input) + list(graph.value_info) if v.name == gather.input[1]), None)
        if ids is None or not ids.type.tensor_type.HasField("shape"):
            continue  # the ids' rank decides the Transpose: left as it was where the graph does not say it
        rank = len(ids.type.tensor_type.shape.dim)
        columns = f"{gather.output[0]}_columns"
        at = list(graph.node).index(gather)
        graph.node.insert(at, onnx.helper.make_node("Gather", [twin.name, gather.input[1]], [columns], axis=1,
                                                    name=f"{gather.name}_from_tied_head"))
        graph.node.insert(at + 1, onnx.helper.make_node("Transpose", [columns], list(gather.output),  # [D, *ids]
                                                        perm=[*range(1, rank + 1), 0],  # -> [*ids, D]
                                                        name=f"{gather.name}_transpose"))
        graph.node.remove(gather)
        graph.initializer.remove(table)
        for i, value in enumerate(list(graph.input)):
            if value.name == table.name:
                del graph.input[i]
        shared.append(f"embedding table {table.name} [{vocab}, {width}] read from the tied head's {twin.name}")
    return shared


def compact_external_data(model: Any, base_dir: str, alignment: int = 4096) -> int:
    """Rewrite each external data file of `model` (an onnx ModelProto loaded without its data) with only the
    tensors the model still references, in order, each at an offset aligned to `alignment` (ONNX's own writer
    aligns large tensors so they can be memory-mapped); the references are updated in place. Streams tensor by
    tensor. Returns the bytes the files shrank by."""
    import os

    from onnx.external_data_helper import uses_external_data

    by_file: dict[str, list[Any]] = {}
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            location = next(e.value for e in tensor.external_data if e.key == "location")
            by_file.setdefault(location, []).append(tensor)
    saved = 0
    for location, tensors in by_file.items():
        path = os.path.join(base_dir, location)
        before = os.path.getsize(path)
        with open(path, "rb") as source, open(path + ".compact", "wb") as target:
            for tensor in tensors:
                info = {e.key: e for e in tensor.external_data}
                source.seek(int(info["offset"].value) if "offset" in info else 0)
                data = source.read(int(info["length"].value))
                target.write(b"\0" * (-target.tell() % alignment))
                offset = target.tell()
                target.write(data)
                if "offset" in info:
                    info["offset"].value = str(offset)
                else:
                    tensor.external_data.add(key="offset", value=str(offset))
        os.replace(path + ".compact", path)
        saved += before - os.path.getsize(path)
    return saved
