"""Small trained models on scikit-learn's digits (8x8 grey images of 0-9), for accuracy checks of lossy
passes such as quantization: a ViT classifier and a LLaVA-style captioner that spells the digit's name.

    model = load_classifier()
    pixels, labels = load_digits("test")
    accuracy(model, pixels, labels)           # ~0.98 in fp32
    caption(load_captioner(), pixels[:3])     # ['seven', 'nine', 'four']

Both are built from the same pieces as the reference models (the ViT of vit.py, attention with separate
q/k/v/out projections written out, LayerNorm, Linear-GELU-Linear MLPs), so the compiler's passes meet
the patterns they meet there. The weights are committed under checkpoints/; bench/train_digits.py
reproduces them, bit for bit, in about a minute on one CPU thread.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from .common import MLP
from .vit import ViT, ViTConfig

CHECKPOINTS = Path(__file__).parent / "checkpoints"
CLASSIFIER_CHECKPOINT = CHECKPOINTS / "digits_vit.pt"
CAPTIONER_CHECKPOINT = CHECKPOINTS / "digits_captioner.pt"

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAD, BOS, EOS = 0, 1, 2
CHARS = "".join(sorted(set("".join(DIGIT_NAMES))))
VOCAB = 3 + len(CHARS)


def digits_vision_config() -> ViTConfig:
    """8x8 one-channel images in 2x2 patches: 16 patch tokens (plus the class token)."""
    return ViTConfig(image_size=8, patch_size=2, hidden=48, layers=3, heads=4, mlp_ratio=2.0, channels=1)


def load_digits(split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed 80/20 split of scikit-learn's 1797 digits: pixels float32 [N, 1, 8, 8] in [0, 1] and labels
    int64 [N] (train: 1437, test: 360). Needs scikit-learn, which ships the data."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    # The legacy RandomState stream is frozen (NEP 19), so the split is the same on every numpy.
    order = np.random.RandomState(0).permutation(len(data.target))
    n_train = int(0.8 * len(order))
    rows = order[:n_train] if split == "train" else order[n_train:]
    pixels = torch.from_numpy(data.images[rows] / 16.0).float().unsqueeze(1)
    return pixels, torch.from_numpy(data.target[rows]).long()


class DigitsViT(nn.Module):
    """ViT over the 16 patches of a digit; the class token's final state goes to a 10-way head."""

    def __init__(self, vision: ViTConfig | None = None) -> None:
        super().__init__()
        self.encoder = ViT(vision or digits_vision_config())
        self.head = nn.Linear(self.encoder.config.hidden, len(DIGIT_NAMES))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 1, 8, 8] in [0, 1] -> logits [B, 10]."""
        return self.head(self.encoder(pixels)[:, 0])


@dataclass(frozen=True)
class CaptionerConfig:
    vision: ViTConfig = field(default_factory=digits_vision_config)
    hidden: int = 48
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    max_text_len: int = 16  # text positions, BOS included

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.hidden // config.heads
        self.q_proj = nn.Linear(config.hidden, config.hidden)
        self.k_proj = nn.Linear(config.hidden, config.hidden)
        self.v_proj = nn.Linear(config.hidden, config.hidden)
        self.out_proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, S, C]; mask [S, S], True where a query may attend."""
        B, S, C = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(B, S, C)
        return self.out_proj(out)


class DecoderBlock(nn.Module):
    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden)
        self.mlp = MLP(config.hidden, int(config.hidden * config.mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DigitsCaptioner(nn.Module):
    """LLaVA in miniature: ViT patch states -> MLP projector -> causal decoder over [image ; text] tokens.

    No KV cache: each call reruns the whole prefix, so any compiled version of `forward` can stand in.
    """

    def __init__(self, config: CaptionerConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CaptionerConfig()
        self.vision = ViT(config.vision)
        self.projector = MLP(config.vision.hidden, config.hidden, config.hidden)
        self.embed_tokens = nn.Embedding(VOCAB, config.hidden)
        seq = config.num_image_tokens + config.max_text_len
        self.pos_embed = nn.Parameter(torch.randn(1, seq, config.hidden) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, VOCAB)
        self.register_buffer("causal_mask", torch.tril(torch.ones(seq, seq, dtype=torch.bool)), persistent=False)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """pixels [B, 1, 8, 8], ids [B, T] (BOS first, T <= max_text_len) -> logits [B, T, VOCAB]: at each
        text position, the next character's."""
        image = self.projector(self.vision(pixels)[:, 1:])
        x = torch.cat([image, self.embed_tokens(ids)], dim=1)
        S = x.shape[1]
        x = x + self.pos_embed[:, :S]
        mask = self.causal_mask[:S, :S]
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.norm(x[:, self.config.num_image_tokens :]))


def encode(name: str) -> list[int]:
    """'two' -> [BOS, t, w, o, EOS]."""
    return [BOS, *(3 + CHARS.index(c) for c in name), EOS]


def decode(ids: list[int]) -> str:
    """Characters up to the first EOS (or PAD); a leading BOS is skipped."""
    text = []
    for i in ids[1:] if ids and ids[0] == BOS else ids:
        if i in (EOS, PAD):
            break
        text.append(CHARS[i - 3] if i > EOS else "?")
    return "".join(text)


def caption_ids(labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forcing sequences [N, 7]: BOS, the digit's name, EOS, then PAD. The model reads [:, :-1]
    and predicts [:, 1:]."""
    width = 2 + max(len(n) for n in DIGIT_NAMES)
    return torch.tensor([encode(DIGIT_NAMES[y]) + [PAD] * (width - len(DIGIT_NAMES[y]) - 2) for y in labels.tolist()])


@torch.no_grad()
def caption(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pixels: torch.Tensor,
            max_len: int = 8) -> list[str]:
    """Greedy captions of a batch. Each step calls `model(pixels, ids)` on the whole growing prefix (no
    cache), so a compiled captioner (dynamic in the text length) can stand in for the eager one. At most
    `max_len` characters, EOS included (max_len <= CaptionerConfig.max_text_len)."""
    ids = torch.full((pixels.shape[0], 1), BOS, dtype=torch.long, device=pixels.device)
    done = torch.zeros(pixels.shape[0], dtype=torch.bool, device=pixels.device)
    for _ in range(max_len):
        next_ids = model(pixels, ids)[:, -1].argmax(dim=-1)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        done |= next_ids == EOS
        if bool(done.all()):
            break
    return [decode(row) for row in ids.tolist()]


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose highest logit is the label."""
    return float((model(pixels).argmax(dim=-1) == labels).float().mean())


def caption_accuracy(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                     labels: torch.Tensor) -> float:
    """Fraction of images whose greedy caption is exactly the digit's name."""
    captions = caption(model, pixels)
    return sum(c == DIGIT_NAMES[y] for c, y in zip(captions, labels.tolist())) / len(captions)


def _load(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def load_classifier() -> DigitsViT:
    """The trained DigitsViT (fp32, CPU, eval mode, gradients off)."""
    return _load(DigitsViT(), CLASSIFIER_CHECKPOINT)


def load_captioner() -> DigitsCaptioner:
    """The trained DigitsCaptioner (fp32, CPU, eval mode, gradients off)."""
    return _load(DigitsCaptioner(), CAPTIONER_CHECKPOINT)
