"""mmaccel.generate across the causal LMs transformers ships (CPU, fp32, tiny configs, random weights): for each,
greedy tokens against Hugging Face's own eager generate() on a left-padded batch of two prompts (10 new tokens)
and on a second call of another prompt length (5), plus the mmaccel warnings the calls raised (a fallback to the
model's own generate() names its reason). A row is "match", "MISMATCH" (with both token lists) or "CRASH" (the
error). Then `torch.compile(model, backend="mmaccel")` on the same left-padded batch, one forward per target
(`--targets`; Triton under its CPU interpreter): "ok" when the logits are within 1e-4 of eager's largest (relative),
with the target's fallback warning if it fell back. The forward run also found the onnxruntime target giving NaN
logits for Helium's padded row (onnxscript's optimizer dropped its RMSNorm epsilon; tests/test_onnxruntime_target.py). What this found when first run (2026-12-01): MPT crashed (graph-broken decode steps under skipped
guards), Bloom, MPT and Mamba raised a ValueError (no position limit in their configs), DeepSeek V3 crashed
(multi-head latent attention), and a row continued by HF's generate(eos_token_id=None) was cut at the config's eos
id; each has a test in tests/test_generation.py. Then the vision-language families of tests/hf_tiny.py VLMS (LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Gemma 3, Mistral 3, Idefics3, InternVL, Aya Vision): one image prompt with the
processor's extra inputs, greedy tokens against HF's generate() twice, and the graphs compiled.

    python bench/hf_generate_coverage.py [--archs llama,mpt,...] [--out bench/results/hf_generate_coverage.json]
    python bench/hf_generate_coverage.py --device cuda --targets eager,triton --dtypes float32,bfloat16  # the GPU path
    python bench/hf_generate_coverage.py --vlms "" --targets "" --recipe "" --prune mlp_channels,heads,blocks

`--prune` adds one pruned forward per structure on each LM (reported error against the compiled model's).
On a GPU the generate rows run the default CUDA path (Triton kernels, decode under CUDA graphs) and stay fp32, so
greedy tokens must equal HF's exactly; the forward rows also run in bf16 against eager's own bf16 rounding.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from typing import Any
from unittest.mock import patch

if "cuda" not in sys.argv[1:] and "--device=cuda" not in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton target's kernels on CPU tensors (before triton loads)

import torch  # noqa: E402
import transformers as T  # noqa: E402

import mmaccel  # noqa: E402
from common import default_out, environment, write_json  # noqa: E402
from hf_generate import torch_older_than  # noqa: E402
from mmaccel.compiler import errors  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository: tests/
from tests import hf_tiny  # noqa: E402

# Config fields shared by the Llama-like configs; a spec marked "_only" takes its own fields alone (configs whose
# fields have other names, or that would keep an unused field: GPT-NeoX stored num_key_value_heads unused).
COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=128, head_dim=8)
SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=128, _only=True)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32, vocab_size=128, _only=True)),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=4)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=4)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128, _only=True)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True, _only=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=128, hidden_size=32, n_layer=2, n_head=4, _only=True)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, _only=True)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, n_ctx=128, _only=True)),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128, _only=True)),
    "glm": ("GlmConfig", "GlmForCausalLM", {}),
    "helium": ("HeliumConfig", "HeliumForCausalLM", {}),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(num_key_value_heads=4, head_dim=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=32, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=128, _only=True)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=128, _only=True)),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", dict(vocab_size=128, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, max_position_embeddings=128, _only=True)),
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128, _only=True)),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4, _only=True)),
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, lru_width=32, attention_window_size=16, _only=True)),
}



DEVICE = torch.device("cpu")  # --device: where models and inputs live


def build(name: str) -> torch.nn.Module:
    cfg_name, model_name, extra = SPECS[name]
    extra = dict(extra)
    only = extra.pop("_only", False)
    fields = extra if only else {**COMMON, "pad_token_id": 0, **extra}
    config = getattr(T, cfg_name)(**fields)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    torch.manual_seed(0)
    return getattr(T, model_name)(config).eval().to(DEVICE)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding, as HF tokenizers pad for generation
    return ids.to(DEVICE), mask.to(DEVICE)


def run(name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"arch": name, "model": SPECS[name][1]}
    try:
        model = build(name)
    except Exception as e:  # noqa: BLE001 - a config this transformers does not take: recorded, not fatal
        return {**row, "status": f"build failed: {type(e).__name__}: {str(e)[:150]}"}
    ids, mask = prompts()
    calls = [dict(input_ids=ids, attention_mask=mask, max_new_tokens=10),
             dict(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:], max_new_tokens=5)]
    return against_hf(row, model, calls)


def run_vlm(name: str) -> dict[str, Any]:
    """A vision-language family: mmaccel.generate twice against HF's generate() on one image prompt."""
    model, images = hf_tiny.VLMS[name]()
    ids = hf_tiny.vlm_prompt(name, model, images).to(DEVICE)
    model = model.to(DEVICE)
    images = {k: v.to(DEVICE) for k, v in images.items()}  # as a processor's BatchFeature.to(device) moves them
    row = {"arch": name, "family": "vision-language", "image_tokens": int((ids == hf_tiny.VLM_IMAGE_TOKEN).sum())}
    row = against_hf(row, model, [dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                       **images)] * 2)
    if row["status"] == "match":
        row["graphs"] = [kind for kind, _, _ in mmaccel.generation_report(model).graphs]
    return row


