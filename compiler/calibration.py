"""Calibration data for lossy passes: the user gives samples of the *model's* inputs; a pass needs each
*graph's* inputs (Dynamo may split a model into several graphs, and a graph's inputs include weights and
intermediate values). mmaccel.compile runs the samples through the compiled model itself before returning it:
each graph Dynamo captures meanwhile runs unoptimized (an eager run of its ATen graph with the live weights)
and keeps the inputs it was called with (a CalibratingGraph); once every sample has run, each such graph is
optimized, its lossy passes measured on what it kept. The graphs the samples reach are the graphs the user's
calls run: no matching of recorded graphs to compiled ones.

Running the samples executes the model (in place updates such as KV-cache writes happen, as in any call).
Inputs are copied as the graph is called. A sample's tensors run contiguous: a slice such as `ids[:, :t]`
keeps its parent's strides, and once Dynamo makes the sliced size dynamic it makes that stride an input of the
graph too, so the graph would not be the one the model's calls (on fresh, contiguous tensors) run.

Samples of several shapes (sentences of their own length, batches of several sizes): the dims in which they
differ are marked dynamic as they run (torch._dynamo.maybe_mark_dynamic), so one graph with symbolic sizes takes
them all and the error is pooled over every sample, rather than measured on those that share the first one's
shape. A size of 1 stays specialized (Dynamo's rule): a sample of length 1 gets a graph of its own."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import InvalidOptionError, LossyPassError
from .options import Sample
from .progress import progress


class CalibratingGraph:
    """Boxed callable for aot_autograd, for a graph captured while calibration samples run: runs `unoptimized`
    and keeps the inputs the optimized graph will take (`kept`); `finish()` optimizes it on them."""

    _boxed_call = True

    def __init__(self, optimize: Callable[[list[list[Any]]], Callable], unoptimized: Callable[[list[Any]], Any],
                 kept: Sequence[int]) -> None:
        self.optimize, self.unoptimized, self.kept = optimize, unoptimized, list(kept)
        self.samples: list[list[Any]] = []
        self.optimized: Callable | None = None

    def __call__(self, args: list[Any]) -> Any:
        if self.optimized is not None:
            return self.optimized(args)
        self.samples.append([a.detach().clone() if isinstance(a, torch.Tensor) else a
                             for a in (args[i] for i in self.kept)])
        return self.unoptimized(args)

    def finish(self) -> None:
        self.optimized = self.optimize(self.samples)


def varying_dims(samples: Sequence[Sample], dynamic: bool | None) -> list[set[int]]:
    """For each tensor of a sample (flattened), the dims in which the samples differ: they are marked dynamic
    as the samples run, so that one graph takes them all. dynamic=False with such samples is an error naming
    one (each shape would compile a graph of its own, measured on its own samples only)."""
    def shapes(sample: Sample) -> list[Any]:
        leaves = torch.utils._pytree.tree_leaves((sample.args, sample.kwargs))
        return [tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in leaves]

    first = shapes(samples[0])
    dims: list[set[int]] = [set() for _ in first]
    for i, sample in enumerate(samples):
        other = shapes(sample)
        if len(other) != len(first):
            continue
        for leaf, (a, b) in enumerate(zip(first, other)):
            if a is not None and b is not None and len(a) == len(b):
                dims[leaf] |= {d for d, (x, y) in enumerate(zip(a, b)) if x != y}
        if dynamic is False and other != first:
            raise InvalidOptionError(f"calibration sample {i} {sample.describe()} differs in shape from sample 0 "
                                     f"{samples[0].describe()}; with dynamic=False each shape compiles a graph of "
                                     "its own, measured on its own samples only: leave dynamic unset (the dims "
                                     "that differ are compiled dynamic) or give samples of one shape")
    return dims


def run_samples(compiled: Callable, samples: Sequence[Sample], dims: list[set[int]]) -> None:
    """Call the compiled model on each sample (contiguous tensors, the dims in `dims` marked dynamic, no grad);
    a sample the model cannot take is named in the error."""
    def prepare(leaves: list[Any]) -> list[Any]:
        ready = [a.contiguous().detach() if isinstance(a, torch.Tensor) else a for a in leaves]
        if len(ready) == len(dims):
            for a, marked in zip(ready, dims):
                if isinstance(a, torch.Tensor) and marked and max(marked) < a.dim():
                    torch._dynamo.maybe_mark_dynamic(a, sorted(marked))
        return ready

    with torch.no_grad():
        for i, sample in enumerate(progress(samples, desc="mmaccel: calibration (running samples)")):
            leaves, spec = torch.utils._pytree.tree_flatten((sample.args, sample.kwargs))
            args, kwargs = torch.utils._pytree.tree_unflatten(prepare(leaves), spec)
            try:
                compiled(*args, **kwargs)
            except (InvalidOptionError, LossyPassError):
                raise
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise LossyPassError(f"mmaccel: calibration sample {i} {sample.describe()} does not run through "
                                     f"the model: {type(e).__name__}: {first}") from e
