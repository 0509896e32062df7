"""Shared test helpers. The backbone: compiled output must match eager, with dtype-aware tolerances."""
from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch

# Without a GPU, the Triton target's generated kernels run on CPU tensors under Triton's interpreter. The
# switch is read when kernels are defined, so it is set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch._dynamo

import mmaccel

# (rtol, atol) by dtype: fp32 allows for reassociation in fused matmuls/attention; half types for rounding.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-7, 1e-9),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 2e-2),
}


def assert_matches_eager(actual: Any, expected: Any, scale_atol: float = 1.0,
                         compute_dtype: torch.dtype | None = None) -> None:
    """Recursively compare outputs (tensors, tuples, lists, dicts, HF ModelOutputs). `compute_dtype`: the
    precision the model computed in, when it returns a wider dtype (fp32 logits from a bf16 model)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"expected a tensor, got {type(actual)}"
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
            f"{actual.shape}/{actual.dtype} vs {expected.shape}/{expected.dtype}"
        if expected.is_floating_point():
            rtol, atol = TOLERANCES[compute_dtype or expected.dtype]
            # Tolerances relative to the output's magnitude, so large logits are not held to atol alone.
            atol = atol * scale_atol * max(1.0, float(expected.detach().abs().max()) if expected.numel() else 1.0)
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
        else:
            torch.testing.assert_close(actual, expected)
    elif isinstance(expected, dict) or hasattr(expected, "to_tuple"):
        expected_items = dict(expected.items())
        actual_items = dict(actual.items())
        assert expected_items.keys() == actual_items.keys()
        for k in expected_items:
            assert_matches_eager(actual_items[k], expected_items[k], scale_atol, compute_dtype)
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_matches_eager(a, e, scale_atol, compute_dtype)
    else:
        assert actual == expected


ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def pooled_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """||actual - expected|| / ||expected|| with the norms pooled over samples (as lossy passes measure)."""
    diff = sum(float((a.double() - e.double()).pow(2).sum()) for a, e in zip(actual, expected))
    return (diff / sum(float(e.double().pow(2).sum()) for e in expected)) ** 0.5


def linear_epilogue_of(y: torch.Tensor, bias: torch.Tensor, activation: str, residual: torch.Tensor) -> torch.Tensor:
    """activation(y + bias) + residual, written out independently of ops.fused_linear (for op tests)."""
    import torch.nn.functional as F

    act = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
           "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation]
    return act(y + bias) + residual


def compile_and_check(model: Callable, *inputs: Any, dynamic: bool | None = None, **options: Any):
    """Compile with mmaccel, run once, assert it matches eager; returns (compiled, report)."""
    with torch.no_grad():
        expected = model(*inputs)
        compiled = mmaccel.compile(model, dynamic=dynamic, **options)
        actual = compiled(*inputs)
    assert_matches_eager(actual, expected)
    report = compiled.mmaccel_report
    assert_optimized(report)
    return compiled, report


def assert_optimized(report: mmaccel.CompileReport) -> None:
    """Every graph went through the pipeline (no fallback) and no pass failed."""
    assert report.graphs, "nothing was compiled"
    for g in report.graphs:
        assert g.status == "optimized", f"graph {g.index} fell back: {g.reason}"
        failed = [(p.name, p.error) for p in g.passes if p.error]
        assert not failed, f"graph {g.index}: passes failed: {failed}"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches, so compile counts and recompiles are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    """Tests marked `coverage`, the opt-in long set (every architecture on every target, tests/test_hf_coverage.py,
    and checks past the CI budget), run only when asked for with `-m coverage`; the default run keeps to the
    suite's time budget (20 minutes on CI's 2 cores)."""
    if "coverage" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="part of the full coverage set: run it with -m coverage")
    for item in items:
        if item.get_closest_marker("coverage") is not None:
            item.add_marker(skip)
