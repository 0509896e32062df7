"""Property-based tests: random small programs (tests/strategies.py) through mmaccel.

Properties, for every drawn program:
  (a) the default pipeline matches eager, with no fallback and no failed pass;
  (b) each pass alone (`passes=[name]`) matches eager;
  (c) every pass is idempotent: rerun on the final graph, it matches nothing and changes nothing;
  (d) the final graph lints and every node carries meta["val"] (constants: with their real shape/dtype).
Plus plain tests for bad inputs at call time (NaN/Inf, empty tensors, wrong dtype/rank) and a mutation
check proving the comparison catches a planted bug.

CI runs the bounded "ci" profile. For a long soak:

    HYPOTHESIS_PROFILE=soak ./scripts/test.sh tests/test_properties.py

A failing example prints its `Program(...)`; `strategies.program_source(program)` turns it into a repro.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import replace

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import mmaccel
import mmaccel.passes.attention as attention_pass
from mmaccel.passes.pipeline import PASS_NAMES, run_pass

from conftest import assert_matches_eager, compile_and_check
from strategies import Attention, Program, attention_programs, build, make_inputs, program_source, programs

settings.register_profile("ci", max_examples=15, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("soak", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Applied per test rather than with load_profile, so other test modules keep their own settings.
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FUSION_PASSES = ("attention_fusion", "parallel_linear_fusion", "linear_epilogue_fusion")
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _fresh() -> None:
    """Per example: the autouse fixture resets Dynamo per test, not per Hypothesis example, and one
    code object (ProgramModel.forward) may only recompile 8 times."""
    torch._dynamo.reset()


def _check_program(program: Program, **options):
    _fresh()
    try:
        note(program_source(program))  # printed with a falsifying example
    except InvalidArgument:  # called outside a Hypothesis test (the mutation checks)
        pass
    model, inputs = build(program), make_inputs(program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Dynamo's own chatter; failures are asserted on
        return compile_and_check(model, *inputs, **options)


def _assert_graph_invariants(report) -> None:
    for g in report.graphs:
        gm = g.final_graph
        assert gm is not None, f"graph {g.index}: no final graph recorded"
        gm.graph.lint()
        for node in gm.graph.nodes:
            if node.op == "output":
                continue
            assert "val" in node.meta, f"graph {g.index}: node {node.format_node()} has no meta['val']"
            if node.op == "get_attr":
                real, fake = _attr(gm, node.target), node.meta["val"]
                if isinstance(real, torch.Tensor):
                    assert tuple(real.shape) == tuple(fake.shape) and real.dtype == fake.dtype, \
                        f"constant {node.target}: real {real.shape}/{real.dtype}, meta {fake.shape}/{fake.dtype}"


def _assert_idempotent(report, names=PASS_NAMES) -> None:
    for g in report.graphs:
        gm, ctx = g.final_graph, g.context
        for name in names:
            before = gm.code
            result = run_pass(gm, ctx, name)
            assert result.error is None, f"graph {g.index}: rerunning {name} failed: {result.error}"
            assert result.matched == 0, \
                f"graph {g.index}: {name} matched {result.matched} again on its own output: {result.changes}"
            assert gm.code == before, f"graph {g.index}: rerunning {name} changed the graph"


def _attr(gm, target: str):
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


# ---------------------------------------------------------------- (a) + (c) + (d)


@PROFILE
@given(programs())
def test_default_pipeline_matches_eager_idempotent_and_valid(program: Program) -> None:
    _, report = _check_program(program)
    _assert_graph_invariants(report)
    _assert_idempotent(report)


# ---------------------------------------------------------------- (b)


@PROFILE
@given(programs(max_blocks=3))
def test_each_pass_alone_matches_eager(program: Program) -> None:
    for name in PASS_NAMES:
        _, report = _check_program(program, passes=[name])
        assert [p.name for g in report.graphs for p in g.passes] == [name] * len(report.graphs) * \
            (2 if name in ("dead_code_elimination", "common_subexpression_elimination", "constant_folding") else 1)
        _assert_graph_invariants(report)


# ---------------------------------------------------------------- attention forms are recognised


@PROFILE
@given(attention_programs())
def test_documented_attention_forms_become_sdpa(program: Program) -> None:
    """Every form in attention.py's docstring is rewritten exactly once, and still matches eager."""
    _, report = _check_program(program)
    (graph,) = report.graphs
    assert graph.pass_result("attention_fusion").matched == 1, graph.final_graph.code
    assert report.graphs[0].count(SDPA) == 1
    _assert_idempotent(report, FUSION_PASSES)


# ---------------------------------------------------------------- dynamic shapes


@PROFILE
@given(programs(max_blocks=3, dtypes=(torch.float32,), static_seq=False), st.integers(2, 7), st.integers(2, 3))
def test_dynamic_shapes_match_eager_at_a_second_size(program: Program, seq2: int, batch2: int) -> None:
    """dynamic=True: one compiled graph, symbolic sizes through every pass, then a call at another size."""
    program = _without_input_masks(replace(program, mask_input="none", batch=2, seq=max(2, program.seq)))
    compiled, report = _check_program(program, dynamic=True)
    _assert_graph_invariants(report)
    model = compiled._orig_mod
    inputs = make_inputs(replace(program, batch=batch2, seq=seq2, seed=program.seed + 7))
    with torch.no_grad():
        assert_matches_eager(compiled(*inputs), model(*inputs))
    assert all(g.status == "optimized" for g in report.graphs)


def _without_input_masks(program: Program) -> Program:
    blocks = []
    for b in program.blocks:
        if getattr(b, "mask", None) == "additive_input":
            b = replace(b, mask="none")
        blocks.append(b)
    return replace(program, blocks=tuple(blocks))


# ---------------------------------------------------------------- bad inputs at call time


class _AttnMLP(nn.Module):
    """A small block touching every fusion: parallel Q/K/V, explicit masked attention, fused epilogues."""

    def __init__(self, d: int = 8, h: int = 2, mask: str = "bool") -> None:
        super().__init__()
        self.h, self.hd, self.mask = h, d // h, mask
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.h, self.hd).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        if self.mask == "bool":
            scores = scores.masked_fill(causal, float("-inf"))
        elif self.mask == "additive":
            scores = scores + torch.zeros(s, s).masked_fill(causal, float("-inf"))
        a = scores.softmax(-1) @ v
        x = x + a.transpose(1, 2).reshape(b, s, d)
        return x + self.down(F.gelu(self.up(x)))


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return _AttnMLP(**kw).eval().requires_grad_(False)


def _outcome(fn, *inputs):
    try:
        with torch.no_grad():
            return "ok", fn(*inputs)
    except Exception as e:  # compared by type below
        return "raised", e


def _assert_same_outcome(compiled, model, *inputs) -> None:
    """Matches eager, or raises an exception of the type eager raises; never a silently different result."""
    expected_kind, expected = _outcome(model, *inputs)
    actual_kind, actual = _outcome(compiled, *inputs)
    if expected_kind == "ok":
        assert actual_kind == "ok", f"eager ran, compiled raised {type(actual).__name__}: {actual}"
        assert_matches_eager(actual, expected)
    else:
        assert actual_kind == "raised", f"eager raised {type(expected).__name__}: {expected}; compiled returned"
        assert isinstance(actual, type(expected)), \
            f"eager raised {type(expected).__name__}, compiled raised {type(actual).__name__}: {actual}"


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
def test_nan_and_inf_inputs_propagate_like_eager(mask: str, poison: str) -> None:
    model = _model(mask=mask)
    x = torch.randn(2, 5, 8)
    compiled, report = compile_and_check(model, x)
    assert report.graphs[0].pass_result("attention_fusion").matched == 1
    for where in [(0, 0, 0), (1, 4, 7), (0, 2, slice(None))]:  # first token, last token, a whole row
        bad = x.clone()
        bad[where] = float(poison)
        with torch.no_grad():
            expected, actual = model(bad), compiled(bad)
        assert torch.equal(torch.isnan(actual), torch.isnan(expected)), \
            f"NaNs at different places for {poison} at {where}"
        assert_matches_eager(actual, expected)


