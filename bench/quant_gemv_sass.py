"""Machine code of the weight-only GEMV kernels without a GPU: each kernel compiled by Triton for sm_90 (H100/H200),
disassembled with the nvdisasm Triton ships, and the instructions of its main loop counted per weight value a
thread handles. A GEMV that reads its weight once is held under the memory floor by instruction issue when this
count is high: an SM issues 4 warp instructions per clock (128 thread instructions), so at 1.98 GHz an H200
(132 SMs) issues 33.4e12 per second against ~4.2e12 weight bytes per second of copy bandwidth; about 8 per
byte (4 per int4 value) is the most a kernel at the floor can spend. Runs on the CPU in about a minute:

    python bench/quant_gemv_sass.py [--out bench/results/quant_gemv_sass_sm90.json]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import default_out, environment, write_json  # noqa: E402
from mmaccel.backends.triton import quant_matmul as qm  # noqa: E402

POINTERS = {"X": "*bf16", "Scale": "*bf16", "Zero": "*u8", "Bias": "*bf16", "Out": "*bf16"}
WORDS_ARGS = {"W": "*i32", "M": "i32", "N": "i32", "n_chunks": "i32", "stride_xm": "i32"}
PACKED_ARGS = {"N": "i32", "K": "i32", "KW": "i32", "n_groups": "i32"}


def sass(fn, signature: dict, constants: dict, num_warps: int) -> str:
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constants}}, constexprs=constants)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 1})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def main_loop(text: str) -> collections.Counter:
    """Opcodes of the longest backward branch's body (the K loop)."""
    lines = text.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.L_x_\d+:$", line.strip())}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    start, end = max(loops, key=lambda se: se[1] - se[0])
    ops = [m.group(1).split(".")[0] for line in lines[start:end + 1]
           if (m := re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]+)", line))]
    return collections.Counter(ops)


def words_row(bits: int, m: int, bn: int, block_words: int, warps: int, group: int = 128) -> dict:
    chunks = max(block_words // (group // 8 if bits == 4 else 16), 1)
    text = sass(qm._wq_words_kernel, {**POINTERS, **WORDS_ARGS},
                dict(BITS=bits, GROUP=group if bits == 4 else 8, HAS_BIAS=False, BLOCK_M=m, BLOCK_N=bn, CHUNKS=chunks),
                warps)
    values = bn * block_words * (32 // bits) / (32 * warps)
    return {"kernel": "words", "bits": bits, "group": group if bits == 4 else None, "M": m, "block_n": bn,
            "block_words": block_words, "num_warps": warps, "values_per_thread": values, **_counts(text, values, m)}


def bytes_row(bits: int, bn: int, bk: int, warps: int, group: int = 128) -> dict:
    signature = {**POINTERS, "W": "*u8" if bits == 4 else "*i8", **PACKED_ARGS}
    text = sass(qm._wq_gemv_kernel, signature,
                dict(BITS=bits, GROUP=group, HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=max(bk, group // 2)), warps)
    values = bn * bk * (2 if bits == 4 else 1) / (32 * warps)
    return {"kernel": "bytes", "bits": bits, "group": group if bits == 4 else None, "M": 1, "block_n": bn, "block_k": bk,
            "num_warps": warps, "values_per_thread": values, **_counts(text, values, 1)}


def _counts(text: str, values: float, m: int) -> dict:
    ops = main_loop(text)
    total = sum(ops.values())
    return {"loop_instructions": total, "per_value": total / values, "per_value_and_row": total / values / m,
            "spills": len(re.findall(r"\b(STL|LDL)\b", text)), "top_ops": dict(ops.most_common(8))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out("quant_gemv_sass_sm90.json"))
    args = parser.parse_args()
    rows = [bytes_row(4, 4, 512, 2), bytes_row(8, 4, 512, 2)]  # the byte kernels' measured best (H100)
    rows += [words_row(bits, *cfg) for bits in (4, 8) for cfg in
             [(1, 4, 128, 4), (1, 16, 128, 4), (2, 16, 64, 4), (4, 16, 64, 4), (8, 16, 32, 4)]]
    rows += [words_row(4, 1, 16, 128, 4, group) for group in (32, 64)]
    for r in rows:
        print(f"{r['kernel']:5} int{r['bits']} g{r['group'] or '-':<3} M={r['M']} BN={r['block_n']:<2} warps={r['num_warps']} "
              f"{r['loop_instructions']:5} instructions / {r['values_per_thread']:5.0f} values: "
              f"{r['per_value']:5.2f} per value, {r['per_value_and_row']:5.2f} per value and row, spills {r['spills']}")
    write_json(args.out, {**environment("cpu"), "target": "sm_90", "rows": rows})


if __name__ == "__main__":
    main()
