"""The pass pipeline: orders the passes, runs each under validation, records what each one did.

cleanup -> fusion -> cleanup [-> opt-in, lossy: quantize -> cleanup]
A pass that raises, or leaves a graph that fails lint / FakeTensor propagation / the output contract,
is rolled back: the graph runs without it and the user gets one warning naming the pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.fx as fx

from ..compiler.errors import warn_once
from ..compiler.options import CompileOptions
from ..compiler._torch_internals import FakeTensorMode
from .meta import output_signature, propagate_fake, signatures_match


@dataclass
class PassResult:
    """What one pass did to one graph. `matched`: pattern instances found and rewritten."""
    name: str = ""
    matched: int = 0
    changes: list[str] = field(default_factory=list)
    lossy: bool = False
    error: str | None = None
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    measured_error: float | None = None  # lossy passes: relative output error on the calibration inputs
    details: dict[str, Any] | None = None  # a pass's own table (quantize: each layer's precision and error)


@dataclass
class PassContext:
    """Everything a pass may read. Options travel here explicitly, never through global config."""
    options: CompileOptions
    fake_mode: FakeTensorMode
    dump: Callable[[str, fx.GraphModule], None] = lambda stage, gm: None
    # Real inputs of the graph (after freezing; a dynamic size as the int it has in the call being compiled),
    # on which lossy passes measure the error they introduce.
    example_inputs: Sequence[Any] | None = None
    # Calibration: several sets of the graph's inputs (same layout as example_inputs); lossy passes measure
    # on these instead when given.
    calibration: Sequence[Sequence[Any]] | None = None


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[fx.GraphModule, PassContext], PassResult]
    lossy: bool = False


class PassValidationError(RuntimeError):
    pass


def _registry() -> tuple[list[Pass], list[Pass]]:
    from .attention import fuse_attention
    from .cleanup import eliminate_common_subexpressions, eliminate_dead_code, fold_constants
    from .fusion import fuse_linear_epilogues, fuse_parallel_linears

    cleanup = [Pass("dead_code_elimination", eliminate_dead_code),
               Pass("common_subexpression_elimination", eliminate_common_subexpressions),
               Pass("constant_folding", fold_constants)]
    fusion = [Pass("attention_fusion", fuse_attention),
              Pass("parallel_linear_fusion", fuse_parallel_linears),
              Pass("linear_epilogue_fusion", fuse_linear_epilogues)]
    return cleanup, fusion


def default_pipeline() -> list[Pass]:
    cleanup, fusion = _registry()
    return [*cleanup, *fusion, *cleanup]


def pipeline_for(options: CompileOptions) -> list[Pass]:
    """The lossless pipeline, then the lossy passes the options ask for (on folded weights) and cleanup again."""
    from .quantize import quantize_linears

    lossy = [Pass("quantize", quantize_linears, lossy=True)] if options.quantize else []
    cleanup, _ = _registry()
    return [*default_pipeline(), *lossy, *(cleanup if lossy else [])]


PASS_NAMES: tuple[str, ...] = tuple(dict.fromkeys(p.name for p in default_pipeline()))


def run_pipeline(gm: fx.GraphModule, ctx: PassContext) -> list[PassResult]:
    results = []
    for p in pipeline_for(ctx.options):
        if p.lossy or ctx.options.pass_enabled(p.name):
            results.append(run_pass(gm, ctx, p))
    return results


def run_pass(gm: fx.GraphModule, ctx: PassContext, p: Pass | str) -> PassResult:
    """Run one pass with validation and rollback; used by the pipeline and by tests."""
    if isinstance(p, str):
        p = next(q for q in default_pipeline() if q.name == p)
    contract = output_signature(gm)
    saved = _copy_graph(gm)
    before = len(gm.graph.nodes)
    start = time.perf_counter()
    try:
        result = p.run(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        propagate_fake(gm, ctx.fake_mode)
        if not signatures_match(contract, output_signature(gm)):
            raise PassValidationError(f"outputs changed from {contract} to {output_signature(gm)}")
    except Exception as e:  # a broken pass must never break (or silently change) the user's model
        gm.graph = saved
        gm.recompile()
        result = PassResult(error=f"{type(e).__name__}: {e}")
        warn_once(f"mmaccel: pass '{p.name}' failed and was skipped; the graph runs without it. "
                  f"Reason: {result.error}")
    result.name, result.lossy = p.name, p.lossy
    result.seconds = time.perf_counter() - start
    result.nodes_before, result.nodes_after = before, len(gm.graph.nodes)
    ctx.dump(f"after_{p.name}", gm)
    return result


def clone_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph, sharing gm's constants: a target rewrites its own copy."""
    return fx.GraphModule(gm, _copy_graph(gm))


def _copy_graph(gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph(owning_module=gm)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph
