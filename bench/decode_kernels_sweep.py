"""Sweep of the decode step's non-GEMV-bound kernels on the Triton target (issue 17 item 1, issue 13's decode floor):
split-KV decode attention (backends/triton/decode_attention.py) and the fused M = 1 GEMV (backends/triton/gemv.py).

Why: the 16-layer 7B-dims decode step on an H200 spent 0.26 ms in attention (16 layers, 1025 live keys of 2048: a
floor near 0.07 ms) and the GEMV fusions (RMSNorm in front, SiLU(gate)*up and the residual after) made the GEMVs
0.34 ms slower (1.74 -> 2.08 ms; bench/results/profile_decode_fusedsplit_h200.txt), eating the launches they save.

Part "attention": for decode shapes (batch 1, 32 heads, head dim 128; MHA and 8 K/V heads; bool masks whose live
prefix is what a static cache holds), every plan of (programs per SM, keys per block, warps, stages) and, for
grouped-query attention, heads per program 1 vs the whole group, against ATen's SDPA on the same inputs. Part
"gemv": the 7B decoder's five linears and three of Whisper large-v3's decoder (LayerNorm in front, one pass) at
M = 1, plain and with the fusion the decode step gives them, at several (rows per program, bytes of a row per
step, warps), x and the norm weight loaded in the weight tile's shape or once as a vector (X1D). Times: GPU time inside a CUDA graph with L2 flushed before
each call (backends/triton/tuning.py `time_us`, as the target's own autotuner measures); GB/s over the bytes a
call must read.

    python bench/decode_kernels_sweep.py [--parts attention gemv] [--out $OUT/decode_kernels_sweep_h200.json]
    TRITON_INTERPRET=1 python bench/decode_kernels_sweep.py --dry     # CPU: every kernel variant checked, tiny
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from common import default_out, environment, gb_per_s, rel_err, write_json
from mmaccel.backends.triton import decode_attention as da
from mmaccel.backends.triton import gemv
from mmaccel.backends.triton.tuning import time_us

# (name, heads, kv heads, head dim, cache length, live keys)
ATTENTION = [("mha 640/1024", 32, 32, 128, 1024, 640), ("mha 1025/2048", 32, 32, 128, 2048, 1025),
             ("mha 4096/4096", 32, 32, 128, 4096, 4096), ("gqa8 1025/2048", 32, 8, 128, 2048, 1025),
             ("gqa8 4096/4096", 32, 8, 128, 4096, 4096),
             # Whisper large-v3's decoder: self-attention over a short static cache, cross-attention over the
             # encoder's 1500 positions
             ("wh self 70/256", 20, 20, 64, 256, 70), ("wh cross 1500", 20, 20, 64, 1500, 1500)]
# (name, N, K, fusion): a Llama-7B decoder layer's linears and its LM head
GEMV = [("qkv+norm", 12288, 4096, "norm"), ("o+residual", 4096, 4096, "residual"),
        ("gate_up+norm+glu", 22016, 4096, "norm_glu"), ("down+residual", 4096, 11008, "residual"),
        ("lm_head+norm", 32000, 4096, "norm"),
        # Whisper large-v3's decoder (d_model 1280): LayerNorm prologues (the one-pass form, MMACCEL_GEMV_LAYERNORM)
        ("wh qkv+ln", 3840, 1280, "layernorm"), ("wh fc1+ln+gelu", 5120, 1280, "layernorm_gelu"),
        ("wh fc2+residual", 1280, 5120, "residual"), ("wh o+residual", 1280, 1280, "residual"),
        ("wh cross-q+ln", 1280, 1280, "layernorm"), ("wh lm_head+ln", 51866, 1280, "layernorm")]


def attention_part(args, device, dtype) -> list[dict]:
    rows = []
    grid = list(itertools.product(args.pps, args.block_n, args.warps, args.stages))
    shapes = [a for a in ATTENTION if not args.shapes or any(a[0].startswith(prefix) for prefix in args.shapes)]
    for name, H, Hkv, D, Lk, live in shapes if not args.dry else [("tiny gqa", 8, 2, 16, 64, 40)]:
        torch.manual_seed(0)
        q = torch.randn(1, H, 1, D, device=device, dtype=dtype)
        k, v = (torch.randn(1, Hkv, Lk, D, device=device, dtype=dtype) for _ in range(2))
        mask = torch.zeros(1, 1, 1, Lk, dtype=torch.bool, device=device)
        mask[..., :live] = True
        gqa = Hkv != H
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, enable_gqa=gqa)
        moved = 2 * Hkv * live * D * dtype.itemsize  # K and V of the live keys, once
        kr, vr = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v)) if gqa else (k, v)
        base = {"shape": name, "H": H, "Hkv": Hkv, "D": D, "Lk": Lk, "live": live, "bytes": moved}
        if not args.dry:
            us = time_us(lambda: F.scaled_dot_product_attention(q, kr, vr, mask), reps=args.reps)
            rows.append({**base, "kernel": "aten sdpa" + (" (K/V repeated)" if gqa else ""), "us": us,
                         "gb_s": gb_per_s(moved, us)})
        default = da.plan(q, k)
        heads_options = sorted({1, default.heads})
        for (pps, block_n, warps, stages), heads in itertools.product(grid, heads_options):
            cut = da.plan(q, k, pps, block_n, warps, stages)._replace(heads=heads)
            fn = lambda cut=cut: da.decode_attention(q, k, v, mask, enable_gqa=gqa, launch=cut)  # noqa: E731
            err = rel_err(fn().float(), ref)
            us = time_us(fn, reps=args.reps) if not args.dry else float("nan")
            rows.append({**base, "kernel": "split-kv" if heads == 1 else f"split-kv {heads} heads", "programs_per_sm": pps, "block_n": block_n, "warps": warps,
                         "stages": stages, "heads": heads, "splits": cut.num_splits, "us": us,
                         "gb_s": gb_per_s(moved, us), "rel_err": err, "default": cut == default})
        _print_best(rows, name)
    return rows


def _print_best(rows: list[dict], shape: str) -> None:
    """Per kernel of this shape: its two fastest configs, the current default and the library's time."""
    mine = [r for r in rows if r["shape"] == shape]
    for kernel in dict.fromkeys(r["kernel"] for r in mine):
        ranked = sorted((r for r in mine if r["kernel"] == kernel and r["us"] == r["us"]), key=lambda r: r["us"])
        shown = ranked[:2] + [r for r in mine if r["kernel"] == kernel and r.get("default") and r not in ranked[:2]]
        for r in shown or [r for r in mine if r["kernel"] == kernel and r.get("default")]:
            knobs = " ".join(f"{key[:5]}={r[key]}" for key in ("programs_per_sm", "block_n", "warps", "stages",
                                                               "heads", "splits", "rows_per_program", "row_bytes")
                             if key in r)
            print(f"{shape:16s} {kernel[:18]:18s} {r['us']:7.2f} us {r['gb_s']:5.0f} GB/s {knobs}"
                  + ("  <- default" if r.get("default") else ""), flush=True)


