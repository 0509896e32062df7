"""Every reference model (tiny) compiled with mmaccel against eager: prefill and decode, two sizes
through one compiled artifact under dynamic shapes, KV-cache writes preserved."""
from __future__ import annotations

import copy

import pytest
import torch

import mmaccel
from mmaccel.models import build, example_inputs

from conftest import assert_matches_eager, assert_optimized

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# (name, first size, second size, which argument varies): sizes avoid the tiny models' fixed dims
# (Dynamo would specialize a length equal to one).
CASES = [
    # vit and chameleon in the opt-in long set (-m coverage, 10 and 8 s; CI time): the Triton target's tests run both
    pytest.param("vit", dict(batch=2), dict(batch=3), marks=pytest.mark.coverage),  # batch 1: 0/1 specialization
    pytest.param("vlm_prefill", dict(seq=5), dict(seq=9), marks=pytest.mark.coverage),  # 12 s; Triton tests run it
    ("vlm_decode", dict(seq=5), dict(seq=9)),
    pytest.param("whisper_encoder", dict(seq=20), dict(seq=28), marks=pytest.mark.coverage),  # 9 s; CI time
    # in the opt-in long set (-m coverage, 9 s; CI time): Whisper's decoder runs in tests/test_generation.py
    pytest.param("whisper_decoder", dict(seq=5), dict(seq=9), marks=pytest.mark.coverage),
    pytest.param("chameleon", dict(seq=5), dict(seq=9), marks=pytest.mark.coverage),
]


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("name,first,second", CASES, ids=[(c.values if hasattr(c, "values") else c)[0] for c in CASES])
def test_reference_model_matches_eager_across_sizes(name, first, second):
    torch.manual_seed(0)
    model, inputs = build(name, **first)
    eager_model = copy.deepcopy(model)  # KV caches are written in place: keep two identical copies
    compiled = mmaccel.compile(model, dynamic=True)
    report = compiled.mmaccel_report
    with torch.no_grad():
        for size in (first, second):
            args = inputs if size is first else example_inputs(name, model, **size)
            assert_matches_eager(compiled(*args), eager_model(*args))
            # in-place cache writes happened exactly as in eager
            for (k, got), (_, want) in zip(_buffers(model).items(), _buffers(eager_model).items()):
                torch.testing.assert_close(got, want, msg=f"buffer {k} differs after compiled call")
    assert_optimized(report)
    assert len(report.graphs) == 1, f"second size recompiled: {[g.inputs for g in report.graphs]}"
    g = report.graphs[0]
    if name != "vlm_decode":  # a decode step has static shapes; only the position (a tensor) moves
        assert any("SymInt" in i for i in g.inputs), "sizes must stay symbolic"
    assert g.matched("attention_fusion") >= 2, "each tiny model has 2 layers of explicit attention"
    assert g.count(SDPA) == g.matched("attention_fusion")
    assert g.matched("parallel_linear_fusion") >= 2
    assert g.matched("linear_epilogue_fusion") >= 4


# in the opt-in long set (-m coverage, 11 s; CI time): tests/test_generation.py generates from HF LLaVA by default
@pytest.mark.coverage
def test_vlm_generate_tokens_and_logits_match_eager():
    torch.manual_seed(0)
    model, (pixels, ids, _) = build("vlm_prefill", seq=6)
    vlm = model.vlm
    eager_tokens, eager_logits = vlm.generate(pixels, ids, max_new_tokens=4)
    vlm.setup_cache(1)
    prefill = mmaccel.compile(vlm.prefill, dynamic=True)
    decode = mmaccel.compile(vlm.decode)
    tokens, logits = vlm.generate(pixels, ids, max_new_tokens=4, prefill_fn=prefill, decode_fn=decode)
    torch.testing.assert_close(tokens, eager_tokens)
    for got, want in zip(logits, eager_logits):
        assert_matches_eager(got, want)
    assert_optimized(prefill.mmaccel_report)
    assert_optimized(decode.mmaccel_report)
    assert len(decode.mmaccel_report.graphs) == 1, "decoding at new positions must not recompile"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoder_half_precision(dtype):
    torch.manual_seed(0)
    model, inputs = build("vlm_decode", dtype=dtype)
    eager_model = copy.deepcopy(model)
    compiled = mmaccel.compile(model)
    with torch.no_grad():
        # fp32 logits computed in half precision: fused SDPA and eager's fp32 softmax round differently
        assert_matches_eager(compiled(*inputs), eager_model(*inputs), scale_atol=2.0, compute_dtype=dtype)
    assert_optimized(compiled.mmaccel_report)
