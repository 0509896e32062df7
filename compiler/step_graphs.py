"""Runs of compiled steps recorded as one CUDA graph: mmaccel.generate's decode blocks (several decode steps) and
speculative rounds (k draft steps and the verify step), each replayed with one launch.

Why: every call of a compiled step costs the host 0.1-0.5 ms (Dynamo's frame hook, AOTAutograd's wrapper, the
frozen-weight check, the Triton target's recording key and copies). Under a 7B step (2.5 ms of GPU work) that
hides; under a small model's it does not, and the GPU waits: on the H200, the trained 303M code model decoded at
0.62 ms per token one step per call, its 6M draft's steps cost about as much as the target's, so a speculative
round of 4 draft steps and a verify took 4.2 plain steps' time (bench/results/code_model_cuda_h200_per_step.json).

How: the steps are called once with the graph's own input buffers while the stream is capturing (the Triton
target launches its kernels plainly under an outer capture: backends/triton/cudagraphs.py), so their kernels land
in this graph; a run ends by copying its new state into its own input buffers, so the next replay continues from
there with no host work between. Capturing executes nothing: the first replay does the work.

Callers record only steps that already ran once uncaptured (compiled, kernels loaded and chosen). A capture that
fails (a step that reads a tensor on the host, a graph break that does) warns once and returns None: the caller
runs the steps one call each. On the CPU (tests, the CPU targets) nothing is recorded: a replay calls the same
function on the same buffers, so the tests run the same flow except the capture.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ._torch_internals import guards_checked_once
from .errors import warn_once
from .lowering import keeping_what_runs


class StepGraph:
    """`run(*buffers)` recorded over its own copies (`buffers`) of `inputs`."""

    def __init__(self, run: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> None:
        self.buffers = [t.clone() for t in inputs]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.run: Callable[..., Any] | None = run
        self.outputs: Any = None
        self.graphs: set[Any] = set()  # the compiled graphs the capture ran: what its kernels read stays alive
        if self.buffers[0].is_cuda:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), keeping_what_runs() as self.graphs:
                self.outputs = run(*self.buffers)
            self.graph, self.run = graph, None  # the recording holds no reference to the model

    def replay(self, inputs: Sequence[torch.Tensor]) -> Any:
        """Copy each input not already in its buffer there, run; the outputs live until the next replay."""
        for buffer, value in zip(self.buffers, inputs):
            if buffer.data_ptr() != value.data_ptr():
                buffer.copy_(value)
        if self.graph is None:
            # Captured on a GPU with every guard checked; here each replay repeats that call with the same
            # objects and shapes, so only the guards telling graphs apart run (as generate's own steps do).
            with guards_checked_once():
                return self.run(*self.buffers)
        self.graph.replay()
        return self.outputs


def record(what: str, run: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> StepGraph | None:
    """A StepGraph, or None (one warning) when the steps cannot be captured."""
    try:
        return StepGraph(run, inputs)
    except Exception as error:  # the model's code is the user's: whatever breaks the capture, run uncaptured
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        warn_once(f"mmaccel.generate: could not record {what} as one CUDA graph ({type(error).__name__}: "
                  f"{str(error)[:200]}); running its steps one call each (slower on small models)")
        return None
