"""Llama-style decoder LM with a static KV cache, gpt-fast style.

Everything that depends on the position (rotary cos/sin, causal mask, cache slot) is read
from precomputed buffers by indexing with the `input_pos` tensor, never derived from Python
ints. A decode step at any position is therefore the same graph, and the prefill length can
be a dynamic dimension. Attention is written out the way HF eager code does it, so the
compiler's attention fusion sees the pattern real models produce.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 32000
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # Chameleon normalizes queries and keys per head to keep its mixed-modal training stable.
    qk_norm: bool = False
    # "additive": HF eager (scores + float mask); "masked_fill": nanoGPT (fill -inf where masked).
    # Both idioms occur in real code, so the reference models carry both for the passes to match.
    mask_style: Literal["additive", "masked_fill"] = "additive"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def tiny(cls) -> "DecoderConfig":
        return cls(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_seq_len=64)

    @classmethod
    def llama_7b(cls, layers: int = 32) -> "DecoderConfig":
        """Llama-2-7B dimensions; fewer `layers` give a cheaper model with the same per-layer cost."""
        return cls(layers=layers)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares is taken in fp32: fp16 squares overflow at moderate activations.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos, sin: [S, D] rows for the positions of x."""
    return x * cos + rotate_half(x) * sin


def rotary_tables(max_seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * n_rep, S, D], each kv head serving n_rep query heads."""
    if n_rep == 1:
        return x
    B, kv_heads, S, D = x.shape
    return x[:, :, None].expand(B, kv_heads, n_rep, S, D).reshape(B, kv_heads * n_rep, S, D)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, config: DecoderConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, config.kv_heads, config.max_seq_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, S, D] at `input_pos` [S]; return the whole cache."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.heads, config.kv_heads, config.head_dim
        self.mask_style = config.mask_style
        self.q_proj = nn.Linear(config.hidden, config.heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden, config.kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden, config.kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.heads * config.head_dim, config.hidden, bias=False)
        self.q_norm = nn.LayerNorm(config.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(config.head_dim) if config.qk_norm else nn.Identity()
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor
    ) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("KV cache not allocated: call setup_cache(batch_size) first")
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, S, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        # Attend over the whole static cache; the mask hides slots after each query's position.
        k, v = self.kv_cache.update(input_pos, k, v)
        k = repeat_kv(k, self.heads // self.kv_heads)
        v = repeat_kv(v, self.heads // self.kv_heads)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        if self.mask_style == "masked_fill":
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, self.heads * self.head_dim)
        return self.o_proj(out)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden, config.norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden, config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attn_norm(x))


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        cos, sin = rotary_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        causal = torch.tril(torch.ones(config.max_seq_len, config.max_seq_len, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)

    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        """Allocate zeroed KV caches for `batch_size` sequences (default: the weights' dtype and device)."""
        weight = self.lm_head.weight
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch_size, self.config, dtype or weight.dtype, device or weight.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float32 logits [B, S, vocab] for tokens (or embeddings) at positions `input_pos` [S].

        Exactly one of `input_ids` [B, S] and `inputs_embeds` [B, S, hidden] is given.
        `input_pos` is a LongTensor; the cache must have been allocated with `setup_cache`.
        """
        if input_pos is None or (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass input_pos and exactly one of input_ids, inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rope_cos[input_pos].to(x.dtype), self.rope_sin[input_pos].to(x.dtype)
        allowed = self.causal_mask[input_pos][None, None]  # [1, 1, S, max_seq_len]
        if self.config.mask_style == "masked_fill":
            mask = allowed
        else:
            mask = torch.zeros_like(allowed, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.lm_head(self.norm(x)).float()
