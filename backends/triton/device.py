"""Facts about a GPU that the Triton target's kernels and choices read on every call, looked up once."""
from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


PDL_SWITCH = "MMACCEL_PDL"


def pdl(device: torch.device) -> bool:
    """Whether this target's Triton kernels launch with programmatic dependent launch (Hopper and later): a
    kernel may then be scheduled while the one before it drains, and waits (gdc_wait, its first instruction)
    until that one's writes are visible, so launch latency and the previous kernel's tail overlap. A decode
    step is ~8 kernels a layer with launch gaps of a few microseconds between them (H200: 0.6 ms of a 2.3 ms
    16-layer step above its floor). Off unless MMACCEL_PDL=1: not measured on a GPU yet."""
    return (os.environ.get(PDL_SWITCH, "0") == "1" and device.type == "cuda"
            and _capability(device)[0] >= 9)


@lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)
