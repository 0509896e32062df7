"""Public API: mmaccel.compile, mmaccel.explain and mmaccel.export_onnx."""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from ._torch_internals import graph_break_count
from .backend import Backend
from .calibration import varying_dims
from .export import export_onnx as export_file
from .export_generation import export_generation
from .errors import InvalidOptionError
from .options import CompileOptions
from .report import CompileReport


def compile(model: Callable, *, dynamic: bool | None = None, fullgraph: bool = False, **options: Any) -> Callable:
    """`torch.compile(model, backend="mmaccel", options=options)`, with options validated now (ValueError)
    rather than at the first call. The result carries `mmaccel_report`, filled in as graphs compile.
    With `calibration=samples` (and quantize=..., prune=... or tokens=...), the model runs once per sample now,
    so that lossy passes measure their error on those inputs (compiler/calibration.py); the dims in which samples
    differ compile dynamic. With `weights="release"` the parameters the lossy passes replace are freed once each
    graph is compiled (compiler/release.py): `model` itself can no longer be called."""
    opts = CompileOptions.from_user(options)
    dims = varying_dims(opts.calibration, dynamic) if opts.calibration is not None else []
    backend = Backend(opts)
    backend.guard_model(model)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    # On the wrapper itself: torch's OptimizedModule forwards a plain setattr to the user's module, so a second
    # compile of the same model replaced the first one's report (it then named the second's target and error)
    object.__setattr__(compiled, "mmaccel_report", backend.report)
    if opts.calibration is not None:
        backend.calibrate(compiled, opts.calibration, dims)
    return compiled


def explain(model: Callable, *example_inputs: Any, dynamic: bool | None = None, **options: Any) -> CompileReport:
    """Compile `model` with mmaccel, run it once on `example_inputs`, and report what happened: graphs
    captured, graph breaks, each pass with what it matched and changed, the target that ran.
    `print(report)` shows it as a table."""
    backend = Backend(CompileOptions.from_user(options))
    backend.guard_model(model)
    before = graph_break_count()
    torch.compile(model, backend=backend, dynamic=dynamic)(*example_inputs)
    after = graph_break_count()
    backend.report.graph_breaks = {r: n - before.get(r, 0) for r, n in after.items() if n > before.get(r, 0)}
    return backend.report


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[Any] | dict[str, Any], path: str | os.PathLike,
                dynamic_shapes: Any = None, generation: bool = False, **options: Any) -> CompileReport:
    """Export `model` through mmaccel's passes to standard ONNX; returns the report of what the passes did.
    generation=False: one file at `path` (compiler/export.py). generation=True: a Hugging Face causal LM or
    LLaVA as a folder at `path`: decoder with past/present key-value tensors (and LLaVA's vision and
    embedding graphs) plus manifest.json, which mmaccel.onnx_generate runs (compiler/export_generation.py);
    its dynamic dims are fixed by the layout, so dynamic_shapes does not apply; its decoder uses ONNX Runtime's
    contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization; RotaryEmbedding for heads not a multiple
    of 16) unless portable=True."""
    if not generation:
        return export_file(model, example_inputs, path, dynamic_shapes=dynamic_shapes, **options)
    if dynamic_shapes is not None:
        raise InvalidOptionError("dynamic_shapes does not apply to export_onnx(generation=True): batch, sequence "
                                 "and past lengths are always dynamic")
    return export_generation(model, example_inputs, path, **options)
