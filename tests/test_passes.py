"""Each pass alone on tiny graphs: the patterns it must match, the near-misses it must leave alone,
and idempotence. Every case also checks the compiled result against eager."""
from __future__ import annotations

import math
import operator
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmaccel
from mmaccel.passes.patterns import drop_dead_nodes
from mmaccel.passes.pipeline import PASS_NAMES, run_pass

from conftest import compile_and_check

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
FUSED_LINEAR = torch.ops.mmaccel.fused_linear.default


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, s, c = x.shape
    return x.view(b, s, h, c // h).transpose(1, 2)


class Attn(nn.Module):
    """Explicit attention in the forms people write; `form` picks one."""

    def __init__(self, form: str, dim: int = 16, h: int = 2) -> None:
        super().__init__()
        self.form, self.h, self.d = form, h, dim // h
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.register_buffer("causal", torch.tril(torch.ones(32, 32, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = heads(self.q(x), self.h), heads(self.k(x), self.h), heads(self.v(x), self.h)
        s = x.shape[1]
        if self.form == "hf":  # HF eager: matmul / sqrt(d) + additive mask, fp32 softmax cast back
            mask = torch.zeros(s, s).masked_fill(~self.causal[:s, :s], torch.finfo(torch.float32).min)
            w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.d) + mask
            p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        elif self.form == "timm":  # q scaled first, no mask
            p = ((q * self.d ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        elif self.form == "whisper":  # q and k each scaled by d^-0.25
            sc = self.d ** -0.25
            p = F.softmax((q * sc) @ (k * sc).transpose(-1, -2), dim=-1)
        elif self.form == "nanogpt":  # masked_fill(-inf) with a boolean causal mask, scale by multiply
            w = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d))
            p = F.softmax(w.masked_fill(~self.causal[:s, :s], float("-inf")), dim=-1)
        elif self.form == "bmm3d":  # [B*H, S, D] with torch.bmm
            b = x.shape[0]
            q3, k3, v3 = (t.reshape(b * self.h, s, self.d) for t in (q, k, v))
            p = torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * self.d ** -0.5, dim=-1)
            return torch.bmm(p, v3).view(b, self.h, s, self.d).transpose(1, 2).reshape(b, s, -1)
        # near-misses
        elif self.form == "softmax_dim2":
            p = F.softmax(q @ k.transpose(-2, -1), dim=2)
        elif self.form == "probs_used":
            p = F.softmax(q @ k.transpose(-2, -1), dim=-1)
            return (p @ v).transpose(1, 2).reshape(x.shape), p
        elif self.form == "finite_fill":
            w = (q @ k.transpose(-2, -1)).masked_fill(~self.causal[:s, :s], -1e4)
            p = F.softmax(w, dim=-1)
        elif self.form == "scalar_tensor_scale":  # a 0-d tensor scale (float attributes under dynamic=True)
            p = F.softmax((q @ k.transpose(-2, -1)) * x.new_tensor(0.3), dim=-1)
        elif self.form == "per_head_scale":  # not a scalar: SDPA cannot express it
            p = F.softmax((q @ k.transpose(-2, -1)) * x.new_tensor([0.3, 0.5]).view(2, 1, 1), dim=-1)
        else:
            raise ValueError(self.form)
        return (p @ v).transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("form", ["hf", "timm", "whisper", "nanogpt", "bmm3d", "scalar_tensor_scale"])
def test_attention_fusion_matches(form):
    torch.manual_seed(0)
    model = Attn(form).eval()
    _, report = compile_and_check(model, torch.randn(2, 5, 16), passes=["attention_fusion", "constant_folding",
                                                                        "dead_code_elimination"])
    g = report.graphs[0]
    assert g.pass_result("attention_fusion").matched == 1
    assert g.count(SDPA) == 1 and g.count(aten._softmax) == 0 and g.count(aten.bmm) == 0


NEAR_MISS_REASONS = {
    "softmax_dim2": "softmax over dim 2, not the last (the keys)",
    "probs_used": "the attention probabilities are used elsewhere too",
    "finite_fill": "masked_fill with -10000.0, not -inf",
    "per_head_scale": "the scores are scaled by a tensor of shape [2, 1, 1], not one number",
}


@pytest.mark.parametrize("form", list(NEAR_MISS_REASONS))
def test_attention_fusion_near_misses_left_alone(form):
    torch.manual_seed(0)
    model = Attn(form).eval()
    _, report = compile_and_check(model, torch.randn(2, 5, 16))
    result = report.graphs[0].pass_result("attention_fusion")
    assert result.matched == 0
    assert report.graphs[0].count(SDPA) == 0
    # one near-miss, the attention's, with its reason; in the printed report too
    assert len(result.near_misses) == 1 and NEAR_MISS_REASONS[form] in result.near_misses[0], result.near_misses
    assert NEAR_MISS_REASONS[form] in str(report)


def test_attention_fusion_near_misses_dtype_and_broadcasting_mask():
    class Odd(nn.Module):
        def forward(self, q, k, v, mask):
            wide = torch.softmax(q @ k.transpose(-1, -2) + mask, dim=-1) @ v  # mask [2, 3, 5, 5], scores [3, 5, 5]
            mixed = torch.softmax(k @ q.transpose(-1, -2), dim=-1).bfloat16() @ v.bfloat16()  # fp32 QK^T, bf16 PV
            return wide, mixed.float()

    q, k, v = (torch.randn(3, 5, 4) for _ in range(3))
    _, report = compile_and_check(Odd(), q, k, v, torch.randn(2, 3, 5, 5), target="eager")
    result = report.graphs[0].pass_result("attention_fusion")
    assert result.matched == 0 and len(result.near_misses) == 2, result.near_misses
    assert "the mask [2, 3, 5, 5] broadcasts the scores [3, 5, 5] to a larger shape [2, 3, 5, 5]" in result.near_misses[0]
    assert "dtypes differ: q torch.float32, K^T torch.float32, V torch.bfloat16" in result.near_misses[1]


class FloatScaleAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = 8 ** -0.5  # a float attribute: under dynamic=True Dynamo passes it as a 0-d tensor

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1) @ v


@pytest.mark.parametrize("dynamic", [None, True])
def test_attention_fusion_float_attribute_scale(dynamic):
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    _, report = compile_and_check(FloatScaleAttention(), q, k, v, dynamic=dynamic)
    assert report.graphs[0].matched("attention_fusion") == 1


def test_attention_fusion_half_precision_additive_mask():
    torch.manual_seed(0)
    model = Attn("hf").eval().to(torch.bfloat16)
    _, report = compile_and_check(model, torch.randn(1, 7, 16, dtype=torch.bfloat16))
    assert report.graphs[0].count(SDPA) == 1


class MLP(nn.Module):
    def __init__(self, act: str = "gelu", gated: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.act, self.gated = act, gated
        self.up = nn.Linear(12, 24, bias=bias)
        self.gate = nn.Linear(12, 24, bias=bias)
        self.down = nn.Linear(24, 12, bias=bias)

    def forward(self, x):
        h = self.up(x)
        if self.gated:
            h = F.silu(self.gate(x)) * h
        elif self.act == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = getattr(F, self.act)(h)
        return x + self.down(h)


@pytest.mark.parametrize("act,expected", [("gelu", "gelu"), ("relu", "relu"), ("silu", "silu"),
                                          ("gelu_tanh", "gelu_tanh")])
def test_linear_epilogue_fusion(act, expected):
    torch.manual_seed(0)
    _, report = compile_and_check(MLP(act).eval(), torch.randn(2, 3, 12))
    g = report.graphs[0]
    assert g.pass_result("linear_epilogue_fusion").matched == 2
    calls = [n for n in g.final_graph.graph.nodes if n.target is FUSED_LINEAR]
    assert sorted(n.args[3] for n in calls) == sorted(["none", expected])
    # the down projection absorbed the residual add
    assert sum(n.args[4] is not None for n in calls) == 1
    assert g.count(aten.addmm) == 0 and g.count(aten.add) == 0


def test_parallel_linear_fusion_gate_up():
    torch.manual_seed(0)
    _, report = compile_and_check(MLP(gated=True).eval(), torch.randn(2, 3, 12))
    g = report.graphs[0]
    assert g.pass_result("parallel_linear_fusion").matched == 1
    assert g.count(aten.split_with_sizes) == 1
    assert g.count(FUSED_LINEAR) == 2  # fused gate/up, and down


def test_parallel_linear_fusion_qkv_mixed_bias():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4, bias=False), nn.Linear(8, 6)

        def forward(self, x):
            return self.q(x).sum(-1) + self.k(x).sum(-1) + self.v(x).sum(-1)

    _, report = compile_and_check(QKV().eval(), torch.randn(3, 5, 8))
    assert report.graphs[0].pass_result("parallel_linear_fusion").matched == 1
    assert "split [8, 4, 6]" in report.graphs[0].pass_result("parallel_linear_fusion").changes[0]


def test_parallel_linear_near_misses():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, y, w):
            # different inputs; and a matmul with a non-constant weight
            return self.a(x) + self.b(y) + x @ w

    _, report = compile_and_check(TwoInputs().eval(), torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 8))
    result = report.graphs[0].pass_result("parallel_linear_fusion")
    assert result.matched == 0
    # x is read by a and by x @ w: a near-miss; y only by b: not one
    assert len(result.near_misses) == 1, result.near_misses
    assert "not merged with the other matmuls reading" in result.near_misses[0]
    assert "its weight 'arg" in result.near_misses[0] and "is not a frozen constant" in result.near_misses[0]


