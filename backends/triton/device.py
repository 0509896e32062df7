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
    """Whether this target's Triton kernels launch with programmatic dependent launch (Hopper and later): each
    kernel waits (gdc_wait) for the previous kernel's writes before reading any activation, then lets the next
    kernel launch (gdc_launch_dependents), so launch latency and block scheduling overlap the kernel before; the
    GEMV reads its first weight tile (a constant) before the wait. A decode step is ~8 kernels a layer, each
    gap a few microseconds under CUDA graphs. H200 (bench/results/pdl_h200.json, rows of one call compared):
    16-layer 7B-dims decode step 2.429 -> 2.337 ms; Whisper large-v3 dims 8 + 8 layers 0.604 -> 0.509 ms/token
    (0.493 with the final form). Waiting only, without the early launch and weight read, changed nothing
    measurable (2.308 vs 2.302 ms), and a branch selecting the pre-read tile inside the K loop cost 17% (3.071
    vs 2.618 ms): the loop now reads each tile one iteration ahead. MMACCEL_PDL=0 turns it off."""
    return (os.environ.get(PDL_SWITCH, "1") != "0" and device.type == "cuda" and torch.version.hip is None
            and _capability(device)[0] >= 9)  # ROCm reports capabilities too; gdc_* are NVIDIA instructions


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """The launch keywords of a kernel with a USE_GDC constexpr: USE_GDC, and launch_pdl when pdl(device)."""
    use_gdc = pdl(device)
    return {"USE_GDC": use_gdc, "launch_pdl": True} if use_gdc else {"USE_GDC": False}


@lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)
