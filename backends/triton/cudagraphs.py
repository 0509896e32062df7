"""CUDA graphs for the Triton target: a decode step is hundreds of small kernels whose launch costs more
than their work; replaying one recorded graph removes that cost.

Correctness rules:
- a recording is keyed by every input's shape, strides and dtype; an input the graph writes in place
  (a KV cache) is also keyed by its address, since the recording writes to that address;
- other inputs are copied into the recording's own buffers when their address differs;
- the call that records runs the graph for real (on a side stream, which also warms up kernels and
  libraries) and returns those results; capturing executes nothing, so in-place writes happen once;
- outputs are copied out of the recording's buffers, so the next replay never overwrites what a caller holds;
- at most MAX_RECORDINGS shapes are recorded; beyond that calls run without graphs (one warning).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ...compiler.errors import warn_once

MAX_RECORDINGS = 8


def wants_cuda_graphs(option: Any, gm: fx.GraphModule) -> bool:
    """"auto": record when every size is static. Measured on an H200 (bench/results/gpu_triton_*), replay beat
    plain launches on every benchmarked model, from a decode step to ViT-L batch 8, because the generated
    launchers cost tens of microseconds of Python each. The price is memory: each recorded shape keeps its
    activations in a private pool. Dynamic sizes would record a graph per length: plain launches there."""
    if option in (True, False):
        return option
    for node in gm.graph.nodes:
        vals = node.meta.get("val")
        for v in vals if isinstance(vals, (tuple, list)) else (vals,):
            if isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor) and not all(isinstance(s, int) for s in v.shape):
                return False
    return True


def mutated_inputs(gm: fx.GraphModule) -> set[int]:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    written = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for i in getattr(node.target, "writes_inputs", ()):  # generated kernels that store into an input
            if node.args[i] in placeholders:
                written.add(placeholders.index(node.args[i]))
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.is_mutable:
            continue
        for arg, spec in zip(node.args, schema.arguments):
            if spec.alias_info is not None and spec.alias_info.is_write and arg in placeholders:
                written.add(placeholders.index(arg))
    return written


class CudaGraphRunner:
    def __init__(self, run: Callable[[list[Any]], Any], gm: fx.GraphModule) -> None:
        self.run = run
        self.kernels = getattr(run, "kernels", None)
        self.mutated = mutated_inputs(gm)
        self.recordings: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Any], Any]] = {}
        self.pool = None

    def key(self, args: Sequence[Any]) -> tuple | None:
        parts = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if a.device.type != "cuda":
                    return None
                parts.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.data_ptr() if i in self.mutated else None))
            elif isinstance(a, (int, float, bool)):
                parts.append(a)
            else:
                return None
        return tuple(parts)

    def __call__(self, args: list[Any]) -> Any:
        key = self.key(args)
        if key is None:
            return self.run(args)
        entry = self.recordings.get(key)
        if entry is None:
            if len(self.recordings) >= MAX_RECORDINGS:
                warn_once(f"mmaccel: {MAX_RECORDINGS} CUDA graphs recorded for one compiled graph (input shapes or "
                          "cache addresses keep changing); further shapes run without CUDA graphs")
                return self.run(args)
            return self.record(key, args)
        graph, static, outputs = entry
        for i, (s, a) in enumerate(zip(static, args)):
            if isinstance(a, torch.Tensor) and i not in self.mutated and s.data_ptr() != a.data_ptr():
                s.copy_(a)
        graph.replay()
        return _copy_out(outputs)

    def record(self, key: tuple, args: list[Any]) -> Any:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = self.run(list(args))  # the real call: warms up kernels and libraries
        torch.cuda.current_stream().wait_stream(stream)
        static = [a if not isinstance(a, torch.Tensor) or i in self.mutated else a.clone() for i, a in enumerate(args)]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.run(list(static))
        self.recordings[key] = (graph, static, outputs)
        return result


def _copy_out(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_copy_out(o) for o in outputs)
    return outputs
