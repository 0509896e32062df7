"""mmaccel.export_onnx: torch.export -> the same lowering and passes as torch.compile -> ONNX file.

The file holds standard ONNX (opset 18) that ONNX Runtime runs without mmaccel installed: mmaccel's own
ops are translated by the ONNX Script functions next to their definitions (ops/), SDPA by torch.onnx.
"""
from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
import time
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..backends.onnxruntime import to_onnx
from ..passes.contract import PassContext
from ..passes.pipeline import run_pipeline
from ._torch_internals import detect_fake_mode
from .debug import DebugDump
from .errors import InvalidOptionError
from .lowering import DECOMPOSITIONS, freeze_input
from .options import CompileOptions, Sample, as_sample, refuse_outside_generate
from .report import CompileReport, GraphReport

# Files with more weight bytes than this store their weights beside the model (`<name>.onnx.data`):
# a single protobuf cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 1_800_000_000


# The SDPA ops torch.export would decompose; the ONNX translations of backends/onnxruntime take them whole.
SDPA_KEPT_WHOLE = (torch.ops.aten.scaled_dot_product_attention.default,
                   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)


class ExportError(RuntimeError):
    """The model cannot be exported; the message names the construct and what to do instead."""


def lower_for_export(model: torch.nn.Module, example_inputs: Sequence[Any], dynamic_shapes: Any,
                     options: CompileOptions, record: GraphReport) -> tuple[fx.GraphModule, list[Any]]:
    """torch.export, decompose to the ATen inference graph, freeze every weight, run the pass pipeline.
    Returns the optimized graph and the flat user inputs it takes."""
    example, samples = fit_samples(model, as_sample(example_inputs, "example_inputs"), options.calibration)
    if samples and dynamic_shapes is None:
        dynamic_shapes, record.calibration_note = calibration_dynamic_shapes(model, example, samples)
    try:
        ep = torch.export.export(model, example.args, example.kwargs or None, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"torch.export could not capture the model: {type(e).__name__}: {first}. If it names "
                          "a dim, fix dynamic_shapes as it suggests; if it is data-dependent Python control "
                          "flow, export needs one graph: torch.compile(model, backend='mmaccel') still works "
                          "on such models.") from e
    # Core ATen (linear -> addmm, matmul -> bmm, softmax -> _softmax): the level the passes match on,
    # as in the torch.compile path, plus mmaccel's own table. SDPA stays whole, as in the torch.compile path
    # (compiler/lowering.py): decomposed, Hugging Face's sdpa attention became a masked softmax with a
    # fully-masked-row guard that attention_fusion does not match, and every such layer stayed unfused.
    table = torch.export.default_decompositions()
    for op in SDPA_KEPT_WHOLE:
        table.pop(op, None)
    table.update(DECOMPOSITIONS)
    table[torch.ops.aten.empty_permuted.default] = _empty_permuted
    ep = ep.run_decompositions(table)
    sig = ep.graph_signature
    mutated = list(sig.buffers_to_mutate.values()) + list(sig.user_inputs_to_mutate.values())
    if mutated:
        raise ExportError(f"the model writes to {mutated} in place (a static KV cache?). ONNX graphs are "
                          "functional: export a step that takes and returns its state as tensors, or use "
                          "torch.compile(model, backend='mmaccel') for in-place caches.")
    gm = ep.graph_module
    record.dynamo_nodes = record.aten_nodes = len(gm.graph.nodes)
    # torch.export asserts dtypes around casts (`.float()`, `.to(dtype)`); the FakeTensor metadata the
    # passes check already guarantees them, and as extra users they would hide patterns from the passes.
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten._assert_tensor_metadata.default)):
        gm.graph.erase_node(node)
    weights = {**ep.state_dict, **ep.constants}
    user_inputs = []
    for spec, node in zip(sig.input_specs, list(gm.graph.find_nodes(op="placeholder"))):
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            user_inputs.append(node)
            continue
        value = weights[spec.target]
        freeze_input(gm, node, value)
        record.frozen += 1
        record.frozen_bytes += value.numel() * value.element_size()
    gm.recompile()
    # A fresh GraphModule: ExportedProgram's module carries export-only state we do not want to re-export.
    gm = fx.GraphModule(gm, gm.graph)
    fake_mode = detect_fake_mode([n.meta["val"] for n in user_inputs])
    flat_inputs = _flat(example)
    calibration = None if samples is None else [_flat(sample) for sample in samples]
    ctx = PassContext(options=options, fake_mode=fake_mode, dump=DebugDump(options.debug_dir).for_graph(0),
                      example_inputs=flat_inputs, calibration=calibration, w8a8_weight_bits=7)
    record.passes = run_pipeline(gm, ctx)
    record.final_graph, record.context, record.final_nodes = gm, ctx, len(gm.graph.nodes)
    record.inputs = [str(tuple(n.meta["val"].shape)) for n in user_inputs]
    return gm, flat_inputs


