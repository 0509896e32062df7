"""Chameleon-style early fusion: images become discrete tokens in the text vocabulary.

A small VQ tokenizer (strided conv encoder + nearest codebook entry) turns an image into a
grid of token ids that sit at the top of a shared vocabulary; one decoder then models the
interleaved sequence [image tokens, text tokens]. The decoder uses QK-norm, as Chameleon
does, and the nanoGPT masked_fill form of the causal mask.
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from .decoder import Decoder, DecoderConfig


@dataclass(frozen=True)
class VQConfig:
    image_size: int = 512
    channels: tuple[int, ...] = (128, 256, 256, 512)  # one stride-2 conv each: 16x downsampling
    embed_dim: int = 256
    codebook_size: int = 8192

    @property
    def num_tokens(self) -> int:
        return (self.image_size // 2 ** len(self.channels)) ** 2


@dataclass(frozen=True)
class ChameleonConfig:
    vq: VQConfig
    text: DecoderConfig

    @property
    def image_token_offset(self) -> int:
        """Image codes occupy the last `codebook_size` ids of the shared vocabulary."""
        return self.text.vocab - self.vq.codebook_size

    @classmethod
    def tiny(cls) -> "ChameleonConfig":
        vq = VQConfig(image_size=16, channels=(16, 32), embed_dim=16, codebook_size=32)
        text = replace(DecoderConfig.tiny(), qk_norm=True, mask_style="masked_fill")
        return cls(vq=vq, text=text)

    @classmethod
    def real(cls) -> "ChameleonConfig":
        """Chameleon-7B: 512 px images as 1024 tokens from an 8192-entry codebook, 65536-token vocabulary."""
        text = replace(DecoderConfig.llama_7b(), vocab=65536, max_seq_len=4096, qk_norm=True, mask_style="masked_fill")
        return cls(vq=VQConfig(), text=text)


class VQImageTokenizer(nn.Module):
    def __init__(self, config: VQConfig, token_offset: int) -> None:
        super().__init__()
        self.token_offset = token_offset
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in config.channels:
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1), nn.GELU()]
            in_channels = out_channels
        layers.append(nn.Conv2d(in_channels, config.embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)
        self.codebook = nn.Embedding(config.codebook_size, config.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> token ids [B, (H / 2^L) * (W / 2^L)] in raster order, offset into the vocabulary."""
        z = self.encoder(pixel_values).flatten(2).transpose(1, 2)  # [B, N, embed_dim]
        codes = self.codebook.weight
        distances = z.pow(2).sum(-1, keepdim=True) - 2 * z @ codes.T + codes.pow(2).sum(-1)
        return distances.argmin(dim=-1) + self.token_offset


class Chameleon(nn.Module):
    def __init__(self, config: ChameleonConfig) -> None:
        super().__init__()
        self.config = config
        self.image_tokenizer = VQImageTokenizer(config.vq, config.image_token_offset)
        self.decoder = Decoder(config.text)

    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        self.decoder.setup_cache(batch_size, dtype, device)

    def tokenize_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_tokenizer(pixel_values)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, S, vocab] for the mixed image/text `input_ids` [B, S] at `input_pos` [S]."""
        return self.decoder(input_ids, input_pos)
