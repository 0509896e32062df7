"""Targets. A target takes a post-pass GraphModule and returns a callable; it knows nothing of how the
graph was optimized."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..compiler.errors import warn_once
from ..ops.w8a8_linear import cpu_int_mm_saturates
from . import eager, onnxruntime, triton

aten = torch.ops.aten


def resolve_target(target: str, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[str, str]:
    """(target to run, why). "auto": triton for CUDA graphs; onnxruntime for CPU graphs when it is installed
    and the graph does not write its inputs in place (copying a KV cache out of the session every step
    would cost more than it saves); eager otherwise."""
    if target != "auto":
        return target, "requested"
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    if not devices:
        # No tensor inputs: a graph that builds tensors from sizes alone (arange, full: Qwen2-VL's and Mistral 3's
        # position ids, MPT's ALiBi under HF's recipe). Where it builds them decides; on a GPU the onnxruntime
        # target was tried, refused the CUDA tensors and fell back with a warning that named the wrong target.
        made = {v.device.type for n in gm.graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)}
        if made - {"cpu"}:
            return "eager", f"auto on {'/'.join(sorted(made))}: a graph with no tensor inputs builds its tensors there"
    if devices == {"cuda"}:
        if triton.available():
            return "triton", "auto on cuda"
        return "eager", "auto on cuda: triton is not installed (pip install 'mmaccel[triton]')"
    if devices == {"cpu", "cuda"} and triton.available() and triton.only_host_scalars_on_cpu(gm):
        return "triton", "auto on cuda (0-dim CPU inputs only copied to the GPU: copied before the graph)"
    if devices - {"cpu"}:
        return "eager", f"auto on {'/'.join(sorted(devices))}: eager"
    if not onnxruntime.available():
        return "eager", "auto on cpu: onnxruntime/onnxscript not installed (pip install 'mmaccel[onnx]')"
    if any(n.target is aten.copy_.default for n in gm.graph.nodes):
        return "eager", "auto on cpu: the graph writes its inputs in place (KV cache), kept on eager"
    return "onnxruntime", "auto on cpu"


def w8a8_weight_bits(target: str, example_inputs: Sequence[Any]) -> int:
    """Bits of the W8A8 weights for a graph that runs on `target` (passes/contract.py PassContext): 7 where an
    integer matmul that runs or measures it saturates 16-bit pair sums of 8-bit weights (ONNX Runtime, or
    torch._int_mm on a CPU, without VNNI: ops/w8a8_linear.py), else 8."""
    if target == "onnxruntime" and onnxruntime.integer_matmul_saturates():
        return 7
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    return 7 if devices == {"cpu"} and cpu_int_mm_saturates() else 8  # (a CUDA graph's 0-dim CPU inputs: CUDA)


def compile_for_target(target: str, gm: fx.GraphModule, example_inputs: Sequence[Any], cuda_graphs: Any = "auto",
                       dump: Callable | None = None) -> tuple[Callable, str]:
    """A boxed callable (it takes the list of graph inputs) and the target that actually runs it."""
    if target == "triton":
        try:
            return triton.compile_graph(gm, example_inputs, cuda_graphs, dump), "triton"
        except triton.Unsupported as e:
            warn_once(f"mmaccel: triton target cannot run this graph ({e}); running it on the eager target")
            return eager.compile_graph(gm), "eager"
    if target == "onnxruntime":
        try:
            return onnxruntime.compile_graph(gm, example_inputs), "onnxruntime"
        except onnxruntime.Unsupported as e:
            warn_once(f"mmaccel: onnxruntime target cannot run this graph ({e}); running it on the eager target")
            return eager.compile_graph(gm), "eager"
    if target == "eager":
        return eager.compile_graph(gm), "eager"
    raise ValueError(f"unknown target {target!r}")
