"""The split-KV decode attention kernel against torch's SDPA. Without a GPU it runs under Triton's
interpreter (conftest sets TRITON_INTERPRET), so shapes are small; lengths are not multiples of the block
size, so the last block of a split and the last split are partial."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("triton")

from mmaccel.backends.triton.decode_attention import decode_attention, plan, supports  # noqa: E402

from conftest import assert_matches_eager  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]  # bf16 loads are wrong in the interpreter


def qkv(B=2, H=4, Hkv=4, Lq=1, Lk=17, D=16, dtype=torch.float32, layout="contiguous"):
    """layout "cache": k/v are the first Lk positions of a longer cache; "bshd": [B, L, H, D] memory,
    transposed to [B, H, L, D] views (q too)."""
    def make(heads, length):
        if layout == "cache":
            return torch.randn(B, heads, length + 7, D, dtype=dtype, device=DEVICE)[:, :, :length]
        if layout == "bshd":
            return torch.randn(B, length, heads, D, dtype=dtype, device=DEVICE).transpose(1, 2)
        return torch.randn(B, heads, length, D, dtype=dtype, device=DEVICE)
    return make(H, Lq), make(Hkv, Lk), make(Hkv, Lk)


def check(q, k, v, attn_mask=None, scale=None, enable_gqa=False):
    assert supports(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa)
    out = decode_attention(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa)
    assert out.is_contiguous()
    # The math backend as reference: on CUDA, fused backends disagree on rows whose every key is masked
    # (cuDNN and memory-efficient kernels return a mean of v there, math returns 0, as this kernel does).
    with sdpa_kernel([SDPBackend.MATH]):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa)
    assert_matches_eager(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk,D", [(1, 1, 16), (3, 17, 64), (1, 100, 64), (3, 100, 16), (16, 33, 40)])
def test_shapes(dtype, Lq, Lk, D):
    torch.manual_seed(0)
    check(*qkv(Lq=Lq, Lk=Lk, D=D, dtype=dtype))


def padding_mask(B, Lq, Lk):
    """bool [B, 1, Lq, Lk]: batch 1 left-padded by 5 keys, a few random holes, every row keeps a key."""
    mask = torch.rand(B, 1, Lq, Lk, device=DEVICE) > 0.2
    mask[1:, :, :, :5] = False
    mask[..., -1] = True
    return mask


def causal_float_mask(Lq, Lk, dtype):
    """float [1, 1, Lq, Lk] as a decoder builds it: 0 where allowed, finfo.min where masked."""
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE).tril(Lk - Lq)
    return torch.zeros(1, 1, Lq, Lk, dtype=dtype, device=DEVICE).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_masks_and_gqa(dtype, mask_kind, Hkv):
    torch.manual_seed(0)
    B, Lq, Lk = 2, 3, 100
    mask = padding_mask(B, Lq, Lk) if mask_kind == "bool" else causal_float_mask(Lq, Lk, dtype)
    check(*qkv(B=B, Hkv=Hkv, Lq=Lq, Lk=Lk, D=64, dtype=dtype), mask, enable_gqa=Hkv != 4)


@pytest.mark.parametrize("Lq,heads", [(1, 8), (16, 4)])
def test_grouped_heads_share_a_program_with_per_head_masks(Lq, heads):
    """Grouped-query attention: one program takes as many query heads of a K/V head as fit its 64 rows (all 8
    at Lq 1; 4 of 8 at Lq 16, so two programs share a K/V head), each row with its own head's mask."""
    torch.manual_seed(0)
    q, k, v = qkv(B=2, H=16, Hkv=2, Lq=Lq, Lk=50, D=16, dtype=torch.float16)
    assert plan(q, k).heads == heads
    mask = torch.rand(2, 16, Lq, 50, device=DEVICE) > 0.3
    mask[..., 0] = True
    check(q, k, v, mask, enable_gqa=True)


@pytest.mark.parametrize("layout", ["cache", "bshd"])
def test_strided_inputs_and_scale(layout):
    torch.manual_seed(0)
    q, k, v = qkv(B=1, Hkv=2, Lq=3, Lk=100, D=16, layout=layout)
    assert not k.is_contiguous()
    mask = torch.rand(1, 4, 1, 100, device=DEVICE) > 0.2  # one per head, stride 0 along query rows
    mask[..., -1] = True
    mask = mask.expand(1, 4, 3, 100)
    check(q, k, v, mask, scale=0.3, enable_gqa=True)


def test_fully_masked_rows():
    """Rows with no key give 0 as SDPA does; a row masked with finfo.min follows the arithmetic."""
    torch.manual_seed(0)
    q, k, v = qkv(B=1, Lq=3, Lk=40)
    mask = torch.ones(1, 1, 3, 40, dtype=torch.bool, device=DEVICE)
    mask[..., 0, :] = False
    out = decode_attention(q, k, v, mask)
    assert (out[:, :, 0] == 0).all()
    check(q, k, v, mask)
    check(q, k, v, torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf")))
    check(q, k, v, torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, torch.finfo(torch.float32).min))


def test_supports_rejects():
    q, k, v = qkv(Lq=3)
    assert supports(q, k, v)
    assert not supports(q, k, v, is_causal=True)
    assert not supports(q, k, v, dropout_p=0.1)
    assert not supports(*qkv(Lq=64))
    assert not supports(q.half(), k, v)
    assert not supports(q, *qkv(Hkv=2)[1:])  # fewer kv heads without enable_gqa
    assert not supports(q, k, v, torch.ones(2, 4, 3, 5, dtype=torch.bool, device=DEVICE))  # not broadcastable


