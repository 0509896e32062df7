"""The pass pipeline: the ordered list of passes, each run under validation, each result recorded.

A pass that raises, or leaves a graph that fails lint / FakeTensor propagation / the output contract, is rolled
back: the graph runs without it and the user gets one warning naming the pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx

from ..compiler.errors import LossyPassError, ReleasedWeightsError, warn_once
from ..compiler._torch_internals import storage_id
from .attention import fuse_attention
from .cleanup import eliminate_common_subexpressions, eliminate_dead_code, fold_constants
from .contract import Pass, PassContext, PassOptions, PassResult, PassValidationError
from .fusion import fuse_linear_epilogues, fuse_parallel_linears
from .graph import clone_module, copy_graph
from .lossy import Lever, apply_levers
from .meta import output_signature, propagate_fake, signatures_match
from .prune import MlpChannelLever
from .prune_blocks import BlockLever
from .prune_heads import HeadLever
from .quantize import QuantizeLever
from .tokens import MergeLever

CLEANUP = (Pass("dead_code_elimination", eliminate_dead_code),
           Pass("common_subexpression_elimination", eliminate_common_subexpressions),
           # after CSE: two identical nodes on a weight (`t(w)` twice) are one by then, so it is folded into one
           # constant, not two copies of it
           Pass("constant_folding", fold_constants))

# The order, and why each step stands where it does.
LOSSLESS = (
    # 1. cleanup first: the linear fusions recognise a linear as mm/addmm on a *constant* transposed weight,
    #    which exists only once constant_folding has folded `t(weight)` of the frozen weights.
    *CLEANUP,
    # 2. attention matches bmm/softmax chains; it neither needs the linear fusions nor is seen by them
    #    (they rewrite mm/addmm only), so its place among them is free.
    Pass("attention_fusion", fuse_attention),
    # 3. parallel linears before epilogues: merging needs plain mm/addmm nodes; an epilogue-fused linear is an
    #    mmaccel::fused_linear op that the merge does not look into.
    Pass("parallel_linear_fusion", fuse_parallel_linears),
    Pass("linear_epilogue_fusion", fuse_linear_epilogues),
    # 4. cleanup again: the fusions leave dead nodes and constants (the unconcatenated weights) behind.
    *CLEANUP,
)


@dataclass(frozen=True)
class LeverEntry:
    name: str
    asked_for: Callable[[PassOptions], bool]
    make: Callable[[PassOptions], list[Lever]]


# Lossy levers, opt-in through options; a new lever is one entry. Those the options ask for run as ONE pass
# (passes/lossy.py: one accuracy_budget, one solver across them, one report), after the lossless pipeline:
# they measure the graph that will run (fused, folded), and quantize finds its linears as the
# mmaccel::fused_linear ops of step 3 (prune its MLPs in the fused form: gate/up one matmul + split).
# Prune before quantize: the mechanism rewrites in this order, so quantize reads (and quantizes) the smaller
# weights prune made, and the structure is decided before the precision of what remains.
# Tokens first: fewer tokens change no weight, and prune's calibration statistics are then gathered on the
# graph as the user gave it (a merged stream's averaged tokens would be another distribution).
# Within prune, structures rewrite in this order: MLP channels, heads, then blocks (a dropped block's MLP and
# attention are still in the graph, unread, when the others rewrite them, and cleanup removes them after).
PRUNE_LEVERS: dict[str, Callable[..., Lever]] = {"mlp_channels": MlpChannelLever, "heads": HeadLever,
                                                 "blocks": BlockLever}
LOSSY = (LeverEntry("tokens", lambda o: o.tokens is not None, lambda o: [MergeLever(o.tokens)]),
         LeverEntry("prune", lambda o: o.prune is not None,
                    lambda o: [make(*[o.prune_fractions[name]] if name in o.prune_fractions else [])
                               for name, make in PRUNE_LEVERS.items() if name in o.prune]),
         LeverEntry("quantize", lambda o: o.quantize is not None, lambda o: [QuantizeLever(o.quantize)]))

PASS_NAMES: tuple[str, ...] = tuple(dict.fromkeys(p.name for p in LOSSLESS))


def asks_for_lossy(options: PassOptions) -> bool:
    """Whether the options ask for any lossy lever (the one place that knows which options are lossy)."""
    return any(entry.asked_for(options) for entry in LOSSY)


def pipeline_for(options: PassOptions) -> list[Pass]:
    """The lossless pipeline, then the lossy levers the options ask for as one pass, and cleanup after it (the
    levers leave replaced weights unused)."""
    levers = [entry for entry in LOSSY if entry.asked_for(options)]
    if not levers:
        return list(LOSSLESS)

    def run_levers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return apply_levers(gm, ctx, [lever for entry in levers for lever in entry.make(ctx.options)],
                            cleanup=[p.run for p in CLEANUP], metric=ctx.options.metric)

    return [*LOSSLESS, Pass("+".join(entry.name for entry in levers), run_levers, lossy=True), *CLEANUP]


def run_pipeline(gm: fx.GraphModule, ctx: PassContext) -> list[PassResult]:
    passes = pipeline_for(ctx.options)
    if any(p.lossy for p in passes):
        # the lossless passes change float16 rounding (attention fusion, folded scales: up to 5e-4 relative on
        # random float16 programs); lossy error is what the user gets against their model, so it is measured
        # against the graph before any pass
        ctx.reference = clone_module(gm)
        _read_owners_themselves(ctx.reference, ctx.weight_owners)
    results = []
    for p in passes:
        if p.lossy or ctx.options.pass_enabled(p.name):
            results.append(run_pass(gm, ctx, p))
    ctx.reference = None  # it holds the weights as they were before fusion: free them with the compile
    return results


def _read_owners_themselves(reference: fx.GraphModule, owners: Sequence[torch.Tensor]) -> None:
    """Make the reference read the user's parameters themselves where its constants are their detached aliases:
    parallel_linear_fusion rebinds each parameter's .data to a view of one concatenated buffer (same values), and
    an alias would keep the old storage alive through the passes, a second copy of the weights at the
    compile-time peak (issue 21)."""
    by_layout = {(storage_id(t), t.storage_offset(), t.shape, t.stride()): t for t in owners}
    for name, t in list(reference.named_buffers()):
        owner = by_layout.get((storage_id(t), t.storage_offset(), t.shape, t.stride()))
        if owner is not None:
            reference.register_buffer(name, owner, persistent=False)


def run_pass(gm: fx.GraphModule, ctx: PassContext, p: Pass | str) -> PassResult:
    """Run one pass with validation and rollback; used by the pipeline and by tests."""
    if isinstance(p, str):
        p = next(q for q in pipeline_for(ctx.options) if q.name == p)
    contract = output_signature(gm)
    saved = copy_graph(gm)
    before = len(gm.graph.nodes)
    start = time.perf_counter()
    try:
        result = p.run(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        propagate_fake(gm, ctx.fake_mode)
        if not signatures_match(contract, output_signature(gm)):
            raise PassValidationError(f"outputs changed from {contract} to {output_signature(gm)}")
    except ReleasedWeightsError:  # the weights are gone: no fallback can run this graph
        raise
    except Exception as e:  # a broken pass must never break (or silently change) the user's model
        gm.graph = saved
        gm.recompile()
        if p.lossy and not ctx.options.lossy_fallback:  # the user asked for it: no quiet lossless result
            raise LossyPassError(f"mmaccel: lossy pass '{p.name}' could not run: {type(e).__name__}: {e}. "
                                 "Fix the cause, or pass lossy_fallback=True to continue without it (with a "
                                 "warning).") from e
        result = PassResult(error=f"{type(e).__name__}: {e}")
        warn_once(f"mmaccel: pass '{p.name}' failed and was skipped; the graph runs without it. "
                  f"Reason: {result.error}")
    result.name, result.lossy = p.name, p.lossy
    result.seconds = time.perf_counter() - start
    result.nodes_before, result.nodes_after = before, len(gm.graph.nodes)
    ctx.dump(f"after_{p.name}", gm)
    return result
