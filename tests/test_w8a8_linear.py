"""mmaccel::w8a8_linear: the reference is exact integer arithmetic (checked against an independent numpy
computation of the documented semantics), its error against the fp32 linear is bounded and per token, the ONNX
translation gives the reference's bits in ONNX Runtime (fused and unfused), and the fake gives the shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mmaccel.ops.w8a8_linear as w8a8
from mmaccel.ops import OPS
from mmaccel.ops.int8_linear import quantize_per_channel
from mmaccel.ops.w8a8_linear import integer_matmul, quantize_activation, w8a8_linear_reference

from conftest import ACTIVATIONS, linear_epilogue_of, relative_error

W8A8 = torch.ops.mmaccel.w8a8_linear.default


def _naive(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None,
           granularity: str) -> torch.Tensor:
    """The module docstring's steps in numpy: float32 quantization, int64 matmul, float32 scaling."""
    f32 = np.float32
    xs = x.numpy().astype(f32)
    r = np.maximum(np.abs(xs).max(axis=-1, keepdims=True), f32(np.finfo(f32).tiny))
    if granularity == "tensor":
        r = np.ones_like(r)
    xn = xs / r
    lo, hi = min(xn.min(), f32(0)), max(xn.max(), f32(0))
    scale = (hi - lo) / f32(255) if hi > lo else f32(1)
    zero = np.round(np.clip(-lo / scale, f32(0), f32(255)))
    q = np.clip(np.round(xn / scale) + zero, f32(0), f32(255))
    acc = (q.astype(np.int64) - int(zero)) @ qweight.numpy().astype(np.int64).T
    y = acc.astype(f32) * (scale * wscale.numpy().astype(f32)) * r
    if bias is not None:
        y = y + bias.numpy()
    return torch.from_numpy(y)


def _linear(n: int, k: int, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q, s = quantize_per_channel(w)
    return w, q, s, (torch.randn(n, generator=g) if bias else None)


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), k=st.integers(1, 70), n=st.integers(1, 24),
       seed=st.integers(0, 2**16), spread=st.sampled_from([1.0, 1e3]), skew=st.sampled_from([0.0, 0.5, 2.0]),
       bias=st.booleans(), granularity=st.sampled_from(["token", "tensor"]))
def test_reference_is_exact_integer_arithmetic(lead, k, n, seed, spread, skew, bias, granularity):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g) + skew  # skew: mostly positive rows, an asymmetric range
    x = x * torch.exp(torch.rand(*lead, 1, generator=g) * np.log(spread))  # token ranges that differ
    _, q, s, b = _linear(n, k, seed, bias)
    expected = _naive(x, q, s, b, granularity)
    assert torch.equal(w8a8_linear_reference(x, q, s, b, "none", None, granularity), expected)
    assert torch.equal(W8A8(x, q, s, b, "none", None, granularity), expected)  # the registered op runs the reference


@pytest.mark.parametrize("k", [1, 8, 4096])
def test_integer_matmul_is_exact_at_the_extremes(k, monkeypatch):
    """Sums of up to K * 255 * 127 (past float32's 2**24) are exact, with torch._int_mm and without."""
    g = torch.Generator().manual_seed(k)
    q = torch.randint(0, 256, (5, k), generator=g).float()
    q[0], q[1] = 255, 0
    w = torch.randint(-127, 128, (7, k), generator=g, dtype=torch.int8)
    w[0], w[1] = 127, -127
    for zero in (0.0, 128.0, 255.0):
        expected = (q.long() - int(zero)) @ w.long().t()
        assert torch.equal(integer_matmul(q, torch.tensor(zero), w).long(), expected)
        with monkeypatch.context() as m:
            m.setattr(w8a8, "_int_mm_supported", lambda a, b: False)
            assert torch.equal(integer_matmul(q, torch.tensor(zero), w).long(), expected)


def test_close_to_the_fp32_linear_and_per_token():
    torch.manual_seed(0)
    w, q, s, b = _linear(256, 768)
    x = torch.randn(2, 50, 768)
    x[0, 0] *= 1000  # one token with massive activations (a class token, an attention sink)
    y, ref = w8a8_linear_reference(x, q, s, b, "none", None), F.linear(x, w, b)
    assert relative_error(y, ref) < 0.02
    # Per token: the other tokens keep their own step; with one step for the tensor theirs is ~1000x coarser.
    assert relative_error(y[:, 1:], ref[:, 1:]) < 0.02
    per_tensor = w8a8_linear_reference(x, q, s, b, "none", None, "tensor")
    assert relative_error(per_tensor[:, 1:], ref[:, 1:]) > 0.5
    assert relative_error(w8a8_linear_reference(x[1:], q, s, b, "none", None, "tensor"), ref[1:]) < 0.02
    # The quantized activation itself: every token within half a step of its own range / 255.
    qx, zero, scale, r = quantize_activation(x)
    assert ((qx - zero) * scale * r - x).abs().le(0.5 * scale * r * (1 + 1e-5)).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_epilogue_is_the_linear_epilogue(activation):
    torch.manual_seed(0)
    _, q, s, b = _linear(12, 20)
    x, residual = torch.randn(3, 5, 20), torch.randn(3, 5, 12)
    plain = w8a8_linear_reference(x, q, s, None, "none", None)
    expected = linear_epilogue_of(plain, b, activation, residual)
    assert torch.equal(w8a8_linear_reference(x, q, s, b, activation, residual), expected)


