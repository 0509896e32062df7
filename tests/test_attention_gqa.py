"""attention_fusion on grouped-query and multi-query attention (fewer K/V heads than query heads).

Every attention, explicit or already SDPA, that reads K/V with each head repeated for its group of query
heads (HF's repeat_kv, repeat_interleave) must end as one `scaled_dot_product_attention(q, k, v, ...,
enable_gqa=True)` on the shared K/V heads, the repeat gone; a backend SDPA kernel that already takes the
shared heads (HF "sdpa" with `enable_gqa=True`) must keep saying so. Other repeats stay, with the reason in
the report. Runs on the eager target (the ONNX and Triton targets are tested where they consume the form).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("transformers")
from hf_tiny import LAYERS, decoder, token_batch  # noqa: E402

from conftest import compile_and_check  # noqa: E402

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
EAGER = {"target": "eager"}


def sdpa_calls(report) -> list[torch.fx.Node]:
    return [n for g in report.graphs for n in g.final_graph.graph.nodes if n.target is SDPA]


def assert_shared_heads(report, q_heads: int, kv_heads: int) -> None:
    """Each SDPA reads K/V with their own head count (no repeat), enable_gqa said when it is fewer than the
    query's."""
    calls = sdpa_calls(report)
    assert len(calls) == LAYERS * len(report.graphs), str(report)
    for n in calls:
        q, k, v = (a.meta["val"] for a in n.args[:3])
        assert (q.shape[1], k.shape[1], v.shape[1]) == (q_heads, kv_heads, kv_heads), n.format_node()
        assert n.kwargs.get("enable_gqa", False) == (kv_heads < q_heads), n.format_node()


# grouped-query on each Llama-family architecture, multi-query (1 K/V head) on one of them
HF_CASES = [("llama", 2), ("mistral", 2), ("qwen2", 2), ("llama", 1)]


@pytest.mark.parametrize("arch,kv_heads", HF_CASES, ids=[f"{a}-{'mqa' if k == 1 else 'gqa'}" for a, k in HF_CASES])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_grouped_query_attention(arch: str, impl: str, kv_heads: int) -> None:
    """Without a padding mask HF "sdpa" passes the shared heads with enable_gqa=True; "eager" writes
    repeat_kv then softmax(QK^T)V."""
    ids, _ = token_batch(2, 9)
    _, report = compile_and_check(decoder(arch, impl, kv_heads), ids, **EAGER)
    assert report.graphs[0].pass_result("attention_fusion").matched == LAYERS
    assert not report.graphs[0].pass_result("attention_fusion").near_misses
    assert_shared_heads(report, 4, kv_heads)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_grouped_query_attention_with_padding_mask(impl: str) -> None:
    """With a mask HF "sdpa" writes repeat_kv out before SDPA; the pass drops the repeat for enable_gqa."""
    ids, mask = token_batch(2, 9, padded_from=6)
    _, report = compile_and_check(decoder("llama", impl, 2), ids, mask, **EAGER)
    assert_shared_heads(report, 4, 2)
    assert all(n.kwargs.get("attn_mask") is not None for n in sdpa_calls(report))


def test_hf_grouped_query_attention_dynamic_sequence() -> None:
    ids, mask = token_batch(2, 8, padded_from=5)
    compiled, report = compile_and_check(decoder("qwen2", "eager", 2), ids, mask, dynamic=True, **EAGER)
    assert_shared_heads(report, 4, 2)


def repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """HF's repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n, S, D], head h reading head h // n."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class GroupedAttention(nn.Module):
    """q [2, 4, 6, 8] and k, v [2, Hkv, 6, 8]; `form` picks how K/V reach the attention."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[1] // k.shape[1]
        if self.form == "sdpa_enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        if self.form == "sdpa_repeat_kv":
            causal = torch.ones(6, 6, dtype=torch.bool).tril()
            return F.scaled_dot_product_attention(q, repeat_heads(k, n), repeat_heads(v, n), attn_mask=causal)
        if self.form == "repeat_interleave":
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        elif self.form == "repeat_kv":
            k, v = repeat_heads(k, n), repeat_heads(v, n)
        # near-misses: attention still fused, the repeat stays
        elif self.form == "tiled":  # head h reads h % Hkv: not enable_gqa's grouping
            k, v = k.repeat(1, n, 1, 1), v.repeat(1, n, 1, 1)
        elif self.form == "tiled_expand":
            b, h, s, d = k.shape
            k, v = (t[:, None].expand(b, n, h, s, d).reshape(b, n * h, s, d) for t in (k, v))
        elif self.form == "sequence_repeat":  # each key position twice: a repeat over a non-head dim
            b, h, s, d = k.shape
            k, v = (t[:, :, :, None].expand(b, h, s, 2, d).reshape(b, h, 2 * s, d) for t in (k, v))
        elif self.form == "k_only":  # V already has every head
            k, v = repeat_heads(k, n), v.repeat_interleave(n, dim=1) + 1
        else:
            raise ValueError(self.form)
        return torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1) @ v