def test_linear_epilogue_near_miss_activation_used_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            h = self.fc(x)
            return F.gelu(h) + h  # the pre-activation value is needed too: only bias is fused

    _, report = compile_and_check(Twice().eval(), torch.randn(4, 8))
    calls = [n for n in report.graphs[0].final_graph.graph.nodes if n.target is FUSED_LINEAR]
    assert len(calls) == 1 and calls[0].args[3] == "none"
    (miss,) = report.graphs[0].pass_result("linear_epilogue_fusion").near_misses
    assert miss.startswith("fc (") and "other node(s): the activation stays separate" in miss, miss


def test_linear_epilogue_near_miss_broadcasting_add():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, shift):
            return self.fc(x) + shift  # shift [1, 8] broadcasts over the rows: not a residual

    _, report = compile_and_check(Shifted().eval(), torch.randn(4, 8), torch.randn(1, 8))
    (miss,) = report.graphs[0].pass_result("linear_epilogue_fusion").near_misses
    assert "the add after it broadcasts [1, 8] against the output [4, 8]" in miss, miss


def test_explain_lists_near_misses_per_pass_with_layer_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Attn("softmax_dim2"), MLP()

        def forward(self, x):
            return self.mlp(self.attn(x)[..., :12])

    torch.manual_seed(0)
    with torch.no_grad():
        report = mmaccel.explain(Block().eval(), torch.randn(2, 5, 16))
    text = str(report)
    assert "near-misses (pattern almost matched, left alone):" in text
    lines = text.splitlines()
    at = lines.index("    attention_fusion:")
    assert lines[at + 1].startswith("      attn (") and "softmax over dim 2, not the last (the keys)" in lines[at + 1]
    passes = {p["name"]: p for p in report.to_dict()["graphs"][0]["passes"]}
    assert passes["attention_fusion"]["near_misses"] == report.graphs[0].pass_result("attention_fusion").near_misses
    # a graph where everything matched lists none
    with torch.no_grad():
        assert "near-misses" not in str(mmaccel.explain(Attn("hf").eval(), torch.randn(2, 5, 16)))


