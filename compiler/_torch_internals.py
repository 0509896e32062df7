"""Every private torch API mmaccel touches lives here, so a torch upgrade changes one file.

Checked against torch 2.11-2.14.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch._dynamo.exc import ShortenTraceback
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch._aot_autograd.schemas import MutationType
from torch._guards import TracingContext, detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake, unset_fake_temporarily
from torch.multiprocessing.reductions import StorageWeakRef
from torch.fx.experimental.symbolic_shapes import statically_known_true

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _hint_without_guard
except ImportError:  # torch before optimization_hint: its predecessor
    from torch.fx.experimental.symbolic_shapes import hint_int as _hint_without_guard

from .errors import InvalidOptionError, ReleasedWeightsError

__all__ = [
    "FakeTensorMode", "unset_fake_temporarily", "outside_dynamo_compile", "detect_fake_mode", "statically_known_true", "lower_with_aot",
    "frozen_candidate_mask", "graph_break_count", "DynamoVisibleOptionError", "is_static_tensor", "concrete_inputs",
    "module_owned_inputs", "recompile_limit_at_least", "is_fake", "StorageWeakRef", "DynamoVisibleReleasedWeightsError",
    "storage_id", "recording_cuda_allocations", "onnx_arithmetic_kept",
]


class DynamoVisibleOptionError(InvalidOptionError, ShortenTraceback):
    """An InvalidOptionError that Dynamo re-raises as is instead of wrapping it in BackendCompilerFailed,
    so `torch.compile(..., options={bad})` raises a ValueError at the first call like mmaccel.compile does."""

    def __init__(self, message: str) -> None:
        ShortenTraceback.__init__(self, message, first_useful_frame=None)


class DynamoVisibleReleasedWeightsError(ReleasedWeightsError, ShortenTraceback):
    """A ReleasedWeightsError that Dynamo re-raises as is (not wrapped in BackendCompilerFailed)."""

    def __init__(self, message: str) -> None:
        ShortenTraceback.__init__(self, message, first_useful_frame=None)


def storage_id(t: torch.Tensor) -> int:
    """The identity of t's storage (its StorageImpl), the same for every view of it, also for a FakeTensor's
    storage and for a storage resized to 0 bytes (data_ptr is neither)."""
    return t.untyped_storage()._cdata


def tensors_sharing_storage(t: torch.Tensor) -> int:
    """How many tensors (views and aliases included) hold `t`'s storage, `t` among them: 1 when nothing else
    can see what is written there. torch counts the storage's owners; the Python storage object made to ask
    is one of them and is left out."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1


def marked_static_address(t: torch.Tensor) -> bool:
    """Whether `torch._dynamo.mark_static_address` marked `t`: a tensor whose address its owner keeps for the
    life of what it holds (transformers' static cache tensors)."""
    return getattr(t, "_dynamo_static_input_type", None) is not None


def lower_with_aot(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                   inference_compiler: Callable, decompositions: dict) -> Callable:
    """aot_autograd: Dynamo graph -> functionalized ATen inference graph handed to `inference_compiler`.
    Input mutations (a KV cache written in place) stay in the graph as trailing `aten.copy_`."""

    def training_compiler(*_: Any) -> Callable:
        raise RuntimeError("mmaccel lowers inference graphs only; a training graph reached it")

    return aot_module_simplified(
        gm, list(example_inputs), fw_compiler=training_compiler, inference_compiler=inference_compiler,
        decompositions=decompositions, keep_inference_input_mutations=True)


def frozen_candidate_mask(num_inputs: int) -> list[bool] | None:
    """For the ATen graph being compiled: which inputs may become constants (not mutated by the graph,
    not the base of an aliased output). None when aot_autograd's metadata is unavailable or does not
    line up one to one with the graph's inputs (then nothing is frozen)."""
    ctx = TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
    if meta is None or len(meta.input_info) != num_inputs or getattr(ctx, "params_flat", None):
        return None
    aliased = {o.base_idx for o in meta.output_info if getattr(o, "base_idx", None) is not None}
    return [info.mutation_type == MutationType.NOT_MUTATED and not info.mutates_metadata and i not in aliased
            for i, info in enumerate(meta.input_info)]


def is_static_tensor(t: Any) -> bool:
    """Parameters and module buffers: Dynamo marks them as static inputs."""
    if not isinstance(t, torch.Tensor):
        return False
    if isinstance(t, torch.nn.Parameter):
        return True
    return torch._dynamo.utils.get_static_address_type(t) is not None


def module_owned_inputs(gm: torch.fx.GraphModule) -> list[bool] | None:
    """For each input of Dynamo's graph `gm`: is it a module's parameter or registered buffer (by the source
    Dynamo read it from)? A tensor marked static by its owner but not a module's, such as the KV cache
    transformers' StaticCache marks with mark_static_address, is state that changes between calls: never a
    weight to freeze. None when Dynamo recorded no sources."""
    owned = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is None:
            return None
        owned.append("._parameters[" in source.name or "._buffers[" in source.name)
    return owned


def concrete_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """Dynamo's example inputs with each SymInt (a dynamic size, e.g. the text length of a decoder graph)
    replaced by the int it had in the call being compiled, read without adding a guard. Running a graph
    on the SymInt itself (a real-tensor op evaluates it) would guard it to that int: the compiled graph
    becomes static, and the next length recompiles."""
    return [_hint_without_guard(a) if isinstance(a, torch.SymInt) else a for a in example_inputs]


