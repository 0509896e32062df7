"""The HF transformers architectures users compile first: CLIP vision, BERT, Llama, Whisper encoder.

Every model is built from a tiny config with random weights (no downloads). Each one runs under the
backend and must match eager with no fallback. With `attn_implementation="eager"` the model writes
attention out (matmul, scale, mask, softmax, matmul): attention_fusion must turn each layer's attention
into scaled_dot_product_attention. With the default "sdpa" the model already calls SDPA and only
correctness (and the linear fusions) is checked.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("transformers")
from hf_tiny import LAYERS, bert, clip_vision, llama, token_batch, whisper_encoder  # noqa: E402

import mmaccel  # noqa: E402

from conftest import assert_matches_eager, assert_optimized, compile_and_check  # noqa: E402

aten = torch.ops.aten
IMPLEMENTATIONS = ["eager", "sdpa"]


def total_matched(report: mmaccel.CompileReport, pass_name: str) -> int:
    return sum(g.pass_result(pass_name).matched for g in report.graphs)


def assert_fusions(report: mmaccel.CompileReport, impl: str) -> None:
    """Every graph: explicit attention (eager implementation) fused into SDPA, one per layer, no softmax
    left; the separate q/k/v projections fused into one matmul per layer."""
    for g in report.graphs:
        assert g.pass_result("parallel_linear_fusion").matched >= LAYERS, f"graph {g.index}:\n{report}"
        if impl == "eager":
            assert g.pass_result("attention_fusion").matched == LAYERS, f"graph {g.index}:\n{report}"
            assert g.count(aten.scaled_dot_product_attention) == LAYERS
            assert g.count(aten._softmax) == 0, f"graph {g.index}: a softmax was left unfused"
    if impl == "eager":
        assert total_matched(report, "attention_fusion") > 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_clip_vision(impl: str) -> None:
    model = clip_vision(impl)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, report = compile_and_check(model, pixels)
    assert len(report.graphs) == 1
    assert_fusions(report, impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bert_with_padding_mask(impl: str) -> None:
    model = bert(impl)
    ids, mask = token_batch(2, 10, padded_from=6)
    _, report = compile_and_check(model, ids, mask)
    assert len(report.graphs) == 1
    assert_fusions(report, impl)
    # The padding mask must reach the fused attention (a dropped mask would still be a plausible output).
    if impl == "eager":
        sdpa = [n for n in report.graphs[0].final_graph.graph.nodes
                if n.target is aten.scaled_dot_product_attention.default]
        assert all(n.kwargs.get("attn_mask") is not None for n in sdpa)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_llama_prompt_forward(impl: str) -> None:
    model = llama(impl)
    ids, _ = token_batch(2, 9)
    _, report = compile_and_check(model, ids)
    assert len(report.graphs) == 1
    assert_fusions(report, impl)
    # q/k/v and gate/up: two parallel groups per layer.
    assert report.graphs[0].pass_result("parallel_linear_fusion").matched == 2 * LAYERS


# in the opt-in long set (-m coverage, 12 and 14 s; CI time): tests/test_generation.py runs HF Llama's cache path
# against HF eager (its compiled recipe and mmaccel.generate)
@pytest.mark.coverage
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_greedy_generate_with_kv_cache(impl: str) -> None:
    """model.generate with the forward compiled: prefill, then decode steps reading and growing the
    DynamicCache. Left padding puts a real mask on every step. Tokens and per-step logits match eager,
    with no graph breaks and no recompile storm: prefill, the first decode step, then one decode graph
    (automatic dynamic shapes) for every later cache length."""
    model = llama(impl, use_cache=True)
    ids, mask = token_batch(2, 7)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding: the first row's prompt is 5 tokens
    generate = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                    return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **generate)
        compiled = mmaccel.compile(model.forward)
        model.forward = compiled
        counters.clear()
        actual = model.generate(ids, **generate)
    assert torch.equal(actual.sequences, expected.sequences)
    assert_matches_eager(actual.logits, expected.logits)
    report = compiled.mmaccel_report
    assert_optimized(report)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(report.graphs) <= 3, str(report)
    assert_fusions(report, impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_whisper_encoder(impl: str) -> None:
    model = whisper_encoder(impl)
    # Whisper's encoder takes exactly 2 * max_source_positions mel frames.
    features = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(1))
    _, report = compile_and_check(model, features)
    assert len(report.graphs) == 1
    assert_fusions(report, impl)


def test_string_backend_bert() -> None:
    """torch.compile(model, backend="mmaccel"): the entry point, no mmaccel.compile."""
    model = bert("eager")
    ids, mask = token_batch(2, 10, padded_from=4)
    with torch.no_grad(), mmaccel.collect_reports() as report:
        expected = model(ids, attention_mask=mask)
        actual = torch.compile(model, backend="mmaccel")(ids, attention_mask=mask)
    assert_matches_eager(actual, expected)
    assert len(report.graphs) == 1
    assert_optimized(report)
    assert_fusions(report, "eager")


def prompt(name: str, seq: int) -> tuple[torch.Tensor, ...]:
    """BERT: ids and a padding mask (last row padded); Llama: ids."""
    ids, mask = token_batch(2, seq, padded_from=seq - 3)
    return (ids, mask) if name == "bert" else (ids,)


# In the opt-in long set (-m coverage, 12 and 17 s; CI time): by default, HF decoders meet new lengths in
# tests/test_attention_gqa.py (dynamic sequence, grouped heads) and tests/test_generation.py (20 random calls)
@pytest.mark.coverage
@pytest.mark.parametrize(("name", "impl"), [("bert", "eager"), ("llama", "sdpa")])
def test_dynamic_sequence_length(name: str, impl: str) -> None:
    """dynamic=True: one graph with a symbolic sequence length serves two prompt lengths."""
    model = bert(impl) if name == "bert" else llama(impl)
    counters.clear()
    compiled, report = compile_and_check(model, *prompt(name, 8), dynamic=True)
    assert len(report.graphs) == 1
    with torch.no_grad():
        second = prompt(name, 13)
        assert_matches_eager(compiled(*second), model(*second))
    assert len(report.graphs) == 1, f"the second length recompiled:\n{report}"
    assert counters["stats"]["unique_graphs"] == 1
    assert_optimized(report)
    assert report.graphs[0].pass_result("parallel_linear_fusion").matched >= LAYERS


# In the opt-in long set (-m coverage; BERT 10 s, Llama 28 s; CI time), like test_dynamic_sequence_length; the
# float-scale-as-tensor case of Llama's attention is checked here only
@pytest.mark.coverage
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_attention_fusion_with_dynamic_shapes(name: str) -> None:
    """The eager attention of HF models still fuses when the sequence length is symbolic. Under
    dynamic=True Dynamo turns the module's float `self.scaling` into a 0-d float64 graph input instead of
    a constant, so the scale the pass sees is a tensor."""
    model = bert("eager") if name == "bert" else llama("eager")
    _, report = compile_and_check(model, *prompt(name, 8), dynamic=True)
    assert_fusions(report, "eager")


def test_output_attentions_is_a_near_miss_named_by_layer() -> None:
    """output_attentions=True returns the probabilities SDPA never forms: each layer's attention stays
    explicit, and explain says so per layer."""
    model = llama("eager")
    ids, _ = token_batch(2, 9)
    with torch.no_grad():
        expected = model(ids, output_attentions=True)
        compiled = mmaccel.compile(model, target="eager")
        assert_matches_eager(compiled(ids, output_attentions=True), expected)
    report = compiled.mmaccel_report
    assert_optimized(report)
    misses = report.graphs[0].pass_result("attention_fusion").near_misses
    assert [m.split(" (")[0] for m in misses] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)], misses
    assert all("the attention probabilities are used elsewhere too" in m for m in misses)
    assert "model.layers.1.self_attn" in str(report)
