"""The Triton target: generated fused kernels for pointwise/reduction chains, library matmuls (cuBLAS),
attention through ATen's fused SDPA or a split-KV decode kernel, and optional CUDA graphs.

The optimized ATen graph stays the program: each group of fused nodes becomes one call of a generated
launcher, and everything else (matmuls, attention, embedding, cache writes, views) stays an ATen call.
Generated source is readable (dumped under MMACCEL_DEBUG) and cached on disk by its hash, so a second
process reuses the file and Triton's own cache of compiled binaries.

On CPU tensors the kernels run under Triton's interpreter (TRITON_INTERPRET=1): that is how the tests
check generated code without a GPU; it is slow and meant for testing only.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ...ops import OPS
from ...passes.graph import clone_module
from ..common import lower_custom_ops, reinplace_input_updates
from . import argmax, attention, decode_fusion, matmul, prepare
from .cache import load_source
from .cudagraphs import CudaGraphRunner, calls_before_recording
from .schedule import plan, rewrite, symbol_nodes

aten = torch.ops.aten
HEADER = "import torch\nimport triton\nimport triton.language as tl\n\n\n"


class Unsupported(Exception):
    """This graph cannot run on the Triton target; the caller falls back to the eager target."""


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def graph_device(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> torch.device:
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor)}
    devices |= {n.meta["val"].device for n in gm.graph.nodes
                if isinstance(n.meta.get("val"), torch.Tensor) and n.op == "get_attr"}
    cuda = {d for d in devices if d.type == "cuda"}
    if len(cuda) > 1:
        raise Unsupported(f"the graph spans several GPUs ({sorted(map(str, cuda))})")
    if cuda:
        return cuda.pop()
    if interpreting():
        return torch.device("cpu")
    raise Unsupported("the graph's tensors are on the CPU; the Triton target needs CUDA tensors "
                      "(or TRITON_INTERPRET=1 to run its kernels under Triton's CPU interpreter, for testing)")


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], cuda_graphs: Any = "auto",
                  dump: Callable[[str, Any], None] | None = None) -> Callable[[list[Any]], Any]:
    if not available():
        raise Unsupported("triton is not installed (pip install 'mmaccel[triton]')")
    device = graph_device(gm, example_inputs)
    gm = clone_module(gm)  # on Unsupported the caller falls back with the untouched graph
    moved = host_scalar_inputs(gm) if device.type == "cuda" else []
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for i in moved:  # the graph sees them where the runner puts them: on its GPU
        val = placeholders[i].meta["val"]
        with val.fake_mode:
            placeholders[i].meta["val"] = val.to(device)
    try:
        stats = generate(gm, device, dump)
    except NotImplementedError as e:
        raise Unsupported(str(e)) from None
    forward = gm.forward

    def run(args: list[Any]) -> Any:
        return forward(*args)

    run.kernels = stats  # type: ignore[attr-defined]
    record_after = calls_before_recording(cuda_graphs, gm) if device.type == "cuda" else None
    stats["cuda_graphs"] = record_after is not None
    runner = CudaGraphRunner(run, gm, record_after) if record_after else run
    return _moving_host_scalars(runner, moved, device) if moved else runner


def host_scalar_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions of the inputs that are 0-dim CPU tensors the graph only copies to a GPU. transformers' static
    cache makes its length counter with torch.tensor(0) and moves it to the GPU inside the first compiled call
    (StaticLayer.lazy_initialization), so every prefill graph of Hugging Face's compiled recipe reads one per
    layer; they sent the whole graph to the eager target, and the recipe's Whisper first token took 25.3 ms
    against eager's 23.9 (H200, issue 13). The runner copies them to the GPU before the graph (8 bytes each),
    so the graph stays all-CUDA: generated kernels and CUDA graphs."""
    moved = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        val = node.meta.get("val")
        if (isinstance(val, torch.Tensor) and val.device.type == "cpu" and val.dim() == 0 and node.users
                and all(u.target is aten._to_copy.default and u.args == (node,)
                        and torch.device(u.kwargs.get("device", "cpu")).type == "cuda" for u in node.users)):
            moved.append(i)
    return moved


def only_host_scalars_on_cpu(gm: fx.GraphModule) -> bool:
    """Whether every CPU tensor input of a graph that also reads CUDA tensors is one host_scalar_inputs moves."""
    cpu = [i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))
           if isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].device.type == "cpu"]
    constants = [node for node in gm.graph.find_nodes(op="get_attr")
                 if isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].device.type == "cpu"
                 and node.meta["val"].dim()]
    return bool(cpu) and not constants and cpu == host_scalar_inputs(gm)


def _moving_host_scalars(runner: Callable[[list[Any]], Any], moved: list[int],
                         device: torch.device) -> Callable[[list[Any]], Any]:
    def run(args: list[Any]) -> Any:
        args = list(args)
        for i in moved:
            args[i] = args[i].to(device)
        return runner(args)

    run.kernels = getattr(runner, "kernels", None)  # type: ignore[attr-defined]
    return run


def generate(gm: fx.GraphModule, device: torch.device, dump: Callable[[str, Any], None] | None = None) -> dict:
    """Rewrite `gm` in place to call generated kernels; returns counts for the report."""
    prepare.expand_composites(gm)
    reinplace_input_updates(gm)
    prepare.views_as_reshapes(gm)
    if prepare.stride_dependent_nodes(gm):
        raise NotImplementedError("the graph reads eager's strides (as_strided), which generated kernels do not keep")
    attention.route_attention(gm)
    argmax.route_argmax(gm)
    matmul.route_linears(gm)
    lower_custom_ops(gm)
    fusions = decode_fusion.fuse_decode_linears(gm, device)
    prepare.hoist_views(gm)
    unknown = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in OPS]
    if unknown:
        raise NotImplementedError(f"no Triton lowering for {unknown[0].target}")
    kernels, fusible = plan(gm, device)
    symbols = {s for k in kernels for s in k.symbols}
    sym_nodes = symbol_nodes(gm, symbols)
    source = HEADER + "\n\n".join(k.source + "\n\n" + k.launcher for k in kernels)
    module = load_source(source, device)
    launchers = {k.name: getattr(module, f"launch_{k.name}") for k in kernels}
    for k in kernels:  # which arguments a launcher writes in place (KV caches), for the CUDA graph runner
        launchers[k.name].writes_inputs = [k.inputs.index(r.args[0]) for r in k.roots
                                           if fusible[r] in ("scatter", "writeback")]
    rewrite(gm, kernels, fusible, launchers, sym_nodes)
    gm.graph.lint()
    gm.recompile()
    if dump is not None:
        dump("triton_kernels", source)
        dump("triton_graph", gm)
    return {"kernels": len(kernels), "fused_nodes": len(fusible), "source_path": module.__file__, **fusions}
