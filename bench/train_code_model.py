"""Trains a code-model pair on the Python standard library's own source (issue 16): a TARGET (Llama, 303M
parameters, hidden 1536, 12 layers: its bf16 decode step reads 0.6 GB of weights) and a DRAFT (6.2M parameters,
hidden 512, 2 layers: 2% of the target's weight bytes per token), both HF LlamaForCausalLM, so mmaccel.generate, speculative decoding and
mmaccel.cascade take them as any HF model.

    python bench/train_code_model.py                        # CUDA: target 150 s, draft 60 s (~4 min in all)
    python bench/train_code_model.py --tiny                 # CPU: tiny models, 250 steps each, ~15 s
    python bench/train_code_model.py --out DIR --budget-s 60 --draft-budget-s 30

Tokens are bytes (vocab 256 + PAD, BOS, EOS): no tokenizer to train or ship, the same on every machine. Data:
every .py file under sysconfig's stdlib folder except tests, site-packages and caches; a file is held out (never
trained on) when crc32 of its relative path % 10 == 0 (~10%, stable across machines with the same Python):
bench/code_model_eval.py takes its prompts from those files. The target is also trained to exit early
(LayerSkip's early-exit loss, weight --early-exit-weight): its final norm and LM head read layer
--early-exit-layer's hidden state too, so draft="layers:N" (self-speculation) proposes tokens worth verifying;
without that loss an intermediate layer's state is not meant for the head and self-speculation would be
measured on a model never asked to do it.

The draft trains on the data's cross-entropy by default; --distill w puts weight w on the KL divergence from the
target's next-byte distribution (the target trained earlier in the run or read from --out): a greedy draft's
token is accepted when its argmax is the target's, which cross-entropy does not ask for. At equal STEPS it helps:
tiny models on CPU, 250 steps each, same target, the draft's argmax agreed with the target's on 0.680 of held-out
bytes with cross-entropy alone, 0.792 at --distill 0.5, 0.846 at 1.0. At equal TIME it does not: each draft step
also runs the 303M target forward, so on the H200 the 60 s draft budget bought 460 distilled steps (22.6M tokens,
agreement 0.769, speculative acceptance 0.53, 1.25x; bench/results/code_model_eval_distilled_h200.json) against
about 3300 cross-entropy steps (161M tokens; acceptance 0.66, 1.30x in run 4), hence the default 0.
training.json records the agreement (held_out_agreement) beside the loss.

Writes DIR/<name>/ (save_pretrained, fp32) and DIR/<name>/training.json (loss curve, tokens seen, tokens/s,
held-out loss per byte) for name in (target, draft); DIR defaults to ~/.cache/mmaccel/code_models[_tiny].
Seeded: the same data order and initial weights each run. A GPU run stops at its time budget, so what it learns
depends on the GPU's speed; --tiny stops at a step count (--max-steps), the same models on any CPU (one thread).
"""
from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD, BOS, EOS = 256, 257, 258
VOCAB = 259
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
HELD_OUT_MODULUS = 10  # crc32(path) % 10 == 0: ~10% of the files (75 of 734 on CPython 3.11)
SIZES = {  # name -> LlamaConfig fields; "tiny" ones train in seconds on CPU
    "target": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4),
    "draft": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4),
    "target_tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2),
    "draft_tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1),
}


def source_files() -> tuple[list[Path], list[Path]]:
    """(train, held out): the stdlib's .py files in a fixed order, split by a hash of the relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIPPED_FOLDERS & set(p.relative_to(root).parts))
    held = {p for p in files if zlib.crc32(str(p.relative_to(root)).encode()) % HELD_OUT_MODULUS == 0}
    return [p for p in files if p not in held], [p for p in files if p in held]


def encode(files: list[Path]) -> torch.Tensor:
    """The files' bytes, each file as BOS + bytes + EOS, concatenated: [N] int64."""
    pieces = [torch.tensor([BOS])]
    for path in files:
        raw = path.read_bytes()
        if raw:  # frombuffer refuses an empty buffer (an empty __init__.py)
            pieces.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8).long())
        pieces.append(torch.tensor([EOS, BOS]))
    return torch.cat(pieces)


def config(size: str, window: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=max(window, 1024), pad_token_id=PAD,
                       bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False, **SIZES[size])