def gemv_part(args, device, dtype) -> list[dict]:
    rows = []
    tiny = [("tiny", 40, 96, "norm_glu"), ("tiny", 40, 96, "residual"), ("tiny ln", 40, 96, "layernorm_gelu")]
    shapes = [g for g in GEMV if not args.shapes or any(g[0].startswith(prefix) for prefix in args.shapes)]
    for name, N, K, fusion_kind in shapes if not args.dry else tiny:
        torch.manual_seed(0)
        glu = "glu" in fusion_kind
        x = torch.randn(1, K, device=device, dtype=dtype)
        weight = torch.randn(N * (2 if glu else 1), K, device=device, dtype=dtype) / K ** 0.5
        layer_norm = fusion_kind.startswith("layernorm")
        normed = "norm" in fusion_kind
        fused = gemv.Fusion(norm_weight=torch.rand(K, device=device, dtype=dtype) + 0.5 if normed else None,
                            eps=1e-6, glu=glu,
                            residual=torch.randn(1, N, device=device, dtype=dtype) if fusion_kind == "residual" else None,
                            norm_bias=torch.randn(K, device=device, dtype=dtype) if layer_norm else None,
                            activation="gelu" if fusion_kind.endswith("gelu") else "none")
        if layer_norm:  # computed once at compile time in the Triton target
            fused = fused._replace(norm_folds=gemv.layer_norm_folds(weight, fused.norm_weight, fused.norm_bias))
        moved = weight.numel() * dtype.itemsize
        base = {"shape": name, "N": N, "K": K, "bytes": moved}
        if not args.dry:
            us = time_us(lambda: x @ weight.T, reps=args.reps)
            rows.append({**base, "kernel": "cublas (plain)", "us": us, "gb_s": gb_per_s(moved, us)})
        default = gemv._config(1, N, K, x.device, dtype, norm=normed, layer_norm=layer_norm)
        for (rows_pp, row_bytes, warps), with_fusion, x1d in itertools.product(
                itertools.product(args.rows_per_program, args.row_bytes, args.gemv_warps), (False, True), (False, True)):
            if with_fusion and layer_norm and not x1d:
                continue  # LayerNorm runs on the X1D path only
            block_k = row_bytes // dtype.itemsize
            # one split: these shapes give every SM programs without one, and the fused epilogue runs in place
            cfg = gemv.GemvConfig(rows_pp, block_k, -(-K // block_k) * block_k, 1, warps, 1, x1d)
            fusion = fused if with_fusion else gemv.Fusion()
            n_out = N if with_fusion else weight.shape[0]

            def fn(cfg=cfg, fusion=fusion, n_out=n_out):
                out = torch.empty(1, n_out, device=device, dtype=dtype)
                gemv._launch(x, weight, None, out, out, fusion, cfg, n_out)
                return out
            expected = gemv.fused_reference(x, weight, None, fusion)
            err = rel_err(fn().float(), expected)
            us = time_us(fn, reps=args.reps) if not args.dry else float("nan")
            kernel = "triton row" + (" fused" if with_fusion else "") + (" x1d" if x1d else "")
            rows.append({**base, "kernel": kernel, "fused": with_fusion, "x1d": x1d,
                         "rows_per_program": rows_pp, "row_bytes": row_bytes, "warps": warps, "us": us,
                         "gb_s": gb_per_s(moved, us), "rel_err": err,
                         "default": (rows_pp, block_k, warps, x1d) == (default.block_n, default.block_k,
                                                                       default.num_warps, default.x1d)})
        _print_best(rows, name)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["attention", "gemv"], choices=["attention", "gemv"])
    p.add_argument("--pps", type=int, nargs="+", default=[3, 6, 12, 24, 48], help="attention: programs per SM")
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128], help="attention: keys per block")
    p.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8], help="attention: warps per program")
    p.add_argument("--gemv-warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="attention: pipeline stages")
    p.add_argument("--rows-per-program", type=int, nargs="+", default=[1, 2, 4, 8], help="gemv: weight rows per program")
    p.add_argument("--row-bytes", type=int, nargs="+", default=[2048, 4096], help="gemv: bytes of a row per step")
    p.add_argument("--shapes", nargs="+", default=None, help="only the shapes whose name starts so (e.g. wh)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dry", action="store_true", help="CPU (TRITON_INTERPRET=1): tiny shapes, correctness only")
    p.add_argument("--out", default=default_out("decode_kernels_sweep_h200.json"))
    args = p.parse_args()
    device = torch.device("cpu" if args.dry else "cuda")
    dtype = torch.float16 if args.dry else torch.bfloat16  # bf16 loads are wrong under the interpreter
    if args.dry:
        args.pps, args.block_n, args.warps, args.stages = [3], [16], [4], [1]
        args.rows_per_program, args.row_bytes, args.gemv_warps = [1, 2], [64], [4]
    start = time.time()
    results = {}
    for part in args.parts:
        print(f"== {part}", flush=True)
        results[part] = (attention_part if part == "attention" else gemv_part)(args, device, dtype)
    bad = [r for rows in results.values() for r in rows if r.get("rel_err", 0) > 2e-2]
    print(f"{sum(map(len, results.values()))} rows in {time.time() - start:.0f} s; {len(bad)} with rel_err > 2e-2")
    write_json(args.out, {"environment": environment(device, dtype=str(dtype), reps=args.reps), **results})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
