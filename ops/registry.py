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
    # int4_matmul_nbits, which names ONNX Runtime's com.microsoft::MatMulNBits (no pass inserts it elsewhere;
    # the export-only int8_embedding is standard ONNX).
    onnx: Callable[..., object] | None = None
    # The lowest ONNX opset the translation is valid at (a graph holding the op is exported at it or later).
    onnx_opset: int = 18


OPS: dict[torch._ops.OpOverload, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    OPS[spec.op] = spec
    return spec
