"""Trains the 64x64 digits ViT of mmaccel.models.digits_canvas (an HF ViTForImageClassification, 65 tokens, 6 blocks)
and writes its fp32 state dict, by default to ~/.cache/mmaccel/digits_vit64.pt (3 MB: not committed).

    nice -n 19 python bench/train_digits_vit64.py [--epochs 30] [--threads 2] [--out PATH]

The training split of models/digits.py, each step's digits shifted by a pixel (bench/train_digits.py) and composed
with three new distractors of the training split; the test split with 3 seeded sets of distractors per digit (1080
images). Seeded; deterministic for a given torch build and thread count. Prints the test accuracy.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmaccel.models import digits, digits_canvas
from train_digits import save, train


def canvas_loss(distractors: torch.Tensor, seed: int):
    """classifier_loss of train_digits.py on the digits composed with new distractors every step."""
    generator = torch.Generator().manual_seed(seed + 1)

    def loss(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(digits_canvas.compose(pixels, distractors, generator)).logits
        return F.cross_entropy(logits, labels, label_smoothing=0.1)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=digits_canvas.CHECKPOINT)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    train_pixels, train_labels = digits.load_digits("train")
    test_pixels, test_labels = digits_canvas.load_canvas("test")

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = digits_canvas.build()
    print(f"digits ViT 64x64: {sum(p.numel() for p in model.parameters()):,} parameters")
    train(model, canvas_loss(train_pixels, args.seed), train_pixels, train_labels, args.epochs, args.lr, args.seed)
    acc = digits.accuracy(digits_canvas.logits_of(model), test_pixels, test_labels)
    print(f"  test accuracy {acc:.4f} on {len(test_labels)} images ({time.perf_counter() - start:.0f} s)")
    save(model, args.out)


if __name__ == "__main__":
    main()
