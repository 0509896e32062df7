"""The 64x64 digits task of mmaccel.models.digits_canvas (token merging's accuracy, issue 15): each canvas holds its
digit enlarged once, at one place, zeros around it; and, with the trained weights cached by
bench/train_digits_vit64.py (opt-in, -m coverage), the model's accuracy and token merging's cost on it."""
from __future__ import annotations

import pytest
import torch

import mmaccel

pytest.importorskip("sklearn")
pytest.importorskip("transformers")

from mmaccel.models import digits, digits_canvas  # noqa: E402


def test_each_canvas_holds_one_square_of_its_digit_at_a_scale():
    """A blank-free digit (all ones) enlarges to a square of ones: one per canvas, of a side in SCALES, in bounds."""
    canvas = digits_canvas.place_on_canvas(torch.ones(32, 1, 8, 8), torch.Generator().manual_seed(0))
    assert canvas.shape == (32, 1, 64, 64)
    sides, corners = set(), set()
    for image in canvas[:, 0]:
        lit = image.nonzero()
        (top, left), (bottom, right) = lit.min(0).values.tolist(), lit.max(0).values.tolist()
        side = bottom - top + 1
        assert side == right - left + 1 and side // 8 in digits_canvas.SCALES and side % 8 == 0
        assert len(lit) == side * side and torch.allclose(image[top:bottom + 1, left:right + 1], torch.ones(side, side))
        sides.add(side)
        corners.add((top, left))
    assert len(sides) == len(digits_canvas.SCALES) and len(corners) > 16  # random scales and places


def test_test_split_is_seeded():
    a_pixels, a_labels = digits_canvas.load_canvas("test", placements=2)
    b_pixels, b_labels = digits_canvas.load_canvas("test", placements=2)
    assert a_pixels.shape == (720, 1, 64, 64) and torch.equal(a_pixels, b_pixels) and torch.equal(a_labels, b_labels)
    assert torch.equal(a_labels[:360], a_labels[360:]) and not torch.equal(a_pixels[:360], a_pixels[360:])


def test_missing_checkpoint_names_the_training_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digits_vit64.py"):
        digits_canvas.load_classifier(tmp_path / "absent.pt")


@pytest.mark.coverage
@pytest.mark.skipif(not digits_canvas.CHECKPOINT.exists(), reason="python bench/train_digits_vit64.py caches it")
def test_trained_model_and_merging_r8_on_every_block():
    """Lossless accuracy as trained (>= 0.97), and r8% on every block, compiled, within 2 points of it (measured:
    see README "Token merging")."""
    model = digits_canvas.load_classifier()
    pixels, labels = digits_canvas.load_canvas("test")
    lossless = digits.accuracy(digits_canvas.logits_of(model), pixels, labels)
    assert lossless >= 0.97
    compiled = mmaccel.compile(model, target="eager", tokens="merge", accuracy_budget=0.5)
    with torch.no_grad():
        merged = digits.accuracy(digits_canvas.logits_of(compiled), pixels, labels)
    report = next(p for g in compiled.mmaccel_report.graphs for p in g.passes if p.lossy)
    assert "6 of 6" in report.changes[0], report.changes
    assert merged >= lossless - 0.02
