"""The Dynamo backend: backend="mmaccel" (entry point) and the Backend object behind mmaccel.compile."""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..backends import compile_for_target, resolve_target, w8a8_weight_bits
from ..passes.contract import PassContext
from ..passes.graph import clone_module
from ..passes.pipeline import run_pipeline
from ._torch_internals import (RESTART_EXCEPTIONS, DynamoVisibleOptionError, DynamoVisibleReleasedWeightsError,
                               concrete_inputs, detect_fake_mode, lower_with_aot, module_owned_inputs,
                               unset_fake_temporarily)
from .calibration import CalibratingGraph, run_samples
from .debug import DebugDump
from .errors import InvalidOptionError, LossyPassError, ReleasedWeightsError, warn_once
from .lowering import DECOMPOSITIONS, FrozenGraph, freeze_parameters
from .options import CompileOptions, Sample, refuse_outside_generate
from .release import (GraphWeights, check_no_stand_ins, is_released, refuse_eager_calls, refuse_released,
                      release_replaced)
from .report import CompileReport, GraphReport, active_reports


def mmaccel_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                    options: dict[str, Any] | None = None, mode: str | None = None) -> Callable:
    """`torch.compile(model, backend="mmaccel", options={...})` lands here."""
    try:
        opts = CompileOptions.from_user(options, mode)
        refuse_outside_generate(opts)
        if opts.calibration is not None:
            raise InvalidOptionError("option 'calibration' needs the model to run the samples through: use "
                                     "mmaccel.compile(model, quantize=..., calibration=samples) or "
                                     "mmaccel.export_onnx(..., calibration=samples)")
        if opts.weights == "release":
            raise InvalidOptionError(_RELEASE_NEEDS_THE_MODEL)
    except InvalidOptionError as e:
        raise DynamoVisibleOptionError(str(e)) from None
    return Backend(opts)(gm, example_inputs)


_RELEASE_NEEDS_THE_MODEL = (
    "option weights='release' needs the model, to make its eager calls raise a clear error once its parameters "
    "are freed: use mmaccel.compile(model, quantize=..., weights='release') (torch.compile(backend='mmaccel') and "
    "a bare mmaccel.Backend do not see the model)")


