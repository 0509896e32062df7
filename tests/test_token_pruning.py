"""tokens="prune" (compiler/token_pruning.py): each image keeps the tokens the last prompt position attends to
most at the language model's layer 2, against a hand-written reference on tiny HF LLaVA (16 image tokens)."""
from __future__ import annotations

import pytest
import torch

import mmaccel
from mmaccel.compiler.token_pruning import SCORE_LAYER, PruneLever
from tests import hf_tiny
from tests.conftest import relative_error
from tests.test_generation import one_thread  # noqa: F401 (autouse: tiny matmuls on one thread)
from tests.test_resolution import full_resolution_logits, prompts

TOKEN = hf_tiny.IMAGE_TOKEN
NEW = 5


def options(**extra) -> dict:
    return {"target": "eager", "tokens": "prune", **extra}


def reference_prompt(model, ids, mask, pixels, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FastV's ranking written out on HF's own eager attention: the probabilities layer SCORE_LAYER's last
    query pays each key (output_attentions), mean over heads; each image's `keep` best, in order; the prompt's
    embeddings (HF's hidden_states[0]: image features in place) at the kept positions, rows left-padded."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True,
                    output_hidden_states=True, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    model.set_attn_implementation("sdpa")
    scores = out.attentions[SCORE_LAYER - 1][:, :, -1].mean(1)  # [B, L]
    rows = []
    for row_ids, row_mask, row_scores, embeds in zip(ids, mask, scores, out.hidden_states[0]):
        image = (row_ids == TOKEN).nonzero()[:, 0]
        best = image[row_scores[image].topk(keep).indices]
        kept = torch.cat([(row_ids != TOKEN).nonzero()[:, 0], best]).sort().values
        rows.append((embeds[kept], row_mask[kept]))
    length = max(len(e) for e, _ in rows)
    embeds = torch.stack([torch.cat([e.new_zeros(length - len(e), e.shape[1]), e]) for e, _ in rows])
    mask = torch.stack([torch.cat([m.new_zeros(length - len(m)), m]) for _, m in rows])
    return embeds, mask


def test_kept_tokens_equal_the_reference_and_generate_equals_hf_on_them() -> None:
    """It fires (8 of 16 tokens per image, the prompt bucket 24 -> 16), the tokens equal HF eager generate's on
    the reference's pruned embeddings, the first token's error is the reported one, and a second call
    compiles nothing (the scoring pass, prefill and decode: one graph each)."""
    model = hf_tiny.llava()
    ids, mask = prompts(16)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    embeds, short_mask = reference_prompt(model, ids, mask, pixels, keep=8)
    with torch.no_grad():
        expected = model.generate(inputs_embeds=embeds, attention_mask=short_mask, max_new_tokens=NEW,
                                  do_sample=False, pad_token_id=0)
    chosen = options(tokens={"prune": [0.5, 0.75]}, accuracy_budget=0.99)
    out = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=NEW, pad_token_id=0,
                           options=chosen)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert torch.equal(out[:, ids.shape[1]:], expected)
    report = mmaccel.generation_report(model, **chosen)
    assert report.tokens["keep"] == "50%" and report.tokens["image tokens per image"] == [16, 8]
    assert [c["keep"] for c in report.tokens["candidates"]] == [0.5, 0.75]
    assert report.graphs[0][1]["prompt"] == 16  # 24 positions without the lever
    with torch.no_grad():
        pruned = model(inputs_embeds=embeds, attention_mask=short_mask,
                       position_ids=(short_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    error = relative_error(pruned, full_resolution_logits(model, ids, mask, pixels))
    assert error == pytest.approx(report.tokens["measured error"], rel=1e-4)
    graphs = len(report.compile.graphs)
    again = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=NEW, pad_token_id=0,
                             options=chosen)
    assert torch.equal(again, out) and len(report.compile.graphs) == graphs == 3
    shorter = mmaccel.generate(model, ids[:, 2:], mask[:, 2:], pixel_values=pixels, max_new_tokens=NEW,
                               pad_token_id=0, options=chosen)  # 22 positions: the same buckets
    assert shorter.shape[1] == 22 + NEW and len(report.compile.graphs) == 3


@pytest.mark.coverage
def test_triton_target_and_a_layer_draft_equal_eager() -> None:
    """The scoring pass, prefill and decode on the Triton target (CPU: TRITON_INTERPRET), and speculative
    decoding with draft="layers:1" (it shares the target's pruned prompt and cache), give the eager target's
    tokens. About 25 s on CPU: in the coverage set."""
    model = hf_tiny.llava()
    ids, mask = prompts(16)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    chosen = {"tokens": {"prune": 0.5}, "accuracy_budget": 0.99}
    expected = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=4, pad_token_id=0,
                                options={"target": "eager", **chosen})
    triton = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=4, pad_token_id=0,
                              options={"target": "triton", **chosen})
    assert torch.equal(triton, expected)
    report = mmaccel.generation_report(model, target="triton", **chosen)
    assert {(g.status, g.target) for g in report.compile.graphs} == {("optimized", "triton")}
    drafted = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=4, pad_token_id=0,
                               options={"target": "eager", **chosen}, draft="layers:1")
    assert torch.equal(drafted, expected)


def test_a_language_model_it_cannot_score_is_left_alone() -> None:
    """Fewer decoder layers than the scoring layer: the prompt as given, the reason recorded (the other
    near-misses and the over-budget case: tests/test_resolution.py, for both prompt levers)."""
    model = hf_tiny.llava()
    decoder = model.get_decoder()
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[:SCORE_LAYER - 1])
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    lever = PruneLever(0.9, None, None)
    assert lever.apply(model, ids, torch.ones_like(ids), {"pixel_values": pixels}, 0)[0] is ids
    assert f"at least {SCORE_LAYER} layers" in lever.choice.summary()["left untouched"]


def test_bad_input() -> None:
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    for bad, message in (({"prune": 0}, "removes every image token"), ({"prune": 1.0}, "prunes nothing"),
                         ({"prune": [0.5, "x"]}, "fraction"), ({"prune": 0.01}, "keeps none of an image's 16"),
                         ({"fastv": 0.5}, "the dict form"), ("fastv", "not valid")):
        with pytest.raises(ValueError, match=message):
            mmaccel.generate(model, ids, pixel_values=pixels, max_new_tokens=2, options=options(tokens=bad))
    extra = torch.cat([ids, torch.tensor([[TOKEN]])], dim=1)  # transformers says so on a first call; later:
    lever = PruneLever(0.9, None, None)
    with pytest.raises(ValueError, match="holds 17 image placeholder tokens"):
        lever.prepared(model, lever.layout(model), extra, torch.ones_like(extra), {"pixel_values": pixels})
    with pytest.raises(ValueError, match="only mmaccel.generate rewrites"):
        mmaccel.compile(model, tokens="prune")
    with pytest.raises(ValueError, match="not yet chosen jointly"):
        mmaccel.generate(model, ids, pixel_values=pixels, max_new_tokens=2,
                         options=options(quantize="int8_weight_only"))
