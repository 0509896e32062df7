"""Lowering: Dynamo graph -> ATen inference graph (aot_autograd) -> frozen weights.

Freezing turns parameters and module buffers that the graph does not mutate into graph constants, so
passes can fold and fuse them (transpose once, concatenate Q/K/V once). Constants are taken by
reference; `FrozenGraph` checks on every call that each frozen tensor is still the same object, with
the same storage and version counter, and otherwise runs the unfrozen graph (see there).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch._decomp
import torch.fx as fx

from ._torch_internals import frozen_candidate_mask, is_static_tensor, storage_id
from .errors import warn_once
from .release import GraphWeights, is_released, refuse_released, register_live

aten = torch.ops.aten

# The decomposition table handed to aot_autograd, on top of the CompositeImplicit decompositions it
# always applies (linear -> t + addmm, matmul -> expand/view/bmm, ...). Rule: decompose an op only when
# it is a composite of simpler ATen ops that every target already runs, and passes gain from seeing
# the parts. Kept small on purpose: norms, softmax, SDPA, GELU and SiLU stay whole, since targets have
# fused kernels for them and passes match them as units.
DECOMPOSITIONS: dict = torch._decomp.get_decompositions([
    aten.addcmul, aten.addcdiv, aten.lerp, aten.hardswish, aten.hardsigmoid, aten.mish,
])


@dataclass
class FrozenInputs:
    """Which graph inputs became constants, and the identity of each frozen tensor at freeze time."""
    kept: list[int]
    frozen: list[tuple[int, torch.Tensor, int, int]] = field(default_factory=list)  # index, tensor, version, ptr
    note: str = ""

    def refresh(self) -> None:
        """Re-record each frozen tensor's storage and version: passes may rebind a parameter as a view of a
        fused weight holding the same values (passes/fusion.py _concatenate_rows)."""
        self.frozen = [(i, t, t._version, t.data_ptr()) for i, t, _, _ in self.frozen]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t, _, _ in self.frozen)


def freeze_input(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> None:
    """Replace graph input `node` by a constant holding `value`. detach(): same storage and version counter
    as the parameter, no autograd history."""
    name = f"_frozen_{node.name}"
    gm.register_buffer(name, value.detach(), persistent=False)
    with gm.graph.inserting_before(node):
        const = gm.graph.get_attr(name)
    const.meta = dict(node.meta)
    node.replace_all_uses_with(const)
    gm.graph.erase_node(node)


def freeze_parameters(gm: fx.GraphModule, real_inputs: Sequence[Any], module_owned: Sequence[bool] | None = None,
                      weights: GraphWeights | None = None) -> FrozenInputs:
    """Freeze the inputs that are unmutated static tensors and, where Dynamo says where each input came from
    (`module_owned`), a module's parameters or buffers only. A parameter weights="release" freed is frozen as
    its stand-in (compiler/release.py): passes see its layout, never a value."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    candidates = frozen_candidate_mask(len(placeholders))
    if module_owned is not None and len(module_owned) != len(placeholders):
        module_owned = None
    if candidates is None or len(real_inputs) != len(placeholders):
        return FrozenInputs(kept=list(range(len(placeholders))),
                            note="freezing skipped: graph inputs do not line up with the module's tensors")
    kept, frozen = [], []
    for i, (node, real, ok) in enumerate(zip(placeholders, real_inputs, candidates)):
        owned = module_owned is None or module_owned[i] or isinstance(real, torch.nn.Parameter)
        if not (ok and owned and is_static_tensor(real) and type(real) in (torch.Tensor, torch.nn.Parameter)):
            kept.append(i)
            continue
        freeze_input(gm, node, weights.stand_in(real) if weights is not None and is_released(real) else real)
        frozen.append((i, real, real._version, real.data_ptr()))
    gm.recompile()
    return FrozenInputs(kept=kept, frozen=frozen)


# Collectors of the compiled graphs that run while one is open (keeping_what_runs); a stack, innermost last.
_COLLECTORS: list[set[Any]] = []


