"""Whisper-style encoder-decoder, following OpenAI's reference implementation.

Attention keeps OpenAI's idiom: q and k are each scaled by head_dim ** -0.25 before q @ k
(a split of the usual 1/sqrt(head_dim) that keeps fp16 products small), and the softmax
runs in float32. The decoder recomputes the whole prefix on each call: no KV cache.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP


@dataclass(frozen=True)
class WhisperConfig:
    n_mels: int = 80
    n_audio_ctx: int = 1500  # encoder positions: the conv stem halves 3000 mel frames (30 s) to 1500
    n_text_ctx: int = 448
    vocab: int = 51865
    d_model: int = 512
    heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6

    @classmethod
    def tiny(cls) -> "WhisperConfig":
        return cls(
            n_mels=16, n_audio_ctx=16, n_text_ctx=32, vocab=64, d_model=32, heads=4, encoder_layers=2, decoder_layers=2
        )

    @classmethod
    def base(cls) -> "WhisperConfig":
        return cls()

    @classmethod
    def small(cls) -> "WhisperConfig":
        return cls(d_model=768, heads=12, encoder_layers=12, decoder_layers=12)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Fixed sinusoidal positions [length, channels]: sines in the first half, cosines in the second."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, xa: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over x, or cross-attention from x to xa; `mask` is additive [T, T]."""
        source = x if xa is None else xa
        q, k, v = self.query(x), self.key(source), self.value(source)
        B, T, C = q.shape
        scale = (C // self.heads) ** -0.25
        q = q.view(B, T, self.heads, -1).permute(0, 2, 1, 3) * scale
        k = k.view(B, k.shape[1], self.heads, -1).permute(0, 2, 3, 1) * scale
        v = v.view(B, v.shape[1], self.heads, -1).permute(0, 2, 1, 3)
        qk = q @ k
        if mask is not None:
            qk = qk + mask
        w = F.softmax(qk.float(), dim=-1).to(q.dtype)
        return self.out((w @ v).permute(0, 2, 1, 3).flatten(start_dim=2))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, cross_attention: bool) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, heads)
        self.cross_attn_ln = nn.LayerNorm(d_model) if cross_attention else None
        self.cross_attn = MultiHeadAttention(d_model, heads) if cross_attention else None
        self.mlp_ln = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, 4 * d_model)

    def forward(self, x: torch.Tensor, xa: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), mask=mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), xa)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(config.n_audio_ctx, config.d_model), persistent=False)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(config.d_model, config.heads, cross_attention=False)
            for _ in range(config.encoder_layers)
        )
        self.ln_post = nn.LayerNorm(config.d_model)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, frames] -> audio features [B, ceil(frames / 2), d_model]; frames <= 2 * n_audio_ctx."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        # OpenAI asserts exactly 3000 frames; slicing lets shorter clips (and dynamic lengths) through.
        x = x + self.positional_embedding[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab, config.d_model)
        self.positional_embedding = nn.Parameter(torch.randn(config.n_text_ctx, config.d_model) * 0.01)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(config.d_model, config.heads, cross_attention=True)
            for _ in range(config.decoder_layers)
        )
        self.ln = nn.LayerNorm(config.d_model)
        mask = torch.full((config.n_text_ctx, config.n_text_ctx), float("-inf")).triu_(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (T <= n_text_ctx), audio_features [B, A, d_model] -> float32 logits [B, T, vocab]."""
        T = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:T]
        mask = self.mask[:T, :T]
        for block in self.blocks:
            x = block(x, audio_features, mask)
        x = self.ln(x)
        # The output projection is tied to the token embedding, as in Whisper.
        return (x @ self.token_embedding.weight.T).float()


class Whisper(nn.Module):
    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config)
        self.decoder = TextDecoder(config)

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel)

    def decode(self, tokens: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, audio_features)

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(tokens, self.encode(mel))