def graph_break_count() -> dict[str, int]:
    """Dynamo's global graph-break counter (reason -> count), read before and after a run."""
    return dict(torch._dynamo.utils.counters["graph_break"])


def _restart_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions Dynamo raises through a backend to restart its analysis: never swallow these."""
    from torch._dynamo import exc
    names = ("TensorifyScalarRestartAnalysis", "RestartAnalysis")
    return tuple(getattr(exc, n) for n in names if hasattr(exc, n))


RESTART_EXCEPTIONS = _restart_exceptions()


@contextlib.contextmanager
def outside_dynamo_compile() -> Iterator[None]:
    """Run a nested torch.export (ONNX conversion) from inside a backend as if no Dynamo compile were
    under way: otherwise it picks up Dynamo's tracing context and emits guards over Dynamo's frame locals."""
    from torch._guards import CompileContext, compile_context, tracing

    with tracing(None), compile_context(CompileContext(None)), unset_fake_temporarily():
        yield


def register_backend_name(name: str, compiler_fn: Any) -> None:
    """Make backend=`name` work in a source checkout too, where no entry point is installed. Where one is,
    torch registers it when it loads it (registering here first would make that a duplicate)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if name not in _COMPILER_FNS and not entry_points(group="torch_dynamo_backends", name=name):
        register_backend(compiler_fn, name=name)


@contextlib.contextmanager
def recompile_limit_at_least(limit: int) -> Iterator[None]:
    """Let each compiled function hold up to `limit` graphs while inside (Dynamo's default, 8, would run a
    ninth shape uncompiled). For callers whose shapes come from a bounded set, such as generation buckets."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    with dynamo_config.patch({name: max(limit, getattr(dynamo_config, name))}):
        yield


def guards_checked_once() -> contextlib.AbstractContextManager:
    """Inside, Dynamo runs only the guards that tell its cached graphs apart (shapes, dtypes), not the full
    set: for calls repeating one already checked with the same objects, such as the decode steps of one
    generate call. (Full guards on a transformers model read ~15 config attributes through its Python
    __getattribute__ per call: half a tiny model's step on CPU.) A no-op on torch without the option."""
    try:
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    except TypeError:
        return contextlib.nullcontext()


@contextlib.contextmanager
def recording_cuda_allocations(max_entries: int = 2_000_000) -> Iterator["CudaAllocations"]:
    """Record where each CUDA allocation came from (torch.cuda.memory's allocation history, private); yields a
    CudaAllocations whose methods list blocks [{"size", "frames": [{"filename", "line", "name"}, ...]}]."""
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    # A recording started after an earlier one in the process continues its trace: count from here only (an
    # 8-layer LLaVA run listed the previous variant's allocations at the second variant's peak)
    start = len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
    try:
        yield CudaAllocations(start)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


class CudaAllocations:
    """The recorded allocations of the current device, read from torch.cuda.memory._snapshot(), from trace
    entry `start` on."""

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def live(self) -> list[dict[str, Any]]:
        """The blocks allocated now."""
        return [block for segment in torch.cuda.memory._snapshot()["segments"] for block in segment["blocks"]
                if block["state"] == "active_allocated"]

    def at_peak(self) -> list[dict[str, Any]]:
        """The blocks allocated at the moment the recorded allocations summed highest (allocated before the
        recording began: not counted, not listed), as the trace's alloc / free_completed events replay them
        (torch/cuda/_memory_viz.py reads the trace the same way)."""
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()][self.start:]
        total, peak, peak_at = 0, 0, -1
        for i, event in enumerate(trace):
            total += event["size"] if event["action"] == "alloc" else \
                -event["size"] if event["action"] == "free_completed" else 0
            if total > peak:
                peak, peak_at = total, i
        live: dict[int, dict[str, Any]] = {}
        for event in trace[:peak_at + 1]:
            if event["action"] == "alloc":
                live[event["addr"]] = event
            elif event["action"] == "free_completed":
                live.pop(event["addr"], None)
        return list(live.values())


@contextlib.contextmanager
def onnx_arithmetic_kept() -> Iterator[None]:
    """Inside, torch.onnx.export(optimize=True) keeps every Add, Sub, Mul and Div of a constant. onnxscript's
    optimizer (0.7) removes x + c and x - c as no-ops when math.isclose(c, 0, rel_tol=1e-5, abs_tol=1e-8) holds,
    and x * c, x / c when c is within 1e-5 of 1: Helium's RMSNorm epsilon (1e-8) was dropped, so a pad token's
    all-zero embedding became 0 * rsqrt(0) = NaN, which attention's 0 * NaN carried into every position of its
    row (the onnxruntime target gave NaN logits for a left-padded prompt, silently). Its no-op rules are taken out
    of the default rule set (onnxscript.rewriter._DEFAULT_REWRITE_RULES, private) for the duration, the dropout
    ones kept; elsewhere (another onnxscript) nothing changes."""
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _no_op
        defaults = rewriter._DEFAULT_REWRITE_RULES
        arithmetic = {id(r) for r in _no_op.rules.rules} - {id(_no_op.dropout_zero_rule),
                                                             id(_no_op.dropout_inference_rule)}
    except (ImportError, AttributeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in defaults if id(r) not in arithmetic)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = defaults
