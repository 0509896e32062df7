"""Model cascading: answer with a small model when it is confident, else with the large one.

    answer = mmaccel.cascade(small, large, calibration=prompts, accuracy_budget=0.02, max_new_tokens=32)
    tokens = answer(input_ids, attention_mask)      # one request; answer.report: routed fraction, agreement, latency

Confidence is the small model's mean token log-probability of its own greedy answer, up to its stop token,
summed by its compiled generation steps as they choose each token (no second forward: the teacher-forced one
this replaced ran eagerly, on every request). The threshold is calibrated on the calibration prompts: each is
answered by both models, and the small model takes the most confident prompts as long as its answers that
differ from the large model's stay within `accuracy_budget` of all calibration prompts. "Accuracy" there is
agreement with the large model's greedy answer (exact token match): the cascade's loss against the large model.
With `references` (the right answer of each calibration prompt) it is accuracy against them: a routed prompt
costs a point when the large model answers it right and the small one wrong, and gains one in the other case;
the most confident prompts are routed as far as the net loss stays within the budget. Agreement is the stricter
measure: where the small model is as accurate as the large one but errs on other prompts, it routes few (the
trained code pair on the H200: 5% at a 0.01 budget, bench/results/code_model_cuda_h200.json).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from . import generation
from .drafts import vocab_size
from .speculative import generate


@dataclass
class CascadeReport:
    """Calibration (threshold, routed fraction, agreement) and the requests answered since."""
    threshold: float
    calibration_routed: float  # fraction of calibration prompts the small model would answer
    calibration_agreement: float  # small == large on all calibration prompts
    calibration_loss: float  # fraction of calibration prompts answered differently from the large model
    latency_ms: dict[str, float]  # mean per calibration prompt: small, large, cascade (small + large when not routed)
    # With references: the fraction of calibration prompts answered right by each (cascade: at the threshold).
    calibration_accuracy: dict[str, float] | None = None
    requests: int = 0
    routed: int = 0
    served_ms: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        served = sum(self.served_ms) / max(len(self.served_ms), 1)
        return (f"mmaccel.cascade: threshold {self.threshold:.3f} (mean log-prob); calibration: "
                f"{self.calibration_routed:.0%} routed to the small model, agreement {self.calibration_agreement:.0%}, "
                f"loss {self.calibration_loss:.1%}"
                + (f" (accuracy {self.calibration_accuracy})" if self.calibration_accuracy else "")
                + f", latency ms {self.latency_ms}; served {self.requests} requests, "
                f"{self.routed} by the small model, {served:.1f} ms mean")


class Cascade:
    """A calibrated small/large pair; call it with one request's model inputs."""

    def __init__(self, small: torch.nn.Module, large: torch.nn.Module, generate_args: dict[str, Any]) -> None:
        self.small, self.large, self.generate_args = small, large, generate_args
        self.report: CascadeReport | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **inputs: Any) -> torch.Tensor:
        start = time.perf_counter()
        tokens, confidence = self._small(input_ids, attention_mask, inputs)
        routed = confidence >= self.report.threshold
        if not routed:
            tokens = generate(self.large, input_ids, attention_mask, **inputs, **self.generate_args)
        self.report.requests += 1
        self.report.routed += routed
        self.report.served_ms.append((time.perf_counter() - start) * 1e3)
        return tokens

    def _small(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               inputs: dict[str, Any]) -> tuple[torch.Tensor, float]:
        """The small model's greedy answer and its mean token log-probability under the small model."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"mmaccel.cascade routes one request at a time (batch 1), got a batch of "
                             f"{input_ids.shape[0]}")
        plain = {k: v for k, v in self.generate_args.items() if k not in ("draft", "speculative_k")}  # large's
        tokens, confidence = generation.generate(self.small, input_ids, attention_mask, **inputs, **plain,
                                                 _scored=True)
        return tokens, float(confidence[0])


@dataclass(frozen=True)
class _Measured:
    """One calibration request: the small model's confidence, whether both answered alike, each one's ms, and
    with a reference whether each answered right (None without)."""
    confidence: float
    agree: bool
    small_ms: float
    large_ms: float
    small_right: bool | None = None
    large_right: bool | None = None

    @property
    def cost(self) -> int:
        """Points lost (negative: gained) by answering with the small model instead of the large one."""
        if self.small_right is None:
            return int(not self.agree)
        return int(self.large_right) - int(self.small_right)


def cascade(small: torch.nn.Module, large: torch.nn.Module, calibration: Any, accuracy_budget: float = 0.01,
            references: Sequence[torch.Tensor] | None = None, **generate_args: Any) -> Cascade:
    """A Cascade calibrated on `calibration` (an iterable of requests: input_ids [1, S], or dicts of model
    inputs) under `accuracy_budget` (the largest fraction of calibration requests the cascade may lose, in
    [0, 1)): against the large model's answers, or with `references` (one right answer per request, token ids
    [1, N] or [N]: an answer is right when its first N new tokens are these) against them. generate_args go to
    mmaccel.generate (max_new_tokens, eos_token_id, options, ...), greedy."""
    if not 0 <= accuracy_budget < 1:
        raise ValueError(f"mmaccel.cascade: accuracy_budget must be in [0, 1), got {accuracy_budget}")
    if vocab_size(small) != vocab_size(large):
        raise ValueError(f"mmaccel.cascade: the small model's vocabulary has {vocab_size(small)} tokens, the "
                         f"large one's {vocab_size(large)}; a cascade needs the same tokenizer")
    pair = Cascade(small, large, {**generate_args, "do_sample": False})
    samples = [s if isinstance(s, dict) else {"input_ids": s} for s in calibration]
    if not samples:
        raise ValueError("mmaccel.cascade: calibration holds no requests")
    if references is not None and len(references) != len(samples):
        raise ValueError(f"mmaccel.cascade: {len(references)} references for {len(samples)} calibration requests; "
                         "give one right answer per request")
    measured = [_measure(pair, sample, None if references is None else references[i])
                for i, sample in enumerate(samples)]
    pair.report = _calibrated(measured, accuracy_budget)
    return pair


def _measure(pair: Cascade, sample: dict[str, Any], reference: torch.Tensor | None) -> _Measured:
    sample = dict(sample)
    input_ids, attention_mask = sample.pop("input_ids"), sample.pop("attention_mask", None)
    start = time.perf_counter()
    small_tokens, confidence = pair._small(input_ids, attention_mask, sample)
    middle = time.perf_counter()
    large_tokens = generate(pair.large, input_ids, attention_mask, **sample, **pair.generate_args)
    end = time.perf_counter()
    agree = small_tokens.shape == large_tokens.shape and bool((small_tokens == large_tokens).all())
    right = (None, None) if reference is None else \
        tuple(_answers(tokens, input_ids.shape[1], reference) for tokens in (small_tokens, large_tokens))
    return _Measured(confidence, agree, (middle - start) * 1e3, (end - middle) * 1e3, *right)


def _answers(tokens: torch.Tensor, prompt: int, reference: torch.Tensor) -> bool:
    """The new tokens begin with the reference answer."""
    reference = reference.reshape(-1).to(tokens.device)
    answer = tokens[0, prompt:prompt + len(reference)]
    return len(answer) == len(reference) and bool((answer == reference).all())


def _calibrated(measured: list[_Measured], budget: float) -> CascadeReport:
    """The lowest threshold whose routed requests (the most confident first) lose at most budget * n points:
    the longest such prefix, so a small model that is right where the large one errs earns routing room."""
    ranked = sorted(measured, key=lambda m: -m.confidence)
    allowed, lost, routed, threshold, kept_loss = budget * len(ranked), 0, 0, float("inf"), 0
    for count, m in enumerate(ranked, start=1):
        lost += m.cost
        if lost <= allowed:
            routed, threshold, kept_loss = count, m.confidence, lost
    n = len(measured)
    small_ms, large_ms = sum(m.small_ms for m in measured) / n, sum(m.large_ms for m in measured) / n
    cascade_ms = small_ms + sum(m.large_ms for m in ranked[routed:]) / n
    accuracy = None
    if measured[0].small_right is not None:
        served = sum(m.small_right for m in ranked[:routed]) + sum(m.large_right for m in ranked[routed:])
        accuracy = {"small": sum(m.small_right for m in measured) / n,
                    "large": sum(m.large_right for m in measured) / n, "cascade": served / n}
    return CascadeReport(threshold, routed / n, sum(m.agree for m in measured) / n, kept_loss / n,
                         {"small": round(small_ms, 2), "large": round(large_ms, 2), "cascade": round(cascade_ms, 2)},
                         calibration_accuracy=accuracy)
