"""FX graph copies shared by the pipeline (rollback), lossy passes (measurement graphs), the compiler and
every target (each rewrites its own copy)."""
from __future__ import annotations

import torch.fx as fx


def clone_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph, sharing gm's constants: a target rewrites its own copy."""
    return fx.GraphModule(gm, copy_graph(gm))


def copy_graph(gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph(owning_module=gm)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph
