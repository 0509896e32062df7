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

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch

from ._torch_internals import graph_break_count, guards_checked_once
from .errors import warn_once
from .lowering import keeping_what_runs


class StepGuards:
    """Whether repeats of a compiled step may run only the guards that tell its graphs apart
    (guards_checked_once): only while no first call of it traced a graph break. A step broken into several graphs
    runs Python between them whose values can change every step (MPT's attention reads the cache's length with
    .item()): Dynamo then needs a new graph or the full guards each step, and with the skipped guards it raised
    "Recompilation triggered with skip_guard_eval_unsafe stance" at MPT's second decode step (or, with one graph
    cached for a frame, could run it with a stale value). Such steps keep every guard."""

    def __init__(self) -> None:
        self.breaks = False

    @contextlib.contextmanager
    def first(self) -> Iterator[None]:
        """Around a step's first call (the one that traces it): notes whether it broke the graph."""
        before = graph_break_count()
        yield
        self.breaks = self.breaks or graph_break_count() != before

    def repeat(self) -> ContextManager:
        """Around a repeat of a step already called once with every guard checked."""
        return contextlib.nullcontext() if self.breaks else guards_checked_once()


class StepGraph:
    """`run(*buffers)` recorded over its own copies (`buffers`) of `inputs`; on the CPU (nothing recorded) each
    replay runs it under `repeat_guards`."""

    def __init__(self, run: Callable[..., Any], inputs: Sequence[torch.Tensor],
                 repeat_guards: Callable[[], ContextManager] = guards_checked_once) -> None:
        self.repeat_guards = repeat_guards
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
            with self.repeat_guards():
                return self.run(*self.buffers)
        self.graph.replay()
        return self.outputs


def record(what: str, run: Callable[..., Any], inputs: Sequence[torch.Tensor],
           repeat_guards: Callable[[], ContextManager] = guards_checked_once) -> StepGraph | None:
    """A StepGraph, or None (one warning) when the steps cannot be captured."""
    try:
        return StepGraph(run, inputs, repeat_guards)
    except Exception as error:  # the model's code is the user's: whatever breaks the capture, run uncaptured
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        warn_once(f"mmaccel.generate: could not record {what} as one CUDA graph ({type(error).__name__}: "
                  f"{str(error)[:200]}); running its steps one call each (slower on small models)")
        return None