def batches(data: torch.Tensor, batch: int, window: int, seed: int):
    """Endless random windows [batch, window + 1] of `data`, seeded."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - window - 1, (batch,), generator=generator)
        yield torch.stack([data[s:s + window + 1] for s in starts.tolist()])


def losses(model: LlamaForCausalLM, windows: torch.Tensor, early_exit: int | None,
           teacher: LlamaForCausalLM | None = None) -> tuple[torch.Tensor, ...]:
    """Next-byte cross-entropy of the last layer and, with `early_exit`, of that layer's hidden state through the
    model's own final norm and head (the self-speculation draft's path); with `teacher`, also the KL divergence
    from the teacher's next-byte distribution (distillation: a draft's greedy proposal is accepted when its
    argmax is the target's, so it learns the target's distribution, not only the data's)."""
    inputs, labels = windows[:, :-1], windows[:, 1:]
    out = model(input_ids=inputs, output_hidden_states=early_exit is not None)
    logits = out.logits.flatten(0, 1).float()
    main = torch.nn.functional.cross_entropy(logits, labels.flatten())
    if teacher is not None:
        with torch.no_grad():
            target = teacher(input_ids=inputs).logits.flatten(0, 1).float().log_softmax(-1)
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
        return main, kl
    if early_exit is None:
        return (main,)
    early_logits = model.lm_head(model.model.norm(out.hidden_states[early_exit]))
    return main, torch.nn.functional.cross_entropy(early_logits.flatten(0, 1).float(), labels.flatten())


