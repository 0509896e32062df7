"""The pass contract: what a pass is given (PassContext), what it returns (PassResult), how it is declared (Pass).

Every pass module imports this and nothing of the pipeline, so the pipeline can import every pass without a
cycle. Options reach passes through PassOptions, the part of compiler.options.CompileOptions that passes read:
the compiler depends on the passes (it validates pass names against the pipeline), never the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.fx as fx

from ..compiler._torch_internals import FakeTensorMode


class PassOptions(Protocol):
    """What passes read of the user's options (compiler.options.CompileOptions has these and more)."""
    quantize: str | None
    prune: tuple[str, ...] | None  # structures: "mlp_channels", "heads", "blocks"
    prune_fractions: Mapping[str, float]  # structure -> the one fraction to remove, where the user fixed it
    tokens: str | None
    accuracy_budget: float
    metric: Callable[[list, list], float] | None  # replaces the relative output error the budget bounds
    lossy_fallback: bool

    def pass_enabled(self, name: str, default: bool = True) -> bool: ...


@dataclass
class PassResult:
    """What one pass did to one graph. `matched`: pattern instances found and rewritten."""
    name: str = ""
    matched: int = 0
    changes: list[str] = field(default_factory=list)
    lossy: bool = False
    error: str | None = None
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    measured_error: float | None = None  # lossy passes: relative output error on the calibration inputs
    details: dict[str, Any] | None = None  # a pass's own table (quantize: each layer's precision and error)
    # Places a pattern almost matched, each with the reason it was left alone (mmaccel.explain lists them).
    near_misses: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """Everything a pass may read. Options travel here explicitly, never through global config."""
    options: PassOptions
    fake_mode: FakeTensorMode
    dump: Callable[[str, fx.GraphModule], None] = lambda stage, gm: None
    # Real inputs of the graph (after freezing; a dynamic size as the int it has in the call being compiled),
    # on which lossy passes measure the error they introduce.
    example_inputs: Sequence[Any] | None = None
    # Calibration: several sets of the graph's inputs (same layout as example_inputs); lossy passes measure
    # on these instead when given.
    calibration: Sequence[Sequence[Any]] | None = None
    # The user's tensors (parameters) that frozen constants alias. A lossless pass that concatenates weights
    # (parallel_linear_fusion) rebinds them as views of the concatenation, so each weight is held once
    # (issue 21: the separate copy cost 65% of a 7B decoder's weight bytes). Empty: never rebind (export).
    weight_owners: Sequence[torch.Tensor] = ()
    # Lossy passes: the graph as it entered the pipeline (the user's model, frozen), whose outputs their error
    # is measured against; set by the pipeline when a lossy pass runs, dropped when the pipeline ends (it holds
    # the weights as they were before parallel_linear_fusion rebound them).
    reference: fx.GraphModule | None = None
    # weights="release" (compiler/release.py GraphWeights): lossy levers record the weights they replace (and
    # how to rebuild the replacement); a recompile after release finds stand-ins here and rebuilds from records.
    released: Any = None
    # Bits of W8A8 weights: 7 (|q| <= 63) where a saturating x86 int8 kernel may multiply them (export_onnx always;
    # the onnxruntime target, and CPU graphs measured with torch._int_mm, where backends.w8a8_weight_bits' probes
    # find one), else 8 (|q| <= 127). ops/w8a8_linear.py says why.
    w8a8_weight_bits: int = 8


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[fx.GraphModule, PassContext], PassResult]
    lossy: bool = False


class PassValidationError(RuntimeError):
    """A pass left a graph that breaks the contract (lint, FakeTensor propagation, output signature)."""
