"""The backend's contract: options and errors, the entry point, fallbacks with one warning, dynamic
shapes, frozen-weight safety, debug dumps and the explain report."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmaccel
from mmaccel.compiler import errors

from conftest import assert_matches_eager, assert_optimized, compile_and_check


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


@pytest.fixture(autouse=True)
def _every_warning_visible():
    """warn_once dedups per process; tests that expect a warning need a clean slate."""
    errors._warned.clear()
    yield


# ---- options and errors -------------------------------------------------------------------------

@pytest.mark.parametrize("options,needle", [
    ({"targte": "eager"}, "targte"),
    ({"target": "tpu"}, "'target'"),
    ({"passes": {"no_such_pass": False}}, "no_such_pass"),
    ({"passes": ["attention_fusion", "bogus"]}, "bogus"),
    ({"passes": {"attention_fusion": "off"}}, "True/False"),
    ({"passes": 3}, "dict"),
    ({"debug_dir": 5}, "debug_dir"),
])
def test_bad_options_raise_value_error_naming_the_option(options, needle):
    with pytest.raises(ValueError, match=needle) as info:
        mmaccel.compile(TinyMLP(), **options)
    assert "valid" in str(info.value) or "must" in str(info.value) or "True/False" in str(info.value)
    # the torch.compile spelling raises the same ValueError, at the first call
    compiled = torch.compile(TinyMLP(), backend="mmaccel", options=options)
    with pytest.raises(ValueError, match=needle):
        compiled(torch.randn(2, 8))


def test_unsupported_mode_is_refused():
    compiled = torch.compile(TinyMLP(), backend="mmaccel", mode="reduce-overhead")
    with pytest.raises(ValueError, match="mode"):
        compiled(torch.randn(2, 8))


def test_string_backend_with_options_matches_eager():
    model = TinyMLP().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = torch.compile(model, backend="mmaccel", options={"target": "eager", "passes": {"constant_folding": False}})(x)
        assert_matches_eager(out, model(x))


def test_entry_point_registers_backend_without_import(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, backend="mmaccel")
        torch.manual_seed(0)
        x = torch.randn(4)
        # ONNX Runtime's erf differs from PyTorch's by up to ~1e-6 (beyond allclose's default atol of 1e-8)
        assert torch.allclose(f(x), torch.nn.functional.gelu(x) * 2, atol=1e-5)
        assert "mmaccel" in torch._dynamo.list_backends()
        print("ok", "mmaccel" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok True"  # loaded lazily by Dynamo, not imported by the user


# ---- fallbacks ----------------------------------------------------------------------------------

def test_gradients_required_falls_back_with_one_warning_and_still_trains():
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(3, 8)
    compiled = mmaccel.compile(model)
    with pytest.warns(mmaccel.MmaccelFallbackWarning, match="gradients are required"):
        out = compiled(x)
    assert_matches_eager(out, model(x))
    out.sum().backward()
    assert model.fc1.weight.grad is not None
    assert compiled.mmaccel_report.graphs[0].status == "fallback"
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmaccel.MmaccelFallbackWarning)
        torch._dynamo.reset()
        mmaccel.compile(TinyMLP())(x)  # same reason again: no second warning


def test_lowering_failure_falls_back_to_correct_graph(monkeypatch):
    from mmaccel.compiler import backend

    def explode(*args, **kwargs):
        raise NotImplementedError("construct X is not supported")

    monkeypatch.setattr(backend, "lower_with_aot", explode)
    model = TinyMLP().eval()
    x = torch.randn(2, 8)
    with torch.no_grad(), pytest.warns(mmaccel.MmaccelFallbackWarning, match="construct X"):
        compiled = mmaccel.compile(model)
        assert_matches_eager(compiled(x), model(x))
    g = compiled.mmaccel_report.graphs[0]
    assert g.status == "fallback" and "NotImplementedError" in g.reason


def test_changed_weights_are_never_served_stale():
    torch.manual_seed(0)
    model = TinyMLP().eval()
    x = torch.randn(2, 8)
    compiled, _ = compile_and_check(model, x)
    with torch.no_grad():
        model.fc1.weight.mul_(2.0)  # in-place update after compile
        with pytest.warns(mmaccel.MmaccelFallbackWarning, match="frozen at compile time have changed"):
            out = compiled(x)
        assert_matches_eager(out, model(x))
        model.load_state_dict(TinyMLP().state_dict())
        assert_matches_eager(compiled(x), model(x))
        model.fc2.weight = nn.Parameter(torch.randn(8, 16))  # replaced parameter
        assert_matches_eager(compiled(x), model(x))



class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(torch.relu(self.fc(x)) + x)


class _BrokenLoop(nn.Module):
    """A graph break inside the loop over blocks: Dynamo compiles the block's forward as a frame of its own and
    serves every block from that one graph, each block's parameters as its inputs (Qwen2-VL's vision blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return x


