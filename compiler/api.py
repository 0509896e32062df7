"""Public API: mmaccel.compile and mmaccel.explain."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ._torch_internals import graph_break_count
from .backend import Backend
from .calibration import varying_dims
from .export import export_onnx  # noqa: F401  (re-exported as mmaccel.export_onnx)
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
    compiled.mmaccel_report = backend.report
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
