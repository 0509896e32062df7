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

from conftest import assert_matches_eager, relative_error

TARGETS = ["eager", "onnxruntime", "triton"]


def _build_for(target: str, name: str, **kwargs):
    """The tiny reference model and inputs, on the GPU for the Triton target when there is one (on CPU tensors
    the Triton target needs the interpreter, which the test session turns on only without a GPU)."""
    model, inputs = build(name, size="tiny", **kwargs)
    if target == "triton" and torch.cuda.is_available():
        model, inputs = model.cuda(), tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs)
    return model, inputs


# the decode step on the Triton target in the opt-in long set (-m coverage, 11 s under the interpreter; CI time)
@pytest.mark.parametrize("name,target", [
    pytest.param(name, target, marks=pytest.mark.coverage) if (name, target) == ("vlm_decode", "triton")
    else (name, target) for name in ["vlm_decode", "vit"] for target in TARGETS])
def test_reported_error_is_the_error_the_user_gets(name, target):
    torch.manual_seed(0)
    model, inputs = _build_for(target, name, batch=1, seq=8)
    with torch.no_grad():
        expected = model(*inputs)
        compiled = mmaccel.compile(model, target=target, quantize="int8_weight_only", accuracy_budget=0.02)
        actual = compiled(*inputs)
    graph = compiled.mmaccel_report.graphs[-1]
    assert graph.target == target
    result = graph.pass_result("quantize")
    assert result.lossy and result.matched >= 8 and "int8_weight_only: " in result.changes[0]
    error = relative_error(actual, expected)
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
    ({"calibration": [torch.randn(2)]}, "only matters to lossy passes"),
    ({"quantize": "auto", "calibration": torch.randn(2, 2)}, "iterable of samples"),
    ({"quantize": "auto", "calibration": []}, "is empty"),
    ({"quantize": "auto", "calibration": [("text",)]}, "holds no tensor"),
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
    assert relative_error(torch.from_numpy(out), expected) == pytest.approx(measured, rel=0.05)


# In the opt-in long set (-m coverage; CI time): int4 on ONNX Runtime (17 s; its MatMulNBits export is checked by
# tests/test_onnx_generation.py by default), W8A8 and auto on the Triton target (8 and 7 s under the interpreter;
# int4 and fp8 run there by default)
LONG_MIXES = {("int4_weight_only", "onnxruntime"), ("w8a8_dynamic", "triton"), ("auto", "triton")}


@pytest.mark.parametrize("scheme,budget,target", [
    pytest.param(scheme, budget, target, marks=pytest.mark.coverage)
    if (scheme, target) in LONG_MIXES else (scheme, budget, target)
    for scheme, budget in [("int4_weight_only", 0.05), ("auto", 0.01), ("w8a8_dynamic", 0.004), ("fp8", 0.02)]
    for target in TARGETS])
def test_mixed_precision_keeps_the_promised_error_on_every_target(scheme, budget, target):
    """int4, W8A8, fp8 and the auto mix: the solver's measured error is within the budget and is the user's
    error."""
    torch.manual_seed(0)
    model, inputs = _build_for(target, "vlm_decode", batch=1, seq=8)
    with torch.no_grad():
        expected = model(*inputs)
        compiled = mmaccel.compile(model, target=target, quantize=scheme, accuracy_budget=budget)
        actual = compiled(*inputs)
    result = compiled.mmaccel_report.graphs[-1].pass_result("quantize")
    assert result.matched >= 1 and result.measured_error <= budget
    assert relative_error(actual, expected) == pytest.approx(result.measured_error, rel=0.05)
    layers = result.details["layers"]
    precisions = {row["precision"] for row in layers}
    allowed = {"w8a8_dynamic": {"w8a8_tensor", "w8a8_token", "original"},
               "fp8": {"fp8_row", "original"},
               "int4_weight_only": {"int4_g128", "int4_g64", "int4_g32", "original"}}.get(
                   scheme, {"int4_g128", "int4_g64", "int4_g32", "int8", "original"})
    assert len(layers) == 9 and precisions <= allowed
    assert sorted(precisions - {"original"})[0].split("_")[0] in str(compiled.mmaccel_report)  # per-layer table


