"""Where an op's implementations live (ops/__init__.py): every mmaccel op has its reference, fake and ONNX
translation in its own file, and a row in the Triton target's lowering table."""
from __future__ import annotations

import pytest
import torch

from mmaccel.backends.triton.prepare import COMPOSITES
from mmaccel.ops import OPS


@pytest.mark.parametrize("op", sorted(OPS, key=str), ids=str)
def test_every_op_follows_the_layout(op) -> None:
    spec = OPS[op]
    module = spec.eager.__module__
    assert module == f"mmaccel.ops.{spec.name}", f"{op}: reference defined in {module}, not in its own op file"
    assert spec.onnx is not None and spec.onnx.__module__ == module, f"{op}: ONNX translation not beside it"
    assert op in COMPOSITES, f"{op}: no row in the Triton target's lowering table (backends/triton/prepare.py)"
    assert torch._library.utils.has_fake_kernel(op), f"{op}: no fake (meta) implementation"