class Backend:
    """A torch.compile backend carrying its options and a report of every graph it compiled:
    `torch.compile(model, backend=mmaccel.Backend(target="eager"))`."""

    def __init__(self, options: CompileOptions | None = None, **user_options: Any) -> None:
        if options is not None and user_options:
            raise InvalidOptionError("pass either a CompileOptions or keyword options to Backend, not both")
        self.options = options or CompileOptions.from_user(user_options)
        refuse_outside_generate(self.options)
        # While calibration samples run (calibrate), graphs are captured as CalibratingGraphs
        self.calibrating: list[CalibratingGraph] | None = None
        self.calibrated = False
        self.report = CompileReport(self.options)
        self.debug = DebugDump(self.options.debug_dir)
        self.model_guarded = False  # weights="release": refuse_eager_calls(model) was done (guard_model)
        self.frozen_graphs: list[weakref.ref] = []  # every FrozenGraph made (retire)

    def retire(self, why: str) -> None:
        """Every graph this backend optimized runs unfrozen from now on and lets go of what it froze (its owner
        compiles anew: mmaccel.generate after the weights changed)."""
        for ref in self.frozen_graphs:
            graph = ref()
            if graph is not None:
                graph.retire(why)
        self.frozen_graphs.clear()

    def guard_model(self, model: torch.nn.Module) -> None:
        """weights="release": eager calls of `model` raise ReleasedWeightsError once its weights are freed."""
        if self.options.weights == "release" and not self.model_guarded:
            if not isinstance(model, torch.nn.Module):
                raise InvalidOptionError("option weights='release' frees a module's parameters: compile an "
                                         f"nn.Module, not a {type(model).__name__}")
            refuse_eager_calls(model)
            self.model_guarded = True

    def calibrate(self, compiled: Callable, samples: Sequence[Sample], dims: list[set[int]]) -> None:
        """Run the samples through `compiled` (this backend's torch.compile of the model), then optimize each
        graph they reached with the inputs it received (compiler/calibration.py)."""
        self.calibrating = []
        try:
            run_samples(compiled, samples, dims)
        finally:
            graphs, self.calibrating, self.calibrated = self.calibrating, None, True
        for graph in graphs:
            graph.finish()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **torch_compile_kwargs: Any) -> Callable:
        if torch_compile_kwargs:
            raise DynamoVisibleOptionError(
                f"torch.compile passed {sorted(torch_compile_kwargs)} to an mmaccel.Backend object; "
                "give options to mmaccel.Backend(...) or use backend='mmaccel' with options={...}")
        if self.options.weights == "release" and not self.model_guarded:
            raise DynamoVisibleOptionError(_RELEASE_NEEDS_THE_MODEL)
        record = GraphReport(index=len(self.report.graphs))
        reports = (self.report, *active_reports())
        start = time.perf_counter()
        try:  # on a Dynamo restart nothing is recorded
            compiled = self._compile(gm, example_inputs, record)
        except ReleasedWeightsError as e:
            raise DynamoVisibleReleasedWeightsError(str(e)) from None
        record.compile_seconds = time.perf_counter() - start
        for report in reports:
            report.graphs.append(record)
        return compiled

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any], record: GraphReport) -> Callable:
        dump = self.debug.for_graph(record.index)
        dump("dynamo", gm)
        record.dynamo_nodes = len(gm.graph.nodes)
        record.inputs = [_describe(x) for x in example_inputs]
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
            return _fallback(gm, example_inputs, record, "gradients are required (grad mode is on and an input or "
                             "parameter requires grad); mmaccel optimizes inference only: call the model under "
                             "torch.no_grad() or torch.inference_mode() to optimize it")

        if self.calibrated:
            record.calibration_note = ("no calibration sample reached this graph (compiled after calibration, for "
                                       "inputs the calibrated graphs do not take): measured on its example inputs")

        def inference_compiler(aten_gm: fx.GraphModule, fake_inputs: Sequence[Any]) -> Callable:
            with unset_fake_temporarily():  # freezing and folding compute on the real weights
                return self._optimize(aten_gm, fake_inputs, example_inputs, record, dump, module_owned_inputs(gm))

        try:
            return lower_with_aot(gm, example_inputs, inference_compiler, DECOMPOSITIONS)
        except (InvalidOptionError, LossyPassError, ReleasedWeightsError, *RESTART_EXCEPTIONS):
            raise
        except Exception as e:  # unsupported construct: run the captured graph as is, correctly
            return _fallback(gm, example_inputs, record, f"lowering failed with {type(e).__name__}: {_first_line(e)}")

    def _optimize(self, aten_gm: fx.GraphModule, fake_inputs: Sequence[Any], real_inputs: Sequence[Any],
                  record: GraphReport, dump: Callable, module_owned: list[bool] | None = None) -> Callable:
        dump("aten", aten_gm)
        record.aten_nodes = len(aten_gm.graph.nodes)
        unfrozen, _ = compile_for_target("eager", clone_module(aten_gm), real_inputs)
        fake_mode = detect_fake_mode(fake_inputs)
        weights = GraphWeights(fake_mode) if self.options.weights == "release" else None
        frozen = freeze_parameters(aten_gm, real_inputs, module_owned, weights)
        record.frozen, record.frozen_bytes, record.freeze_note = len(frozen.frozen), frozen.nbytes, frozen.note
        kept_inputs = [real_inputs[i] for i in frozen.kept]
        owners = [t for _, t, _, _ in frozen.frozen]

        def optimize(calibration: list[list[Any]] | None = None) -> FrozenGraph:
            # Lossy passes run the graph on these to measure it: concrete sizes, or the run would specialize them
            ctx = PassContext(options=self.options, fake_mode=fake_mode, dump=dump,
                              example_inputs=concrete_inputs(kept_inputs), calibration=calibration or None,
                              weight_owners=[t for t in owners if not is_released(t)], released=weights,
                              w8a8_weight_bits=w8a8_weight_bits(resolve_target(self.options.target, aten_gm,
                                                                               real_inputs)[0], real_inputs))
            record.passes = run_pipeline(aten_gm, ctx)
            if weights is not None:
                check_no_stand_ins(aten_gm)
                record.released_bytes = release_replaced(owners, aten_gm, weights)
            # parallel_linear_fusion may have rebound parameters as views of fused weights; release freed some
            frozen.refresh()
            record.graph_weight_bytes, record.own_weight_bytes = _weight_bytes(aten_gm, owners)
            # The report outlives the call that compiled: it keeps the inputs' layouts, not their values (it held the
            # first call's tensors, a whole KV cache in Hugging Face's recipe, for the life of the compiled model)
            ctx.example_inputs, ctx.calibration = _layouts_only(ctx.example_inputs), None
            record.final_graph, record.context, record.final_nodes = aten_gm, ctx, len(aten_gm.graph.nodes)
            target, record.target_reason = resolve_target(self.options.target, aten_gm, real_inputs)
            if target == "triton" and self.options.cuda_graphs is not False:
                _warn_if_symbolic_cache_writes(aten_gm, real_inputs)
            run, record.target = compile_for_target(target, clone_module(aten_gm), kept_inputs,
                                                    self.options.cuda_graphs, dump)
            record.kernels = getattr(run, "kernels", None)
            if record.target != target:
                record.target_reason += f"; {target} could not run it (see warning)"
            record.status = "optimized"
            graph = FrozenGraph(run, frozen, unfrozen, list(aten_gm.buffers()), record)
            self.frozen_graphs.append(weakref.ref(graph))
            return graph

        if self.calibrating is None:
            return optimize()
        graph = CalibratingGraph(optimize, unfrozen, frozen.kept)
        self.calibrating.append(graph)
        return graph