def test_auto_spends_precision_where_the_model_is_sensitive():
    """A tighter budget never makes the mix cheaper, and the layers kept at higher precision are the ones
    measured most sensitive (here the lm_head, whose int4 error is 5x the others')."""
    torch.manual_seed(0)
    model, inputs = build("vlm_decode", size="tiny", batch=1, seq=8)
    sizes = {}
    with torch.no_grad():
        for budget in (0.05, 0.02, 0.005):
            compiled = mmaccel.compile(model, target="eager", quantize="auto", accuracy_budget=budget)
            compiled(*inputs)
            result = compiled.mmaccel_report.graphs[-1].pass_result("quantize")
            assert result.measured_error <= budget
            layers = result.details["layers"]
            sizes[budget] = sum(row["bytes"] for row in layers)
    assert sizes[0.05] <= sizes[0.02] <= sizes[0.005]
    head = next(row for row in layers if row["layer"].endswith("lm_head"))
    assert head["precision"] in ("int8", "original")
    by_kind = result.details["sensitivity_by"]["kind"]
    assert max(by_kind, key=by_kind.get) == "lm_head"


def test_solver_skips_a_non_monotone_step():
    """A precision step that measures worse (int4 g32 after g64) must not hide the better step after it."""
    from mmaccel.passes.lossy import Site, solve

    ladder = ("int4_g64", "int4_g32", "int8", "original")
    table = {"a": ({"int4_g64": 0.056, "int4_g32": 0.058, "int8": 0.0036}, (4736, 5376, 8704, 32768)),
             "b": ({"int4_g64": 0.001, "int4_g32": 0.001, "int8": 5e-5}, (4736, 5376, 8704, 32768))}
    sites = [Site(n, n, (64, 64), c[-1], ladder, {**e, "original": 0.0}, lever="quantize")
             for n, (e, c) in table.items()]
    costs = {n: dict(zip(ladder, c)) for n, (_, c) in table.items()}
    assert solve(sites, lambda site, p: costs[site.node][p], 0.02) == {("quantize", "a"): "int8",
                                                                       ("quantize", "b"): "int4_g64"}


def test_calibration_samples_are_what_the_error_is_measured_on():
    """With calibration samples the reported error is the error pooled over those samples (not the first
    call's inputs), and the recording finds the graph the backend compiles."""
    torch.manual_seed(0)
    model, inputs = build("vit", size="tiny", batch=2)
    samples = [torch.randn_like(inputs[0]) for _ in range(3)]
    with torch.no_grad():
        references = [model(s) for s in samples]
        compiled = mmaccel.compile(model, target="eager", quantize="int8_weight_only", accuracy_budget=0.05,
                                   calibration=samples)
        outputs = [compiled(s) for s in samples]
    graph = compiled.mmaccel_report.graphs[-1]
    assert not graph.calibration_note
    result = graph.pass_result("quantize")
    assert "on 3 calibration input(s)" in result.changes[0]
    diff = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outputs, references))
    ref = sum(float(r.double().pow(2).sum()) for r in references)
    assert result.measured_error == pytest.approx((diff / ref) ** 0.5, rel=1e-3)


def test_calibration_through_torch_compile_directly_names_the_fix():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="mmaccel", options={"quantize": "auto", "calibration": [torch.randn(1, 4)]})
    with pytest.raises(Exception, match="mmaccel.compile"):
        compiled(torch.randn(1, 4))


