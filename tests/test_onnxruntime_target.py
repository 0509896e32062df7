"""The onnxruntime target: attention as HF decoders call it (causal flag, grouped-query K/V heads, the CPU
flash kernel a traced F.scaled_dot_product_attention leaves when attention_fusion is off), and a fallback
warning that names the op and the user's source line it came from."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import mmaccel  # noqa: E402
from mmaccel.compiler import errors  # noqa: E402

from conftest import assert_matches_eager, compile_and_check  # noqa: E402

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _every_warning_visible():
    errors._warned.clear()
    yield


class Attention(nn.Module):
    """F.scaled_dot_product_attention over projected q/k/v with `kv_heads` K/V heads (grouped-query when
    fewer than the 4 query heads), as HF's sdpa attention calls it."""

    def __init__(self, kv_heads: int, is_causal: bool, masked: bool):
        super().__init__()
        self.kv_heads, self.is_causal, self.masked = kv_heads, is_causal, masked
        self.q, self.kv = nn.Linear(32, 32), nn.Linear(32, 2 * 8 * kv_heads)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, 4, 8).transpose(1, 2)
        k, v = self.kv(x).view(B, S, 2, self.kv_heads, 8).permute(2, 0, 3, 1, 4)
        mask = None
        if self.masked:  # the last key of every row masked: a padding mask, broadcast over heads
            mask = torch.ones(S, S, dtype=torch.bool, device=x.device)
            mask[:, -1] = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal,
                                             enable_gqa=self.kv_heads != 4)
        return out.transpose(1, 2).reshape(B, S, 32)


ATTENTION_CASES = [(4, True, False), (2, True, False), (1, False, False), (2, False, True)]


def attention_cases():
    for kv_heads, is_causal, masked in ATTENTION_CASES:
        for fusion in (True, False):
            yield pytest.param(kv_heads, is_causal, masked, fusion,
                               id=f"kv{kv_heads}-{'causal' if is_causal else 'mask' if masked else 'full'}-"
                                  f"{'canonical_sdpa' if fusion else 'cpu_flash_kernel'}")


@pytest.mark.parametrize(("kv_heads", "is_causal", "masked", "fusion"), attention_cases())
def test_attention_runs_on_onnxruntime(kv_heads, is_causal, masked, fusion):
    """Causal and grouped-/multi-query attention run in the ONNX Runtime session and match eager: through
    the aten SDPA translation (attention_fusion on) and through the CPU flash kernel's (off)."""
    torch.manual_seed(0)
    model = Attention(kv_heads, is_causal, masked).eval()
    _, report = compile_and_check(model, torch.randn(2, 7, 32), target="onnxruntime",
                                  passes={"attention_fusion": fusion})
    g = report.graphs[0]
    assert g.target == "onnxruntime", g.target_reason
    sdpa = aten.scaled_dot_product_attention if fusion else aten._scaled_dot_product_flash_attention_for_cpu
    assert g.count(sdpa) == 1