def test_cse_dce_and_constant_folding():
    class Dup(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            unused = x * 3  # dead
            a = x @ (self.w.t() * 2.0)  # weight-only arithmetic: folded at compile time
            return torch.relu(x) + torch.relu(x) + a

    _, report = compile_and_check(Dup().eval(), torch.randn(4, 8))
    g = report.graphs[0]
    assert g.matched("common_subexpression_elimination") >= 1
    assert g.matched("constant_folding") >= 2  # t and mul
    assert g.count(aten.relu) == 1 and g.count(aten.mul) == 0


def test_empty_1d_cat_inputs_are_dropped_other_empties_left():
    """HF's DynamicCache starts a layer as torch.tensor([]) and concatenates onto it; aten.cat skips inputs of
    shape (0,), and so does the pass (on CUDA that CPU operand stopped CUDA-graph capture). A [0, 8] input is
    an ordinary operand (not the legacy rule) and stays."""
    def fn(x):
        legacy = torch.cat([torch.tensor([]), x], dim=-1)
        ordinary = torch.cat([x.new_zeros(0, 8), x], dim=0)
        return legacy, ordinary

    _, report = compile_and_check(fn, torch.randn(3, 8))
    g = report.graphs[0]
    assert "dropped 1 empty 1-D cat input(s)" in [c for r in g.passes for c in r.changes]
    assert g.count(aten.cat) == 2


def test_a_returned_host_constant_copied_to_the_device_is_folded():
    """HF Mistral's cache returns `torch.tensor(window).to(device)`: a host-to-device copy at run time, which a
    CUDA graph cannot record. It is folded into a device constant, returned as a copy of it ("meta" stands in
    for the GPU here); an ordinary returned value of constants is still never folded."""
    from mmaccel.passes.cleanup import fold_constants
    from mmaccel.passes.patterns import add_constant

    graph = torch.fx.Graph()
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    const = graph.get_attr(add_constant(gm, "_tensor_constant", torch.tensor(4096)))
    lifted = graph.call_function(aten.lift_fresh_copy.default, (const,))
    on_device = graph.call_function(aten._to_copy.default, (lifted,), {"device": torch.device("meta")})
    doubled = graph.call_function(aten.mul.Tensor, (lifted, 2))
    graph.output((on_device, doubled))
    for node, val in ((on_device, torch.empty((), dtype=torch.long, device="meta")), (doubled, torch.tensor(8192))):
        node.meta["val"] = val
    fold_constants(gm, None)
    returned = gm.graph.output_node().args[0]
    assert returned[0].target is aten.clone.default and returned[0].args[0].op == "get_attr"
    assert getattr(gm, returned[0].args[0].target).device.type == "meta"
    assert returned[1].target is aten.mul.Tensor


def test_dead_attention_dropped_outside_dynamo():
    """One dead-code rule with or without Dynamo's TracingContext (mmaccel.compile optimizes outside it once its
    calibration samples ran, where FX keeps every unread nondeterministic_seeded op): an unread attention at
    dropout_p=0 goes, positional, keyword or default; with dropout it stays, as does a random op (a draw
    shifts the RNG stream of the ops after it)."""
    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    cases = ((aten._scaled_dot_product_flash_attention_for_cpu.default, (q, q, q), {}),
             (aten._scaled_dot_product_efficient_attention.default, (q, q, q, None, False, 0.0), {}),
             (SDPA, (q, q, q), {"dropout_p": 0.0}),
             (SDPA, (q, q, q), {"dropout_p": 0.1}),
             (aten.rand_like.default, (q,), {}))
    for target, args, kwargs in cases:
        graph.call_function(target, args, kwargs)
    graph.output(q)
    drop_dead_nodes(graph)
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [SDPA, aten.rand_like.default]


def test_constant_folding_leaves_factories_alone():
    def f(x):
        return x + torch.ones(x.shape[-1], x.shape[-1]).tril().sum(0)

    _, report = compile_and_check(f, torch.randn(3, 5))
    assert report.graphs[0].count(aten.ones) == 1


def test_passes_are_idempotent_on_attention_block():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Attn("hf"), MLP(gated=True)

        def forward(self, x):
            return self.mlp(self.attn(x)[..., :12])

    _, report = compile_and_check(Block().eval(), torch.randn(1, 6, 16))
    g = report.graphs[0]
    assert g.pass_result("attention_fusion").matched == 1
    for name in PASS_NAMES:
        assert run_pass(g.final_graph, g.context, name).matched == 0, name


def test_disabling_a_pass_by_name():
    torch.manual_seed(0)
    _, report = compile_and_check(Attn("timm").eval(), torch.randn(1, 4, 16), passes={"attention_fusion": False})
    g = report.graphs[0]
    assert "attention_fusion" not in [p.name for p in g.passes]
    assert g.count(SDPA) == 0


def test_failing_pass_is_rolled_back_with_one_warning(monkeypatch):
    from mmaccel.passes import pipeline

    def broken(gm, ctx):
        for node in gm.graph.nodes:
            if node.target is aten.addmm.default:
                node.args = (node.args[0], node.args[1], node.args[1])  # wrong shapes: must not survive
        raise RuntimeError("planted failure")

    monkeypatch.setattr(pipeline, "LOSSLESS", tuple(
        pipeline.Pass(p.name, broken) if p.name == "linear_epilogue_fusion" else p for p in pipeline.LOSSLESS))
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(2, 3, 12)
    with torch.no_grad(), pytest.warns(mmaccel.MmaccelFallbackWarning, match="linear_epilogue_fusion"):
        compiled = mmaccel.compile(model)
        out = compiled(x)
    torch.testing.assert_close(out, model(x))
    result = compiled.mmaccel_report.graphs[0].pass_result("linear_epilogue_fusion")
    assert result.error and "planted failure" in result.error


def test_shared_kv_heads_keep_the_layout_the_view_after_them_reads(monkeypatch):
    """On CUDA the op with repeated K/V (HF's repeat_kv, a mask) runs the efficient kernel, laid out
    [B, S, H, D], and HF's view after it relies on that; with enable_gqa it runs the math path (contiguous).
    Found on an H200: the view failed and the pass was rolled back on grouped-query Llamas. Simulated here
    (CPU fake propagation is contiguous both ways): sharing the heads now adds the copy the view needs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from mmaccel.compiler.options import CompileOptions
    from mmaccel.passes import attention
    from mmaccel.passes.contract import PassContext
    from mmaccel.passes.meta import propagate_fake

    real = attention._fake_output

    def as_on_cuda(sdpa):
        out = real(sdpa)
        return out if sdpa.kwargs.get("enable_gqa") else out.transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(attention, "_fake_output", as_on_cuda)
    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")

    def repeat_kv(x):  # [2, 2, 16, 8] -> [2, 4, 16, 8], head h reads x's head h // 2
        expanded = graph.call_function(aten.expand.default, (graph.call_function(aten.unsqueeze.default, (x, 2)),
                                                              [2, 2, 2, 16, 8]))
        return graph.call_function(aten.view.default, (graph.call_function(aten.clone.default, (expanded,)),
                                                       [2, 4, 16, 8]))

    kernel = graph.call_function(aten._scaled_dot_product_efficient_attention.default,
                                 (q, repeat_kv(k), repeat_kv(v), None, False))
    heads_inner = graph.call_function(aten.transpose.int, (graph.call_function(operator.getitem, (kernel, 0)), 1, 2))
    graph.output((graph.call_function(aten.view.default, (heads_inner, [2, 16, 32])),))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    fake = FakeTensorMode()
    for node, heads in zip(gm.graph.find_nodes(op="placeholder"), (4, 2, 2)):
        node.meta["val"] = fake.from_tensor(torch.randn(2, heads, 16, 8))
    propagate_fake(gm, fake)
    gm.graph.find_nodes(op="call_function", target=operator.getitem)[0].meta["val"] = as_on_cuda(
        gm.graph.call_function(SDPA, (q, kernel.args[1], kernel.args[2])))  # the kernel's own layout
    drop_dead_nodes(gm.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rolled-back pass warns
        result = run_pass(gm, PassContext(options=CompileOptions(), fake_mode=fake), "attention_fusion")
    assert result.error is None
    sdpa = gm.graph.find_nodes(op="call_function", target=SDPA)[0]
    assert sdpa.kwargs.get("enable_gqa") and [n.target for n in sdpa.users] == [aten.transpose.int]
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(gm(q, k, v)[0], expected.transpose(1, 2).reshape(2, 16, 32))


class ScaledQuery(nn.Module):
    """HF Whisper's self-attention: q_proj(x) * head_dim ** -0.5, then SDPA with scale=1.0; `shared` also
    returns the scaled query (a near-miss: the multiply must stay)."""

    def __init__(self, factor: float = 8 ** -0.5, shared: bool = False) -> None:
        super().__init__()
        self.factor, self.shared = factor, shared
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        scaled = self.q(x) * self.factor
        q = heads(scaled, 2).contiguous()
        out = F.scaled_dot_product_attention(q, heads(self.k(x), 2), heads(self.v(x), 2), scale=1.0)
        out = out.transpose(1, 2).reshape(x.shape)
        return (out, scaled) if self.shared else out


@pytest.mark.parametrize("factor", [8 ** -0.5, 0.3])
def test_query_scaling_becomes_sdpa_scale(factor):
    _, report = compile_and_check(ScaledQuery(factor).eval(), torch.randn(2, 5, 16))
    g = report.graphs[0]
    assert g.count(aten.mul) == 0 and g.count(SDPA) == 1
    assert any("query's scaling" in c for c in g.pass_result("attention_fusion").changes)


def test_query_scaling_read_elsewhere_stays():
    _, report = compile_and_check(ScaledQuery(shared=True).eval(), torch.randn(2, 5, 16))
    g = report.graphs[0]
    assert g.count(aten.mul) == 1 and g.count(SDPA) == 1


def test_cuda_sdpa_kernel_keeps_its_output_layout_for_the_view_after_it():
    """The CUDA kernels write [B, H, S, D] laid out as [B, S, H, D]; HF's transpose(1, 2) + view(B, S, H * D)
    relies on it (no copy in the traced graph). The canonical op gets that layout back with one copy, so the
    view stays valid (before: the pass was rolled back on every HF Llama prefill on the GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from mmaccel.compiler.options import CompileOptions
    from mmaccel.passes.contract import PassContext

    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    kernel = graph.call_function(aten._scaled_dot_product_efficient_attention.default, (q, k, v, None, False))
    out = graph.call_function(operator.getitem, (kernel, 0))
    heads_inner = graph.call_function(aten.transpose.int, (out, 1, 2))
    graph.output((graph.call_function(aten.view.default, (heads_inner, [2, 16, 32])),))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    fake = FakeTensorMode()
    for node in gm.graph.find_nodes(op="placeholder"):
        node.meta["val"] = fake.from_tensor(torch.randn(2, 4, 16, 8))
    from mmaccel.passes.meta import propagate_fake
    propagate_fake(gm, fake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rolled-back pass warns
        result = run_pass(gm, PassContext(options=CompileOptions(), fake_mode=fake), "attention_fusion")
    assert result.matched == 1 and result.error is None
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(SDPA) == 1 and targets.count(aten.clone.default) == 1
    assert aten._scaled_dot_product_efficient_attention.default not in targets
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 16, 32)
    torch.testing.assert_close(gm(q, k, v)[0], expected)
