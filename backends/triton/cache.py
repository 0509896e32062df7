"""The on-disk cache of generated kernel source and per-device choices (MMACCEL_CACHE_DIR, else
~/.cache/mmaccel)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
from typing import Any

import torch

from .device import device_name


def cache_dir() -> str:
    root = os.environ.get("MMACCEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mmaccel")
    return os.path.join(root, "triton")


def load_source(source: str, device: torch.device) -> Any:
    """Import generated source from the on-disk cache, writing it there first if it is new. The key covers
    the source (graph and shapes are in it), the device and the versions that compile it."""
    import triton

    name = device_name(device) if device.type == "cuda" else "interpreter"
    key = "\n".join([source, name, torch.__version__, triton.__version__, platform.python_version()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"k_{digest}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"mmaccel_kernels_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
