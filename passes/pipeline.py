"""The pass pipeline: the ordered list of passes, each run under validation, each result recorded.

A pass that raises, or leaves a graph that fails lint / FakeTensor propagation / the output contract, is rolled
back: the graph runs without it and the user gets one warning naming the pass.
"""
from __future__ import annotations

import time

import torch.fx as fx

from ..compiler.errors import warn_once
from .attention import fuse_attention
from .cleanup import eliminate_common_subexpressions, eliminate_dead_code, fold_constants
from .contract import Pass, PassContext, PassResult, PassValidationError
from .fusion import fuse_linear_epilogues, fuse_parallel_linears
from .graph import copy_graph
from .meta import output_signature, propagate_fake, signatures_match
from .quantize import quantize_linears

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

# Lossy levers, opt-in through options. They run after the lossless pipeline: they measure the graph that
# will run (fused, folded), and quantize finds its linears as the mmaccel::fused_linear ops of step 3.
LOSSY = (Pass("quantize", quantize_linears, lossy=True),)

PASS_NAMES: tuple[str, ...] = tuple(dict.fromkeys(p.name for p in LOSSLESS))


def pipeline_for(options) -> list[Pass]:
    """The lossless pipeline, then the lossy levers the options ask for and cleanup after them (they leave the
    replaced full-precision weights unused)."""
    lossy = [p for p in LOSSY if _asked_for(p, options)]
    return [*LOSSLESS, *lossy, *(CLEANUP if lossy else ())]


def _asked_for(p: Pass, options) -> bool:
    return {"quantize": options.quantize is not None}[p.name]


def run_pipeline(gm: fx.GraphModule, ctx: PassContext) -> list[PassResult]:
    results = []
    for p in pipeline_for(ctx.options):
        if p.lossy or ctx.options.pass_enabled(p.name):
            results.append(run_pass(gm, ctx, p))
    return results


def run_pass(gm: fx.GraphModule, ctx: PassContext, p: Pass | str) -> PassResult:
    """Run one pass with validation and rollback; used by the pipeline and by tests."""
    if isinstance(p, str):
        p = next(q for q in (*LOSSLESS, *LOSSY) if q.name == p)
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