def test_one_graph_serving_several_layers_is_not_taken_for_changed_weights():
    """The graph froze the first block's weights; the other blocks' calls bring their own: they run unfrozen on
    their weights with one warning saying so, and the graph is not retired as stale (before: "weights frozen at
    compile time have changed", a reset advised that changes nothing, and every later call unoptimized). An
    in-place update of the frozen weights still retires it."""
    errors._warned.clear()
    torch.manual_seed(0)
    model = _BrokenLoop().eval()
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mmaccel.Backend(target="eager"))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, mmaccel.collect_reports() as report:
        warnings.simplefilter("always")
        for _ in range(2):
            assert_matches_eager(compiled(x), model(x))
    messages = [str(w.message) for w in caught]
    assert sum("other weights than those it froze" in m for m in messages) == 1
    assert not any("have changed since" in m for m in messages)
    assert "stale" not in {g.status for g in report.graphs}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, mmaccel.collect_reports() as report:
        warnings.simplefilter("always")
        model.blocks[0].fc.weight.mul_(2.0)
        assert_matches_eager(compiled(x), model(x))
    assert any("have changed since" in str(w.message) for w in caught)


# ---- dynamic shapes -----------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = (p(x).view(b, s, self.h, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) * (c // self.h) ** -0.5
        return self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, c))


def _run_lengths(compiled, model, lengths):
    with torch.no_grad():
        for s in lengths:
            x = torch.randn(2, s, 16)
            assert_matches_eager(compiled(x), model(x))


def test_dynamic_true_one_graph_for_all_lengths():
    model = Attention().eval()
    compiled = mmaccel.compile(model, dynamic=True)
    _run_lengths(compiled, model, [3, 7, 12])
    report = compiled.mmaccel_report
    assert_optimized(report)
    assert len(report.graphs) == 1 and report.graphs[0].matched("attention_fusion") == 1
    assert any("SymInt" in i for i in report.graphs[0].inputs)


def test_mark_dynamic():
    model = Attention().eval()
    compiled = mmaccel.compile(model)
    x = torch.randn(2, 5, 16)
    torch._dynamo.mark_dynamic(x, 1)
    with torch.no_grad():
        assert_matches_eager(compiled(x), model(x))
    _run_lengths(compiled, model, [6, 9])
    assert len(compiled.mmaccel_report.graphs) == 1


def test_automatic_dynamic_after_one_recompile():
    model = Attention().eval()
    compiled = mmaccel.compile(model)  # dynamic=None: static first, dynamic after a size changes
    _run_lengths(compiled, model, [4, 6, 9, 11])
    graphs = compiled.mmaccel_report.graphs
    assert len(graphs) == 2
    assert not any("SymInt" in i for i in graphs[0].inputs) and any("SymInt" in i for i in graphs[1].inputs)
    assert all(g.matched("attention_fusion") == 1 for g in graphs)


# ---- reports and debugging ----------------------------------------------------------------------

def test_two_compiles_of_one_model_keep_their_own_reports():
    """mmaccel.compile twice on one module (two targets, say): each result reports its own graphs. torch's
    OptimizedModule forwards a plain setattr to the user's module, so the second compile used to replace the first
    one's report, which then named the second's target."""
    model = Attention().eval()
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        first = mmaccel.compile(model, target="eager")
        first(x)
        second = mmaccel.compile(model, target="eager", passes={"attention_fusion": False})
        second(x)
    assert first.mmaccel_report is not second.mmaccel_report
    assert [g.target for g in first.mmaccel_report.graphs] == ["eager"]
    assert first.mmaccel_report.graphs[0].pass_result("attention_fusion").matched == 1
    assert "attention_fusion" not in [p.name for p in second.mmaccel_report.graphs[0].passes]
    assert not hasattr(model, "mmaccel_report")