def _saturating_integer_matmul(q: torch.Tensor, zero: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's uint8 x int8 GEMM on x86 CPUs without VNNI (MLAS's AVX2 kernel, vpmaddubsw): the products of
    two neighbouring k are added in int16 with saturation, then summed exactly; the zero point is taken off through
    the weight's row sums. Reproduces CI's error on such a CPU bit for bit (0.0317 where the pass measured 0.0020)."""
    a, b = q.double(), qweight.double()
    if a.shape[1] % 2:
        a, b = torch.nn.functional.pad(a, (0, 1)), torch.nn.functional.pad(b, (0, 1))
    pairs = (a[:, None, :] * b[None, :, :]).unflatten(-1, (-1, 2)).sum(-1).clamp(-32768, 32767)
    return (pairs.sum(-1) - zero.double() * b.sum(1)).to(torch.int32)


def _w8a8_weights(compiled) -> list[torch.Tensor]:
    graphs = compiled.mmaccel_report.graphs
    return [getattr(g.final_graph, n.args[1].target) for g in graphs for n in g.final_graph.graph.nodes
            if n.target is torch.ops.mmaccel.w8a8_linear.default]


@pytest.mark.parametrize("saturates", [True, False], ids=["saturating-host", "vnni-host"])
def test_w8a8_weights_keep_7_bits_where_onnxruntime_would_saturate_them(monkeypatch, saturates):
    """On a host whose ONNX Runtime sums pairs of uint8 x int8 products in int16 with saturation (x86 without
    VNNI; the probe is forced here) the onnxruntime target's W8A8 weights hold |q| <= 63: 255 * 63 * 2 fits where
    255 * 127 * 2 does not, and those weights give the same bits under an emulation of that kernel. Where it does
    not saturate they keep 8 bits, as on the eager target. The error the pass reports is the user's either way
    (on a saturating host only with 7 bits: the check is skipped for 8 bits forced there). Near-miss: 8-bit
    weights under the emulated kernel change the output, so the emulation bites."""
    import mmaccel.backends
    from mmaccel.backends import onnxruntime as ort_target
    from mmaccel.ops import w8a8_linear as w8a8

    host_ort, host_int_mm = ort_target.integer_matmul_saturates(), w8a8.cpu_int_mm_saturates()
    monkeypatch.setattr(ort_target, "integer_matmul_saturates", lambda: saturates)
    monkeypatch.setattr(mmaccel.backends, "cpu_int_mm_saturates", lambda: False)  # its own test below
    torch.manual_seed(0)
    model, inputs = build("vlm_decode", size="tiny", batch=1, seq=8)
    with torch.no_grad():
        expected = model(*inputs)
        compiled = {t: mmaccel.compile(model, target=t, quantize="w8a8_dynamic", accuracy_budget=0.004)
                    for t in ("onnxruntime", "eager")}
        actual = {t: c(*inputs) for t, c in compiled.items()}
    ort_weights, eager_weights = _w8a8_weights(compiled["onnxruntime"]), _w8a8_weights(compiled["eager"])
    assert ort_weights and eager_weights
    assert max(int(w.abs().max()) for w in ort_weights) == (63 if saturates else 127)
    changes = {t: c.mmaccel_report.graphs[-1].pass_result("quantize").changes[0] for t, c in compiled.items()}
    assert ("W8A8 weights in 7 bits" in changes["onnxruntime"]) == saturates, changes
    assert "7 bits" not in changes["eager"]
    assert max(int(w.abs().max()) for w in eager_weights) == 127
    if saturates or not (host_ort or host_int_mm):
        measured = compiled["onnxruntime"].mmaccel_report.graphs[-1].pass_result("quantize").measured_error
        assert relative_error(actual["onnxruntime"], expected) == pytest.approx(measured, rel=0.05)
    for w in ort_weights:  # the largest activations (all positive: q up to 255) against these weights
        q, zero, _, _ = w8a8.quantize_activation(torch.randn(5, w.shape[1]).abs() * 3)
        same = torch.equal(_saturating_integer_matmul(q, zero, w), w8a8.integer_matmul(q, zero, w))
        assert same or not saturates
    monkeypatch.setattr(w8a8, "integer_matmul", _saturating_integer_matmul)
    with torch.no_grad():
        saturated = compiled["eager"](*inputs)
    if not host_int_mm:  # (where torch._int_mm saturates, the eager run above already did)
        assert relative_error(saturated, expected) > 5 * relative_error(actual["eager"], expected)


def test_cpu_graphs_keep_7_bit_w8a8_weights_where_torch_int_mm_saturates(monkeypatch):
    """torch._int_mm measures (and on the eager target runs) W8A8 on CPU; where oneDNN's kernel saturates (x86
    without VNNI: forced here) CPU graphs take 7-bit weights and the report says so; the probe recognizes such a
    kernel (int8 x int8 run as uint8 x int8 with the shift taken back, pairs clipped to int16)."""
    import mmaccel.backends
    from mmaccel.ops import w8a8_linear as w8a8

    monkeypatch.setattr(mmaccel.backends, "cpu_int_mm_saturates", lambda: True)
    torch.manual_seed(0)
    model, inputs = build("vlm_decode", size="tiny", batch=1, seq=8)
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", quantize="w8a8_dynamic", accuracy_budget=0.004)
        compiled(*inputs)
    assert max(int(w.abs().max()) for w in _w8a8_weights(compiled)) == 63
    assert "W8A8 weights in 7 bits" in compiled.mmaccel_report.graphs[-1].pass_result("quantize").changes[0]

    assert w8a8.cpu_int_mm_saturates() in (True, False)  # this host's answer
    w8a8.cpu_int_mm_saturates.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: _saturating_integer_matmul(
        a.int() + 128, torch.tensor(128.0), b.t().contiguous()))
    try:
        assert w8a8.cpu_int_mm_saturates() is True
    finally:  # later callers probe this host's own kernel again
        w8a8.cpu_int_mm_saturates.cache_clear()


def test_the_saturation_probe_tells_a_saturating_onnxruntime_from_an_exact_one(monkeypatch):
    """The probe runs ONNX Runtime once on the largest uint8 x int8 products: this host's answer is a bool, and
    a session that returns what a saturating kernel returns (pairs clipped to 32767) is recognized as one."""
    ort = pytest.importorskip("onnxruntime")
    from mmaccel.backends import onnxruntime as ort_target

    assert ort_target._probe_saturation() in (True, False)
    real = ort.InferenceSession

    class Saturating:
        def __init__(self, *args, **kwargs):
            self.session = real(*args, **kwargs)

        def run(self, names, feeds):
            exact, fused = self.session.run(names, feeds)
            k = feeds["a"].shape[1]
            return np.full_like(exact, 32767 * (k // 2)), fused

    monkeypatch.setattr(ort, "InferenceSession", Saturating)
    assert ort_target._probe_saturation() is True


def test_w8a8_onnx_export_runs_integer_matmuls_in_plain_onnxruntime(tmp_path):
    """W8A8 dynamic: the file holds int8 weights, quantizes activations with DynamicQuantizeLinear and multiplies
    with MatMulInteger (standard ops, which ONNX Runtime fuses); ONNX Runtime without mmaccel gives the error
    the pass measured."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, inputs = build("vit", size="tiny", batch=2)
    path = tmp_path / "w8a8.onnx"
    report = mmaccel.export_onnx(model, inputs, path, quantize="w8a8_dynamic", accuracy_budget=0.02)
    result = report.graphs[0].pass_result("quantize")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert result.matched >= 8 and len(weights) == result.matched
    # 7 bits: ONNX Runtime's x86 kernels without VNNI cannot saturate them, wherever the file runs; the report says so
    assert max(int(np.abs(onnx.numpy_helper.to_array(w).astype(np.int32)).max()) for w in weights) == 63
    assert "W8A8 weights in 7 bits" in result.changes[0]
    assert ops.count("MatMulInteger") == result.matched and "DynamicQuantizeLinear" in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})
    with torch.no_grad():
        expected = model(*inputs)
    assert 0 < result.measured_error <= 0.02
    assert relative_error(torch.from_numpy(out), expected) == pytest.approx(result.measured_error, rel=0.05)