def qkv(kv_heads: int) -> tuple[torch.Tensor, ...]:
    """q [2, 4, 6, 8], k and v [2, kv_heads, 6, 8]."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, h, 6, 8, generator=g) for h in (4, kv_heads, kv_heads))


@pytest.mark.parametrize("form", ["repeat_kv", "repeat_interleave", "sdpa_repeat_kv", "sdpa_enable_gqa"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_forms_share_kv_heads(form: str, kv_heads: int) -> None:
    _, report = compile_and_check(GroupedAttention(form), *qkv(kv_heads), **EAGER)
    result = report.graphs[0].pass_result("attention_fusion")
    assert result.matched == 1 and not result.near_misses
    (sdpa,) = sdpa_calls(report)
    assert sdpa.kwargs.get("enable_gqa") is True
    assert [a.meta["val"].shape[1] for a in sdpa.args[:3]] == [4, kv_heads, kv_heads]
    assert report.graphs[0].count(aten.expand) == 0 and report.graphs[0].count(aten.repeat) == 0


@pytest.mark.parametrize("form,kv_heads,reason", [
    ("tiled", 2, "K/V are tiled with repeat([1, 2, 1, 1])"),
    ("tiled_expand", 2, "K/V heads are tiled (head h reads h % Hkv)"),
    ("sequence_repeat", 4, "K/V are repeated along dim -2 of [2, 4, 6, 8], not the heads"),
    ("k_only", 2, "K and V are not repeated alike"),
])
def test_other_repeats_stay_with_reason(form: str, kv_heads: int, reason: str) -> None:
    _, report = compile_and_check(GroupedAttention(form), *qkv(kv_heads), **EAGER)
    result = report.graphs[0].pass_result("attention_fusion")
    (sdpa,) = sdpa_calls(report)
    assert result.matched == 1 and not sdpa.kwargs.get("enable_gqa")
    assert [m for m in result.near_misses if f"K/V stay repeated: {reason}" in m], result.near_misses
    assert "K/V stay repeated" in str(report)


def test_grouped_query_idempotent() -> None:
    from mmaccel.passes.pipeline import run_pass

    _, report = compile_and_check(GroupedAttention("repeat_kv"), *qkv(2), **EAGER)
    g = report.graphs[0]
    again = run_pass(g.final_graph, g.context, "attention_fusion")
    assert again.error is None and again.matched == 0 and not again.near_misses


@pytest.mark.parametrize("rows,copied", [(1, False), (4, True)])
def test_kernel_layout_is_copied_only_where_it_differs(rows, copied):
    """A CUDA SDPA kernel's output [B, H, L, D] sits in [B, L, H, D] storage, which HF's view after it relies on;
    the canonical op's is contiguous. At one query row (decode) both lay the elements out alike, whatever stride
    the size-1 dim has: no copy kernel there (the registry's grouped-query decode step had one per layer on an
    H200); at several rows the copy that makes the kernel's layout stays."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from mmaccel.passes.attention import _with_layout

    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    sdpa = graph.call_function(SDPA, (q, k, v))
    graph.output(sdpa)
    with FakeTensorMode():
        q.meta["val"] = torch.empty(1, 8, rows, 16)
        k.meta["val"] = v.meta["val"] = torch.empty(1, 8, 32, 16)
        want = torch.empty(1, rows, 8, 16).transpose(1, 2)  # the kernel's layout
    out = _with_layout(graph, sdpa, want)
    assert (out is not sdpa) == copied
    if copied:
        assert out.target is aten.transpose.int and out.args[0].target is aten.clone.default
