"""mmaccel: an inference compiler for multimodal foundation models, as a torch.compile backend.

    torch.compile(model, backend="mmaccel", options={...})   # registered through an entry point
    mmaccel.compile(model, **options)                        # same, options validated up front
    mmaccel.explain(model, *example_inputs, **options)       # what was captured and optimized
"""
from .compiler.api import compile, explain
from .compiler.backend import Backend
from .compiler.errors import InvalidOptionError, MmaccelFallbackWarning
from .compiler.options import CompileOptions
from .compiler.report import CompileReport, GraphReport

__all__ = ["compile", "explain", "Backend", "CompileOptions", "CompileReport", "GraphReport",
           "InvalidOptionError", "MmaccelFallbackWarning"]
__version__ = "0.1.0"
