"""Attention on the Triton target: decode shapes (a few queries over a long KV cache) go to the split-KV
kernel, which spreads the cache over all SMs; everything else to ATen's fused SDPA (FlashAttention or
memory-efficient kernels on CUDA)."""
from __future__ import annotations

import torch
import torch.fx as fx

from .device import sm_count

aten = torch.ops.aten


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Grouped-query attention (enable_gqa, K/V with fewer heads) reads the shared K/V heads in place in the
    decode kernel; ATen's kernels get them in place too, except where none of its fused kernels takes them."""
    from . import decode_attention

    if _few_heads(q) and decode_attention.supports(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return decode_attention.decode_attention(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and k.shape[1] != q.shape[1] and _no_fused_gqa_kernel(q, attn_mask):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        enable_gqa = False
    return aten.scaled_dot_product_attention.default(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                     enable_gqa=enable_gqa)


def _no_fused_gqa_kernel(q, attn_mask) -> bool:
    """On CUDA (torch 2.11 to 2.14, sdp_utils.cpp) FlashAttention takes grouped K/V heads but no attn_mask, and
    the memory-efficient kernel takes a mask but no grouped heads (check_batch_size_and_num_heads_dense<false>):
    a masked grouped-query call would run the math kernel, which writes the [B, H, Lq, Lk] scores to memory.
    Repeating K/V (B*H*Lk*D more reads) lets the memory-efficient kernel run instead."""
    return q.is_cuda and attn_mask is not None


def _few_heads(q) -> bool:
    """Split-KV pays when batch x heads leaves SMs idle (measured on an H200: 12.2 vs 16.2 us at batch 1 with
    a mask; 72.5 vs 64.2 us at batch 8, where ATen's kernel already fills the GPU)."""
    if not q.is_cuda:
        return True
    return q.shape[0] * q.shape[1] <= sm_count(q.device)


_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal")


def route_attention(gm: fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        q, k, v, *rest = node.args
        kwargs = dict(zip(_SDPA_ARGS, rest))
        kwargs.update(node.kwargs)
        node.target, node.args, node.kwargs = sdpa, (q, k, v), kwargs
        count += 1
    return count
