"""mmaccel's exported decoder with ONNX Runtime's contrib ops (compiler/onnx_fusions.py, the default) against the
same export with standard ops only (portable=True, the decoder before the fusions) and ONNX Runtime GenAI's
builder output, each in its own generation loop (onnx_generate's, spinning 20 us, with one shared K/V buffer
where the decoder takes it; GenAI's generator, ONNX Runtime's default spinning; and ours with that spinning
too, and with the past grown each step), in interleaved rounds so that the load of this shared machine falls
on all alike (issue 18). Same model as bench/onnx_generate.py (125M
Llama, random weights), same prompt, 2 threads; fp32 and int4.

    python bench/onnx_fusion_peers.py                # 125M Llama, fp32 and int4, 5 rounds
    python bench/onnx_fusion_peers.py --size tiny    # a quick check
    python bench/onnx_fusion_peers.py --precisions fp32 --rounds 9   # the fp32 rows alone

Per row: first-token ms and ms per new token (onnx_peers.timings, one call each per round; the median over
rounds; "/ last": the median over rounds of its ms per token over the precision's last row's, GenAI's;
"quiet": the same over the rounds other jobs left alone, QUIET_CORES; 0 when none were), the
folder's bytes, tokens equal to HF eager's (fp32), for our loops the ms per token spent outside ONNX
Runtime's runs (outside_run_ms), and from ONNX Runtime's profile of one decode step after 80
past positions (onnx_decode_step.kernel_profile): nodes run (and of which ops) and kernel ms,
matmuls and the rest.
GenAI's rows need onnxruntime-genai (pip install -e '.[bench]'). JSON under bench/results/ (or $OUT).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

import mmaccel

from common import default_out, environment, other_jobs_cores, other_jobs_start, write_json  # bench/ is on sys.path when a script here runs
from onnx_decode_step import kernel_profile
from onnx_generate import add_model_arguments, build, past_shape
from onnx_peers import folder_bytes, genai_build, genai_loop, same_tokens, save_for_peers, timings

INT4 = {"quantize": "int4_weight_only", "accuracy_budget": 0.5}  # bench/onnx_generate.py's int4 rows


def loops(model: torch.nn.Module, ids: torch.Tensor, precision: str, work: str,
          threads: int) -> dict[str, tuple[Callable[[int], Any], str]]:
    """name -> (generate(new) -> tokens, decoder file) for the three decoders of one precision."""
    rows = {}
    for name, portable in ((f"mmaccel {precision}, contrib ops (default)", False),
                           (f"mmaccel {precision}, portable=True (standard ops)", True)):
        folder = os.path.join(work, f"mmaccel_{precision}_{'portable' if portable else 'fused'}")
        mmaccel.export_onnx(model, {"input_ids": ids}, folder, generation=True, portable=portable,
                            **(INT4 if precision == "int4" else {}))
        rows[name] = (our_loop(folder, ids, threads, spin_us=20), os.path.join(folder, "decoder.onnx"))
    # GenAI's loop keeps ONNX Runtime's default spinning, which costs up to 1.7x when another job holds a core
    # of this machine (bench/onnx_spinning.py): ours with the same setting too, to rank the graphs alone
    fused = rows[f"mmaccel {precision}, contrib ops (default)"][1]
    rows[f"mmaccel {precision}, contrib ops, ORT's default spinning"] = (
        our_loop(os.path.dirname(fused), ids, threads, None), fused)
    # the loop before the shared K/V buffer (onnx_generate's GrowingCache), to measure that lever in the same rounds
    rows[f"mmaccel {precision}, contrib ops, past grown each step"] = (
        our_loop(os.path.dirname(fused), ids, threads, 20, share_buffer=False), fused)
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return rows
    folder = genai_build(os.path.join(work, "hf"), work, precision)
    rows[f"GenAI builder {precision}"] = (genai_loop(folder, ids, threads), os.path.join(folder, "model.onnx"))
    return rows


def our_loop(folder: str, ids: torch.Tensor, threads: int, spin_us: int | None,
             share_buffer: bool = True) -> Callable[[int], Any]:
    generator = mmaccel.OnnxGenerator(folder, intra_op_threads=threads, spin_us=spin_us, share_buffer=share_buffer)
    generate = lambda new: mmaccel.onnx_generate(generator, ids, max_new_tokens=new, eos_token_id=[], pad_token_id=0)
    generate.generator = generator  # for outside_run_ms
    return generate


def outside_run_ms(generate: Callable[[int], Any], new: int, repeats: int = 5) -> dict[str, float]:
    """Of one of our loops' ms per new token, how much is spent outside ONNX Runtime's decoder runs (binding,
    the token choice, numpy): generate(new) timed whole and around each run, less generate(1)'s; median of
    `repeats`."""
    session = generate.generator.sessions["decoder"]
    run, spent = session.run_with_iobinding, []

    def timed(*args: Any) -> None:
        start = time.perf_counter()
        run(*args)
        spent.append(time.perf_counter() - start)

    def outside(tokens: int) -> float:
        spent.clear()
        start = time.perf_counter()
        generate(tokens)
        return time.perf_counter() - start - sum(spent)

    session.run_with_iobinding = timed
    try:
        per_token = [(outside(new) - outside(1)) / (new - 1) * 1e3 for _ in range(repeats)]
    finally:
        session.run_with_iobinding = run
    return {"ms_per_token_outside_run": round(statistics.median(per_token), 3)}


# A round is "quiet" when other processes kept less than this many of the 2 cores busy during it
# (common.other_jobs_cores). 2026-11-30: 0.00-0.02 in every round of a run alone on this machine; 2.0 with two
# other jobs running. It sees processes only: this VM's rounds still spread 11-14 ms per token when all read 0.
QUIET_CORES = 0.25


def interleaved(runs: dict[str, tuple[Callable[[int], Any], str]], new: int, rounds: int) -> dict[str, dict]:
    """Each loop's medians over `rounds` rounds, the loops taking turns each round, its ms per token in each
    round, and the median over rounds of its ms per token over the last loop's of the same round (GenAI's when
    it is there): the load of this shared machine changes between rounds, less within one. Also the cores
    other jobs kept busy in each round, and the ratio over the quiet rounds alone."""
    times: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    others = []
    for _ in range(rounds):
        start = other_jobs_start()
        for name, (generate, _) in runs.items():
            times[name].append(timings(generate, new, 1))
        others.append(other_jobs_cores(start))
    last, quiet = list(runs)[-1], [i for i, cores in enumerate(others) if cores < QUIET_CORES]

    def over_last(rows: list[dict[str, float]], kept: list[int]) -> float | None:
        ratios = [rows[i]["ms_per_token"] / times[last][i]["ms_per_token"] for i in kept]
        return round(statistics.median(ratios), 3) if ratios else None

    return {name: {**{key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]},
                   "ms_per_token_rounds": [r["ms_per_token"] for r in rows], "other_jobs_cores_rounds": others,
                   f"ms_per_token_over_{last}": over_last(rows, list(range(rounds))),
                   f"ms_per_token_over_{last}_quiet_rounds": over_last(rows, quiet)}
            for name, rows in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "int4"), default=["fp32", "int4"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.size, args.arch)
    config = model.config
    ids = torch.randint(3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                   do_sample=False, eos_token_id=[], pad_token_id=0)
    past = past_shape(config, 80)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as work:
        save_for_peers(model, os.path.join(work, "hf"))
        for precision in args.precisions:
            runs = loops(model, ids, precision, work, args.threads)
            load_before = os.getloadavg()
            for name, row in interleaved(runs, args.new, args.rounds).items():
                generate, path = runs[name]
                rows[name] = {**row, "load_average_before": load_before, "load_average_after": os.getloadavg(),
                              "file_bytes": folder_bytes(os.path.dirname(path)),
                              "tokens_equal_hf": same_tokens(np.asarray(generate(args.new)), reference),
                              **(outside_run_ms(generate, args.new) if hasattr(generate, "generator") else {}),
                              **kernel_profile(path, past, args.threads)}
    print(f"{'decoder':52} {'first ms':>9} {'ms/token':>9} {'/ last':>7} {'quiet':>6} {'outside':>8} {'MB':>6} "
          f"{'nodes':>6} {'matmul ms':>10} {'other':>6}")
    for name, row in rows.items():
        ratio = next(v for k, v in row.items() if k.startswith("ms_per_token_over_"))
        quiet = next(v for k, v in row.items() if k.endswith("_quiet_rounds"))
        print(f"{name:52} {row['first_token_ms']:>9.1f} {row['ms_per_token']:>9.2f} {ratio:>7.3f} {quiet or 0:>6.3f} "
              f"{row.get('ms_per_token_outside_run', float('nan')):>8.3f} {row['file_bytes'] / 1e6:>6.1f} "
              f"{row['nodes_per_step']:>6} {row['kernel_ms_matmul']:>10.2f} {row['kernel_ms_other']:>6.2f}")
    path = args.out or default_out(f"onnx_fusion_peers_cpu_{args.size}.json")
    write_json(path, {"environment": environment("cpu", threads=args.threads, arch=args.arch, size=args.size,
                                                 prompt=args.prompt,
                                                 new_tokens=args.new, rounds=args.rounds),
                      "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
