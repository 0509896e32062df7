"""A vision task where tokens matter, for token merging's accuracy (issue 15): four scikit-learn digits enlarged 4x
(32x32) in the quadrants of a 64x64 canvas, the label that of the top-left one; read by an HF
ViTForImageClassification in 8x8 patches: 64 patch tokens and a class token, 16 of the digit to classify and 48 of
three other digits (distractors, like a photo's clutter: not blank, so merging them is not free). The digits ViT
(models/digits.py) has 17 tokens, too few for merging to mean anything.

    model = load_classifier()                  # trained by bench/train_digits_vit64.py, cached outside the repo
    pixels, labels = load_canvas("test")       # 1080 images: the 360 test digits, 3 sets of distractors each
    digits.accuracy(logits_of(model), pixels, labels)

An HF model built from its config (nothing downloaded), so the token-merging lever meets the tower it follows in
real checkpoints (vit.layers.N). transformers is imported here, not by mmaccel.models.
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
SCALE = 4  # a digit's 8x8 pixels -> 32x32: 4x4 patches, each 2x2 of its pixels (the digits ViT's patches)
TEST_SETS = 3  # each test digit with 3 seeded sets of distractors: 1080 images, a point is 10.8 of them
# 3.2 MB of fp32 weights; cached, not committed: bench/train_digits_vit64.py writes it (30 epochs: 25 min on a
# shared 2-core CPU under nice, test accuracy 0.885)
CHECKPOINT = Path.home() / ".cache" / "mmaccel" / "digits_vit64.pt"


def vit64_config() -> ViTConfig:
    """6 blocks, hidden 128 in 4 heads, MLP 256, one grey channel, 10 classes."""
    return ViTConfig(image_size=CANVAS, patch_size=8, num_channels=1, hidden_size=128, num_hidden_layers=6,
                     num_attention_heads=4, intermediate_size=256, num_labels=len(DIGIT_NAMES),
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")


def compose(pixels: torch.Tensor, distractors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, 1, 8, 8] digits -> [B, 1, 64, 64]: each enlarged (bilinear) in the top-left quadrant, three digits drawn
    from `distractors` [M, 1, 8, 8] in the others."""
    B = pixels.shape[0]
    others = distractors[torch.randint(0, len(distractors), (B, 3), generator=generator)]  # [B, 3, 1, 8, 8]
    quadrants = torch.cat([pixels[:, None], others], dim=1).flatten(0, 1)
    side = 8 * SCALE
    enlarged = F.interpolate(quadrants, size=(side, side), mode="bilinear", align_corners=False)
    # [B * 4, 1, 32, 32] -> [B, 1, 64, 64]: quadrants in reading order (top-left, top-right, bottom-left, ...)
    return enlarged.view(B, 2, 2, side, side).permute(0, 1, 3, 2, 4).reshape(B, 1, CANVAS, CANVAS)


def load_canvas(split: Literal["train", "test"], sets: int = TEST_SETS,
                seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits split of models/digits.py, each digit composed `sets` times with distractors of the same split
    (seeded): pixels [N, 1, 64, 64] in [0, 1], labels [N]. Training draws new distractors each step instead
    (bench/train_digits_vit64.py)."""
    pixels, labels = load_digits(split)
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([compose(pixels, pixels, generator) for _ in range(sets)]), labels.repeat(sets)


def build() -> ViTForImageClassification:
    return ViTForImageClassification(vit64_config())


def load_classifier(path: Path = CHECKPOINT) -> ViTForImageClassification:
    """The trained model (fp32, CPU, eval mode, gradients off); FileNotFoundError names the training script."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: python bench/train_digits_vit64.py writes it (~25 min on CPU)")
    model = build()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def logits_of(model: Callable[..., object]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An HF classifier (compiled or not) as pixels -> logits, what digits.accuracy calls."""
    return lambda pixels: model(pixels).logits
