"""Grouped-query attention decode (issue 20's GPU check): a Hugging Face LlamaForCausalLM at Llama-3-8B dims
(32 query heads, 8 KV heads) against the same model without grouped-query attention at the same weight bytes
(32 KV heads; the MLP narrowed from 14336 to 12288 so the weights weigh the same), one decode step with a
static KV cache holding `--kv` prompt positions, batch 1, bf16, random weights. eager, Inductor and mmaccel (Triton target,
CUDA graphs); CUDA-event medians after warm-up. Also prints whether attention_fusion fired on each graph.

    python bench/gqa_decode.py --layers 8 --out bench/results/gqa_decode_h200.json   # GPU, ~3 min
    python bench/gqa_decode.py --tiny                                                  # CPU check
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import mmaccel
from common import default_out, environment, rel_err, write_json
from mmaccel.timing import median_ms

# (KV heads, MLP width): equal weight bytes per layer. GQA saves 2 * 4096 * (4096 - 1024) = 25.2M attention
# weights per layer, which 3 * 4096 * 2048 of MLP width gives back.
SHAPES = {"gqa": (8, 14336), "mha_same_bytes": (32, 12288)}


def build(kind: str, layers: int, tiny: bool, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    kv_heads, mlp = SHAPES[kind]
    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=mlp // 64, num_hidden_layers=2, num_attention_heads=8,
                             num_key_value_heads=kv_heads // 4, vocab_size=256, max_position_embeddings=256)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=32,
                             num_key_value_heads=kv_heads, vocab_size=128256, max_position_embeddings=8192,
                             rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def case(kind: str, args, device: str, dtype: torch.dtype) -> list[dict]:
    model = build(kind, args.layers, args.tiny, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(0, model.config.vocab_size, (1, args.kv), device=device)
    token = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    steps = 1 + args.warmup + args.iters

    rows, reference = [], None
    variants = {"eager": model.forward, "inductor": torch.compile(model.forward),  # compiled lazily, when called
                "mmaccel": torch.compile(model.forward, backend="mmaccel")}
    for name, forward in variants.items():
        if name not in args.variants:
            continue
        # A fresh static cache per variant, filled with the prompt; each timed step appends one position, as
        # generate() does (HF computes the position from the cache, whatever its version).
        cache = StaticCache(config=model.config, max_cache_len=args.kv + steps)
        with torch.no_grad():
            model(prompt, past_key_values=cache)

        def step():
            return forward(input_ids=token, past_key_values=cache).logits

        with torch.no_grad(), mmaccel.collect_reports() as report:
            out = step().float()
            reference = out if reference is None else reference
            ms = median_ms(step, args.iters, args.warmup, device=device)
        if args.profile and name == "mmaccel":
            print_kernels(f"{kind} {name}", step)
        err = rel_err(out, reference)
        fused = [g.matched("attention_fusion") for g in report.graphs]
        targets = sorted({g.target for g in report.graphs})
        rows.append({"model": kind, "variant": name, "median_ms": ms, "rel_err_vs_eager": err,
                     "weight_bytes": weight_bytes, "attention_fused_per_graph": fused, "targets": targets})
        print(f"{kind:16} {name:9} {ms:8.3f} ms  rel err {err:.1e}  weights {weight_bytes / 2**30:.2f} GiB"
              + (f"  attention fused per graph {fused}, target {targets}" if name == "mmaccel" else ""), flush=True)
    return rows


def print_kernels(label: str, step, steps: int = 3, rows: int = 12) -> None:
    """Where one step's GPU time goes (as bench/profile_decode.py does for the reference decoder)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / steps / 1000
    print(f"== {label}: {total:.3f} ms of kernel time per step, {sum(e.count for e in events) / steps:.0f} kernels")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"{e.self_device_time_total / steps / 1000:8.3f} ms {e.count // steps:5d}x  {e.key[:90]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--variants", nargs="+", default=["eager", "inductor", "mmaccel"])
    p.add_argument("--profile", action="store_true", help="CUDA: print the mmaccel step's top kernels")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        args.kv, args.warmup, args.iters = 24, 1, 3
        args.variants = [v for v in args.variants if v != "inductor"]  # minutes of C++ compiles on a CPU
    rows = [r for kind in SHAPES for r in case(kind, args, device, dtype)]
    out = args.out or default_out("gqa_decode_tiny.json" if args.tiny else "gqa_decode.json")
    write_json(out, {"environment": environment(device, layers=args.layers, kv=args.kv), "rows": rows})
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
