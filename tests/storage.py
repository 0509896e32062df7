"""Memory a compiled model holds, counted as tensor storage bytes (issue 21): every tensor reachable from some
roots (a module, the callables a backend returned), each storage counted once however many tensors view it."""
from __future__ import annotations

import gc
import sys
import types
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import is_fake

# Objects whose referents are the interpreter's, not the model's: walking into them would count any tensor a
# library keeps at module level.
_OPAQUE = (types.ModuleType, type, types.CodeType, types.FrameType)


def reachable_storages(*roots: Any) -> dict[tuple[str, int], int]:
    """(device, storage address) -> storage bytes of every real tensor reachable from `roots` through object
    references (attributes, containers, closures, bound methods), module namespaces excepted."""
    module_dicts = {id(vars(m)) for m in list(sys.modules.values()) if m is not None}
    storages: dict[tuple[str, int], int] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE) or id(obj) in module_dicts:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not is_fake(obj) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
            continue
        stack.extend(gc.get_referents(obj))
    return storages


def reachable_storage_bytes(*roots: Any) -> int:
    return sum(reachable_storages(*roots).values())


def capturing_backend(backend: Callable) -> tuple[Callable, list[Callable]]:
    """`backend` wrapped to keep what it returns (the compiled graphs Dynamo holds on to) in a list."""
    compiled: list[Callable] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        compiled.append(backend(gm, example_inputs))
        return compiled[-1]

    return capture, compiled
