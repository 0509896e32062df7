"""weights="release" (issue 21): a quantized or pruned graph holds its own smaller weights; the full-precision
parameters it replaced are freed, so the compiled model costs its quantized bytes (int8 about half of bf16).

Freeing: the parameter's storage is resized to 0 bytes (as FSDP does). The Parameter object stays, with its
shape, strides, dtype and device, so Dynamo's guards on it still pass and the graphs compiled so far keep
running; only its values are gone. Only storages a lossy lever replaced are freed (small tensors the passes
fold, such as rotary tables, stay), and never one that a live compiled graph still reads (a tied embedding).

Recompiles (a new input length with dynamic=False, a failed guard) trace the model again and need its weights.
A released parameter enters the new graph as a stand-in: a FakeTensor with the parameter's metadata over one
fake storage per released storage, so views, transposes and the back-to-back check of parallel_linear_fusion
see the same layout as in the first compile, while nothing can read a value. The levers then rebuild what was
recorded when the sources were released (each quantized linear, each pruned MLP), keyed by the source's identity
(storage, offset, shape, strides, dtype) and the scheme, without measuring again (`GraphWeights.recall`). A
stand-in still read by the final graph (an MLP pruned then quantized, a scheme never recorded, a weight a pass had
to compute on) stops the compile with ReleasedWeightsError naming the fixes: nothing ever runs on a freed storage.

Eager calls: `refuse_eager_calls(model)` puts a forward pre-hook on each module holding parameters; once one is
released, calling the module raises ReleasedWeightsError (under Dynamo's trace the hook does nothing).
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from ._torch_internals import StorageWeakRef, is_fake, storage_id
from .errors import ReleasedWeightsError, warn_once

# Process-wide, as the released storages are: storage id -> (weak reference, bytes freed). The weak reference
# keeps the id from being reused by a new storage while the entry exists.
_RELEASED: dict[int, tuple[StorageWeakRef, int]] = {}
# (source key, scheme) -> what the lossy lever made from that source, for recompiles after release.
_REMEMBERED: dict[tuple, Any] = {}
# Compiled graphs alive, each with the ids of the storages it reads: never released under them.
_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()

FIXES = ("compile with weights='keep'; or give mmaccel.compile calibration samples of every input shape (the dims "
         "in which they differ compile dynamic) so that no recompile is needed; or reload the weights and compile "
         "again")


def is_released(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not is_fake(t) and t.numel() > 0 and storage_id(t) in _RELEASED


def register_live(graph: Any, needed: Iterable[int]) -> None:
    """`graph` (a compiled graph) reads the storages `needed` for as long as it lives."""
    graph.needed = set(needed)
    _LIVE.add(graph)


class GraphWeights:
    """One graph's side of release: stand-ins for released parameters, and what its lossy levers replaced."""

    def __init__(self, fake_mode: Any) -> None:
        self.fake_mode = fake_mode
        self.bases: dict[int, torch.Tensor] = {}  # released storage id -> its fake storage (uint8)
        self.origin: dict[int, int] = {}  # fake storage id -> released storage id
        self.replaced: list[tuple[torch.Tensor, str, Any]] = []  # (weight, scheme, what replaced it)

    def stand_in(self, t: torch.Tensor) -> torch.Tensor:
        """A FakeTensor laid out as `t` over the fake storage standing for t's released storage."""
        sid = storage_id(t)
        if sid not in self.bases:
            with self.fake_mode:
                self.bases[sid] = torch.empty(_RELEASED[sid][1], dtype=torch.uint8, device=t.device)
            self.origin[storage_id(self.bases[sid])] = sid
        with self.fake_mode:
            return self.bases[sid].view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())

    def key(self, t: torch.Tensor) -> tuple:
        sid = storage_id(t)
        return self.origin.get(sid, sid), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype

    def reads_stand_ins(self, gm: fx.GraphModule) -> bool:
        return any(is_fake(t) for t in gm.buffers())

    def replace(self, weight: torch.Tensor, scheme: str, made: Any = None) -> None:
        """A lossy lever replaced `weight`; `made` (if not None) rebuilds the replacement without it."""
        self.replaced.append((weight, scheme, made))

    def recall(self, weight: torch.Tensor, scheme: str) -> Any:
        return _REMEMBERED.get((*self.key(weight), scheme))


