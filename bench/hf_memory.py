"""Memory a compiled Hugging Face decoder holds beyond its own weights (issue 21): eager, Inductor, mmaccel
(lossless) and mmaccel int8 weight-only, on a LlamaForCausalLM at 7B dims (random weights).

On CUDA: GPU memory allocated beyond the model after compiling and running a `--seq`-token forward twice
("held"), and the peak above the model during that ("peak"). On CPU (`--tiny`, a 2-layer toy config): bytes of
the distinct tensor storages reachable from the module and the compiled graphs (no allocator statistics).

    python bench/hf_memory.py --layers 8 --out bench/results/hf_memory_h200.json     # GPU, ~2 min
    python bench/hf_memory.py --tiny                                                  # CPU check
"""
from __future__ import annotations

import argparse
import gc

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mmaccel
from common import default_out, environment, write_json

VARIANTS = ("eager", "inductor", "mmaccel", "mmaccel_int8")


def build(tiny: bool, layers: int, device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=128)
    else:  # Llama-2-7B dims, `layers` layers
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def compiled(variant: str, model: torch.nn.Module):
    if variant == "eager":
        return model
    if variant == "inductor":
        return torch.compile(model)
    options = {"quantize": "int8_weight_only", "accuracy_budget": 0.5} if variant == "mmaccel_int8" else {}
    return torch.compile(model, backend="mmaccel", options=options)


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measure(variant: str, args: argparse.Namespace, device: str) -> dict:
    torch._dynamo.reset()
    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    model = build(args.tiny, args.layers, device)
    weights = storage_bytes([*model.parameters(), *model.buffers()])
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device=device)
    with torch.no_grad(), mmaccel.collect_reports() as report:
        fn = compiled(variant, model)
        for _ in range(2):
            out = fn(ids).logits
        del out
    gc.collect()
    row = {"variant": variant, "weight_bytes": weights}
    if cuda:
        torch.cuda.synchronize()
        row["held_bytes"] = torch.cuda.memory_allocated() - base
        row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        graphs = [g.final_graph for g in report.graphs if g.final_graph is not None]
        tensors = [*model.parameters(), *model.buffers(), *(b for g in graphs for b in g.buffers())]
        row["held_bytes"] = storage_bytes(tensors) - weights
    del fn, model, report
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer toy config on CPU (storage accounting)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.seq = min(args.seq, 16)
    rows = [measure(v, args, device) for v in args.variants.split(",")]
    gib = 2 ** 30
    print(f"{'variant':14} {'weights GiB':>11} {'held GiB':>9} {'held/weights':>12} {'peak GiB':>9}")
    for r in rows:
        peak = f"{r['peak_bytes'] / gib:9.3f}" if "peak_bytes" in r else f"{'-':>9}"
        print(f"{r['variant']:14} {r['weight_bytes'] / gib:11.3f} {r['held_bytes'] / gib:9.3f} "
              f"{r['held_bytes'] / r['weight_bytes']:12.1%} {peak}")
    out = args.out or default_out("hf_memory_tiny.json" if args.tiny else "hf_memory.json")
    write_json(out, {"environment": environment(device, layers=args.layers, seq=args.seq), "rows": rows})
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
