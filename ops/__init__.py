"""The project's own ops. Each is defined once, in one file, with torch.library: schema, reference
implementation, fake (meta) implementation and the per-target lowerings that exist so far.
Passes insert these ops; backends lower them through OPS."""
from __future__ import annotations

from .registry import OPS, OpSpec
from . import fp8_linear, fused_linear, int4_linear, int8_linear, w8a8_linear  # noqa: F401  (registers the ops)

__all__ = ["OPS", "OpSpec"]