def release_replaced(owners: Sequence[torch.Tensor], gm: fx.GraphModule, weights: GraphWeights) -> int:
    """Free the storages of the parameters in `owners` that a lossy lever replaced in `gm` and no live graph
    (this one included) reads; remember what replaced them. Returns the bytes freed."""
    _forget_expired()
    replaced = {weights.key(w)[0] for w, _, _ in weights.replaced}
    needed = {storage_id(t) for t in gm.buffers()}.union(*(g.needed for g in _LIVE))
    freed = 0
    for t in owners:
        sid = storage_id(t)
        if sid in replaced and sid not in needed and sid not in _RELEASED:
            freed += _free(t)
    held = {storage_id(t) for t in gm.buffers()}
    for weight, scheme, made in weights.replaced:
        key = weights.key(weight)
        # a record holds only tensors the graph holds (it adds no memory): not a pruned weight a later lever
        # quantized, so pruned-and-quantized MLPs are not rebuilt
        if made is not None and key[0] in _RELEASED and _storages(made) <= held:
            _REMEMBERED[(*key, scheme)] = made
    return freed


def _storages(made: Any) -> set[int]:
    return {storage_id(t) for t in torch.utils._pytree.tree_leaves(made) if isinstance(t, torch.Tensor)}


def _free(t: torch.Tensor) -> int:
    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    try:
        storage.resize_(0)
    except RuntimeError as e:  # a storage that cannot resize (memory-mapped from a file): kept
        warn_once(f"mmaccel: weights='release' kept a parameter whose storage cannot be freed ({e})")
        return 0
    _RELEASED[storage_id(t)] = (StorageWeakRef(storage), nbytes)
    return nbytes


def _forget_expired() -> None:
    expired = {sid for sid, (ref, _) in _RELEASED.items() if ref.expired()}
    for sid in expired:
        del _RELEASED[sid]
    for key in [k for k in _REMEMBERED if k[0] in expired]:
        del _REMEMBERED[key]


def check_no_stand_ins(gm: fx.GraphModule) -> None:
    """Raise ReleasedWeightsError when the final graph still reads a released parameter's stand-in."""
    stand_ins = {storage_id(t): t for t in gm.buffers() if is_fake(t)}
    if stand_ins:
        mib = sum(t.numel() * t.element_size() for t in stand_ins.values()) / 2**20
        raise ReleasedWeightsError(
            f"mmaccel: a new graph of this model (a recompile: new input shapes or a failed guard) reads "
            f"{len(stand_ins)} weight tensor(s) ({mib:.1f} MiB) that weights='release' freed, and cannot be rebuilt "
            f"from the quantized weights of earlier graphs (no quantized form was recorded for them under these "
            f"options, an MLP pruned then quantized, or a pass computed on them). Fixes: {FIXES}.")


def refuse_released(tensors: Iterable[Any], what: str) -> None:
    if any(is_released(t) for t in tensors):
        raise ReleasedWeightsError(f"mmaccel: {what} reads parameters that weights='release' freed. Fixes: {FIXES}.")


def refuse_eager_calls(model: torch.nn.Module) -> None:
    """Calling `model` (or a submodule) eagerly after its parameters were released raises ReleasedWeightsError."""
    for module in model.modules():
        if any(p is not None for p in module._parameters.values()):
            module.register_forward_pre_hook(_refuse_if_released)


def _refuse_if_released(module: torch.nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():  # tracing for a (re)compile: the compiler handles released weights
        return
    released = [name for name, p in module._parameters.items() if is_released(p)]
    if released:
        raise ReleasedWeightsError(
            f"mmaccel: {type(module).__name__}.{released[0]} was freed by weights='release' (the quantized / pruned "
            "compiled model holds its own weights): call the compiled model, not the original module; to keep "
            "the module usable, compile with weights='keep'")