def test_nan_in_weights_free_fusions_propagate_like_eager() -> None:
    """NaN/Inf through fused linear epilogues and a residual (no attention)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)

        def forward(self, x):
            return F.silu(self.a(x)) * self.b(x) + torch.relu(self.a(x))

    torch.manual_seed(0)
    model = M().eval().requires_grad_(False)
    x = torch.randn(3, 4)
    compiled, _ = compile_and_check(model, x)
    bad = x.clone()
    bad[0, 0], bad[1, 2], bad[2] = float("nan"), float("inf"), float("-inf")
    _assert_same_outcome(compiled, model, bad)
    with torch.no_grad():
        assert torch.equal(torch.isnan(compiled(bad)), torch.isnan(model(bad)))


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8), (1, 1, 8)])
@pytest.mark.parametrize("mask", ["none", "bool"])
def test_empty_and_unit_dims_compile_like_eager(shape, mask: str) -> None:
    """Zero-size batch or sequence (and 1s): compiled from scratch at that shape."""
    model = _model(mask=mask)
    x = torch.randn(*shape)
    with torch.no_grad():
        model(x)  # eager must work for the case to be meaningful
    compile_and_check(model, x)


@pytest.mark.parametrize("dynamic", [None, True])
def test_empty_input_after_compiling_on_a_normal_one(dynamic) -> None:
    model = _model(mask="bool")
    compiled, _ = compile_and_check(model, torch.randn(2, 5, 8), dynamic=dynamic)
    for shape in [(0, 5, 8), (2, 0, 8), (0, 0, 8)]:
        _assert_same_outcome(compiled, model, torch.randn(*shape))


@pytest.mark.parametrize("bad", ["float64", "float16", "int64", "rank2", "rank4", "wrong_features"])
def test_wrong_dtype_or_rank_matches_eager_or_raises_like_eager(bad: str) -> None:
    model = _model(mask="bool")
    compiled, _ = compile_and_check(model, torch.randn(2, 5, 8))
    x = {
        "float64": torch.randn(2, 5, 8, dtype=torch.float64),
        "float16": torch.randn(2, 5, 8, dtype=torch.float16),
        "int64": torch.randint(0, 3, (2, 5, 8)),
        "rank2": torch.randn(5, 8),
        "rank4": torch.randn(1, 2, 5, 8),
        "wrong_features": torch.randn(2, 5, 7),
    }[bad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _assert_same_outcome(compiled, model, x)


def test_same_program_in_float64_after_float32_matches_eager() -> None:
    """A model converted to float64 after compiling: recompiles (new dtype guards) and still matches."""
    model = _model(mask="additive")
    compiled, _ = compile_and_check(model, torch.randn(2, 5, 8))
    model.double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _assert_same_outcome(compiled, model, x)


# ---------------------------------------------------------------- mutation check: the properties can fail


def _wrong_scale_rewrite(original):
    def rewrite(graph, att):
        att.scale *= 1.5  # a planted bug: the fused attention uses the wrong scale
        return original(graph, att)
    return rewrite


def test_mutation_check_wrong_attention_scale_is_caught(monkeypatch) -> None:
    program = Program(dtype=torch.float32, batch=2, seq=5, dim=8, input_kind="float", layout="contiguous",
                      blocks=(Attention(d=8, heads=2, head_dim=4, seq=5, qkv="separate", key="transpose",
                                        scale="div_scores", mask="bool_causal", softmax="plain", out_proj=True),),
                      mask_input="none", mask_shape="ss", return_intermediate=False, seed=0)
    _check_program(program)  # correct compiler: passes
    monkeypatch.setattr(attention_pass, "_rewrite", _wrong_scale_rewrite(attention_pass._rewrite))
    with pytest.raises(AssertionError, match="not close"):
        _check_program(program)


def test_mutation_check_is_found_by_the_hypothesis_property(monkeypatch) -> None:
    """The same planted bug, found by the random-program property itself (not by a hand-picked model)."""
    monkeypatch.setattr(attention_pass, "_rewrite", _wrong_scale_rewrite(attention_pass._rewrite))

    @settings(max_examples=30, deadline=None, database=None, derandomize=True, phases=["generate"],
              suppress_health_check=list(HealthCheck))
    @given(attention_programs(dtypes=(torch.float32,)))
    def prop(program):
        _check_program(program)

    with pytest.raises(AssertionError):
        prop()
