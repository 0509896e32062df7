"""tokens="auto" (compiler/token_auto.py): the fastest first token within accuracy_budget among the settings of
tokens="resolution" and "prune" and the prompt as given, on tiny HF LLaVA (16 image tokens). First-token times
are injected through the lever's timing seam (time_ms) where the choice must be deterministic."""
from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch

import mmaccel
from mmaccel.compiler.generation import _session
from mmaccel.compiler.resolution import ImageLayout, ResolutionLever, on_pareto_front
from mmaccel.compiler.token_auto import AS_GIVEN, AutoLever
from mmaccel.compiler.token_pruning import SCORE_LAYER, PruneLever
from tests import hf_tiny
from tests.test_generation import one_thread  # noqa: F401 (autouse: tiny matmuls on one thread)
from tests.test_resolution import prompts

# tiny LLaVA: 32px images in 8px patches; resolution offers 16px and 24px, prune 25%, 50%, 75%
LABELS = ["lossless", "resolution 16px", "resolution 24px", "prune 25%", "prune 50%", "prune 75%"]


def injected(ms: dict[str, float], seen: list) -> Callable:
    """A time_ms seam: each label's ms from `ms` (100 for the others), the labels asked for kept in `seen`."""
    def time_ms(runs: dict, device: torch.device) -> dict[str, float]:
        seen.append(list(runs))
        return {label: ms.get(label, 100.0) for label in runs}
    return time_ms


def test_the_fastest_within_budget_wins_and_equals_the_explicit_option() -> None:
    """prune 50% measured fastest wins although prune 25% and resolution 16px keep fewer tokens within budget;
    its prompt is tokens={"prune": 0.5}'s and generate's tokens are HF eager's on it; the report lists every
    candidate with its error (prune 50%'s as the explicit lever measures it), ms and Pareto mark, and prints the
    table. The explicit lever runs alone (eager scorer), not as a second session: 5 s of compiles less; one new
    token (no decode graph: tests/test_token_pruning.py decodes a pruned prompt)."""
    model = hf_tiny.llava()
    ids, mask = prompts(16)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    explicit = PruneLever(0.99, None, None, settings=[0.5])
    _, short_mask, pruned = explicit.apply(model, ids, mask, {"pixel_values": pixels}, 0)
    with torch.no_grad():
        expected = model.generate(inputs_embeds=pruned["inputs_embeds"], attention_mask=short_mask,
                                  max_new_tokens=1, do_sample=False, pad_token_id=0)
    auto = {"target": "eager", "tokens": "auto", "accuracy_budget": 0.99}
    seen: list = []
    _session(model, auto).token_lever.time_ms = injected({"lossless": 9.0, "prune 50%": 2.0, "prune 25%": 3.0}, seen)
    out = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=1, pad_token_id=0, options=auto)
    assert torch.equal(out[:, :ids.shape[1]], ids) and torch.equal(out[:, ids.shape[1]:], expected)
    report = mmaccel.generation_report(model, **auto)
    tokens = report.tokens
    assert tokens["setting"] == "prune 50%" and tokens["image tokens per image"] == [16, 8]
    assert tokens["first-token ms"] == 2.0 and seen == [LABELS]  # timed once, every candidate
    candidates = tokens["candidates"]
    assert [c["label"] for c in candidates] == LABELS and [c["tokens"] for c in candidates] == [16, 4, 9, 4, 8, 12]
    assert [c["chosen"] for c in candidates] == [label == "prune 50%" for label in LABELS]
    assert all(c["error"] <= 0.99 for c in candidates) and candidates[0]["error"] == 0.0
    assert candidates[4]["error"] == pytest.approx(explicit.choice.error, rel=1e-5)
    # lossless (error 0) and prune 50% (fastest) are on the front; the 100 ms ones are behind lossless
    assert [candidates[i]["pareto"] for i in (0, 4, 1, 2, 5)] == [True, True, False, False, False]
    printed = str(report)
    assert all(label in printed for label in LABELS) and "prune 50%                     8" in printed
    assert report.graphs[0][1]["prompt"] == 16  # only the chosen setting's prefill ran: the times were injected


def test_the_chosen_prompt_is_the_explicit_options() -> None:
    """The lever alone, each setting made fastest in turn: the prompt auto gives is the explicit lever's."""
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    mask, inputs = torch.ones_like(ids), {"pixel_values": pixels}
    for label, lever in (("resolution 16px", ResolutionLever(0.99, None, None, [16])),
                         ("prune 75%", PruneLever(0.99, None, None, [0.75]))):
        auto = AutoLever(0.99, None, None)
        auto.time_ms = injected({label: 1.0}, [])
        chosen, expected = auto.apply(model, ids, mask, inputs, 0), lever.apply(model, ids, mask, inputs, 0)
        assert auto.choice.label == label and torch.equal(chosen[0], expected[0]) and torch.equal(chosen[1],
                                                                                                 expected[1])
        assert chosen[2].keys() == expected[2].keys() and all(torch.equal(chosen[2][k], expected[2][k])
                                                              for k in expected[2])


