"""GPU baseline: eager vs Inductor (default, reduce-overhead) vs mmaccel on the 7B-dims decode step and the
ViT-L/14@336 encoder, bf16, one run. Checks mmaccel's outputs against eager.

    python bench/gpu_baseline.py --layers 16 [--out bench/results/gpu_baseline.json]
    python bench/gpu_baseline.py --device cpu --size tiny --iters 3    # smoke test of the script itself
"""
from __future__ import annotations

import argparse
import time

import torch

from common import default_out, environment, rel_err, write_json
from mmaccel.models import Decoder, DecoderConfig, ViT, ViTConfig
from mmaccel.timing import median_ms


def run_case(name, model, inputs, rows, iters: int, device: torch.device) -> None:
    with torch.no_grad():
        ref = model(*inputs).clone()
        variants = {
            "eager": model,
            "inductor": torch.compile(model),
            "inductor_cudagraphs": torch.compile(model, mode="reduce-overhead"),
            "mmaccel": torch.compile(model, backend="mmaccel"),
        }
        for label, fn in variants.items():
            start = time.perf_counter()
            out = fn(*inputs).clone()
            compile_s = time.perf_counter() - start
            ms = median_ms(lambda: fn(*inputs), iters, 5, device)
            rows.append({"case": name, "variant": label, "median_ms": ms, "first_call_s": compile_s,
                         "rel_err_vs_eager": rel_err(out, ref)})
            print(f"{name:24} {label:22} {ms:9.3f} ms  first call {compile_s:6.1f}s  rel err {rows[-1]['rel_err_vs_eager']:.2e}",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--iters", type=int, default=50, help="timed calls per variant, after 5 warmups (default 50)")
    p.add_argument("--out", default=default_out("gpu_baseline.json"))
    p.add_argument("--skip-vit", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu, for a smoke test with --size tiny")
    p.add_argument("--size", choices=("real", "tiny"), default="real", help="model sizes (default real)")
    args = p.parse_args()
    torch.manual_seed(0)
    rows: list[dict] = []
    dev = torch.device(args.device)
    tiny = args.size == "tiny"
    with dev:
        dec = Decoder(DecoderConfig.tiny() if tiny else DecoderConfig.llama_7b(layers=args.layers))
    dec = dec.to(torch.bfloat16).eval().requires_grad_(False)
    dec.setup_cache(1, dtype=torch.bfloat16, device=dev)
    position = min(1000, dec.config.max_seq_len // 2)  # 1000 at real size, as in the committed runs
    token, pos = torch.randint(0, dec.config.vocab, (1, 1), device=dev), torch.tensor([position], device=dev)
    run_case(f"decode 7B-dims L{args.layers} b1" if not tiny else "decode tiny b1", dec, (token, pos), rows,
             args.iters, dev)
    del dec
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_vit:
        config = ViTConfig.tiny() if tiny else ViTConfig.vit_l14_336()
        with dev:
            vit = ViT(config)
        vit = vit.to(torch.bfloat16).eval().requires_grad_(False)
        pixels = torch.randn(8, 3, config.image_size, config.image_size, device=dev, dtype=torch.bfloat16)
        run_case("ViT-L/14@336 b8" if not tiny else "ViT tiny b8", vit, (pixels,), rows, args.iters, dev)
    write_json(args.out, {"environment": environment(dev, dtype="torch.bfloat16"), "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
