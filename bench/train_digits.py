"""Trains the two digits models of mmaccel.models.digits and writes their checkpoints (fp32 state dicts).

    python bench/train_digits.py [--out models/checkpoints] [--threads 1]

Deterministic on CPU for a given torch build and thread count (seeded, one thread by default); each model
trains in well under two minutes on two cores. Prints the test accuracy of each (classifier: argmax;
captioner: greedy captions that match the digit's name exactly).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmaccel.models import digits

BATCH = 64


def shift_by_one_pixel(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixel in each direction (zeros fill in): [B, 1, 8, 8]."""
    B, _, H, W = pixels.shape
    padded = F.pad(pixels, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, B), generator=generator)
    rows = (dy[:, None] + torch.arange(H))[:, :, None]
    cols = (dx[:, None] + torch.arange(W))[:, None, :]
    return padded[torch.arange(B)[:, None, None], 0, rows, cols].unsqueeze(1)


def train(model: nn.Module, loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
          pixels: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    """AdamW with a one-cycle schedule over shuffled, shifted mini-batches."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(labels) // BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), BATCH):
            rows = order[start:start + BATCH]
            loss = loss_fn(model, shift_by_one_pixel(pixels[rows], generator), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0:
            print(f"  epoch {epoch + 1}: loss {loss.item():.4f}")
    model.eval()


def classifier_loss(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(pixels), labels, label_smoothing=0.1)


def captioner_loss(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    ids = digits.caption_ids(labels)
    logits = model(pixels, ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=digits.PAD)


def save(model: nn.Module, path: Path) -> None:
    torch.save({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, path)
    print(f"  wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(digits.CHECKPOINTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-epochs", type=int, default=60)
    parser.add_argument("--captioner-epochs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_pixels, train_labels = digits.load_digits("train")
    test_pixels, test_labels = digits.load_digits("test")

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    classifier = digits.DigitsViT()
    print("classifier")
    train(classifier, classifier_loss, train_pixels, train_labels, args.classifier_epochs, 3e-3, args.seed)
    acc = digits.accuracy(classifier, test_pixels, test_labels)
    print(f"  test accuracy {acc:.4f} ({time.perf_counter() - start:.0f} s)")
    save(classifier, args.out / digits.CLASSIFIER_CHECKPOINT.name)

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    captioner = digits.DigitsCaptioner()
    print("captioner")
    train(captioner, captioner_loss, train_pixels, train_labels, args.captioner_epochs, 3e-3, args.seed)
    acc = digits.caption_accuracy(captioner, test_pixels, test_labels)
    print(f"  test exact-match caption accuracy {acc:.4f} ({time.perf_counter() - start:.0f} s)")
    save(captioner, args.out / digits.CAPTIONER_CHECKPOINT.name)


if __name__ == "__main__":
    main()
