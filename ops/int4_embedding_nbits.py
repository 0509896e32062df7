"""mmaccel::int4_embedding_nbits: a token embedding that reads a tied LM head's 4-bit weights in ONNX Runtime's
MatMulNBits layout (ops/int4_matmul_nbits.py), so an int4 folder stores the table once. Export-only:
export_onnx(generation=True) with a quantize option puts it in place of aten.embedding when the head was
quantized to int4 and the table, quantized the same way, gives exactly the head's bits (a tied head), under the
accuracy budget (compiler/export_embeddings.py).

Its translation is one com.microsoft::GatherBlockQuantized (ONNX Runtime's contrib op) on the head's own packed
weight b [N, K/G, G/2]: gathered on axis 0, blocks of G along the last axis (each (row, block) one block), then a
Reshape of the gathered rows [*ids, K/G, G] to [*ids, K]. Reading b as it is, not reshaped to [N, K/2] as ONNX
Runtime GenAI's builder does, keeps ONNX Runtime from folding a reshaped copy of the table at session start
(a 32000 x 768 table: +37 MB of session memory with the Reshape, none without). The price is the scales and
zero points again in the gather's rank-3 shapes (MatMulNBits takes scales only as [N * K/G] or [N, K/G], and its
zero points two to a byte across blocks): 5 bytes per block, 0.96 MB for 32000 x 768 at G = 128.

Values: (q - zero) * scale in fp32, as MatMulNBits dequantizes (dequantize_matmul_nbits), so the embedding reads
exactly the values the head multiplies with."""
from __future__ import annotations

import torch

from .int4_matmul_nbits import contrib_op
from .registry import OpSpec, register


def gather_layout(scales: torch.Tensor, zero_points: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MatMulNBits' scales [N * K/G] and packed zero points [N, ceil((K/G)/2)] -> GatherBlockQuantized's on the
    rank-3 b: scales [N, K/G, 1], zero points uint8 [N, K/G, 1] (one block per byte, low nibble)."""
    n = zero_points.shape[0]
    zero = torch.stack([zero_points & 15, zero_points >> 4], dim=-1).reshape(n, -1)[:, :blocks]
    return scales.reshape(n, blocks, 1).contiguous(), zero.reshape(n, blocks, 1).contiguous()


def int4_embedding_nbits_reference(ids: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                                   zero_points: torch.Tensor) -> torch.Tensor:
    rows = b[ids]  # [*ids, K/G, G/2]
    q = torch.stack([rows & 15, rows >> 4], dim=-1).reshape(*rows.shape[:-1], 2 * rows.shape[-1]).float()
    w = (q - zero_points[ids].float()) * scales[ids].float()
    return w.reshape(*ids.shape, -1).to(scales.dtype)


@torch.library.custom_op("mmaccel::int4_embedding_nbits", mutates_args=())
def int4_embedding_nbits(ids: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                         zero_points: torch.Tensor) -> torch.Tensor:
    return int4_embedding_nbits_reference(ids, b, scales, zero_points)


@int4_embedding_nbits.register_fake
def _int4_embedding_nbits_fake(ids, b, scales, zero_points):
    return scales.new_empty((*ids.shape, b.shape[1] * b.shape[2] * 2))


def int4_embedding_nbits_onnx(ids, b, scales, zero_points):
    """com.microsoft::GatherBlockQuantized on b as it is (rank 3), then Reshape to [*ids, K]."""
    from onnxscript import opset18 as op

    _, blocks, half = b.shape
    gather = contrib_op("GatherBlockQuantized", [("data", "T1"), ("indices", "Tind"), ("scales", "T2"),
                                                 ("zero_points", "T1")], ("output", "T2"),
                        {"T1": ["tensor(uint8)"], "T2": ["tensor(float)", "tensor(float16)"],
                         "Tind": ["tensor(int32)", "tensor(int64)"]},
                        ("gather_axis", "quantize_axis", "block_size", "bits"))
    rows = gather(b, ids, scales, zero_points, gather_axis=0, quantize_axis=2, block_size=2 * half, bits=4)
    shape = op.Concat(op.Shape(ids), op.Constant(value_ints=[blocks * 2 * half]), axis=0)
    return op.Reshape(rows, shape)


register(OpSpec(name="int4_embedding_nbits", op=torch.ops.mmaccel.int4_embedding_nbits.default,
                eager=int4_embedding_nbits_reference, onnx=int4_embedding_nbits_onnx))