def test_fp8_warns_once_off_gpu_and_exports_float8_weights_that_plain_onnxruntime_runs(tmp_path):
    """fp8 where there is no fp8 matmul (this CPU): one warning naming the device and the alternatives, and
    still the promised error. The ONNX file (opset 21) holds 1-byte float8 weights and runs in ONNX Runtime."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, inputs = build("vit", size="tiny", batch=2)
    path = tmp_path / "fp8.onnx"
    from mmaccel.compiler import errors

    errors._warned.clear()  # earlier tests of this process may have had the warning already
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = mmaccel.export_onnx(model, inputs, path, quantize="fp8", accuracy_budget=0.05)
    fp8_warnings = [w for w in caught if "quantize='fp8' on cpu" in str(w.message)]
    assert len(fp8_warnings) == 1 and "w8a8_dynamic" in str(fp8_warnings[0].message)
    result = report.graphs[0].pass_result("quantize")
    model_proto = onnx.load(str(path))
    weights = [i for i in model_proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert result.matched >= 8 and len(weights) == result.matched
    assert max(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")) >= 21
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})
    with torch.no_grad():
        expected = model(*inputs)
    assert 0 < result.measured_error <= 0.05
    assert relative_error(torch.from_numpy(out), expected) == pytest.approx(result.measured_error, rel=0.05)
