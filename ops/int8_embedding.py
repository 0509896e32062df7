"""mmaccel::int8_embedding: a token embedding table stored int8, one symmetric scale per row (per token):
table[ids] = qweight[ids] * scale[ids]. Export-only (export_onnx(generation=True) with a quantize option puts
it in place of aten.embedding on a frozen table; no pass inserts it for the other targets): a 32000 x 768 fp32
table is 98 MB of a 125M Llama's 154 MB int4 folder, int8 makes it 25 MB.

Its ONNX translation gathers first and converts after, in standard ops: Gather(int8 table, ids) -> Cast ->
Mul by Gather(scales, ids). Both Gathers read the ids, a graph input, so ONNX Runtime cannot constant-fold the
table back to fp32 at session start, as it does with a dequantized-then-gathered table (or with int4_linear's
unpacking ops). Values equal the reference's: the int8 value converts exactly, then one rounding in the Mul."""
from __future__ import annotations

import torch

from .int8_linear import quantize_per_channel
from .registry import OpSpec, register


def quantize_embedding_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [V, D], scale [V, 1] in the table's dtype): int8_linear's per-output-channel scheme, a row per token."""
    q, scale = quantize_per_channel(table)
    return q, scale[:, None].contiguous()


def int8_embedding_reference(ids: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qweight[ids].to(scale.dtype) * scale[ids]  # [*ids, D] * [*ids, 1]


@torch.library.custom_op("mmaccel::int8_embedding", mutates_args=())
def int8_embedding(ids: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return int8_embedding_reference(ids, qweight, scale)


@int8_embedding.register_fake
def _int8_embedding_fake(ids, qweight, scale):
    return scale.new_empty((*ids.shape, qweight.shape[1]))


def int8_embedding_onnx(ids, qweight, scale):
    from onnxscript import opset18 as op

    rows = op.CastLike(op.Gather(qweight, ids, axis=0), scale)
    return op.Mul(rows, op.Gather(scale, ids, axis=0))


register(OpSpec(name="int8_embedding", op=torch.ops.mmaccel.int8_embedding.default, eager=int8_embedding_reference,
                onnx=int8_embedding_onnx))
