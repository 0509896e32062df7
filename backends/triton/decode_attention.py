"""Split-KV ("flash-decoding") attention for autoregressive decode.

In decode a few query tokens attend to a long KV cache, so the cost is reading K and V once. ATen's SDPA
kernels give each (batch, head) one program: B*H = 32 programs for a 32-head model at batch 1, on an H100
with 132 SMs, leaves most of the memory bandwidth idle. Here the KV length is split over programs too:
  phase 1, grid (B*H / heads, num_splits): each program runs an online softmax over its chunk of keys for
           `heads` query heads that share a K/V head (grouped-query attention: each K/V block is read once per
           group, not once per query head; 1 for multi-head attention) and writes the partials (row max, row
           sum, unnormalized output) to fp32 scratch;
  phase 2, grid (B*H, Lq): merges the splits of one query row with a log-sum-exp rescale.
The scratch holds Lq*D floats per split, small next to the chunk of cache each split reads; a plan of one split
writes the output directly, without phase 2. The default launch plan (`plan`) comes from an H200 sweep
(bench/decode_kernels_sweep.py); on CUDA each decode shape's plan is measured on first use (`_tuned_plan`).

Semantics are those of torch.nn.functional.scaled_dot_product_attention (bool mask: True attends; float
mask: added to the scaled scores, in fp32). A row whose every key is masked (all False, or all -inf) gives
0, as PyTorch's SDPA does, rather than 0/0 = NaN: left-padded batches have such rows, and a NaN there would
reach every later token through the cache. A row masked with finite values (finfo.min) follows the plain
arithmetic, as in eager. NaN in q, k or v still propagates, except from keys in a block that every query row
masks out with False / -inf: such blocks are not read (a static KV cache's slots past the current position).
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .device import device_name, pdl_launch, sm_count
from .tuning import Choices, time_us, tuned

MAX_QUERY_ROWS = 16  # one padded tl.dot tile of query rows; longer queries are prefill, not decode
MAX_HEAD_DIM = 256


@triton.jit
def _split_kv_kernel(Q, K, V, Mask, M_part, L_part, Acc_part, Out,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                     H, group, heads, Lq, Lk, D, split_len, scale,
                     HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FINAL: tl.constexpr,
                     USE_GDC: tl.constexpr):
    """One program: `heads` query heads that share one K/V head (grouped-query attention reads each K/V block
    once for its whole group instead of once per query head), all their Lq query rows as the rows of one tile
    (row r: head r // Lq, query r % Lq), and one split of the keys. FINAL (one split): the normalized output
    straight to Out, as _combine_kernel would write it (no scratch, no second kernel)."""
    if USE_GDC:  # launched with programmatic dependent launch (device.pdl): the previous kernel's writes first
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid, split = tl.program_id(0), tl.program_id(1)
    # int64 batch/head offsets: a KV cache can hold more than 2**31 elements
    b = (pid // (H // heads)).to(tl.int64)
    head0 = ((pid % (H // heads)) * heads).to(tl.int64)
    kvh = head0 // group
    offs_r, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    row_ok, d_ok = offs_r < heads * Lq, offs_d < D
    h, m = head0 + offs_r // Lq, offs_r % Lq
    q = tl.load(Q + b * sqb + h[:, None] * sqh + m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, Lk)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_MASK:
            mv = tl.load(Mask + b * smb + h[:, None] * smh + m[:, None] * smm + offs_n[None, :] * smn,
                         mask=row_ok[:, None] & n_ok[None, :], other=0)
            if MASK_IS_BOOL:
                bias = tl.where(mv, bias, float("-inf"))
            else:
                bias = mv.to(tl.float32)
        # A block every row masks out with False / -inf adds exactly nothing: skip its K and V reads. A static
        # KV cache at position p of max_len masks the max_len - p slots not written yet, so early in a
        # generation most of the cache is never read (finite masks, finfo.min, are read: exact arithmetic)
        live = tl.max(tl.where(row_ok[:, None] & n_ok[None, :] & (bias > float("-inf")), 1, 0))
        if live > 0:
            # K is read transposed ([D, N]) so the dot needs no shuffle; D is the contiguous dim either way.
            # V is loaded before the scores are computed, so both loads are in flight at once: a decode
            # program does one or two blocks, and serial K-then-V latency was most of its time
            kt = tl.load(K + b * skb + kvh * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                         mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale + bias
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # While a row has seen no key its max is -inf; shifting by 0 keeps exp() at 0 instead of NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    if FINAL:  # every key masked: acc and l_i are 0, and the output 0 as SDPA gives (a NaN sum still propagates)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + ((b * H + h) * Lq + m)[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = ((b * H + h) * tl.num_programs(1) + split) * Lq + m  # scratch row of (batch, head, split, query row)
        tl.store(M_part + part, m_i, mask=row_ok)
        tl.store(L_part + part, l_i, mask=row_ok)
        tl.store(Acc_part + part[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(M_part, L_part, Acc_part, Out, num_splits, Lq, D,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    bh, row = tl.program_id(0), tl.program_id(1)
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    s_ok, d_ok = offs_s < num_splits, offs_d < D
    part = (bh * num_splits + offs_s) * Lq + row
    m = tl.load(M_part + part, mask=s_ok, other=float("-inf"))
    l = tl.load(L_part + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # each split's rescale to the global max
    acc = tl.load(Acc_part + part[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(l * w, 0)
    # Every key masked: acc and total are 0, and the output 0 as SDPA gives (a NaN total still propagates)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + (bh * Lq + row) * D + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
             enable_gqa: bool = False) -> bool:
    """Whether decode_attention computes this SDPA call: decode shapes (Lq <= 16), no dropout or causal flag."""
    if not (q.dim() == k.dim() == v.dim() == 4) or k.shape != v.shape or dropout_p != 0.0 or is_causal:
        return False
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    heads_ok = Hkv == H or (enable_gqa and Hkv > 0 and H % Hkv == 0)
    if not (heads_ok and k.shape[0] == B and k.shape[3] == D and 0 < Lq <= MAX_QUERY_ROWS
            and 0 < D <= MAX_HEAD_DIM and Lk > 0 and B * H > 0):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        return False
    if not (q.device == k.device == v.device) or not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    if attn_mask is None:
        return True
    if attn_mask.device != q.device or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return False
    try:
        return attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, (B, H, Lq, Lk)) == (B, H, Lq, Lk)
    except RuntimeError:
        return False


class Plan(NamedTuple):
    """How one call is cut into programs: `heads` query heads of one K/V head per program (their Lq rows
    together), keys in splits of `split_len` (a whole number of `block_n` blocks)."""
    heads: int
    block_n: int
    split_len: int
    num_splits: int
    num_warps: int
    num_stages: int


MAX_TILE_ROWS = 64  # query rows of one program (heads x Lq): the q, score and output tiles stay in registers
# CUDA defaults from the H200 sweep (bench/decode_kernels_sweep.py, bench/results/decode_kernels_sweep_h200.json;
# 135 plans on 5 decode shapes): the plan with the lowest geometric mean over the shapes of its time against each
# shape's best, 1.08x, where the former plan (3 programs per SM, 4 warps, 3 stages) was 1.20x: 11.8 -> 10.4 us at
# 640 live keys, 16.6 -> 14.3 at 1025, 40.1 -> 30.2 at 4096 (MHA, 32 heads of 128). More programs keep more loads
# in flight; a program does one or two blocks, so pipeline stages buy nothing.
PROGRAMS_PER_SM, BLOCK_N, NUM_WARPS, NUM_STAGES = 6, 64, 4, 1


def plan(q: torch.Tensor, k: torch.Tensor, programs_per_sm: Optional[int] = None, block_n: Optional[int] = None,
         num_warps: Optional[int] = None, num_stages: Optional[int] = None, splits: Optional[int] = None) -> Plan:
    """The launch plan; the keyword arguments override the CUDA defaults (the sweep's knobs). Heads: the most of
    a K/V group that fit MAX_TILE_ROWS rows. Splits: about `programs_per_sm` programs per SM on CUDA, so every SM
    has loads in flight, at most 64 splits so the merge's [splits, D] tile stays in registers; 4 splits on the
    interpreter (small blocks too), so small test shapes still span several blocks and splits and the merge;
    `splits` asks for that many instead (1: no merge kernel)."""
    B, H, Lq, D = q.shape
    Lk, group = k.shape[2], H // k.shape[1]
    heads = max(d for d in range(1, group + 1) if group % d == 0 and d * Lq <= max(MAX_TILE_ROWS, Lq))
    programs = B * H // heads
    if q.is_cuda:
        block_n = block_n or (BLOCK_N if D <= 128 else BLOCK_N // 2)
        target = min(64, triton.cdiv((programs_per_sm or PROGRAMS_PER_SM) * sm_count(q.device), programs))
        num_warps, num_stages = num_warps or NUM_WARPS, num_stages or NUM_STAGES
    else:
        block_n, target, num_warps, num_stages = block_n or 16, 4, num_warps or 4, num_stages or 1
    target = splits or target
    split_len = triton.cdiv(triton.cdiv(Lk, target), block_n) * block_n
    return Plan(heads, block_n, split_len, triton.cdiv(Lk, split_len), num_warps, num_stages)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, enable_gqa: bool = False, launch: Optional[Plan] = None) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa) for the shapes
    `supports` accepts, as a new contiguous [B, H, Lq, D] tensor. k, v and the mask are read through their
    strides (a broadcast mask is never expanded in memory). `launch`: a plan other than the measured one (the
    sweep)."""
    assert supports(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa), "decode_attention: unsupported inputs"
    B, H, Lq, D = q.shape
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        cut = launch or _tuned_plan(q, k, v, attn_mask, scale)
        out = torch.empty(B, H, Lq, D, device=q.device, dtype=q.dtype)
        _launch(q, k, v, attn_mask, scale, cut, out)
    return out


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
            scale: Optional[float], cut: Plan, out: torch.Tensor) -> None:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    final = cut.num_splits == 1
    m_part = torch.empty(0 if final else B * H * cut.num_splits * Lq, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(0 if final else B * H * cut.num_splits * Lq * D, device=q.device, dtype=torch.float32)
    mask = q if attn_mask is None else attn_mask  # any pointer does when there is no mask
    mask_strides = (0, 0, 0, 0) if attn_mask is None else attn_mask.broadcast_to(B, H, Lq, Lk).stride()
    launch = pdl_launch(q.device)
    _split_kv_kernel[(B * H // cut.heads, cut.num_splits)](
        q, k, v, mask, m_part, l_part, acc_part, out, *q.stride(), *k.stride(), *v.stride(), *mask_strides,
        H, H // k.shape[1], cut.heads, Lq, Lk, D, cut.split_len, 1.0 / math.sqrt(D) if scale is None else scale,
        HAS_MASK=attn_mask is not None, MASK_IS_BOOL=mask.dtype == torch.bool,
        # fp32 inputs would otherwise be rounded to tf32 by the tensor cores
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=max(16, triton.next_power_of_2(cut.heads * Lq)), BLOCK_N=cut.block_n, BLOCK_D=block_d,
        FINAL=final, num_warps=cut.num_warps, num_stages=cut.num_stages, **launch)
    if not final:
        _combine_kernel[(B * H, Lq)](m_part, l_part, acc_part, out, cut.num_splits, Lq, D,
                                     BLOCK_S=triton.next_power_of_2(cut.num_splits), BLOCK_D=block_d, **launch)


# The plan is measured per decode shape on CUDA (tuning.pick: the default plan first, kept unless another is 3%
# faster; the choice kept on disk; MMACCEL_ATTENTION_TUNE=0 keeps the default). Candidates: (programs per SM,
# keys per block, warps, stages, splits or None) from the H200 sweeps' per-shape winners
# (decode_kernels_sweep_h200.json, decode_kernels_sweep_whisper_h200.json): 640 live keys (24, 64, 4, 1) 10.4
# against the default's 11.8 us, 4096 keys (3, 64, 2, 1) 30.2 against 40.1 at the time's default, grouped-query
# 1025 keys (6, 32, 2, 1) 7.9 against 9.3, Whisper's cross-attention over 1500 positions (12, 128, 2, 1) 6.73
# against 7.66; and one split, which needs no merge kernel (Whisper's self-attention: a short cache, 20 heads).
TUNE_SWITCH = "MMACCEL_ATTENTION_TUNE"
CANDIDATES = [(24, 64, 4, 1, None), (6, 64, 8, 1, None), (3, 64, 2, 1, None), (6, 32, 2, 1, None),
              (6, 64, 4, 3, None), (12, 128, 2, 1, None), (1, 64, 8, 1, None), (6, 64, 4, 1, 1), (6, 128, 4, 1, 1)]
_tuned = Choices("decode_attention_plans.json")


def candidates(q: torch.Tensor, k: torch.Tensor) -> list[Plan]:
    """The default plan first, then CANDIDATES as plans for this shape, without repeats."""
    out = [plan(q, k)]
    for pps, block_n, warps, stages, splits in CANDIDATES:
        cut = plan(q, k, pps, block_n, warps, stages, splits)
        if cut not in out:
            out.append(cut)
    return out


def _tuned_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                scale: Optional[float]) -> Plan:
    """The measured plan of this shape on CUDA; the default elsewhere, while a CUDA graph is being captured
    before any measurement, or with MMACCEL_ATTENTION_TUNE=0."""
    if not q.is_cuda or os.environ.get(TUNE_SWITCH, "1") == "0":
        return plan(q, k)
    mask = "none" if attn_mask is None else f"{attn_mask.dtype}{tuple(attn_mask.shape)}"
    key = f"v1|{device_name(q.device)}|{q.dtype}|q{tuple(q.shape)}|k{tuple(k.shape)}|mask {mask}"

    def measure(cut: Plan) -> float:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return time_us(lambda: _launch(q, k, v, attn_mask, scale, cut, out))

    return tuned(_tuned, key, lambda: candidates(q, k), measure, lambda known: Plan(*known))
