"""A vision task where tokens matter, for token merging's accuracy (issue 15): each scikit-learn digit enlarged 3x,
4x or 5x (24 to 40 pixels) and placed anywhere on a blank 64x64 canvas, read by an HF ViTForImageClassification in
8x8 patches: 64 patch tokens and a class token, of which the digit covers 9 to 36 (up to 25 without straddling
patch borders) and the rest is background. The digits ViT (models/digits.py) has 17 tokens, too few for merging to
mean anything.

    model = load_classifier()                  # trained by bench/train_digits_vit64.py, cached outside the repo
    pixels, labels = load_canvas("test")       # 1080 images: the 360 test digits, 3 placements each
    digits.accuracy(logits_of(model), pixels, labels)

An HF model built from its config (nothing downloaded), so the token-merging lever meets the tower it follows in
real checkpoints (vit.encoder.layer.N). transformers is imported here, not by mmaccel.models.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from .digits import DIGIT_NAMES, load_digits

CANVAS = 64
SCALES = (3, 4, 5)  # digit side 24, 32, 40 pixels: 3x3 to 5x5 patches of digit, 28 to 55 of background
TEST_PLACEMENTS = 3  # each test digit at 3 seeded places: 1080 images, a point is 10.8 of them
# ~1.4 MB of fp32 weights; cached, not committed: bench/train_digits_vit64.py writes it in ~10 min on 2 cores
CHECKPOINT = Path.home() / ".cache" / "mmaccel" / "digits_vit64.pt"


def vit64_config() -> ViTConfig:
    """6 blocks, hidden 128 in 4 heads, MLP 256, one grey channel, 10 classes."""
    return ViTConfig(image_size=CANVAS, patch_size=8, num_channels=1, hidden_size=128, num_hidden_layers=6,
                     num_attention_heads=4, intermediate_size=256, num_labels=len(DIGIT_NAMES),
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")


def place_on_canvas(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, 1, 8, 8] digits -> [B, 1, 64, 64]: each enlarged (bilinear) by a random scale of SCALES and put at a
    random place, zeros around it."""
    B = pixels.shape[0]
    canvas = torch.zeros(B, 1, CANVAS, CANVAS)
    scales = torch.tensor(SCALES)[torch.randint(0, len(SCALES), (B,), generator=generator)]
    for scale in SCALES:
        rows = (scales == scale).nonzero().flatten()
        side = 8 * scale
        enlarged = F.interpolate(pixels[rows], size=(side, side), mode="bilinear", align_corners=False)
        corners = torch.randint(0, CANVAS - side + 1, (len(rows), 2), generator=generator)
        for image, (y, x), row in zip(enlarged, corners.tolist(), rows.tolist()):
            canvas[row, :, y:y + side, x:x + side] = image
    return canvas


def load_canvas(split: Literal["train", "test"], placements: int = TEST_PLACEMENTS,
                seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits split of models/digits.py, each digit placed `placements` times (seeded): pixels [N, 1, 64, 64]
    in [0, 1], labels [N]. Training draws new places each step instead (bench/train_digits_vit64.py)."""
    pixels, labels = load_digits(split)
    generator = torch.Generator().manual_seed(seed)
    return (torch.cat([place_on_canvas(pixels, generator) for _ in range(placements)]),
            labels.repeat(placements))


def build() -> ViTForImageClassification:
    return ViTForImageClassification(vit64_config())


def load_classifier(path: Path = CHECKPOINT) -> ViTForImageClassification:
    """The trained model (fp32, CPU, eval mode, gradients off); FileNotFoundError names the training script."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: python bench/train_digits_vit64.py writes it (~10 min on CPU)")
    model = build()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def logits_of(model: Callable[..., object]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An HF classifier (compiled or not) as pixels -> logits, what digits.accuracy calls."""
    return lambda pixels: model(pixels).logits
