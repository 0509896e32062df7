"""Progress bars for long compile-time work (calibration, sensitivity measurement): tqdm, the ecosystem's bar,
written to stderr; quiet when MMACCEL_PROGRESS=0."""
from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=os.environ.get("MMACCEL_PROGRESS", "1") == "0", leave=False)