@pytest.mark.parametrize(("kv_heads", "is_causal", "masked"), ATTENTION_CASES)
def test_sdpa_translation_with_enable_gqa(kv_heads, is_causal, masked):
    """The aten SDPA node attention_fusion emits for grouped-query attention (enable_gqa=True, K/V with
    fewer heads), translated on its own: a graph holding just that node."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from mmaccel.backends import onnxruntime as target

    def attention(q, k, v, mask):
        return (aten.scaled_dot_product_attention.default(q, k, v, mask if masked else None, 0.0, is_causal,
                                                          scale=0.3, enable_gqa=True),)

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=generator)
    k, v = (torch.randn(2, kv_heads, 7 if not is_causal else 5, 8, generator=generator) for _ in range(2))
    mask = torch.rand(2, 1, 5, k.shape[2], generator=generator) > 0.3
    gm = torch.fx.symbolic_trace(attention)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(q, k, v, mask)
    run = target.compile_graph(gm, [q, k, v, mask])
    expected = F.scaled_dot_product_attention(q, k, v, mask if masked else None, is_causal=is_causal, scale=0.3,
                                              enable_gqa=True)
    assert_matches_eager(run([q, k, v, mask])[0], expected)


def fallback_message(record) -> str:
    return next(str(w.message) for w in record if issubclass(w.category, mmaccel.MmaccelFallbackWarning))


class Cummax(nn.Module):
    def forward(self, x):
        running = torch.cummax(x, dim=1).values  # no ONNX translation
        return running + 1


def test_untranslatable_op_warning_names_op_and_source_line():
    """The fallback warning says which op could not be converted and where the model wrote it."""
    line = next(i for i, text in enumerate(open(__file__), 1) if "torch.cummax(x, dim=1)" in text)
    x = torch.randn(2, 5)
    with torch.no_grad(), pytest.warns(mmaccel.MmaccelFallbackWarning) as record:
        compiled = mmaccel.compile(Cummax(), target="onnxruntime")
        assert_matches_eager(compiled(x), Cummax()(x))
    message = fallback_message(record)
    assert "aten.cummax.default" in message and f"test_onnxruntime_target.py, line {line}" in message, message
    assert "No ONNX function found" in message  # the translation's own reason, not torch.onnx's advice
    assert compiled.mmaccel_report.graphs[0].target == "eager"


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        hidden = F.gelu(self.fc1(x))
        return self.fc2(hidden)


def test_session_failure_warning_names_the_graph_node(monkeypatch):
    """ONNX Runtime names the ONNX node it rejects; the warning maps it back to the graph node and its source."""
    import onnx
    import onnxruntime as ort

    def refuse(model_bytes, *args, **kwargs):
        proto = onnx.load_from_string(model_bytes)
        erf = next(n for n in proto.graph.node if n.op_type == "Erf")  # gelu's, inside fused_linear's translation
        raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : Node ({erf.name}) Op (Erf) [ShapeInferenceError] test")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    x = torch.randn(2, 8)
    with torch.no_grad(), pytest.warns(mmaccel.MmaccelFallbackWarning) as record:
        model = MLP().eval()
        assert_matches_eager(mmaccel.compile(model, target="onnxruntime")(x), model(x))
    message = fallback_message(record)
    assert re.search(r"at mmaccel\.fused_linear\.default \(node fused_linear_default\), from "
                     r".*test_onnxruntime_target\.py, line \d+: hidden = F\.gelu\(self\.fc1\(x\)\)", message), message


@pytest.mark.parametrize("dynamic", [False, True])
def test_an_output_that_is_a_view_of_a_strided_input_keeps_its_values(dynamic):
    """A graph returning a view of its input (here x.reshape(b, s * d).view(b, s, d) of a strided [2, 2, 1]):
    ONNX Runtime returns a fresh tensor, which AOTAutograd rebuilt as a view of the caller's input with that
    tensor's strides, reading the input's storage in order (found by test_properties: off by 2.1). The view
    now comes from PyTorch, with eager's strides."""
    def flatten(x):
        b, s, d = x.shape
        return x.reshape(b, s * d).view(b, s, d), x * 2

    x = torch.randn(2, 4, 2).as_strided((2, 2, 1), (4, 2, 2))
    compiled = mmaccel.compile(flatten, target="onnxruntime", dynamic=dynamic)
    for got, expected in zip(compiled(x), flatten(x)):
        torch.testing.assert_close(got, expected)
        assert got.stride() == expected.stride()


class TinyConstants(nn.Module):
    """An RMSNorm with Helium's epsilon (1e-8), then a scale within 1e-5 of 1 and a shift of 1e-9."""

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)
        return (y * 1.000004 + 1e-9) / 0.999997


