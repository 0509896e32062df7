"""ONNX Runtime's thread spinning in mmaccel.onnx_generate's loop (issue 18): the same exported folder run with
2 intra-op threads spinning as ONNX Runtime does by default (Optimum's and GenAI's loops keep it), spinning
at most 20 us (OnnxGenerator's default), never spinning, and 1 thread, in interleaved rounds so that the load
of this shared machine falls on every variant alike. `taskset -c 0 python bench/onnx_spinning.py` holds it to
one core, as when another job holds the other. A decode step is ~800 short kernels; a spinning worker holds its core between
them, which costs the main thread its time slices when another job wants that core.

    python bench/onnx_spinning.py                   # 125M Llama (bench/onnx_generate.py's), fp32
    python bench/onnx_spinning.py --int4            # and its int4 export (MatMulNBits)
    python bench/onnx_spinning.py --folder DIR      # an existing export_onnx(generation=True) folder

Per variant: first-token ms and ms per new token as bench/onnx_generate.py measures them (onnx_peers.timings),
the median over --rounds rounds. JSON under bench/results/ (or $OUT), with the load average before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import Any

import torch

import mmaccel

from common import default_out, environment, write_json  # bench/ is on sys.path when a script here runs
from onnx_generate import SIZES, build
from onnx_peers import timings

VARIANTS = {"2 threads, ONNX Runtime's default spinning": (2, None),
            "2 threads, spinning 20 us (onnx_generate's default)": (2, 20),
            "2 threads, no spinning": (2, 0),
            "1 thread": (1, 0)}


def variants(spins: list[str] | None) -> dict[str, tuple[int, int | None]]:
    """VARIANTS, or with --spin-us 2 threads at each of those spin times ("default": ONNX Runtime's own)."""
    if not spins:
        return VARIANTS
    return {f"2 threads, spinning {'by default' if s == 'default' else s + ' us'}": (2, None if s == "default" else int(s))
            for s in spins}


def interleaved(folder: str, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each variant's medians over `rounds` rounds, the variants taking turns each round."""
    chosen = variants(args.spin_us)
    generators = {name: mmaccel.OnnxGenerator(folder, intra_op_threads=threads, spin_us=spin_us)
                  for name, (threads, spin_us) in chosen.items()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name, generator in generators.items():
            def generate(new: int, generator: mmaccel.OnnxGenerator = generator) -> Any:
                return mmaccel.onnx_generate(generator, ids, max_new_tokens=new, eos_token_id=[], pad_token_id=0)
            runs[name].append(timings(generate, args.new, 1))
    return {name: {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
            for name, rows in runs.items()}


def folders(args: argparse.Namespace, ids: torch.Tensor, work: str) -> dict[str, str]:
    """precision -> folder: --folder as given, or the 125M Llama exported in fp32 (and int4 with --int4)."""
    if args.folder:
        return {"given": args.folder}
    model = build(args.size)
    int4 = {"quantize": "int4_weight_only", "accuracy_budget": 0.5}  # bench/onnx_generate.py's int4 row
    precisions = {"fp32": {}, **({"int4": int4} if args.int4 else {})}
    for precision, options in precisions.items():
        mmaccel.export_onnx(model, {"input_ids": ids}, os.path.join(work, precision), generation=True, **options)
    return {precision: os.path.join(work, precision) for precision in precisions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="130m")
    parser.add_argument("--folder", default=None)
    parser.add_argument("--int4", action="store_true")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spin-us", nargs="+", default=None, metavar="US",
                        help="instead of the default variants: 2 threads at each of these spin times ('default': ONNX "
                             "Runtime's own), e.g. --spin-us default 20 200 1000")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    vocab = SIZES[args.size][-1]
    ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as work:
        exported = folders(args, ids, work)
        load_before = os.getloadavg()
        for precision, folder in exported.items():
            for name, row in interleaved(folder, ids, args).items():
                rows[f"{precision}, {name}"] = row
    print(f"{'variant':58} {'first token ms':>15} {'ms / token':>11}")
    for name, row in rows.items():
        print(f"{name:58} {row['first_token_ms']:>15.1f} {row['ms_per_token']:>11.2f}")
    path = args.out or default_out(f"onnx_spinning_cpu_{args.size}.json")
    write_json(path, {"environment": environment("cpu", size=args.size, prompt=args.prompt, new_tokens=args.new,
                                                 rounds=args.rounds, load_average_before=load_before,
                                                 load_average_after=os.getloadavg()),
                      "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