def _layouts_only(inputs: Sequence[Any] | None) -> list[Any] | None:
    """Meta tensors of the inputs' shapes, strides and dtypes (other values as they are)."""
    if inputs is None:
        return None
    return [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta") if isinstance(a, torch.Tensor)
            else a for a in inputs]


def _fallback(gm: fx.GraphModule, inputs: Sequence[Any], record: GraphReport, reason: str) -> Callable:
    refuse_released(inputs, f"a graph that must run unoptimized ({reason})")
    record.status, record.reason, record.target = "fallback", reason, "dynamo graph (unoptimized)"
    warn_once(f"mmaccel: running a graph unoptimized: {reason}")
    return gm.forward


def _weight_bytes(gm: fx.GraphModule, model_tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(bytes of the distinct storages behind gm's constants, those of them no model tensor shares)."""
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in gm.buffers()}
    shared = {t.untyped_storage().data_ptr() for t in model_tensors}
    return sum(held.values()), sum(n for ptr, n in held.items() if ptr not in shared)


def _warn_if_symbolic_cache_writes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """HF's compiled-generation recipe gives the static cache another length whenever the prompt length or
    max_new_tokens changes; from the second length on Dynamo makes the sizes symbolic, and a graph with
    symbolic sizes records no CUDA graph (8-13 ms per token for a 7B decoder on an H200, issue 13)."""
    symbolic = any(isinstance(x, torch.SymInt) for x in inputs)
    if symbolic and any(n.target is torch.ops.aten.copy_.default for n in gm.graph.nodes):
        warn_once("mmaccel: a graph writes its inputs in place (a KV cache) at symbolic sizes, so it runs "
                  "without CUDA graphs. With Hugging Face generate() this happens once the static cache length "
                  "changes between calls: mmaccel.generate(model, **inputs, max_new_tokens=...) pads lengths to a "
                  "few buckets and keeps every decode step static")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        dims = ", ".join(str(d) for d in x.shape)
        return f"{str(x.dtype).removeprefix('torch.')}[{dims}]"
    return f"{type(x).__name__}({x})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
