"""GPU correctness check of the paths users take, at the sizes where CPU tests cannot see CUDA's own behaviour
(kernel output layouts, CUDA-graph capture rules):
A. every tiny HF architecture of tests/hf_tiny.py, fp32 and bf16, `torch.compile(model, backend="mmaccel")` on
   the Triton target: text decoders at four prompt lengths (the second one makes the length symbolic), the others
   on their inputs twice (the second call replays a CUDA graph); with the mmaccel warnings each raised (a
   rolled-back pass, a graph run without CUDA graphs);
B. HF Llama at 7B dims (2 layers, bf16) compiled with the defaults at three lengths;
C. mmaccel.generate on a tiny HF Llama (fp32) across prompt/cache buckets: tokens vs HF eager, memory after each;
   then with HF's logits processors (repetition_penalty, suppress_tokens, begin_suppress_tokens) on a padded batch.

    python bench/hf_cuda_check.py                         # CUDA, ~5 min; JSON under $OUT (or /tmp)
    ARCHS=mistral,qwen2 PARTS=A python bench/hf_cuda_check.py     # these architectures only, in this order

Found on an H200 (bench/results/hf_tiny_triton_cuda_check_h200.json): grouped-query attention_fusion rolled back
on CUDA's layouts, HF Mistral crashing in CUDA-graph capture (both fixed)."""
import os
import sys
import time
import traceback
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmaccel  # noqa: E402
from common import environment, write_json  # noqa: E402
from mmaccel.compiler import errors  # noqa: E402
from tests import hf_tiny  # noqa: E402

OUT = os.path.join(os.environ.get("OUT", "/tmp"), "hf_cuda_check.json")
DEVICE = os.environ.get("DEV", "cuda")


def rel(a, b) -> float:
    a = a.last_hidden_state if hasattr(a, "last_hidden_state") else (a.logits if hasattr(a, "logits") else a)
    b = b.last_hidden_state if hasattr(b, "last_hidden_state") else (b.logits if hasattr(b, "logits") else b)
    if isinstance(a, (tuple, list)):
        a, b = a[0], b[0]
    return float((a.double() - b.double()).norm() / b.double().norm())


def failure(e: Exception) -> dict:
    return {"ok": False, "error": f"{type(e).__name__}: {e}"[:500], "tb": traceback.format_exc()[-1500:]}


def calls(arch, dtype) -> list[tuple]:
    """The input tuples to call with, on the device (floating inputs in `dtype`)."""
    if arch.family.startswith("decoder"):
        return [(torch.randint(1, hf_tiny.VOCAB - 1, (2, n), device=DEVICE),) for n in (5, 13, 29, 13)]
    inputs = tuple(t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE) for t in arch.inputs())
    return [inputs, inputs]


def architecture_row(arch, dtype) -> dict:
    row = {"arch": arch.name, "dtype": str(dtype)}
    try:
        torch._dynamo.reset()
        model = arch.build().to(DEVICE, dtype)
        reference = torch.compile(model, backend="eager") if arch.dynamo_reference else model
        errors._warned.clear()  # each architecture's warnings, even those an earlier one raised
        compiled = torch.compile(model, backend="mmaccel", options={"target": "triton"})
        errs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for args in calls(arch, dtype):
                with torch.no_grad():
                    errs.append(rel(compiled(*args), reference(*args)))
        row.update(errs=errs, ok=max(errs) < (1e-4 if dtype == torch.float32 else 3e-2),
                   warnings=sorted({str(w.message)[:200] for w in caught if "mmaccel" in str(w.message)}))
    except Exception as e:  # noqa: BLE001
        row.update(failure(e))
    return row


def part_a(res: dict) -> None:
    named = {arch.name: arch for arch in hf_tiny.ARCHITECTURES}
    order = [name.strip() for name in os.environ.get("ARCHS", "").split(",") if name.strip() in named]
    for arch in [named[name] for name in order] or hf_tiny.ARCHITECTURES:  # ARCHS: these, in this order; else all
        for dtype in (torch.float32, torch.bfloat16):
            row = architecture_row(arch, dtype)
            res["archs"].append(row)
            write_json(OUT, res)  # after every row: a run cut off by its time limit keeps what it measured
            print(row["arch"], row["dtype"], row["ok"], row.get("errs"), row.get("error", ""), row.get("warnings"),
                  flush=True)


def part_b(res: dict) -> None:
    torch._dynamo.reset()
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device(DEVICE):
        big = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    compiled = torch.compile(big, backend="mmaccel")
    for n in (17, 64, 300):
        ids = torch.randint(0, 32000, (1, n), device=DEVICE)
        try:
            with torch.no_grad():
                res["llama7b"].append({"n": n, "err": rel(compiled(ids), big(ids))})
        except Exception as e:  # noqa: BLE001
            res["llama7b"].append({"n": n, **failure(e)})
        print("llama7b", res["llama7b"][-1], flush=True)
    del big, compiled
    torch.cuda.empty_cache()


def part_c(res: dict) -> None:
    torch._dynamo.reset()
    small = hf_tiny.llama("sdpa", use_cache=True, max_positions=1024).to(DEVICE).eval()
    for prompt, new in ((7, 8), (40, 20), (100, 33), (7, 8), (250, 60), (40, 20)):
        ids = torch.randint(1, hf_tiny.VOCAB - 1, (1, prompt), device=DEVICE)
        mask = torch.ones_like(ids)
        try:
            start = time.perf_counter()
            got = mmaccel.generate(small, input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                ref = small.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
            row = {"prompt": prompt, "new": new, "same": bool(torch.equal(got.cpu(), ref.cpu())),
                   "s": round(seconds, 2), "allocated_mib": torch.cuda.memory_allocated() / 2**20,
                   "reserved_mib": torch.cuda.memory_reserved() / 2**20}
        except Exception as e:  # noqa: BLE001
            row = {"prompt": prompt, "new": new, **failure(e)}
        res["generate"].append(row)
        print("generate", row, flush=True)
    # HF's logits processors inside the recorded steps (the [B, V] seen-token mask is updated in place, so a
    # replayed CUDA graph must see each step's tokens): greedy tokens against HF eager on a left-padded batch.
    ids = torch.randint(1, hf_tiny.VOCAB - 1, (2, 30), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    for processor in (dict(repetition_penalty=1.3), dict(repetition_penalty=0.6), dict(suppress_tokens=[9, 15, 73]),
                      dict(begin_suppress_tokens=[91, 93]), dict(repetition_penalty=1.2, suppress_tokens=[5])):
        try:
            got = mmaccel.generate(small, input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                   pad_token_id=0, **processor)
            with torch.no_grad():
                ref = small.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                                     **processor)
            row = {"processor": processor, "same": bool(torch.equal(got.cpu(), ref.cpu()))}
        except Exception as e:  # noqa: BLE001
            row = {"processor": processor, **failure(e)}
        res["generate"].append(row)
        print("generate", row, flush=True)


def main() -> None:
    torch.manual_seed(0)
    res = {"environment": environment(DEVICE), "archs": [], "llama7b": [], "generate": []}
    parts = os.environ.get("PARTS", "A,B,C").split(",")
    for name, part in (("A", part_a), ("B", part_b), ("C", part_c)):
        if name in parts:
            part(res)
    write_json(OUT, res)


if __name__ == "__main__":
    main()
