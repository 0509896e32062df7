from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class OpSpec:
    """One mmaccel op: the torch.library op that passes insert, its reference (the eager target) and its ONNX
    translation (export and the onnxruntime target). The Triton target's lowering is a row of its own table
    (backends/triton/prepare.py COMPOSITES): see ops/__init__.py for why."""
    name: str
    op: torch._ops.OpOverload
    # Plain-Python implementation the eager target calls directly (no dispatcher round trip).
    eager: Callable[..., torch.Tensor]
    # ONNX Script translation for torch.onnx's custom_translation_table: standard ONNX ops, except the export-only
    # int4_matmul_nbits and int4_embedding_nbits, which name ONNX Runtime's com.microsoft::MatMulNBits and
    # GatherBlockQuantized (no pass inserts them elsewhere; the export-only int8_embedding is standard ONNX).
    onnx: Callable[..., object] | None = None
    # The lowest ONNX opset the translation is valid at (a graph holding the op is exported at it or later).
    onnx_opset: int = 18


OPS: dict[torch._ops.OpOverload, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    OPS[spec.op] = spec
    return spec


# Quantizers compute in float32: whole, a 32000 x 4096 bf16 LM head made about 2 GB of float32 temporaries (the
# copy, then each elementwise step) on top of the model while compiling (issue 21's compile-time peak), and the
# int4 reference's dequantized weight 1.5 GiB more while the lossy pass measured it (H200, 8 layers at 7B dims).
# By runs of rows, each step's temporaries are at most this many bytes; the quantized values are the same bits
# (every scheme here is per row or per group within a row).
QUANTIZE_CHUNK_BYTES = 64 * 2**20


def row_runs(rows: int, row_elements: int) -> list[slice]:
    """Runs of `rows` rows of `row_elements` values whose float32 copy is at most QUANTIZE_CHUNK_BYTES (one run when
    small)."""
    run = max(1, QUANTIZE_CHUNK_BYTES // max(4 * row_elements, 1))
    return [slice(start, start + run) for start in range(0, rows, run)]


def by_rows(quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], weight: torch.Tensor
            ) -> tuple[torch.Tensor, ...]:
    """quantize(weight), for a `quantize` whose outputs all have one row per weight row and take each row alone,
    computed on row_runs."""
    runs = row_runs(weight.shape[0], weight[0].numel())
    if len(runs) == 1:
        return quantize(weight)
    first = quantize(weight[runs[0]])
    outputs = tuple(t.new_empty((weight.shape[0], *t.shape[1:])) for t in first)
    for out, part in zip(outputs, first):
        out[runs[0]] = part
    for run in runs[1:]:
        for out, part in zip(outputs, quantize(weight[run])):
            out[run] = part
    return outputs


def by_output_rows(linear: Callable[[slice], torch.Tensor], rows: int, row_elements: int) -> torch.Tensor:
    """linear(every row) for a reference linear whose weight has `rows` output rows of `row_elements` values,
    computed on row_runs (linear(run): the outputs of those rows, concatenated on the last dim), so it never
    converts the whole weight at once."""
    runs = row_runs(rows, row_elements)
    return linear(slice(None)) if len(runs) == 1 else torch.cat([linear(run) for run in runs], dim=-1)