def test_grouped_query_sdpa_reaches_the_kernel_with_shared_kv_heads(monkeypatch):
    """The aten SDPA node attention_fusion emits for grouped-query attention (enable_gqa=True), on the Triton
    target: the decode kernel gets K/V with their own 2 heads (no repeat in memory) and matches eager."""
    from mmaccel.backends.triton import attention, decode_attention as module

    seen = []
    kernel = module.decode_attention
    monkeypatch.setattr(module, "decode_attention", lambda q, k, v, *a, **kw: seen.append(k.shape) or kernel(q, k, v, *a, **kw))
    q, k, v = qkv(Hkv=2, Lq=3)
    mask = torch.rand(2, 1, 3, 17, device=DEVICE) > 0.3
    out = attention.sdpa(q, k, v, mask, scale=0.2, enable_gqa=True)
    assert seen == [k.shape]
    assert_matches_eager(out, F.scaled_dot_product_attention(q, k, v, mask, scale=0.2, enable_gqa=True))


def test_grouped_query_prefill_without_a_fused_aten_kernel_repeats_kv(monkeypatch):
    """Prefill (too many query rows for the decode kernel) with a mask, where ATen has no fused kernel for
    grouped K/V heads (CUDA: _no_fused_gqa_kernel): ATen gets K/V repeated per query head, same result."""
    from types import SimpleNamespace

    from mmaccel.backends.triton import attention

    heads = []

    def aten_sdpa(q, k, v, *args, **kwargs):
        heads.append((k.shape[1], kwargs["enable_gqa"]))
        return torch.ops.aten.scaled_dot_product_attention.default(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "_no_fused_gqa_kernel", lambda q, mask: True)
    monkeypatch.setattr(attention, "aten", SimpleNamespace(scaled_dot_product_attention=SimpleNamespace(default=aten_sdpa)))
    q, k, v = qkv(Hkv=2, Lq=20, Lk=20)
    mask = torch.rand(2, 1, 20, 20, device=DEVICE) > 0.3
    out = attention.sdpa(q, k, v, mask, enable_gqa=True)
    assert heads == [(4, False)]
    assert_matches_eager(out, F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocks_every_row_masks_out_are_not_read(dtype):
    """A static KV cache at position 64 of 100: slots 64.. are masked (bool False / -inf) and hold NaN here, so
    the output equals attention over the written prefix only if the kernel skipped those blocks (64: a block
    boundary on the interpreter, 16, and on CUDA, 64; a partly masked block is read, and NaN there propagates
    through 0 * NaN as in eager)."""
    torch.manual_seed(0)
    q, k, v = qkv(Lq=2, Lk=100, D=16, dtype=dtype)
    written = 64
    for t in (k, v):
        t[:, :, written:] = float("nan")
    keep = torch.zeros(1, 1, 2, 100, dtype=torch.bool, device=DEVICE)
    keep[..., :written] = True
    expected = F.scaled_dot_product_attention(q, k[:, :, :written], v[:, :, :written])
    for mask in (keep, torch.zeros(keep.shape, dtype=dtype, device=DEVICE).masked_fill(~keep, float("-inf"))):
        assert_matches_eager(decode_attention(q, k, v, mask), expected)


def test_finite_masks_are_read_as_eager_reads_them():
    """Near miss: finfo.min is not -inf, so those blocks are read (NaN there reaches the output, as in eager)."""
    torch.manual_seed(0)
    q, k, v = qkv(Lq=1, Lk=100, D=16)
    v[:, :, 60:] = float("nan")
    mask = torch.zeros(1, 1, 1, 100, device=DEVICE)
    mask[..., 60:] = torch.finfo(torch.float32).min
    assert torch.isnan(decode_attention(q, k, v, mask)).all()


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "all_masked_row"])
def test_every_tuning_candidate_and_the_one_split_plan_match(mask_kind):
    """Each plan the decode tuner may pick (decode_attention.CANDIDATES, built for this shape) gives the
    reference, including the one-split plans whose kernel writes the output itself (no merge kernel): a row
    with every key masked gives 0 there too, grouped-query heads, a float mask."""
    from mmaccel.backends.triton import decode_attention as da

    torch.manual_seed(0)
    q, k, v = qkv(B=2, H=8, Hkv=2, Lq=2, Lk=70, D=16, dtype=torch.float16)
    mask = None if mask_kind == "none" else padding_mask(2, 2, 70)
    if mask_kind == "float":
        mask = torch.zeros(mask.shape, dtype=torch.float16, device=DEVICE).masked_fill(~mask, float("-inf"))
    if mask_kind == "all_masked_row":
        mask[0, :, 1, :] = False
    with sdpa_kernel([SDPBackend.MATH]):
        expected = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    options = da.candidates(q, k)
    assert options[0] == plan(q, k) and len(set(options)) == len(options)
    assert {cut.num_splits == 1 for cut in options} == {True, False}
    for cut in options:
        out = decode_attention(q, k, v, mask, enable_gqa=True, launch=cut)
        assert_matches_eager(out, expected)
        if mask_kind == "all_masked_row":
            assert (out[0, :, 1] == 0).all()
