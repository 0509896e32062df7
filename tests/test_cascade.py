"""mmaccel.cascade on tiny Llama models: the threshold keeps the calibration loss within the budget, requests
are answered by the model the threshold picks, and the report gives routed fraction, agreement and latency."""
from __future__ import annotations

import pytest
import torch

import mmaccel
from mmaccel.compiler import generation
from mmaccel.compiler.cascade import _calibrated, _Measured
from mmaccel.compiler.drafts import layer_draft
from tests import hf_tiny
from tests.test_generation import EAGER, one_thread  # noqa: F401 (fixture)


def test_cascade_routes_confident_requests_to_the_small_model() -> None:
    large = hf_tiny.llama("sdpa", use_cache=True)
    small = layer_draft(large, 1)  # the large model's first layer and head: agrees on some prompts
    prompts = [torch.randint(3, hf_tiny.VOCAB, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(12)]
    args = dict(max_new_tokens=3, eos_token_id=[], options=EAGER)
    answer = mmaccel.cascade(small, large, calibration=prompts[:10], accuracy_budget=0.1, **args)
    report = answer.report
    assert report.calibration_loss <= 0.1 and 0 < report.calibration_routed < 1, report
    assert set(report.latency_ms) == {"small", "large", "cascade"}
    for prompt in prompts[10:]:
        _, confidence = answer._small(prompt, None, {})
        expected = mmaccel.generate(small if confidence >= report.threshold else large, prompt, **args)
        assert torch.equal(answer(prompt), expected)
    assert report.requests == 2 and "routed to the small model" in str(report)
    with pytest.raises(ValueError, match="batch 1"):
        answer(torch.cat(prompts[:2]))


def test_threshold_calibration_near_misses() -> None:
    """(confidence, agrees, small ms, large ms): routing stops before the disagreement that would pass the
    budget, even when less confident requests agree; a zero budget routes only the agreeing top."""
    rows = [(-0.1, True, 1, 4), (-0.2, False, 1, 4), (-0.3, True, 1, 4), (-0.4, False, 1, 4)]
    measured = [_Measured(*m) for m in rows]
    assert _calibrated(measured, 0.25).threshold == -0.3  # one wrong of four allowed
    assert _calibrated(measured, 0.0).threshold == -0.1
    report = _calibrated(measured, 0.25)
    assert (report.calibration_routed, report.calibration_loss, report.latency_ms["cascade"]) == (0.75, 0.25, 2.0)
    with pytest.raises(ValueError, match="accuracy_budget"):
        mmaccel.cascade(None, None, calibration=[], accuracy_budget=1.5)


# in the opt-in long set (-m coverage, 8 s; CI time)
@pytest.mark.coverage
def test_references_measure_accuracy_not_agreement() -> None:
    """Against references, a request the small model answers right and the large one wrong pays for one the
    other way round: at a zero budget all four route (net loss 0) where agreement routes one."""
    rows = [(-0.1, True, 1, 4, True, True), (-0.2, False, 1, 4, False, True), (-0.3, False, 1, 4, True, False),
            (-0.4, True, 1, 4, False, False)]
    report = _calibrated([_Measured(*m) for m in rows], 0.0)
    assert (report.calibration_routed, report.calibration_loss) == (1.0, 0.0)
    assert report.calibration_accuracy == {"small": 0.5, "large": 0.5, "cascade": 0.5}
    assert _calibrated([_Measured(*m[:4]) for m in rows], 0.0).calibration_routed == 0.25
    large = hf_tiny.llama("sdpa", use_cache=True)
    small = layer_draft(large, 1)
    prompts = [torch.randint(3, hf_tiny.VOCAB, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    args = dict(max_new_tokens=2, eos_token_id=[], options=EAGER)
    smalls = [mmaccel.generate(small, p, **args)[:, 6:] for p in prompts]
    routed_all = mmaccel.cascade(small, large, calibration=prompts, references=smalls, accuracy_budget=0.0, **args)
    assert routed_all.report.calibration_routed == 1.0 and routed_all.report.calibration_accuracy["small"] == 1.0
    with pytest.raises(ValueError, match="one right answer per request"):
        mmaccel.cascade(small, large, calibration=prompts, references=smalls[:2], **args)


@pytest.mark.coverage  # 8 s (CI time); test_cascade_routes_confident_requests_to_the_small_model runs the steps' confidence
def test_confidence_summed_by_the_steps_equals_a_teacher_forced_forward() -> None:
    """The small model's mean log-probability of its greedy answer, as its compiled steps sum it (blocks
    included), equals the eager teacher-forced forward over prompt + answer, up to the stop token."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    prompt = torch.randint(3, hf_tiny.VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    free = mmaccel.generate(model, prompt, max_new_tokens=12, eos_token_id=[], options=EAGER)
    for stop in ([], [int(free[0, 6 + 4])]):
        tokens, confidence = generation.generate(model, prompt, max_new_tokens=12, eos_token_id=stop, options=EAGER,
                                                 _scored=True)
        answer = tokens[:, 6:]
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[:, 5:-1].float()
        expected = logits.log_softmax(-1).gather(-1, answer[..., None]).mean()
        assert answer.shape[1] == (12 if not stop else 5)
        torch.testing.assert_close(confidence[0], expected, rtol=1e-4, atol=1e-5)
    # Every scored call sums into the session's one buffer per (batch, device): the compiled steps write it in
    # place, so a new tensor per call made the Triton target re-record the prefill's CUDA graph every call
    session = generation._session(model, EAGER)
    assert len(session.scores) == 1
    buffer = next(iter(session.scores.values()))
    spy = session._score(1, buffer.device)
    assert spy.data_ptr() == buffer.data_ptr() and not spy.any()