def test_explain_reports_graphs_breaks_passes_and_target():
    model = Attention().eval()

    def with_break(x):
        y = model(x)
        torch._dynamo.graph_break()
        return model(y)

    with torch.no_grad():
        report = mmaccel.explain(with_break, torch.randn(1, 4, 16))
    assert len(report.graphs) == 2 and sum(report.graph_breaks.values()) >= 1
    text = str(report)
    for needle in ("graph break", "attention_fusion", "parallel_linear_fusion", "linear_epilogue_fusion",
                   "target: onnxruntime (auto on cpu)", "scaled_dot_product_attention", "frozen weights"):
        assert needle in text, needle
    d = report.to_dict()
    assert d["graphs"][0]["passes"][0]["name"] == "dead_code_elimination"


def test_debug_dir_dumps_every_stage(tmp_path):
    with torch.no_grad():
        mmaccel.compile(TinyMLP().eval(), debug_dir=str(tmp_path))(torch.randn(2, 8))
    (run,) = list(tmp_path.iterdir())
    files = sorted(os.listdir(run / "graph_000"))
    assert files[0].endswith("_dynamo.py") and files[1].endswith("_aten.py")
    assert any("after_linear_epilogue_fusion" in f for f in files)
    assert "fused_linear" in (run / "graph_000" / files[-1]).read_text()


def test_mmaccel_debug_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("MMACCEL_DEBUG", "1")
    monkeypatch.chdir(tmp_path)
    with torch.no_grad():
        mmaccel.compile(TinyMLP().eval())(torch.randn(2, 8))
    assert list((tmp_path / "mmaccel_debug").glob("*/graph_000/*_aten.py"))


def test_inference_mode_and_no_grad_both_optimize():
    model = TinyMLP()
    x = torch.randn(2, 8)
    for ctx in (torch.no_grad, torch.inference_mode):
        torch._dynamo.reset()
        compiled = mmaccel.compile(model)
        with ctx():
            assert_matches_eager(compiled(x), model(x))
        assert_optimized(compiled.mmaccel_report)


# ---- eager target ---------------------------------------------------------------------------------

class Cache(nn.Module):
    def __init__(self, read_old: bool = False):
        super().__init__()
        self.read_old = read_old
        self.register_buffer("k", torch.zeros(1, 2, 16, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x, pos):
        old = self.k.sum() if self.read_old else 0  # a read of the cache before the write: keep it functional
        self.k.index_copy_(2, pos, self.proj(x))
        return self.k.sum(-1) + old


@pytest.mark.parametrize("read_old,expected", [(False, 1), (True, 0)])
def test_eager_target_writes_kv_cache_in_place(read_old, expected):
    import copy

    from mmaccel.backends.common import reinplace_input_updates
    from mmaccel.passes.graph import clone_module

    model = Cache(read_old).eval()
    eager_model = copy.deepcopy(model)
    compiled = mmaccel.compile(model, target="eager")
    with torch.no_grad():
        for p in (3, 4):
            x, pos = torch.randn(1, 2, 1, 4), torch.tensor([p])
            assert_matches_eager(compiled(x, pos), eager_model(x, pos))
            torch.testing.assert_close(model.k, eager_model.k)
    graph = compiled.mmaccel_report.graphs[0].final_graph
    assert reinplace_input_updates(clone_module(graph)) == expected


def test_onnxruntime_session_failure_falls_back_to_eager_target(monkeypatch):
    import onnxruntime as ort

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for MatMul(13)")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    model = TinyMLP().eval()
    x = torch.randn(2, 8)
    with torch.no_grad(), pytest.warns(mmaccel.MmaccelFallbackWarning, match="NOT_IMPLEMENTED"):
        compiled = mmaccel.compile(model, target="onnxruntime")
        assert_matches_eager(compiled(x), model(x))
    g = compiled.mmaccel_report.graphs[0]
    assert g.status == "optimized" and g.target == "eager"


def test_onnxruntime_target_leaves_bfloat16_graphs_to_eager():
    emb = torch.nn.Embedding(11, 4).to(torch.bfloat16).eval()  # int64 in, bf16 out: numpy has no bf16
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), pytest.warns(mmaccel.MmaccelFallbackWarning, match="bfloat16"):
        compiled = mmaccel.compile(emb, target="onnxruntime")
        assert_matches_eager(compiled(ids), emb(ids))
    assert compiled.mmaccel_report.graphs[0].target == "eager"