def test_tiny_constants_survive_the_onnx_optimizer():
    """onnxscript's optimizer took x + c for c within 1e-8 of 0 (and x * c, x / c for c within 1e-5 of 1) as no-ops
    and removed them: the RMSNorm of an all-zero row (a pad token's zero embedding in Helium) became 0 * rsqrt(0) =
    NaN on the onnxruntime target, and in the HF model attention spread it over the row. The arithmetic is kept."""
    x = torch.randn(3, 16)
    x[1] = 0.0
    fn = mmaccel.compile(TinyConstants(), target="onnxruntime")
    with torch.no_grad():
        out, expected = fn(x), TinyConstants()(x)
    assert fn.mmaccel_report.graphs[-1].target == "onnxruntime"
    assert not out.isnan().any()
    assert torch.equal(out[1], expected[1])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(out[0], x[0] * torch.rsqrt(x[0].pow(2).mean()), rtol=1e-6, atol=0)  # scale kept


def test_mixture_of_experts_runs_on_onnxruntime():
    """transformers' grouped_mm_fallback (the expert matmul of Mixtral, Qwen-MoE, OLMoE, DeepSeek V3 and Jamba on
    CPU) had no ONNX translation: such graphs ran on the eager target. Rows of experts with no tokens included;
    the offsets are an input, so other routings run on the same session."""
    transformers = pytest.importorskip("transformers")
    from transformers.integrations import moe  # noqa: F401  registers torch.ops.transformers.grouped_mm_fallback

    def experts(x, w, offs):
        return torch.ops.transformers.grouped_mm_fallback(x, w, offs) * 2.0

    x, w = torch.randn(7, 8), torch.randn(4, 8, 5)
    fn = mmaccel.compile(experts, target="onnxruntime")
    for offs in ([2, 2, 6, 7], [0, 3, 7, 7]):  # expert 1 (then 0 and 3) gets no row
        offs = torch.tensor(offs)
        torch.testing.assert_close(fn(x, w, offs), experts(x, w, offs))
    assert [g.target for g in fn.mmaccel_report.graphs] == ["onnxruntime"]

    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 9))
    compiled = mmaccel.compile(model, target="onnxruntime")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    assert {g.target for g in compiled.mmaccel_report.graphs} == {"onnxruntime"}


def test_a_graph_returning_an_input_unchanged_runs_on_onnxruntime():
    """A graph that hands an input back unchanged (x.contiguous() / x.float() of what already is; Gemma 3's and
    Idefics3's inputs_embeds between graph breaks) ran on the eager target with a warning; the output is now the
    input itself, as eager returns it, beside ONNX Runtime's outputs."""
    def f(x, y):
        return x.contiguous(), y * 2.0, y.float()

    x, y = torch.randn(3, 4), torch.randn(5)
    fn = mmaccel.compile(f, target="onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmaccel.MmaccelFallbackWarning)
        a, b, c = fn(x, y)
    assert a.data_ptr() == x.data_ptr() and torch.equal(a, x)
    assert torch.equal(b, y * 2.0) and c.data_ptr() == y.data_ptr()
    assert fn.mmaccel_report.graphs[-1].target == "onnxruntime"


def test_squeeze_of_a_dim_that_is_not_one_runs_on_onnxruntime():
    """torch's squeeze(dim) leaves a dim of another size than 1 alone; ONNX's Squeeze fails on it, and torch.onnx
    emitted one anyway: ONNX Runtime refused Mistral 3's image_features.squeeze(0) of a [4, 32] tensor, and the
    graph ran on the eager target. Squeezes of such dims are now no-ops in the file; dims of size 1 still go."""
    def f(x, y):
        return torch.split(x.squeeze(0), [4])[0] * 2, y.squeeze(0) + 1, y.squeeze(-1).squeeze(1) * 3, \
            torch.squeeze(x, (0, 1)) - 1

    x, y = torch.randn(4, 32), torch.randn(1, 5, 1)
    fn = mmaccel.compile(f, target="onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmaccel.MmaccelFallbackWarning)
        out = fn(x, y)
    for actual, expected in zip(out, f(x, y)):
        assert actual.shape == expected.shape and torch.equal(actual, expected)
    assert fn.mmaccel_report.graphs[-1].target == "onnxruntime"
