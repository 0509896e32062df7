"""tokens="resolution" (compiler/resolution.py): a LLaVA image at fewer patches, the prompt with fewer image
placeholders, against a hand-written reference on tiny HF LLaVA (32px images in 8px patches: 16 image tokens).
The over-budget and near-miss tests cover tokens="prune" too (tests/test_token_pruning.py: the rest of it)."""
from __future__ import annotations

import warnings

import pytest
import torch

import mmaccel
from mmaccel.compiler.options import CompileOptions
from mmaccel.compiler.resolution import ImageLayout, ResolutionLever, shrunk_prompt
from mmaccel.compiler.token_pruning import PruneLever
from tests import hf_tiny
from tests.conftest import relative_error
from tests.test_generation import one_thread  # noqa: F401 (autouse: tiny matmuls on one thread)

TOKEN = hf_tiny.IMAGE_TOKEN
NEW = 5


def options(**extra) -> dict:
    return {"target": "eager", "tokens": "resolution", **extra}


def prompts(image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows (3 text tokens, the image, 5 text; and 1, the image, 2 left-padded with 0), as a processor
    would write them for images of `image_tokens` features."""
    rows = [[11, 12, 13] + [TOKEN] * image_tokens + [21, 22, 23, 24, 25], [14] + [TOKEN] * image_tokens + [26, 27]]
    width = len(rows[0])
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (torch.arange(width) >= torch.tensor([[0], [width - len(rows[1])]])).long()


def reference_tokens(model, ids, mask, pixels, side: int) -> torch.Tensor:
    """Greedy decoding written out: the CLIP tower on the resized image with interpolated position embeddings,
    LLaVA's layer -2 without the class token, the projector, scattered into the prompt's embeddings; the
    language model over the whole sequence at every step (no cache), positions from the mask."""
    small = torch.nn.functional.interpolate(pixels, size=(side, side), mode="bicubic", antialias=True)
    with torch.no_grad():
        tower = model.model.vision_tower(small, interpolate_pos_encoding=True, output_hidden_states=True)
        features = model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == TOKEN] = features.reshape(-1, features.shape[-1])
        new = []
        for _ in range(NEW):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                                position_ids=positions).last_hidden_state
            token = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
            new.append(token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(token)], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(new, dim=1)


def full_resolution_logits(model, ids, mask, pixels) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    pixel_values=pixels)
    return out.logits[:, -1]


def test_fewer_image_tokens_equal_the_hand_written_reference() -> None:
    """It fires (a 16px image: 4 of 16 image tokens, the prompt bucket 24 -> 16), the tokens equal the
    reference's, the returned prompt is the user's, the first token's logits are off by the reported error,
    and a second call of the same shapes compiles nothing."""
    model = hf_tiny.llava()
    ids, mask = prompts(16)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small_ids, small_mask = prompts(4)
    expected = reference_tokens(model, small_ids, small_mask, pixels, 16)
    out = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=NEW, options=options(
        accuracy_budget=0.99))
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert torch.equal(out[:, ids.shape[1]:], expected)
    report = mmaccel.generation_report(model, **options(accuracy_budget=0.99))
    assert report.tokens["side"] == "16px" and report.tokens["image tokens per image"] == [16, 4]
    assert [c["side"] for c in report.tokens["candidates"]] == [16, 24]
    assert report.graphs[0][1]["prompt"] == 16  # 24 positions without the lever
    small = torch.nn.functional.interpolate(pixels, size=(16, 16), mode="bicubic", antialias=True)
    error = relative_error(full_resolution_logits(model, small_ids, small_mask, small),
                           full_resolution_logits(model, ids, mask, pixels))
    assert error == pytest.approx(report.tokens["measured error"], rel=1e-4)
    graphs = len(report.compile.graphs)
    again = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=NEW, options=options(
        accuracy_budget=0.99))
    assert torch.equal(again, out) and len(report.compile.graphs) == graphs == 2


@pytest.mark.parametrize("setting", [{"resolution": 16}, {"prune": 0.25}])
def test_over_budget_keeps_every_image_token_with_one_warning(setting) -> None:
    """Both prompt levers: the prompt as given (tokens equal HF eager's), the reason in the report, one warning
    for two calls."""
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    with torch.no_grad():
        lossless = model.generate(ids, pixel_values=pixels, max_new_tokens=1, do_sample=False, pad_token_id=0)
    chosen = options(tokens=setting, accuracy_budget=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [mmaccel.generate(model, ids, pixel_values=pixels, max_new_tokens=1, options=chosen) for _ in "ab"]
    assert all(torch.equal(out, lossless) for out in outs)
    assert len([w for w in caught if "over accuracy_budget" in str(w.message)]) == 1
    report = mmaccel.generation_report(model, **chosen)
    assert "over accuracy_budget" in report.tokens["left untouched"]
    [(name, value)] = setting.items()
    assert [c[{"resolution": "side", "prune": "keep"}[name]] for c in report.tokens["candidates"]] == [value]
    assert report.graphs[0][1]["prompt"] == 24


def test_the_cheapest_side_within_budget_wins_and_the_metric_replaces_the_error() -> None:
    lever = ResolutionLever(0.3, None, None)
    layout = ImageLayout(TOKEN, 336, 14, class_token=False)
    measured = [{"side": 168, "tokens": 144, "error": 0.5}, {"side": 224, "tokens": 256, "error": 0.2},
                {"side": 280, "tokens": 400, "error": 0.1}]
    choice = lever._cheapest(layout, measured)
    assert (choice.setting, choice.tokens, choice.error) == (224, (576, 256), 0.2)
    assert ImageLayout(TOKEN, 336, 14, class_token=True).tokens(224) == 257  # strategy "full": + the class token
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    calls = []

    def metric(outputs, references) -> float:  # per sample, the first token's logits [1, vocab]
        assert len(outputs) == len(references)
        calls.append((len(outputs), outputs[0][0].shape))
        return 0.0
    lever = ResolutionLever(1.0, metric, None)
    small_ids, _, inputs = lever.apply(model, ids, torch.ones_like(ids), {"pixel_values": pixels}, 0)
    assert calls == [(1, torch.Size([1, hf_tiny.VOCAB]))] * 2 and lever.choice.error == 0.0
    assert small_ids.shape == (1, 12) and inputs["pixel_values"].shape == (1, 3, 16, 16)
    samples = CompileOptions.from_user(options(calibration=[{"input_ids": ids, "pixel_values": pixels}] * 3,
                                               metric=metric)).calibration
    calls.clear()
    lever = ResolutionLever(1.0, metric, samples, settings=[24])
    lever.apply(model, ids, torch.ones_like(ids), {"pixel_values": pixels}, 0)
    assert calls == [(3, torch.Size([1, hf_tiny.VOCAB]))]  # the calibration samples, not the call's inputs


@pytest.mark.parametrize("lever", [ResolutionLever, PruneLever])
def test_near_misses_are_left_alone(lever) -> None:
    """Both prompt levers (tokens="resolution", "prune"): a prompt whose image run is split in two, a text-only
    prompt, a model that is not LLaVA: the prompt as given, the reason recorded."""
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    mask = torch.ones_like(ids)
    split = torch.cat([ids[:, :10], torch.tensor([[7]]), ids[:, 10:]], dim=1)
    chooser = lever(0.9, None, None)
    assert chooser.apply(model, split, torch.ones_like(split), {"pixel_values": pixels}, 0)[0] is split
    assert "not in runs of 16" in chooser.choice.summary()["left untouched"]
    text = ids[:, :3]
    assert chooser.apply(model, text, mask[:, :3], {}, 0)[0] is text
    paligemma = hf_tiny.paligemma()
    ids, pixels = hf_tiny.vlm_inputs()
    chooser = lever(0.9, None, None)
    assert chooser.apply(paligemma, ids, torch.ones_like(ids), {"pixel_values": pixels}, 0)[0] is ids
    assert "only LLaVA-1.5-style" in chooser.choice.summary()["left untouched"]


def test_bad_input() -> None:
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    with pytest.raises(ValueError, match="below one 8px patch"):
        mmaccel.generate(model, ids, pixel_values=pixels, max_new_tokens=2, options=options(tokens={"resolution": 4}))
    for bad in ({"resolution": 0}, {"resolution": [16, "x"]}, {"stride": 2}):
        with pytest.raises(ValueError, match="resolution"):
            mmaccel.generate(model, ids, pixel_values=pixels, max_new_tokens=2, options=options(tokens=bad))
    with pytest.raises(ValueError, match="only mmaccel.generate rewrites"):
        mmaccel.compile(model, tokens="resolution")
    with pytest.raises(ValueError, match="only mmaccel.generate rewrites"):
        torch.compile(torch.nn.Linear(2, 2), backend="mmaccel", options={"tokens": "resolution"})(torch.ones(2))
    with pytest.raises(ValueError, match="not yet chosen jointly"):
        mmaccel.generate(model, ids, pixel_values=pixels, max_new_tokens=2,
                         options=options(quantize="int8_weight_only"))