@contextmanager
def keeping_what_runs() -> Iterator[set[Any]]:
    """The compiled graphs (FrozenGraph objects) called inside the block. A CUDA-graph capture of compiled steps
    (compiler/step_graphs.py) holds them: its kernels read their constants and buffers (fused biases, folded
    tables, quantized weights, the unfrozen graph's own), which torch._dynamo.reset() would otherwise free under
    the recording. On an H200 a recording made while steps ran unfrozen (their weights had changed), replayed
    after a reset, hit an illegal memory access; a replay after a reset without a weight change read freed
    blocks the allocator had not reused yet."""
    kept: set[Any] = set()
    _COLLECTORS.append(kept)
    try:
        yield kept
    finally:
        _COLLECTORS.remove(kept)


class FrozenGraph:
    """Boxed callable for aot_autograd: drops the frozen inputs and runs the optimized graph, after checking
    that no frozen weight changed since compile time. If one did (load_state_dict, an in-place update, a
    replaced parameter), the optimized graph would be stale: it warns once and runs `unfrozen` instead,
    which reads the live weights (correct, without the frozen-weight optimizations)."""

    _boxed_call = True

    def __init__(self, run: Callable[[list[Any]], Any], frozen: FrozenInputs,
                 unfrozen: Callable[[list[Any]], Any], constants: Sequence[torch.Tensor] = (),
                 record: Any = None) -> None:
        self.run, self.kept, self.unfrozen, self.record = run, frozen.kept, unfrozen, record
        self.checks = [(i, t, v, p) for i, t, v, p in frozen.frozen]
        self.stale = False
        # weights="release" never frees a storage the optimized graph reads (`constants`)
        register_live(self, (storage_id(t) for t in constants))

    def retire(self, why: str) -> None:
        """Never run optimized again: from now on `unfrozen` runs on the live weights. The optimized graph holds
        the weights it froze (fused copies, quantized forms, or the old storage itself after a dtype round trip
        gave the parameters new storage), so it and the report's copy are let go, or the process keeps a second
        copy of the weights (issue 21; LLaVA at 8 layers on an H200 held 8.45 GiB instead of 4.58 after
        model.float().to(bf16) and torch._dynamo.reset())."""
        self.stale = True
        self.run = None
        if self.record is not None:
            self.record.final_graph = self.record.context = None
            self.record.status, self.record.reason = "stale", why

    def _weights_unchanged(self, args: list[Any]) -> bool | None:
        """True: the frozen tensors themselves were passed, unchanged. False: one of them changed (in place, or
        new storage after a dtype round trip or load). None: other tensors came in their place while the frozen
        ones are as they were: Dynamo reuses one graph for every layer whose forward it compiled as a frame of
        its own (a graph break inside a loop over layers; Qwen2-VL's vision blocks), with each layer's
        parameters as inputs; or a parameter was replaced by a new one."""
        other = False
        for i, t, version, ptr in self.checks:
            a = args[i]
            if t._version != version or t.data_ptr() != ptr:
                return False
            other = other or a is not t
        return None if other else True

    def __call__(self, args: list[Any]) -> Any:
        if _COLLECTORS:
            _COLLECTORS[-1].add(self)
        if not self.stale:
            unchanged = self._weights_unchanged(args)
            if unchanged is None:
                # Not stale: the weights it froze come back on the next call of their own layer (tiny Qwen2-VL:
                # every call warned "have changed since" and retired its vision block's graph after block 0).
                warn_once("mmaccel: a compiled graph was called with other weights than those it froze (one graph "
                          "Dynamo reuses for several layers after a graph break inside their loop, or a replaced "
                          "parameter); those calls run without frozen-weight optimizations.")
                refuse_released(args, "the unoptimized graph run for other weights than those frozen")
                return self.unfrozen(args)
            if not unchanged:
                self.retire("frozen weights changed since compile time: runs unoptimized on the live weights")
                warn_once("mmaccel: weights frozen at compile time have changed since (in-place update, "
                          "load_state_dict or a new dtype); running the graph without frozen-weight "
                          "optimizations. Call torch._dynamo.reset() and compile again to re-optimize.")
        if self.stale:
            refuse_released(args, "the unoptimized graph run when frozen weights change")
            return self.unfrozen(args)
        kept = [args[i] for i in self.kept]
        args.clear()
        return self.run(kept)
