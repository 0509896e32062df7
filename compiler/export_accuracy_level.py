"""MatMulNBits' accuracy_level=4 in export_onnx(generation=True) int4 folders (issue 18), when ONNX Runtime's own
output stays within accuracy_budget.

accuracy_level=4 selects ONNX Runtime's CPU kernel that rounds the activations to int8 per block before the 4-bit
dot products (ONNX Runtime GenAI's builder emits it for CPU). On the 125M Llama of bench/onnx_generate.py it
decodes 1.75x faster than the exact fp32-activation kernel (bench/onnx_int4_accuracy_level.py: 3.91 against 6.85
ms per token, quiet machine), and it is what left our int4 folder 1.8x behind GenAI's (bench/onnx_generate.py).
That rounding happens inside ONNX Runtime, so the quantize pass, which measures the graph run by torch, cannot see
it: here the written file is run by ONNX Runtime on the graph's trace inputs, with and without the attribute,
against the model run eagerly (the reference quantize_embedding measures against). The attribute stays only when
ONNX Runtime's error with it is within accuracy_budget; otherwise the file keeps the exact kernel, with a warning.
Both numbers go into the report as the pass `matmul_nbits_accuracy_level`. The int8 rounding differs between CPU
kernels (AVX2, AVX-512 VNNI, ARM), so the number measured is this machine's.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np
import torch

from ..passes.contract import PassResult
from ..passes.lossy import pooled_relative_error
from .errors import warn_once

NAME = "matmul_nbits_accuracy_level"
LEVEL = 4  # ONNX Runtime's int8-activation kernel (CompInt8)


def int8_activation_matmuls(path: str, inputs: Sequence[torch.Tensor], reference: list[torch.Tensor],
                            budget: float) -> PassResult:
    """Give the MatMulNBits of the ONNX file at `path` accuracy_level=LEVEL when ONNX Runtime's outputs on
    `inputs` stay within `budget` of `reference` (the model's own outputs); rewrites `path` only then."""
    import onnx

    start = time.perf_counter()
    proto = onnx.load(path, load_external_data=False)  # the weights stay in their external file, untouched
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    result = PassResult(name=NAME, lossy=True, nodes_before=len(proto.graph.node),
                        nodes_after=len(proto.graph.node))
    if not nodes:
        result.changes = ["no MatMulNBits in the graph"]
        return result
    before = _onnxruntime_error(path, inputs, reference)
    for node in nodes:
        set_accuracy_level(node, LEVEL)
    candidate = path + f".level{LEVEL}.onnx"  # beside `path`, so the external data file resolves the same
    onnx.save(proto, candidate)
    try:
        after = _onnxruntime_error(candidate, inputs, reference)
        measured = (f"ONNX Runtime's relative output error against the model on the trace inputs {after:.2e} "
                    f"({before:.2e} with fp32 activations)")
        if after <= budget:  # NaN counts as over budget
            os.replace(candidate, path)
            result.matched, result.measured_error = len(nodes), after
            result.changes = [f"{len(nodes)} MatMulNBits accuracy_level={LEVEL} (int8 activations); {measured}; "
                              f"budget {budget:g}"]
        else:
            warn_once(f"mmaccel: MatMulNBits left at accuracy_level 0 (fp32 activations): level {LEVEL} would make "
                      f"{measured}, over accuracy_budget {budget:g}")
            result.changes, result.measured_error = [f"rolled back, over budget {budget:g}: {measured}"], before
    finally:
        if os.path.exists(candidate):
            os.remove(candidate)
    result.seconds = time.perf_counter() - start
    return result


def set_accuracy_level(node: Any, level: int) -> None:
    """Set (or replace) a MatMulNBits NodeProto's accuracy_level."""
    import onnx

    kept = [a for a in node.attribute if a.name != "accuracy_level"]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])


def _onnxruntime_error(path: str, inputs: Sequence[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The file run by a plain ONNX Runtime session on `inputs`, its error against `reference`."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ascontiguousarray(t.detach().cpu().numpy()) for i, t in zip(session.get_inputs(), inputs)}
    outputs = [torch.from_numpy(o) for o in session.run(None, feeds)]
    return pooled_relative_error([outputs], [[r.detach().cpu() for r in reference]])
