"""Calibration data for lossy passes: the user gives samples of the *model's* inputs; a pass needs each
*graph's* inputs (Dynamo may split a model into several graphs, and a graph's inputs include weights and
intermediate values). mmaccel.compile runs the model once per sample under a recording backend, which
keeps every graph's real inputs, keyed by the graph's code and input signature; the compiling backend then
finds the samples of the graph it compiles under the same key.

Running the samples executes the model eagerly (in place updates such as KV-cache writes happen, as in any
call). Parameters are kept by reference; other tensor inputs are copied, before the graph runs.

A sample's tensors run contiguous: a slice such as `ids[:, :t]` keeps its parent's strides, and once Dynamo
makes the sliced size dynamic it makes that stride an input of the graph too, so the recorded graph would not
be the one the model's calls (on fresh, contiguous tensors) compile, and its samples would reach no graph."""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .progress import progress

GraphSamples = dict[str, list[list[Any]]]


def graph_key(gm: fx.GraphModule, inputs: Sequence[Any]) -> str:
    signature = [(tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else type(a).__name__
                 for a in inputs]
    return hashlib.sha256(f"{gm.code}|{signature}".encode()).hexdigest()


def record_graph_inputs(model: Callable, samples: Sequence[Sequence[Any]]) -> GraphSamples:
    recorded: GraphSamples = defaultdict(list)

    def recorder(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        key = graph_key(gm, example_inputs)

        def run(*args: Any) -> Any:
            recorded[key].append([a if isinstance(a, torch.nn.Parameter) or not isinstance(a, torch.Tensor)
                                  else a.detach().clone() for a in args])
            return gm(*args)
        return run

    compiled = torch.compile(model, backend=recorder)
    with torch.no_grad():
        for sample in progress(samples, desc="mmaccel: calibration (recording graph inputs)"):
            compiled(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in sample))
    return dict(recorded)