def against_hf(row: dict[str, Any], model: torch.nn.Module, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """`row` with the status of mmaccel.generate against HF's greedy generate() on each of `calls` (keyword
    arguments; no stop id, pad id 0), the mmaccel warnings raised and the seconds taken."""
    fixed = dict(eos_token_id=None, pad_token_id=0)
    try:
        with torch.no_grad():
            expected = [model.generate(**call, **fixed, do_sample=False) for call in calls]
    except Exception as e:  # noqa: BLE001
        return {**row, "status": f"HF eager failed: {type(e).__name__}: {str(e)[:150]}"}
    errors._warned.clear()
    torch._dynamo.reset()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = [mmaccel.generate(model, **call, **fixed) for call in calls]
            same = all(g.shape == e.shape and torch.equal(g, e) for g, e in zip(got, expected))
            row["status"] = "match" if same else "MISMATCH"
            if not same:
                row["tokens"] = {"mmaccel": [g.tolist() for g in got], "hf": [e.tolist() for e in expected]}
        except Exception as e:  # noqa: BLE001 - the row records it
            row["status"] = f"CRASH {type(e).__name__}: {str(e)[:200]}"
            row["traceback"] = traceback.format_exc()[-800:]
    row["warnings"] = sorted({str(w.message)[:200] for w in caught if "mmaccel" in str(w.message)})
    row["seconds"] = round(time.perf_counter() - start, 1)
    if RECIPE_CACHES:
        row["recipe"] = {cache: recipe(model, calls, cache) for cache in RECIPE_CACHES}
    return row


RECIPE_CACHES: list[str] = []  # --recipe: the caches HF's compiled recipe runs with


def recipe(model: torch.nn.Module, calls: list[dict[str, Any]], cache: str) -> str:
    """The Hugging Face docs' compiled-generation recipe, `model.forward = torch.compile(model.forward,
    backend="mmaccel")` then generate() (`cache`: "static" passes cache_implementation="static", "dynamic" HF's
    default cache), against HF's eager generate() with the same cache on each of `calls`: "match", "MISMATCH",
    "CRASH ..." or "HF eager failed ..." (a cache this architecture does not take). With scalars captured and,
    before torch 2.13, transformers' torch checks off, as the README tells vision-language users."""
    fixed = dict(eos_token_id=None, pad_token_id=0, do_sample=False,
                 **({"cache_implementation": "static"} if cache == "static" else {}))
    try:
        with torch.no_grad():
            expected = [model.generate(**call, **fixed) for call in calls]
    except Exception as e:  # noqa: BLE001
        return f"HF eager failed: {type(e).__name__}: {str(e)[:150]}"
    errors._warned.clear()
    torch._dynamo.reset()
    original = model.forward
    model.forward = torch.compile(original, backend="mmaccel")
    try:
        checks = {"TRANSFORMERS_DISABLE_TORCH_CHECK": "1"} if torch_older_than(2, 13) else {}
        with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True), patch.dict(os.environ, checks):
            got = [model.generate(**call, **fixed) for call in calls]
        return "match" if all(g.shape == e.shape and torch.equal(g, e) for g, e in zip(got, expected)) else "MISMATCH"
    except Exception as e:  # noqa: BLE001 - the row records it
        return f"CRASH {type(e).__name__}: {str(e)[:200]}"
    finally:
        model.forward = original


