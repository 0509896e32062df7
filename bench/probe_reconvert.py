"""Issue 21 probe: GPU memory of mmaccel.generate on LLaVA-1.5-7B dims (8 decoder layers, random weights) across
a dtype round trip, model.float().to(bfloat16), which gives every parameter new storage (what hf_generate.py's
divergence check did between variants): steady GiB after compiling, after the round trip and another call (the
session compiles its steps again and retires the old graphs; until 2026-12-01 they turned stale and ran
unfrozen), after torch._dynamo.reset(), and after one more call (an illegal memory access on the H200 before
recordings held the graphs they captured).

    python bench/probe_reconvert.py [--layers 8]          # CUDA, ~1 min
"""
import argparse
import gc
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmaccel  # noqa: E402
from hf_generate import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the stale-graph warning is expected here
    model, inputs, _ = build("llava", False, "cuda", torch.bfloat16, args.layers)
    model = model.eval().requires_grad_(False)
    inputs = {k: v.cuda() for k, v in inputs.items()}

    def steady(what: str) -> None:
        gc.collect()
        torch.cuda.synchronize()
        print(f"{what:52} {torch.cuda.memory_allocated() / 2**30:7.3f} GiB")

    def generate() -> None:
        mmaccel.generate(model, **inputs, max_new_tokens=8, eos_token_id=[], pad_token_id=0)

    steady("model")
    with torch.no_grad():
        generate()
        generate()
        steady("compiled (mmaccel.generate twice)")
        model.float().to(torch.bfloat16)
        steady("after model.float().to(bf16)")
        generate()
        steady("and another call (steps compiled again)")
        torch._dynamo.reset()
        steady("after torch._dynamo.reset()")
        generate()
        steady("compiled again")


if __name__ == "__main__":
    main()
