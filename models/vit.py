"""CLIP/ViT vision encoder in plain PyTorch.

Attention is spelled out timm-style with separate q, k and v projections so that the
compiler's passes (parallel-linear fusion, attention fusion) meet the pattern real
checkpoints produce, rather than an already fused qkv or an SDPA call.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .common import MLP


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    channels: int = 3
    norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def tiny(cls) -> "ViTConfig":
        return cls(image_size=32, patch_size=8, hidden=32, layers=2, heads=4)

    @classmethod
    def vit_b16(cls) -> "ViTConfig":
        return cls(image_size=224, patch_size=16, hidden=768, layers=12, heads=12)

    @classmethod
    def vit_l14_336(cls) -> "ViTConfig":
        """CLIP ViT-L/14 at 336 px, the LLaVA-1.5 vision tower."""
        return cls(image_size=336, patch_size=14, hidden=1024, layers=24, heads=16)


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden, config.hidden)
        self.k_proj = nn.Linear(config.hidden, config.hidden)
        self.v_proj = nn.Linear(config.hidden, config.hidden)
        self.out_proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.out_proj(x)


class ViTBlock(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.attn = ViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.mlp = MLP(config.hidden, int(config.hidden * config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(
            config.channels, config.hidden, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.hidden) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + config.num_patches, config.hidden) * 0.02)
        # CLIP normalizes the embeddings once before the first block.
        self.norm_pre = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.blocks = nn.ModuleList(ViTBlock(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden, eps=config.norm_eps)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + N, hidden]: class token then one token per patch."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        return self.norm_pre(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final normalized hidden states [B, 1 + N, hidden]."""
        x = self.embed(pixel_values)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of the penultimate block, class token dropped: [B, N, hidden].

        LLaVA feeds these to its projector: the last block is tuned for CLIP's contrastive
        objective and the second-to-last carries more spatial detail.
        """
        x = self.embed(pixel_values)
        for block in self.blocks[:-1]:
            x = block(x)
        return x[:, 1:]