def forward(name: str, target: str, dtype: torch.dtype = torch.float32) -> str:
    """One forward of the compiled model on `target` against eager: "ok", "MISMATCH <error>" or "CRASH ..."; a
    fallback warning is appended. fp32: within 1e-4 of eager's largest logit (relative). A lower precision: the
    compiled model's error against the fp32 eager logits at most twice eager's own in that dtype (or 4 ulps of
    the dtype at 1.0, whichever is larger): rounding differs, but no more than eager's own rounding does.
    Compared at the real tokens only, as transformers' own eager-against-SDPA tests do: a left-padded position
    attends to no key, and what such a row gives is each kernel's own (explicit softmax over finfo.min scores
    averages V, CUDA's SDPA kernels give 0). GPT-J, which has no SDPA attention in transformers 5.17, differed
    there alone on an H200 once its attention was fused (passes/attention.py)."""
    model = build(name)
    ids, mask = prompts()
    errors._warned.clear()
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            scale = expected.abs().max()
            tolerance = 1e-4
            if dtype != torch.float32:
                model = model.to(dtype)
                own = float((model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float() - expected)
                            [mask.bool()].abs().max() / scale)
                tolerance = max(2 * own, 4 * torch.finfo(dtype).eps)
            compiled = torch.compile(model, backend="mmaccel", options={"target": target})
            out = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            real = mask.bool()
            error = float((out[real] - expected[real]).abs().max() / scale)
            status = "ok" if error <= tolerance else f"MISMATCH {error:.1e} (tolerance {tolerance:.1e})"
        except Exception as e:  # noqa: BLE001 - the row records it
            status = f"CRASH {type(e).__name__}: {str(e)[:150]}"
    fallbacks = sorted({str(w.message)[:120] for w in caught if "cannot run this graph" in str(w.message)})
    return status + "".join(f" ({w})" for w in fallbacks)


