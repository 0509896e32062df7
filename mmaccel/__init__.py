"""mmaccel: an inference compiler for multimodal foundation models, as a torch.compile backend.

    torch.compile(model, backend="mmaccel", options={...})   # registered through an entry point
    mmaccel.compile(model, **options)                        # same, options validated up front
    mmaccel.explain(model, *example_inputs, **options)       # what was captured and optimized
    mmaccel.export_onnx(model, example_inputs, path)          # same passes, standard ONNX file
    mmaccel.generate(model, **inputs, max_new_tokens=64)      # HF generation, steps compiled, lengths bucketed
    mmaccel.generate(model, **inputs, draft="layers:4")       # speculative decoding (or draft=small_model)
    mmaccel.cascade(small, large, calibration=prompts)        # the small model answers when confident
    mmaccel.export_onnx(model, inputs, folder, generation=True)   # HF decoder with past K/V (+ LLaVA vision), manifest
    mmaccel.onnx_generate(folder, input_ids, max_new_tokens=64)  # generation on ONNX Runtime, numpy loop
"""
import os as _os

# A regular (non-editable) install lays compiler/, passes/, ... out inside this package. In a source
# checkout they are this folder's siblings: look there too, so running from the checkout works either way.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "compiler")) and \
        _os.path.isfile(_os.path.join(_checkout, "compiler", "backend.py")):
    __path__.append(_checkout)

from .compiler.api import compile, explain, export_onnx
from .compiler.backend import Backend
from .compiler.generation import GenerationReport, generation_report
from .compiler.speculative import generate
from .compiler.cascade import Cascade, CascadeReport, cascade
from .compiler.onnx_generate import OnnxGenerator, onnx_generate
from .compiler.errors import InvalidOptionError, MmaccelFallbackWarning
from .compiler.options import CompileOptions
from .compiler.report import CompileReport, GraphReport, collect_reports
from .compiler._torch_internals import register_backend_name as _register
from .compiler.backend import mmaccel_backend as _mmaccel_backend

_register("mmaccel", _mmaccel_backend)

__all__ = ["compile", "explain", "export_onnx", "generate", "generation_report", "GenerationReport", "cascade",
           "Cascade", "CascadeReport", "onnx_generate", "OnnxGenerator", "collect_reports", "Backend", "CompileOptions",
           "CompileReport", "GraphReport",
           "InvalidOptionError", "MmaccelFallbackWarning"]
__version__ = "0.1.0"