def _empty_permuted(size: Sequence[Any], physical_layout: Sequence[int], *, dtype: Any = None, layout: Any = None,
                    device: Any = None, pin_memory: Any = None) -> torch.Tensor:
    """aten.empty_permuted (torch.empty_like of a strided tensor; transformers' mixture-of-experts layers) as
    aten.empty: an ONNX tensor has no strides, and torch.onnx translates empty, not empty_permuted (Mixtral's and
    Qwen2-MoE's export stopped there)."""
    return torch.empty(size, dtype=dtype, device=device)


def _flat(sample: Sample) -> list[Any]:
    return list(torch.utils._pytree.tree_leaves((sample.args, sample.kwargs)))


def _bind(model: torch.nn.Module, sample: Sample, where: str) -> dict[str, Any]:
    """The sample's arguments by parameter name, in the order of the model's forward signature."""
    try:
        return dict(inspect.signature(model.forward).bind(*sample.args, **sample.kwargs).arguments)
    except TypeError as e:
        raise ExportError(f"{where} {sample.describe()} does not fit {type(model).__name__}.forward: {e}") from e


def fit_samples(model: torch.nn.Module, example: Sample, samples: Sequence[Sample] | None
                ) -> tuple[Sample, list[Sample] | None]:
    """The example and each calibration sample in one layout (the example's positional arguments, then its
    keyword arguments in signature order), so each flattens to the exported graph's inputs. A sample laid out
    otherwise (a keyword for a positional argument) is bound to forward's signature; one passing other
    arguments than the example (the graph takes the example's only) is an error naming it."""
    parameters = inspect.signature(model.forward).parameters
    order = list(parameters)

    def ordered(kwargs: dict[str, Any]) -> dict[str, Any]:
        return dict(sorted(kwargs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))

    example = Sample(example.args, ordered(example.kwargs))
    if samples is None:
        return example, None
    # *args, or keywords gathered by **kwargs, have no one place in the example's layout
    variadic = {n for n, p in parameters.items() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    fitted = []
    for i, sample in enumerate(samples):
        if len(sample.args) == len(example.args) and set(sample.kwargs) == set(example.kwargs):
            fitted.append(Sample(sample.args, ordered(sample.kwargs)))
            continue
        want, have = _bind(model, example, "example_inputs"), _bind(model, sample, f"calibration sample {i}")
        if set(have) != set(want) or variadic & (set(have) | set(want)):
            raise ExportError(f"calibration sample {i} {sample.describe()} passes {sorted(have)} but the example "
                              f"inputs pass {sorted(want)}; the exported graph takes the example's arguments only: "
                              "give samples with the arguments of the example, laid out as in the example (or add "
                              "the others to example_inputs, a dict of keyword arguments)")
        names, positional = list(want), len(example.args)
        fitted.append(Sample(tuple(have[n] for n in names[:positional]), {n: have[n] for n in names[positional:]}))
    return example, fitted


def calibration_dynamic_shapes(model: torch.nn.Module, example: Sample, samples: Sequence[Sample]
                               ) -> tuple[dict[str, Any] | None, str]:
    """Without dynamic_shapes from the user, the dims in which calibration samples differ from the example are
    exported dynamic (Dim.AUTO), so that the graph the passes measure takes every sample; and the note saying
    so. Sizes 0 and 1 are specialized by torch.export: a sample differing from one is an error naming it."""
    bound = _bind(model, example, "example_inputs")
    spec: dict[str, Any] = {}
    varying = []
    for name, value in bound.items():
        dims = set()
        for i, sample in enumerate(samples):
            other = _bind(model, sample, f"calibration sample {i}")[name]
            if not isinstance(value, torch.Tensor) or not isinstance(other, torch.Tensor) or other.dim() != value.dim():
                continue
            for d, (a, b) in enumerate(zip(value.shape, other.shape)):
                if a != b and a <= 1:
                    raise ExportError(f"calibration sample {i} {sample.describe()} has size {b} in dim {d} of "
                                      f"'{name}' where the example inputs have {a}; torch.export specializes sizes 0 "
                                      "and 1, so the graph could not take the sample: give example inputs of size "
                                      ">= 2 in that dim")
                if a != b:
                    dims.add(d)
        spec[name] = {d: torch.export.Dim.AUTO for d in sorted(dims)} if dims else None
        varying += [f"{name}[{d}]" for d in sorted(dims)]
    if not varying:
        return None, ""
    return spec, (f"calibration samples differ in {', '.join(varying)}: exported with those dims dynamic, so the "
                  "error is measured on every sample")


def export_options(options: dict[str, Any]) -> CompileOptions:
    opts = CompileOptions.from_user(options)
    refuse_outside_generate(opts)
    if opts.target != "auto":
        raise InvalidOptionError("option 'target' does not apply to export_onnx: the file is the target")
    if opts.weights == "release":  # nothing to gain: the file holds only the quantized weights already
        raise InvalidOptionError("option weights='release' does not apply to export_onnx: the ONNX file holds the "
                                 "quantized / pruned weights only, and your model stays whole (the export's own "
                                 "copies are freed when it returns)")
    return opts


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[Any], path: str | os.PathLike,
                dynamic_shapes: Any = None, **options: Any) -> CompileReport:
    """Export `model` through mmaccel's passes to an ONNX file at `path` (opset 18, checked with
    onnx.checker). A failed export never leaves a partial file at `path`: it is written aside, validated,
    then moved into place. Returns the report of what the passes did."""
    import onnx

    opts = export_options(options)
    path = os.fspath(path)
    report = CompileReport(opts)
    record = GraphReport(index=0, target=f"onnx file {path}", target_reason="export_onnx")
    start = time.perf_counter()
    gm, flat_inputs = lower_for_export(model, example_inputs, dynamic_shapes, opts, record)
    program = convert(gm, flat_inputs)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".mmaccel-export-") as tmp:
        staged = os.path.join(tmp, os.path.basename(path))
        program.save(staged, external_data=record.frozen_bytes > EXTERNAL_DATA_BYTES)
        onnx.checker.check_model(staged)  # by path: also checks models with external data
        for name in os.listdir(tmp):
            shutil.move(os.path.join(tmp, name), os.path.join(folder, name))
    record.status, record.compile_seconds = "optimized", time.perf_counter() - start
    report.graphs.append(record)
    return report


def convert(gm: fx.GraphModule, flat_inputs: list[Any]) -> Any:
    """The post-pass graph as a torch.onnx ONNXProgram; ExportError naming the op and source line it failed on."""
    try:
        return to_onnx(gm, flat_inputs)
    except Exception as e:
        raise ExportError(_explain_onnx_failure(gm, e)) from e


def _explain_onnx_failure(gm: fx.GraphModule, error: Exception) -> str:
    """Name the op torch.onnx could not translate and the model source line it came from."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).replace(" Next steps:", "")
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) in text:
            where = (node.meta.get("stack_trace") or "").strip().splitlines()
            line = where[-2].strip() if len(where) >= 2 else "unknown source line"
            return (f"ONNX export failed at op {node.target} ({line}): {text.strip().splitlines()[0]}. "
                    "Fallback: run the model with torch.compile(model, backend='mmaccel'), or replace the op "
                    "in the model with supported ones.")
    return f"ONNX export failed: {type(error).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