def pruned(name: str, structure: str) -> str:
    """The compiled forward with prune=`structure` (eager target, accuracy_budget 0.99 so that every option may be
    taken, 2 calibration batches): "<n> pruned, error <e>" when the error the compiled model gives on the
    calibration batches equals the one the report measured (rel 1e-3), "ERROR MISMATCH ..." when it does not,
    "none: <first near-miss reason>" when nothing was pruned, or "CRASH ...". Where the structure is followed
    across the architectures users bring."""
    model = build(name)
    samples = [{"input_ids": torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(s)).to(DEVICE),
                "use_cache": False} for s in range(2)]
    errors._warned.clear()
    torch._dynamo.reset()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = mmaccel.compile(model, target="eager", prune=structure, accuracy_budget=0.99,
                                       calibration=samples)
            got = torch.cat([compiled(**x).logits for x in samples])
            want = torch.cat([model(**x).logits for x in samples])
        result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    except Exception as e:  # noqa: BLE001 - the row records it
        return f"CRASH {type(e).__name__}: {str(e)[:150]}"
    if not result.matched:
        why = result.near_misses[0].split("left whole: ")[-1] if result.near_misses else "no such structure"
        return f"none: {why[:150]}"
    error = float((got - want).norm() / want.norm())
    if abs(error - result.measured_error) > 1e-3 * max(error, 1e-6):
        return f"ERROR MISMATCH {error:.3e} against the reported {result.measured_error:.3e}"
    return f"{result.matched} pruned, error {error:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(SPECS))
    p.add_argument("--targets", default="eager,onnxruntime,triton", help="forward targets (empty: none)")
    p.add_argument("--vlms", default=",".join(hf_tiny.VLMS), help="vision-language families (empty: none)")
    p.add_argument("--device", default="cpu", help="cuda: the GPU path (real Triton kernels, CUDA graphs)")
    p.add_argument("--dtypes", default="float32",
                   help="forward rows per dtype (generate rows are fp32: greedy tokens must equal HF's)")
    p.add_argument("--recipe", default="static,dynamic",
                   help="caches of HF's compiled recipe to check against HF (empty: none)")
    p.add_argument("--prune", default="", help="prune structures to check per LM (mlp_channels,heads,blocks; "
                   "empty: none)")
    p.add_argument("--shard", default="0/1", help="i/n: every n-th model from the i-th (parallel processes)")
    p.add_argument("--out", default=default_out("hf_generate_coverage.json"))
    args = p.parse_args()
    shard, shards = map(int, args.shard.split("/"))
    RECIPE_CACHES[:] = filter(None, args.recipe.split(","))
    global DEVICE
    DEVICE = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    torch.set_num_threads(1)
    rows = []
    for name in args.archs.split(",")[shard::shards]:
        rows.append(run(name))
        r = rows[-1]
        if not r["status"].startswith(("build failed", "HF eager failed")):
            r["forward"] = {target + ("" if dtype == torch.float32 else f" {str(dtype)[6:]}"): forward(name, target, dtype)
                            for dtype in dtypes for target in filter(None, args.targets.split(","))}
            r["prune"] = {structure: pruned(name, structure) for structure in filter(None, args.prune.split(","))}
        forwards = " ".join(f"{t}: {v[:40]}" for t, v in {**r.get("forward", {}), **{
            f"recipe {c}": v for c, v in r.get("recipe", {}).items()}, **{
            f"prune {c}": v for c, v in r.get("prune", {}).items()}}.items())
        print(f"{name:16} {r['status'][:60]:60} {r.get('seconds', '')} | {forwards}", flush=True)
        write_json(args.out, {"environment": environment(DEVICE), "rows": rows})  # partial results survive a timeout
    for name in list(filter(None, args.vlms.split(",")))[shard::shards]:
        rows.append(run_vlm(name))
        r = rows[-1]
        print(f"{name:16} {r['status'][:60]:60} {r['seconds']} | {r.get('graphs')} {r['image_tokens']} image tokens"
              + "".join(f" recipe {c}: {v[:40]}" for c, v in r.get("recipe", {}).items()), flush=True)
        write_json(args.out, {"environment": environment(DEVICE), "rows": rows})
    write_json(args.out, {"environment": environment(DEVICE), "rows": rows})
    counts = {s: sum(r["status"].startswith(s) for r in rows) for s in ("match", "MISMATCH", "CRASH")}
    forwards = [v for r in rows for v in r.get("forward", {}).values()]
    wrong = sum(not v.startswith("ok") for v in forwards)
    recipes = [v for r in rows for v in r.get("recipe", {}).values()]
    print(f"generate: {counts} of {len(rows)}; forward: {len(forwards) - wrong} of {len(forwards)} ok; recipe: "
          f"{sum(v == 'match' for v in recipes)} of {len(recipes)} match; wrote {args.out}")


if __name__ == "__main__":
    main()