@pytest.mark.coverage
def test_timed_through_the_sessions_prefill() -> None:
    """No injected times: each candidate's first token runs through the session's compiled prefill (a graph per
    prompt bucket and input kind), the choice's tokens equal its explicit option's. About 25 s on CPU: in the
    coverage set."""
    model = hf_tiny.llava()
    ids, mask = prompts(16)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    auto = {"target": "eager", "tokens": "auto", "accuracy_budget": 0.99}
    out = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=4, pad_token_id=0, options=auto)
    report = mmaccel.generation_report(model, **auto)
    candidates = report.tokens["candidates"]
    assert [c["label"] for c in candidates] == LABELS and all(c["first_token_ms"] > 0 for c in candidates)
    prefills = {(key["prompt"], tuple(key["inputs"])) for kind, key, _ in report.graphs if kind == "prefill"}
    assert prefills == {(24, ("pixel_values",)), (16, ("pixel_values",)), (16, ("inputs_embeds",)),
                        (24, ("inputs_embeds",))}
    chosen = next(c for c in candidates if c["chosen"])
    name, value = chosen["setting"]
    explicit = {"target": "eager", "tokens": {name: value}, "accuracy_budget": 0.99} if value is not None else {
        "target": "eager"}
    assert torch.equal(out, mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=4,
                                             pad_token_id=0, options=explicit))


def test_choice_rules() -> None:
    """Within budget the fastest wins, even with more tokens; the prompt as given wins when fastest (no warning);
    over budget everywhere: the prompt as given and one warning. The Pareto front of (error, ms)."""
    layout = ImageLayout(hf_tiny.IMAGE_TOKEN, 336, 14, class_token=False)

    def measured() -> list[dict]:
        rows = [(AS_GIVEN, 576, 0.0, 10.0), (("resolution", 168), 144, 0.5, 4.0), (("prune", 0.25), 144, 0.2, 7.0),
                (("prune", 0.75), 432, 0.05, 6.0)]
        return [{"setting": s, "tokens": t, "error": e, "first_token_ms": ms} for s, t, e, ms in rows]
    choice = AutoLever(0.3, None, None)._cheapest(layout, measured())
    assert (choice.setting, choice.tokens, choice.first_token_ms) == (("prune", 0.75), (576, 432), 6.0)
    assert [c["chosen"] for c in choice.candidates] == [False, False, False, True]
    assert on_pareto_front(measured()) == [True, True, False, True]
    rows = measured()
    rows[0]["first_token_ms"] = 3.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastest = AutoLever(0.3, None, None)._cheapest(layout, rows)
        over = AutoLever(0.01, None, None)._cheapest(layout, measured())
    assert fastest.setting is None and fastest.summary()["left untouched"] == "the prompt as given measured fastest"
    assert over.setting is None and "over accuracy_budget" in over.reason
    assert [c["chosen"] for c in over.candidates] == [True, False, False, False]
    assert len([w for w in caught if "over accuracy_budget" in str(w.message)]) == 1


def test_over_budget_times_every_candidate_and_keeps_the_prompt() -> None:
    """The lever alone (no session: the eager model's first token, timed by mmaccel/timing.py): over budget,
    the prompt as given, every candidate timed, one warning."""
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    lever = AutoLever(1e-6, None, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lever.apply(model, ids, torch.ones_like(ids), {"pixel_values": pixels}, 0)[0] is ids
    assert len([w for w in caught if "over accuracy_budget" in str(w.message)]) == 1
    candidates = lever.choice.summary()["candidates"]
    assert [c["label"] for c in candidates] == LABELS and all(c["first_token_ms"] > 0 for c in candidates)


def test_levers_that_cannot_follow_the_model_are_left_out() -> None:
    """A language model too shallow to score: resolution's sides and the prompt as given only. A model neither
    lever follows: the prompt as given, both reasons in the report."""
    model = hf_tiny.llava()
    decoder = model.get_decoder()
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[:SCORE_LAYER - 1])
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    lever = AutoLever(0.99, None, None)
    lever.time_ms = injected({"resolution 16px": 1.0}, [])
    small_ids, _, inputs = lever.apply(model, ids, torch.ones_like(ids), {"pixel_values": pixels}, 0)
    assert [c["label"] for c in lever.choice.candidates] == LABELS[:3]
    assert small_ids.shape == (1, 12) and inputs["pixel_values"].shape == (1, 3, 16, 16)
    paligemma = hf_tiny.paligemma()
    ids, pixels = hf_tiny.vlm_inputs()
    lever = AutoLever(0.99, None, None)
    assert lever.apply(paligemma, ids, torch.ones_like(ids), {"pixel_values": pixels}, 0)[0] is ids
    reason = lever.choice.summary()["left untouched"]
    assert reason.startswith("resolution: ") and "; prune: " in reason and "only LLaVA-1.5-style" in reason


def test_bad_input() -> None:
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    for options, message in (({"tokens": "auto", "quantize": "int8_weight_only"}, "not yet chosen jointly"),
                             ({"tokens": "auto", "prune": "heads"}, "not yet chosen jointly"),
                             ({"tokens": {"auto": 0.5}}, "the dict form"), ({"tokens": "fastest"}, "not valid")):
        with pytest.raises(ValueError, match=message):
            mmaccel.generate(model, ids, pixel_values=pixels, max_new_tokens=2, options={"target": "eager",
                                                                                          **options})
    assert PruneLever in {type(lever) for lever in AutoLever(0.1, None, None).parts()}
