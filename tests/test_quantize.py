"""Quantization (lossy, opt-in): int8 weight-only linears. The error the pass reports is the error the user
gets on every target; over the budget nothing is quantized; the ONNX file holds int8 weights in standard
QDQ form; the Triton GEMV fuses the dequantization. The default pipeline never quantizes."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import mmaccel
from mmaccel.models import build
from mmaccel.ops.int8_linear import int8_linear_reference, quantize_per_channel

from conftest import assert_matches_eager

TARGETS = ["eager", "onnxruntime", "triton"]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["vlm_decode", "vit"])
def test_reported_error_is_the_error_the_user_gets(name, target):
    torch.manual_seed(0)
    model, inputs = build(name, size="tiny", batch=1, seq=8)
    with torch.no_grad():
        expected = model(*inputs)
        compiled = mmaccel.compile(model, target=target, quantize="int8_weight_only", accuracy_budget=0.02)
        actual = compiled(*inputs)
    graph = compiled.mmaccel_report.graphs[-1]
    assert graph.target == target
    result = graph.pass_result("quantize")
    assert result.lossy and result.matched >= 8 and "int8 weight-only" in result.changes[0]
    error = _relative_error(actual, expected)
    assert 0 < error <= 0.02
    assert result.measured_error == pytest.approx(error, rel=0.05)


def test_over_budget_keeps_the_graph_unquantized_with_one_warning():
    torch.manual_seed(0)
    model, inputs = build("vlm_decode", size="tiny", batch=1, seq=8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = model(*inputs)
        compiled = mmaccel.compile(model, target="eager", quantize="int8_weight_only", accuracy_budget=1e-6)
        actual = compiled(*inputs)
    assert_matches_eager(actual, expected)  # lossless: the quantized graph was rolled back
    result = compiled.mmaccel_report.graphs[-1].pass_result("quantize")
    assert result.matched == 0 and result.changes[0].startswith("rolled back, over budget")
    assert result.measured_error > 1e-6
    assert sum("quantization not applied" in str(w.message) for w in caught) == 1


def test_default_never_quantizes():
    model, inputs = build("vit", size="tiny", batch=1)
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager")
        compiled(*inputs)
    assert all(p.name != "quantize" and not p.lossy for p in compiled.mmaccel_report.graphs[-1].passes)


@pytest.mark.parametrize("options,match", [
    ({"quantize": "int4_weight_only"}, "not available yet"),
    ({"quantize": "int7"}, "not valid"),
    ({"quantize": "int8_weight_only", "accuracy_budget": 0}, "accuracy_budget"),
    ({"quantize": "int8_weight_only", "accuracy_budget": "1%"}, "accuracy_budget"),
])
def test_bad_quantize_options_name_the_problem(options, match):
    with pytest.raises(ValueError, match=match):
        mmaccel.compile(torch.nn.Linear(2, 2), **options)


def test_onnx_export_writes_int8_weights_that_plain_onnxruntime_runs(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, inputs = build("vit", size="tiny", batch=2)
    full, quantized = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    mmaccel.export_onnx(model, inputs, full)
    report = mmaccel.export_onnx(model, inputs, quantized, quantize="int8_weight_only")
    measured = report.graphs[0].pass_result("quantize").measured_error
    weights = [i for i in onnx.load(str(quantized)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(weights) == report.graphs[0].pass_result("quantize").matched
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(quantized)).graph.node)
    int8_bytes = sum(np.prod(w.dims) for w in weights)
    assert int8_bytes > 0 and quantized.stat().st_size < full.stat().st_size - 2 * int8_bytes
    session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})
    with torch.no_grad():
        expected = model(*inputs)
    assert _relative_error(torch.from_numpy(out), expected) == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(1, 1), (17, 33), (130, 1000)])
def test_triton_int8_gemv_fuses_the_dequantization(n, k, bias):
    pytest.importorskip("triton")
    from mmaccel.backends.triton import gemv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x, w = torch.randn(1, k, device=device), torch.randn(n, k, device=device)
    b = torch.randn(n, device=device) if bias else None
    q, scale = quantize_per_channel(w)
    assert gemv.supports(x, q) and not gemv.supports(torch.randn(2, k, device=device), q)
    torch.testing.assert_close(gemv.gemv(x, q, b, scale=scale), int8_linear_reference(x, q, scale, b, "none", None),
                               rtol=1e-4, atol=1e-4)
