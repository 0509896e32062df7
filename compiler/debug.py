"""MMACCEL_DEBUG=1 or options={"debug_dir": ...}: every stage's graph written as readable Python."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch.fx as fx


class DebugDump:
    def __init__(self, root: str | None) -> None:
        self.root = root
        self.run_dir: str | None = None

    def for_graph(self, index: int) -> Callable[[str, fx.GraphModule | str], None]:
        if self.root is None:
            return lambda stage, gm: None
        counter = iter(range(10**6))

        def dump(stage: str, gm: fx.GraphModule | str) -> None:
            """A graph, or generated source (a str) such as a target's kernels."""
            folder = os.path.join(self._run_dir(), f"graph_{index:03d}")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{next(counter):02d}_{stage}.py")
            with open(path, "w") as f:
                f.write(f"# mmaccel graph {index}, stage '{stage}'\n")
                f.write(gm if isinstance(gm, str) else
                        gm.print_readable(print_output=False, include_stride=True, include_device=True))
        return dump

    def _run_dir(self) -> str:
        if self.run_dir is None:
            self.run_dir = os.path.abspath(os.path.join(self.root, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
            os.makedirs(self.run_dir, exist_ok=True)
            print(f"[mmaccel] writing debug graphs to {self.run_dir}", file=sys.stderr)
        return self.run_dir
