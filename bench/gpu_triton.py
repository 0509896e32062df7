"""GPU benchmark of mmaccel's Triton target against eager and Inductor, with a roofline floor per case (bf16,
torch.no_grad(), one run of a few minutes).

    python bench/gpu_triton.py [--cases decode_b1,prefill] [--variants eager,mmaccel] [--layers 16] [--iters 50]
                               [--out $OUT/gpu_triton.json] [--budget-s 480]
    python bench/gpu_triton.py --device cpu --size tiny --iters 3    # smoke test of the script itself

Cases ("real" size; `--size tiny` swaps in the registry's tiny configs):
    decode_b1        VLMDecode (LLaVA-1.5-7B dims: ViT-L/14@336 tower + Llama-2-7B-dims decoder with --layers layers),
                     one token, batch 1, at position 1024 of the 2048-slot static KV cache (filled with noise)
    decode_b8        the same with batch 8
    prefill          VLMPrefill, batch 1: one 336 px image (576 image tokens) + 64 text tokens = 640 positions
    vit_l14_336_b8   ViT-L/14@336 encoder, batch 8 (577 tokens per image)
    whisper_encoder  the registry's real Whisper encoder (base: d_model 512, 6 layers), batch 1, 3000 mel frames
Variants: eager; inductor (torch.compile default); inductor_cudagraphs (mode="reduce-overhead");
mmaccel / mmaccel_cudagraphs: backend="mmaccel", options {"target": "triton", "cuda_graphs": "auto" / True}.
Every variant compiles the same model object after torch._dynamo.reset() and runs the same inputs.

Measured per variant: first-call seconds (compile included); median ms of --iters calls after 5 warmups (CUDA
events around each call, so launch overhead counts; perf_counter off CUDA); relative error of the output after
timing vs eager's, ||out - ref|| / ||ref|| in fp32; for mmaccel variants what its compile report says
(graphs, targets, fallbacks).

Roofline floor per case, from two numbers measured at the start: copy bandwidth (a 1 GiB device-to-device copy,
read + write bytes counted) and bf16 matmul TFLOP/s (8192^3):
    memory floor  = (weight bytes read + KV cache bytes + input and output bytes) / copy bandwidth
    compute floor = FLOPs / matmul TFLOP/s
    floor = max(memory floor, compute floor); fraction of floor = floor / measured median
Weight bytes count the parameters the case uses (of the embedding table, one row per decoder position; the ViT's
last block and final norm are unused by prefill's features). KV bytes are both caches of every layer over the
whole static cache: the model masks the unwritten slots with finfo.min, so attention as written reads all
max_seq_len slots (16 x 2 x 2048 x 4096 x 2 B = 0.54 GB at batch 1; the 2026-11-29 runs' floors counted only
the 1025 written slots, 1.67 instead of 1.73 ms). Activations are left out (a lower bound). FLOPs:
    linears and convolutions: 2 * weight elements * output positions (tokens)
    attention: 4 * B * heads * Lq * Lk * head_dim per layer (QK^T and PV), Lk = keys the model attends over
    (the whole static cache for the decoder, every token for the encoders)
Biases, norms, softmax and elementwise work are left out.

Each case runs in its own worker process: a crashed kernel (a lost CUDA context) costs one case, not the run, and
a worker still running when --budget-s is spent is stopped, so the run ends in time. The JSON (environment,
hardware, per-case floors, rows) is rewritten after each case; a PNG plot (bench/plot.py) is written beside it
when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

import mmaccel
from common import (default_out, environment, floors, measure_hardware, memory_row, png_beside, rel_err,
                    start_memory, write_json, write_png)
from mmaccel.models import VLM, DecoderConfig, ViT, ViTConfig, VLMConfig, VLMDecode, VLMPrefill, build, example_inputs
from mmaccel.timing import median_ms
from plot import plot_results

DTYPE = torch.bfloat16
WARMUP = 5
PREFILL_TEXT_TOKENS = 64  # at real size; tiny uses the registry's default
Inputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Cost:
    """What a case must move and compute at least (see the module docstring for what is counted)."""
    weight_bytes: int = 0
    kv_bytes: int = 0
    flops: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass
class Case:
    model: nn.Module
    inputs: Inputs
    cost: Cost
    shapes: str


def _param_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _linear_weights(*modules: nn.Module) -> int:
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, nn.Linear))


def _attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, layers: int) -> int:
    return 4 * batch * heads * q_len * k_len * head_dim * layers


def decoder_cost(vlm: VLM, batch: int, seq: int) -> Cost:
    """The Llama decoder on `seq` new tokens per sequence, attending over its whole static cache."""
    dec, c = vlm.decoder, vlm.config.text
    caches = [layer.attn.kv_cache for layer in dec.layers]
    embed_rows = batch * seq * c.hidden * dec.embed_tokens.weight.element_size()
    return Cost(
        weight_bytes=_param_bytes(dec.layers, dec.norm, dec.lm_head) + embed_rows,
        kv_bytes=sum(kv.k.nbytes + kv.v.nbytes for kv in caches),
        flops=2 * batch * seq * _linear_weights(dec.layers, dec.lm_head)
        + _attention_flops(batch, c.heads, seq, c.max_seq_len, c.head_dim, c.layers),
    )


def vit_cost(vit: ViT, batch: int, blocks: int) -> Cost:
    """The first `blocks` blocks of the ViT on `batch` images (class token included)."""
    c, tokens = vit.config, 1 + vit.config.num_patches
    unused = (*vit.blocks[blocks:], vit.norm) if blocks < c.layers else ()
    return Cost(
        weight_bytes=_param_bytes(vit) - _param_bytes(*unused),
        flops=2 * batch * tokens * _linear_weights(*vit.blocks[:blocks])
        + 2 * batch * c.num_patches * vit.patch_embed.weight.numel()
        + _attention_flops(batch, c.heads, tokens, tokens, c.head_dim, blocks),
    )


def _vlm(size: str, layers: int, batch: int, device: torch.device) -> VLM:
    config = VLMConfig.tiny() if size == "tiny" else VLMConfig(ViTConfig.vit_l14_336(), DecoderConfig.llama_7b(layers))
    with device:
        vlm = VLM(config)
        vlm.setup_cache(batch)
    return vlm.to(DTYPE).eval().requires_grad_(False)


def build_decode(size: str, layers: int, batch: int, device: torch.device) -> Case:
    vlm = _vlm(size, layers, batch, device)
    for layer in vlm.decoder.layers:  # noise, not zeros: a kernel reading the wrong slots must show in rel err
        layer.attn.kv_cache.k.normal_()
        layer.attn.kv_cache.v.normal_()
    model, c = VLMDecode(vlm), vlm.config
    position = c.text.max_seq_len // 2
    inputs = example_inputs("vlm_decode", model, batch, seq=position - c.num_image_tokens)
    shapes = (f"decode token [{batch}, 1] at position {position}, KV cache [{c.text.layers} layers x 2, {batch}, "
              f"{c.text.kv_heads}, {c.text.max_seq_len}, {c.text.head_dim}], hidden {c.text.hidden}")
    # the floor counts every slot: this decoder masks unwritten slots with finfo.min (HF eager's additive style),
    # which attention must read (the Triton decode attention skips only blocks masked with False / -inf)
    return Case(model, inputs, decoder_cost(vlm, batch, 1), shapes)


def build_prefill(size: str, layers: int, batch: int, device: torch.device) -> Case:
    vlm = _vlm(size, layers, batch, device)
    model, c = VLMPrefill(vlm), vlm.config
    inputs = example_inputs("vlm_prefill", model, batch, seq=PREFILL_TEXT_TOKENS if size == "real" else None)
    text = inputs[1].shape[1]
    seq = c.num_image_tokens + text
    cost = (vit_cost(vlm.vision, batch, c.vision.layers - 1) + decoder_cost(vlm, batch, seq)
            + Cost(_param_bytes(vlm.projector), 0, 2 * batch * c.num_image_tokens * _linear_weights(vlm.projector)))
    shapes = (f"pixels [{batch}, 3, {c.vision.image_size}, {c.vision.image_size}] -> {c.num_image_tokens} image "
              f"tokens + {text} text tokens = {seq} positions, decoder {c.text.layers} layers, cache {c.text.max_seq_len}")
    return Case(model, inputs, cost, shapes)


def build_vit(size: str, layers: int, batch: int, device: torch.device) -> Case:
    config = ViTConfig.tiny() if size == "tiny" else ViTConfig.vit_l14_336()
    with device:
        vit = ViT(config)
    vit = vit.to(DTYPE).eval().requires_grad_(False)
    inputs = example_inputs("vit", vit, batch)
    shapes = f"pixels {list(inputs[0].shape)}, {1 + config.num_patches} tokens, {config.layers} layers, hidden {config.hidden}"
    return Case(vit, inputs, vit_cost(vit, batch, config.layers), shapes)


def build_whisper_encoder(size: str, layers: int, batch: int, device: torch.device) -> Case:
    encoder, inputs = build("whisper_encoder", size, batch, dtype=DTYPE, device=device)
    c, frames = encoder.config, inputs[0].shape[-1]
    positions = (frames + 1) // 2  # conv2 has stride 2
    cost = Cost(
        weight_bytes=_param_bytes(encoder),
        flops=2 * batch * positions * _linear_weights(encoder.blocks)
        + 2 * batch * (frames * encoder.conv1.weight.numel() + positions * encoder.conv2.weight.numel())
        + _attention_flops(batch, c.heads, positions, positions, c.d_model // c.heads, c.encoder_layers),
    )
    shapes = f"mel {list(inputs[0].shape)} -> {positions} positions, {c.encoder_layers} layers, d_model {c.d_model}"
    return Case(encoder, inputs, cost, shapes)


# name -> (builder, batch)
CASES: dict[str, tuple[Callable[[str, int, int, torch.device], Case], int]] = {
    "decode_b1": (build_decode, 1),
    "decode_b8": (build_decode, 8),
    "prefill": (build_prefill, 1),
    "vit_l14_336_b8": (build_vit, 8),
    "whisper_encoder": (build_whisper_encoder, 1),
}


def build_case(name: str, size: str = "real", layers: int = 16, device: str | torch.device = "cuda") -> Case:
    """Model, inputs, cost and a shape summary of case `name`, seeded so every variant and rerun sees the same."""
    torch.manual_seed(0)
    builder, batch = CASES[name]
    return builder(size, layers, batch, torch.device(device))


def _mmaccel(cuda_graphs: bool | str) -> Callable[[nn.Module], Callable]:
    return lambda m: torch.compile(m, backend="mmaccel", options={"target": "triton", "cuda_graphs": cuda_graphs})


def _torchao(scheme: str) -> Callable[[nn.Module], Callable]:
    """torchao's weight-only scheme on a copy of the model (quantize_ changes modules in place), through Inductor
    with CUDA graphs, as torchao's own decode benchmarks run it. int4: group 128 in the tinygemm layout
    (aten._weight_int4pack_mm, torchao's int4 path without extra kernel packages). A bench-only dependency:
    absent, the variant's row says so."""
    def make(model: nn.Module) -> Callable:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        config = (Int8WeightOnlyConfig() if scheme == "int8"
                  else Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        copy = deepcopy(model)
        quantize_(copy, config)
        return torch.compile(copy, mode="reduce-overhead")
    return make


VARIANTS: dict[str, Callable[[nn.Module], Callable]] = {
    "eager": lambda m: m,
    "inductor": lambda m: torch.compile(m),
    "inductor_cudagraphs": lambda m: torch.compile(m, mode="reduce-overhead"),
    "mmaccel": _mmaccel("auto"),
    "mmaccel_cudagraphs": _mmaccel(True),
    # Lossy, opt-in (issue 5): quantized linears. The models here have random weights, so the budgets only
    # decide that every layer takes the scheme's cheapest precision (int8; int4 in groups of 128; W8A8 and
    # fp8 with per-tensor scales); accuracy on trained weights is measured elsewhere
    # (bench/quantize_accuracy.py, tests).
    "mmaccel_int8": lambda m: torch.compile(m, backend="mmaccel", options={
        "target": "triton", "quantize": "int8_weight_only", "accuracy_budget": 0.05}),
    "mmaccel_int4": lambda m: torch.compile(m, backend="mmaccel", options={
        "target": "triton", "quantize": "int4_weight_only", "accuracy_budget": 0.5}),
    "mmaccel_w8a8": lambda m: torch.compile(m, backend="mmaccel", options={
        "target": "triton", "quantize": "w8a8_dynamic", "accuracy_budget": 0.2}),
    "mmaccel_fp8": lambda m: torch.compile(m, backend="mmaccel", options={
        "target": "triton", "quantize": "fp8", "accuracy_budget": 0.2}),
    # Lossy, opt-in (issue 14): a fixed fraction of every MLP's channels removed (prune={"mlp_channels": f}), alone
    # and with int4. Random weights: the budget only lets every MLP take the fraction (the row's "lossy" field says
    # what was applied); accuracy on trained weights is bench/prune_accuracy.py's.
    "mmaccel_prune25": lambda m: torch.compile(m, backend="mmaccel", options={
        "target": "triton", "prune": {"mlp_channels": 0.25}, "accuracy_budget": 0.99}),
    "mmaccel_prune50": lambda m: torch.compile(m, backend="mmaccel", options={
        "target": "triton", "prune": {"mlp_channels": 0.5}, "accuracy_budget": 0.99}),
    "mmaccel_prune50_int4": lambda m: torch.compile(m, backend="mmaccel", options={
        "target": "triton", "prune": {"mlp_channels": 0.5}, "quantize": "int4_weight_only", "accuracy_budget": 0.99}),
    # The peer issue 17 names: torchao's int8 / int4 weight-only through Inductor (bench-only dependency)
    "torchao_int8": _torchao("int8"),
    "torchao_int4": _torchao("int4"),
}
BASELINES = ("eager", "inductor", "inductor_cudagraphs")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    """Drop compiled code, CUDA graph pools and cached blocks, so the next variant starts from the same memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _report_summary(report: mmaccel.CompileReport) -> dict[str, Any]:
    return {
        "graphs": len(report.graphs),
        "graph_breaks": sum(report.graph_breaks.values()),
        "targets": sorted({f"{g.target} ({g.target_reason})" for g in report.graphs if g.status != "fallback"}),
        "fallbacks": sorted({g.reason for g in report.graphs if g.status == "fallback"}),
        "lossy": [change for g in report.graphs for p in g.passes if p.lossy for change in p.changes][:4],
    }


def measure_variant(variant: str, case: Case, ref: torch.Tensor, iters: int) -> dict[str, Any]:
    """Compile `case.model` as `variant`, time it and compare its output with `ref`."""
    device = ref.device
    torch._dynamo.reset()
    start_memory(device)
    fn = VARIANTS[variant](case.model)
    row: dict[str, Any] = {}
    with mmaccel.collect_reports() as report, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        fn(*case.inputs)
        _sync(device)
        row["first_call_s"] = time.perf_counter() - start
    row["median_ms"] = median_ms(lambda: fn(*case.inputs), iters, WARMUP, device)
    row["rel_err_vs_eager"] = rel_err(fn(*case.inputs), ref)
    row.update(memory_row(device))
    if report.graphs:
        row["mmaccel_report"] = _report_summary(report)
    if caught:
        row["warnings"] = list(dict.fromkeys(str(w.message)[:300] for w in caught))[:5]
    return row


def run_case(name: str, variants: list[str], size: str, layers: int, iters: int, device: str,
             emit: Callable[[dict[str, Any], list[dict[str, Any]]], None] = lambda info, rows: None) -> list[dict[str, Any]]:
    """Every variant of case `name`, each caught on its own; `emit(case_info, rows)` after each row."""
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        case = build_case(name, size, layers, device)
        ref = case.model(*case.inputs).clone()
        io_bytes = sum(t.nbytes for t in case.inputs) + ref.nbytes
        info = {"shapes": case.shapes, **dataclasses.asdict(case.cost), "io_bytes": io_bytes}
        print(f"== {name}: {case.shapes}", flush=True)
        for variant in variants:
            try:
                row = {"case": name, "variant": variant, **measure_variant(variant, case, ref, iters)}
                print(f"{name:16} {variant:20} {row['median_ms']:9.3f} ms  first call {row['first_call_s']:6.1f} s  "
                      f"rel err {row['rel_err_vs_eager']:.1e}  {mmaccel_note(row)}", flush=True)
            except Exception as e:
                traceback.print_exc()
                row = {"case": name, "variant": variant, "error": f"{type(e).__name__}: {e}"[:1000]}
                print(f"{name:16} {variant:20} FAILED {row['error'][:200]}", flush=True)
            rows.append(row)
            emit(info, rows)
            _free(ref.device)  # raises if a kernel broke the CUDA context: the worker ends, the parent notes why
    del case, ref
    _free(torch.device(device))
    return rows


def add_floors(info: dict[str, Any], hardware: dict[str, float]) -> None:
    moved = info["weight_bytes"] + info["kv_bytes"] + info["io_bytes"]
    info.update(floors(moved, info["flops"], hardware))


def add_ratios(rows: list[dict[str, Any]], cases: dict[str, dict[str, Any]]) -> None:
    """Speedups against the baselines of the same case, and the fraction of the case's floor reached."""
    ms = {(r["case"], r["variant"]): r["median_ms"] for r in rows if "median_ms" in r}
    for r in rows:
        if "median_ms" not in r:
            continue
        for base in BASELINES:
            base_ms = ms.get((r["case"], base))
            r[f"speedup_vs_{base}"] = base_ms / r["median_ms"] if base_ms else None
        floor = cases.get(r["case"], {}).get("floor_ms")
        r["floor_fraction"] = floor / r["median_ms"] if floor else None


def mmaccel_note(row: dict[str, Any]) -> str:
    """What an mmaccel row ran on, when that is not the Triton target it asked for."""
    report = row.get("mmaccel_report")
    if not report:
        return ""
    notes = [f"target {t}" for t in report["targets"] if not t.startswith("triton")]
    notes += [f"{report['graph_breaks']} graph break(s)"] if report["graph_breaks"] else []
    notes += [f"fallback: {reason}" for reason in report["fallbacks"]]
    return "; ".join(notes)


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-".rjust(int(fmt.split(".")[0]))

    lines = [f"{'case':16} {'variant':20} {'median ms':>10} {'x eager':>8} {'x ind':>7} {'x ind_cg':>8} "
             f"{'floor':>6} {'rel err':>8} {'1st call s':>10}  note"]
    for r in rows:
        head = f"{r['case']:16} {r['variant']:20}"
        if "median_ms" not in r:
            lines.append(f"{head} error: {r['error'][:120]}")
            continue
        lines.append(f"{head} {r['median_ms']:10.3f} {num(r['speedup_vs_eager'], '8.2f')} "
                     f"{num(r['speedup_vs_inductor'], '7.2f')} {num(r['speedup_vs_inductor_cudagraphs'], '8.2f')} "
                     f"{num(r['floor_fraction'], '6.0%')} {r['rel_err_vs_eager']:8.1e} {r['first_call_s']:10.1f}  "
                     f"{mmaccel_note(r)[:120]}")
    return "\n".join(lines)


def _worker(args: argparse.Namespace) -> None:
    """One case in this process; its rows land in --worker-out after each variant."""
    run_case(args.worker, args.variants, args.size, args.layers, args.iters, args.device,
             emit=lambda info, rows: write_json(args.worker_out, {"case": info, "rows": rows}))


def _run_worker(case: str, args: argparse.Namespace, timeout_s: float, tmp: str) -> tuple[dict[str, Any], list[dict]]:
    """Run case `case` in a child process; rows it never wrote are recorded with the reason."""
    out = os.path.join(tmp, f"{case}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, "--worker-out", out, "--size", args.size,
           "--layers", str(args.layers), "--iters", str(args.iters), "--device", args.device,
           "--variants", ",".join(args.variants)]
    why = f"time budget (--budget-s {args.budget_s:g}) spent before this variant finished"
    try:
        if timeout_s > 0:
            rc = subprocess.run(cmd, timeout=timeout_s).returncode
            why = f"worker process exited with code {rc} before this variant finished"
    except subprocess.TimeoutExpired:
        pass
    done: dict[str, Any] = {"case": {}, "rows": []}
    if os.path.exists(out):
        with open(out) as f:
            done = json.load(f)
    finished = {r["variant"] for r in done["rows"]}
    missing = [{"case": case, "variant": v, "error": why} for v in args.variants if v not in finished]
    return done["case"], done["rows"] + missing


def _names(valid: dict[str, Any]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        unknown = [n for n in names if n not in valid]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(valid)}")
        return names
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=_names(CASES), default=list(CASES),
                   help=f"comma list, run in this order (default: {','.join(CASES)})")
    p.add_argument("--variants", type=_names(VARIANTS), default=list(VARIANTS),
                   help=f"comma list (default: {','.join(VARIANTS)})")
    p.add_argument("--layers", type=int, default=16, help="decoder layers at real size (default 16; 32 is all of 7B)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per variant, after 5 warmups (default 50)")
    p.add_argument("--out", default=default_out("gpu_triton.json"),
                   help="JSON path (default: $OUT/gpu_triton.json if OUT is set, "
                   "else bench/results/gpu_triton.json); the PNG goes beside it")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock seconds for all cases; what is still running then is stopped (default 480)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu, for a smoke test with --size tiny")
    p.add_argument("--size", choices=("real", "tiny"), default="real", help="model sizes (default real)")
    p.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return _worker(args)
    start = time.perf_counter()
    device = torch.device(args.device)
    data: dict[str, Any] = {
        "environment": environment(device, dtype=str(DTYPE)),
        "settings": {k: getattr(args, k) for k in ("cases", "variants", "layers", "iters", "size", "budget_s")},
        "hardware": measure_hardware(device, DTYPE),
        "cases": {},
        "results": [],
    }
    hw = data["hardware"]
    print(f"{data['environment']['device']}: copy {hw['copy_gb_s']:.4g} GB/s (read + write), "
          f"bf16 matmul {hw['matmul_tflop_s']:.4g} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            case_start = time.perf_counter()
            info, rows = _run_worker(case, args, args.budget_s - (case_start - start), tmp)
            print(f"-- {case}: {time.perf_counter() - case_start:.0f} s; {time.perf_counter() - start:.0f} of "
                  f"{args.budget_s:g} s spent", flush=True)
            if info:
                add_floors(info, hw)
                data["cases"][case] = info
            data["results"] += rows
            add_ratios(data["results"], data["cases"])
            write_json(args.out, data)
    print("\n" + format_table(data["results"]))
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.0f} s)")
    write_png(plot_results, data, png_beside(args.out), f"python bench/plot.py {args.out}")


if __name__ == "__main__":
    main()
