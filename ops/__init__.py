"""The project's own ops. Passes insert them; targets lower them.

Where an op's implementations live (decided once; every op follows it, tests/test_ops_layout.py checks):
- ops/<op>.py, one file per op, holds what defines the op's bits on every target: the torch.library schema,
  the reference implementation (exact; the eager target runs it), the fake (meta) implementation, and the
  ONNX translation (the reference's twin in standard ONNX ops, used by export_onnx and the onnxruntime
  target alike; the two are written side by side because they must compute the same values). Its OpSpec
  registers it in OPS. An op file imports no target.
- A target that generates its own kernels keeps its lowering of every op in one table beside those kernels:
  the Triton target's `backends/triton/prepare.py` COMPOSITES (the op -> ATen ops its code generator fuses
  + the target's own matmul kernels). Kernels belong to the target that launches them, so ops/ never imports
  a target.
A new op is one file in ops/, imported below, plus one row in the Triton target's table."""
from __future__ import annotations

from .registry import OPS, OpSpec
from . import (fp8_linear, fused_linear, int4_embedding_nbits, int4_linear, int4_matmul_nbits,  # noqa: F401
               int8_embedding, int8_linear, token_merge, token_unmerge, w8a8_linear)  # (registers the ops)

__all__ = ["OPS", "OpSpec"]