def test_fake_gives_the_shape_and_the_op_is_registered():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, q, s, b = _linear(12, 20)
    x, residual = torch.randn(2, 3, 20), torch.randn(2, 3, 12)
    torch.library.opcheck(W8A8, (x, q, s, b, "gelu", residual))
    with FakeTensorMode() as mode:
        out = W8A8(mode.from_tensor(x), mode.from_tensor(q), mode.from_tensor(s), mode.from_tensor(b), "none", None)
    assert out.shape == (2, 3, 12) and out.dtype == torch.float32
    assert OPS[W8A8].eager is w8a8_linear_reference and OPS[W8A8].onnx is not None
    assert W8A8(torch.randn(0, 20), q, s, b, "none", None).shape == (0, 12)
    with pytest.raises(ValueError, match="granularity 'channel'"):
        W8A8(x, q, s, b, "none", None, "channel")


def _vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags or " avx2 " not in flags


class _Cases(torch.nn.Module):
    """Every epilogue form in one graph, so one export and one session cover them. Forms that read the same input
    with the same granularity share one activation quantization (the exporter merges identical subgraphs) and
    become MatMulIntegerToFloat in ONNX Runtime; the forms reading x + 1 have theirs alone and become
    DynamicQuantizeMatMul."""

    # (activation, bias, residual, granularity, input)
    FORMS = [("none", False, False, "token", "x"), ("none", True, False, "token", "x"),
             ("gelu", True, False, "token", "x"), ("relu", False, True, "token", "x"),
             ("silu", True, True, "token", "x"), ("gelu_tanh", True, False, "token", "x"),
             ("none", True, False, "tensor", "x"), ("gelu", True, True, "tensor", "x"),
             ("none", True, False, "token", "x+1"), ("none", True, False, "tensor", "x+2")]

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        for i in range(len(self.FORMS)):
            for name, t in zip("qsb", _linear(n, k, seed=i)[1:]):
                self.register_buffer(f"{name}{i}", t)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = {"x": x, "x+1": x + 1, "x+2": x + 2}
        return tuple(W8A8(inputs[source], getattr(self, f"q{i}"), getattr(self, f"s{i}"),
                          getattr(self, f"b{i}") if bias else None, act, residual if res else None, granularity)
                     for i, (act, bias, res, granularity, source) in enumerate(self.FORMS))


@pytest.fixture(scope="module")
def onnx_cases(tmp_path_factory):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    k, n = 48, 40
    module = _Cases(k, n).eval()
    x, residual = torch.randn(2, 5, k), torch.randn(2, 5, n)
    rows = Dim("rows")
    table = {op: spec.onnx for op, spec in OPS.items() if spec.onnx is not None}
    path = str(tmp_path_factory.mktemp("w8a8") / "w8a8.onnx")
    program = torch.onnx.export(module, (x, residual), dynamo=True, opset_version=18, custom_translation_table=table,
                                dynamic_shapes=({1: rows}, {1: rows}), optimize=True, verbose=False)
    program.save(path)
    sessions = {}
    for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        if level == "ORT_ENABLE_ALL":
            options.optimized_model_filepath = path + ".optimized"
        sessions[level] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return module, path, sessions


def test_onnx_is_standard_and_fused_by_onnxruntime(onnx_cases):
    import onnx

    _, path, _ = onnx_cases
    written = onnx.load(path)
    assert {o.domain for o in written.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in written.graph.node} <= {""}
    assert sum(n.op_type == "MatMulInteger" for n in written.graph.node) == len(_Cases.FORMS)
    optimized = [n.op_type for n in onnx.load(path + ".optimized").graph.node]
    assert optimized.count("DynamicQuantizeLinear") == 2 and "MatMulInteger" not in optimized
    assert optimized.count("MatMulIntegerToFloat") == len(_Cases.FORMS) - 2
    assert optimized.count("DynamicQuantizeMatMul") == 2


@pytest.mark.skipif(not _vnni(), reason="ONNX Runtime's x86 u8s8 kernel without VNNI saturates int16 pair sums")
@pytest.mark.parametrize("level", ["ORT_ENABLE_ALL", "ORT_DISABLE_ALL"])
@pytest.mark.parametrize("data", ["gaussian", "token_spread", "positive", "zeros", "one_row"])
def test_onnx_runtime_gives_the_reference(onnx_cases, level, data):
    module, _, sessions = onnx_cases
    g = torch.Generator().manual_seed(len(data))
    rows = 1 if data == "one_row" else 7
    x, residual = torch.randn(2, rows, 48, generator=g), torch.randn(2, rows, 40, generator=g)
    if data == "token_spread":
        x = x * torch.logspace(-3, 3, rows)[:, None]
    elif data == "positive":
        x = F.gelu(x) * 5
    elif data == "zeros":
        x = torch.zeros_like(x)
    session = sessions[level]
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy(), session.get_inputs()[1].name: residual.numpy()})
    with torch.no_grad():
        expected = module(x, residual)
    for form, out, ref in zip(_Cases.FORMS, outs, expected):
        out = torch.from_numpy(out)
        if form[0] == "none" and form[3] == "token":  # same float32 operations in the same order: the same bits
            assert torch.equal(out, ref), form
        else:  # Erf/Tanh/Sigmoid differ by a few ulps; per tensor, ONNX Runtime fuses the bias add into the GEMM
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(ref.abs().max())))
