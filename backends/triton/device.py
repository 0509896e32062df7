"""Facts about a GPU that the Triton target's kernels and choices read on every call, looked up once."""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)
