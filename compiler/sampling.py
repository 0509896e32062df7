"""Token choice inside the compiled generation step: greedy, or sampling with HF's temperature -> top-k ->
top-p order, seeded by a counter-based hash instead of a random-number generator's state.

Why a hash: the noise for (seed, step, row, vocab id) is a pure function of those integers, made of pointwise
integer ops. It fuses into the step's kernels, replays from a CUDA graph without generator state, and gives
the same tokens for the same seed on every target and device (eager, Triton, CPU, GPU), so a compiled run
can be checked against the uncompiled step. Sampling draws by Gumbel-max: argmax(logits + Gumbel noise) is
a sample of softmax(logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
# The 32-bit integer hash of Thomas Mueller's public-domain "hash prospector" family: two multiply-xorshift
# rounds; the constant is under 2**31, so products stay within int64.
_MIX = 0x45D9F3B


@dataclass(frozen=True)
class Sampler:
    """The parts of a sampling configuration that change the graph; temperature and top-p are tensors. The logits
    processors before the choice (compiler/generation.py): HF's repetition penalty, suppressed tokens, and tokens
    suppressed at the first new token only (Whisper's generation config sets both)."""
    do_sample: bool
    top_k: int | None
    use_top_p: bool
    repetition: bool = False
    suppress: bool = False
    begin_suppress: bool = False


def choose_tokens(logits: torch.Tensor, sampler: Sampler, temperature: torch.Tensor, top_p: torch.Tensor,
                  seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] float32 -> next token ids [B]. `step` ([1]) makes each step's noise different."""
    if not sampler.do_sample:
        return logits.argmax(-1)
    scores = warp_scores(logits, sampler, temperature, top_p)
    return (scores + gumbel_noise(seed, step, scores.shape, scores.device)).argmax(-1)


def warp_scores(logits: torch.Tensor, sampler: Sampler, temperature: torch.Tensor,
                top_p: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> the scores sampling draws from (softmax of them is the sampled distribution):
    temperature, then top-k, then top-p, -inf where a token is dropped."""
    scores = logits / temperature
    if sampler.top_k is not None:
        scores = _top_k(scores, sampler.top_k)
    if sampler.use_top_p:
        scores = _top_p(scores, top_p)
    return scores


def _top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """As HF's TopKLogitsWarper: keep scores at least the k-th largest."""
    kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(scores < kth, -float("inf"))


def _top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """As HF's TopPLogitsWarper: drop the least likely tokens whose probabilities sum to at most 1 - top_p,
    always keeping the most likely one."""
    sorted_scores, sorted_ids = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    drop = cumulative <= (1 - top_p)
    drop[..., -1:] = False
    return scores.masked_fill(drop.scatter(-1, sorted_ids, drop), -float("inf"))


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, shape: torch.Size, device: torch.device,
                 stream: int = 0) -> torch.Tensor:
    """Gumbel(0, 1) noise of `shape` ([B, V]), a function of (seed, stream, step, row, column) only."""
    return -torch.log(-torch.log(uniform_noise(seed, step, shape, device, stream)))


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, shape: torch.Size, device: torch.device,
                  stream: int = 0) -> torch.Tensor:
    """Uniform(0, 1) noise of a 2-d `shape`. `stream` separates draws that share a step (speculative decoding
    draws its proposals, acceptance tests and corrections at the same counter); stream 0 is plain sampling."""
    rows, cols = shape
    index = torch.arange(rows, device=device)[:, None] * cols + torch.arange(cols, device=device)[None, :]
    key = _hash(_hash(seed.reshape(1, 1) & _MASK32) ^ ((step.reshape(1, 1) ^ (stream << 24)) & _MASK32))
    bits = _hash(_hash(index & _MASK32) ^ key)
    # 24 bits: exact in float32; +0.5 keeps u strictly inside (0, 1).
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def _hash(x: torch.Tensor) -> torch.Tensor:
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x