def held_out_windows(data: torch.Tensor, window: int, max_windows: int = 64) -> torch.Tensor:
    """Up to `max_windows` consecutive windows [count, window + 1] of the held-out bytes."""
    count = min(max_windows, (len(data) - 1) // (window + 1))
    return data[:count * (window + 1)].view(count, window + 1)


@torch.no_grad()
def held_out_loss(model: LlamaForCausalLM, data: torch.Tensor, window: int, batch: int, early_exit: int | None,
                  device: str) -> list[float]:
    """Mean next-byte loss (nats) over held_out_windows."""
    model.eval()
    windows = held_out_windows(data, window)
    totals = None
    for chunk in windows.split(batch):
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            values = [v.item() * len(chunk) for v in losses(model, chunk.to(device), early_exit)]
        totals = values if totals is None else [a + b for a, b in zip(totals, values)]
    model.train()
    return [t / len(windows) for t in totals]


@torch.no_grad()
def held_out_agreement(model: LlamaForCausalLM, teacher: LlamaForCausalLM, data: torch.Tensor, window: int,
                       batch: int, device: str) -> float:
    """How often the model's next-byte argmax is the teacher's over held_out_windows: a greedy draft's
    per-token acceptance rate, teacher-forced."""
    model.eval()
    windows = held_out_windows(data, window)[:, :-1]
    same = 0
    for chunk in windows.split(batch):
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            ids = chunk.to(device)
            same += (model(input_ids=ids).logits.argmax(-1) == teacher(input_ids=ids).logits.argmax(-1)).sum().item()
    model.train()
    return same / windows.numel()


def train(size: str, data: torch.Tensor, held_out: torch.Tensor, args: argparse.Namespace, device: str,
          early_exit: int | None, budget_s: float,
          teacher: LlamaForCausalLM | None = None) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """AdamW (bf16 autocast on CUDA), linear warm-up then cosine decay over `budget_s` of wall time. With
    `teacher` (the draft's target), the held-out agreement with it is measured, and with --distill w > 0 the
    loss is (1 - w) * cross-entropy + w * KL from it."""
    distilled = teacher if args.distill > 0 else None
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config(size, args.window)).to(device).train()
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    curve, seen, step, start = [], 0, 0, time.perf_counter()
    for windows in batches(data, args.batch, args.window, args.seed):
        elapsed = time.perf_counter() - start
        if elapsed > budget_s or (args.max_steps and step >= args.max_steps):
            break
        # The schedule follows whichever limit comes first: on a GPU the time budget, with --tiny the step count
        # (the same models on any machine).
        progress = max(elapsed / budget_s, step / args.max_steps if args.max_steps else 0.0)
        scale = min(1.0, (step + 1) / args.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * max(scale, 0.05)
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            parts = losses(model, windows.to(device, non_blocking=True), early_exit, distilled)
        if distilled is not None:
            loss = (1 - args.distill) * parts[0] + args.distill * parts[1]
        else:
            loss = parts[0] + (args.early_exit_weight * parts[1] if early_exit is not None else 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, seen = step + 1, seen + windows[:, 1:].numel()
        if step % args.log_every == 0:
            record = {"step": step, "s": round(time.perf_counter() - start, 1), "tokens": seen,
                      "loss": [round(p.item(), 4) for p in parts]}
            curve.append(record)
            print(f"{size:12} step {step:5} {record['s']:6.1f} s loss {record['loss']} "
                  f"{seen / record['s']:,.0f} tokens/s", flush=True)
    train_s = time.perf_counter() - start
    held = held_out_loss(model, held_out, args.window, args.batch, early_exit, device)
    agreement = None if teacher is None else held_out_agreement(model, teacher, held_out, args.window, args.batch,
                                                                device)
    summary = {"size": size, "config": SIZES[size], "parameters": sum(p.numel() for p in model.parameters()),
               "steps": step, "tokens_seen": seen, "train_s": round(train_s, 1), "tokens_per_s": round(seen / train_s),
               "held_out_loss_nats": [round(v, 4) for v in held], "early_exit_layer": early_exit,
               "final_loss": curve[-1]["loss"] if curve else None, "curve": curve,
               "distill": args.distill if distilled is not None else 0.0, "held_out_agreement": agreement}
    print(f"{size:12} {summary['parameters'] / 1e6:.1f}M parameters, {seen:,} tokens in {train_s:.0f} s, held-out "
          f"loss {summary['held_out_loss_nats']} nats/byte"
          + (f", argmax agrees with the target's on {agreement:.3f} of held-out bytes" if teacher else ""), flush=True)
    return model.eval(), summary


def default_dir(tiny: bool) -> Path:
    return Path.home() / ".cache" / "mmaccel" / ("code_models_tiny" if tiny else "code_models")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU, a few seconds each")
    p.add_argument("--out", type=Path, default=None, help="folder of the models (default ~/.cache/mmaccel/...)")
    p.add_argument("--models", nargs="+", default=["target", "draft"], choices=["target", "draft"])
    p.add_argument("--budget-s", type=float, default=None, help="the target's training seconds (150; 60 with --tiny)")
    p.add_argument("--draft-budget-s", type=float, default=None, help="the draft's (60): at ~50x "
                   "fewer FLOPs per token it sees more tokens than the target in less time")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps too (0: budget only; "
                   "250 with --tiny)")
    p.add_argument("--batch", type=int, default=None, help="windows per step (48; 8 with --tiny)")
    p.add_argument("--window", type=int, default=None, help="bytes per window (1024; 128 with --tiny)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (6e-4; 5e-3 with --tiny)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (50; 10 with --tiny)")
    p.add_argument("--early-exit-layer", type=int, default=None, help="target layer trained to exit (4; 1 tiny)")
    p.add_argument("--early-exit-weight", type=float, default=0.5)
    p.add_argument("--distill", type=float, default=0.0, help="the draft's loss weight on the KL divergence from "
                   "the target (trained in this run, or read from --out), the rest on the data's cross-entropy; 0 "
                   "(default): cross-entropy alone, which bought more agreement per second of GPU (see above)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(budget_s=(60 if tiny else 150), draft_budget_s=60, max_steps=(250 if tiny else 0),
                    batch=(8 if tiny else 48), window=(128 if tiny else 1024), lr=(5e-3 if tiny else 6e-4), warmup_steps=(10 if tiny else 50),
                    early_exit_layer=(1 if tiny else 4), out=default_dir(tiny))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trains and saves each of --models; returns {name: training summary}."""
    args = parse(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # tiny models: a second thread buys nothing and shares a busy machine
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    train_files, held_files = source_files()
    data, held_out = encode(train_files), encode(held_files)
    print(f"stdlib: {len(train_files)} files ({len(data):,} bytes) to train on, {len(held_files)} held out "
          f"({len(held_out):,} bytes); device {device}", flush=True)
    summaries, teacher = {}, None
    for name in args.models:
        size = f"{name}_tiny" if args.tiny else name
        early_exit = args.early_exit_layer if name == "target" else None
        budget_s = args.budget_s if name == "target" else args.draft_budget_s
        if name == "draft" and teacher is None and (args.out / "target").exists():
            teacher = LlamaForCausalLM.from_pretrained(args.out / "target").to(device).eval()
        model, summary = train(size, data, held_out, args, device, early_exit, budget_s,
                               teacher if name == "draft" else None)
        summary.update(train_files=len(train_files), held_out_files=len(held_files), train_bytes=len(data),
                       device=device, batch=args.batch, window=args.window, lr=args.lr, seed=args.seed)
        folder = args.out / name
        model.save_pretrained(folder)
        (folder / "training.json").write_text(json.dumps(summary, indent=1))
        summaries[name] = summary
        teacher = model.requires_grad_(False) if name == "target" else teacher
        del model
    return summaries


if __name__ == "__main__":
    main()
