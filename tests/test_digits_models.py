"""The trained digits models (mmaccel.models.digits): their committed checkpoints reach the accuracy they
were trained to, and compiled versions give eager's logits, predictions and captions on the test split."""
from __future__ import annotations

import pytest
import torch

import mmaccel
from mmaccel.models import digits

pytest.importorskip("sklearn")

from conftest import assert_matches_eager, assert_optimized  # noqa: E402

TARGETS = ["eager", "onnxruntime"]


@pytest.fixture(scope="module")
def test_split():
    return digits.load_digits("test")


@pytest.fixture(scope="module")
def classifier():
    return digits.load_classifier()


@pytest.fixture(scope="module")
def captioner():
    return digits.load_captioner()


def test_checkpoints_load_in_inference_mode(classifier, captioner):
    for model in (classifier, captioner):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_classifier_accuracy(classifier, test_split):
    pixels, labels = test_split
    assert len(labels) == 360
    assert digits.accuracy(classifier, pixels, labels) >= 0.95


def test_captioner_exact_match(captioner, test_split):
    pixels, labels = test_split
    assert digits.caption_accuracy(captioner, pixels, labels) >= 0.90


@pytest.mark.parametrize("target", TARGETS)
def test_compiled_classifier_matches_eager(classifier, test_split, target):
    pixels, _ = test_split
    with torch.no_grad():
        expected = classifier(pixels)
        compiled = mmaccel.compile(classifier, target=target)
        actual = compiled(pixels)
    assert_optimized(compiled.mmaccel_report)
    assert_matches_eager(actual, expected)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("target", TARGETS)
def test_compiled_captioner_matches_eager_teacher_forced(captioner, test_split, target):
    """Every text position at once: BOS and the whole name (the longest prefix a caption needs)."""
    pixels, labels = test_split
    ids = digits.caption_ids(labels)[:, :-1]
    with torch.no_grad():
        expected = captioner(pixels, ids)
        compiled = mmaccel.compile(captioner, target=target)
        actual = compiled(pixels, ids)
    assert_optimized(compiled.mmaccel_report)
    assert_matches_eager(actual, expected)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


# in the opt-in long set (-m coverage, 12 s; CI time): the teacher-forced captioner tests run its graphs by default
@pytest.mark.coverage
def test_compiled_captioner_greedy_captions_match_eager(captioner, test_split):
    """Greedy decoding reruns the growing prefix: one graph for the BOS-only prefix, then one dynamic in
    the text length serves every longer one. On ONNX Runtime only, whose export of the dynamic graph is the
    target-specific part (the eager target takes the same graph from the same passes; it would double the
    file's time)."""
    pixels, _ = test_split
    compiled = mmaccel.compile(captioner, target="onnxruntime")
    assert digits.caption(compiled, pixels) == digits.caption(captioner, pixels)
    assert_optimized(compiled.mmaccel_report)
    assert len(compiled.mmaccel_report.graphs) == 2
