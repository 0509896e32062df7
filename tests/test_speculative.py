"""Speculative decoding (compiler/speculative.py, compiler/drafts.py): greedy tokens equal plain greedy (and HF
eager) on tiny Llama, Qwen2 and LLaVA; sampling is distributed as the target's (a seeded chi-square test against
the exact distribution of a tiny 8-token model); bad drafts are refused in words; a failing draft falls back."""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import mmaccel
from mmaccel.compiler.drafts import resolve_draft
from mmaccel.compiler.sampling import Sampler, warp_scores
from mmaccel.compiler.speculative import K_CHOICES, _accept_sampled, _KPolicy
from tests import hf_tiny
from tests.test_generation import EAGER, hf_generate, left_padded_batch, one_thread  # noqa: F401 (fixture)

# A draft that fails falls back to plain decoding with a warning: here that would pass the greedy tests silently.
pytestmark = pytest.mark.filterwarnings("error::mmaccel.MmaccelFallbackWarning")


# in the opt-in long set (-m coverage, 9 s; CI time): LLaVA's self-speculation below runs the same path by default
@pytest.mark.coverage
def test_self_speculation_greedy_equals_plain_greedy_on_llama() -> None:
    """draft='layers:1': the target's first layer, its norm and head, no weight or cache copied; a stop token
    inside a round pads the rest of its row as plain decoding does; draft='quantized:int4_weight_only'."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    expected = hf_generate(model, ids, mask, max_new_tokens=20, do_sample=False, eos_token_id=[])
    actual = mmaccel.generate(model, ids, mask, max_new_tokens=20, pad_token_id=0, eos_token_id=[],
                              draft="layers:1", speculative_k=3, options=EAGER)
    assert torch.equal(actual, expected)
    report = mmaccel.generation_report(model, **EAGER)
    assert report.speculative["k"] == {3: report.speculative["rounds"]}
    assert 0 < report.speculative["acceptance_rate"] <= report.speculative["row_acceptance_rate"] <= 1
    assert {kind for kind, _, _ in report.graphs} == {"prefill", "draft", "verify"}
    stop = int(expected[1, 7 + 5])
    stopped = hf_generate(model, ids, mask, max_new_tokens=20, do_sample=False, eos_token_id=[stop])
    assert torch.equal(mmaccel.generate(model, ids, mask, max_new_tokens=20, pad_token_id=0, eos_token_id=[stop],
                                        draft="layers:1", speculative_k=3, options=EAGER), stopped)
    draft, _ = resolve_draft(model, "layers:1")
    assert draft.model.layers[0] is model.model.layers[0] and len(draft.model.layers) == 1
    assert {id(p) for p in draft.parameters()} <= {id(p) for p in model.parameters()}
    assert mmaccel.generation_report(draft, **EAGER).graphs == []  # no prefill, no cache: the target's are shared
    # The target quantized to int4 as the draft (its own session, cache and graphs): the same tokens.
    quantized = mmaccel.generate(model, ids, mask, max_new_tokens=20, pad_token_id=0, eos_token_id=[],
                                 draft="quantized:int4_weight_only", speculative_k=3, options=EAGER)
    assert torch.equal(quantized, expected)
    draft_report = mmaccel.generation_report(model, **EAGER, quantize="int4_weight_only", accuracy_budget=0.5,
                                             weights="keep")  # the draft is the target: its weights are kept
    assert [g.matched("quantize") for g in draft_report.compile.graphs] == [8, 9]  # prefill; step with the head
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2  # the target is untouched


def test_self_speculation_after_a_weight_change_compiles_again() -> None:
    """A weight changed between speculative calls: the target's and the draft's steps are compiled again (no
    step runs unfrozen: that warning would fail this module), the verify and draft steps are looked up on the
    new backends, and greedy tokens equal the changed model's plain greedy."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([6])
    mmaccel.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, eos_token_id=[], draft="layers:1",
                     speculative_k=3, options=EAGER)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1)  # a layer the draft shares with the target
    expected = hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=[])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*have changed since.*")
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, eos_token_id=[],
                                  draft="layers:1", speculative_k=3, options=EAGER)
    assert torch.equal(actual, expected)
    assert "compiled again after 1 weight change" in str(mmaccel.generation_report(model, **EAGER))


# in the opt-in long set (-m coverage, 14 s; CI time): tests/test_prune.py checks the pruned graph itself
@pytest.mark.coverage
def test_pruned_draft_greedy_equals_plain_greedy() -> None:
    """draft='pruned:0.5' (and '+int4_weight_only'): the target with half of every MLP's channels removed, in a
    session of its own; its own weights kept (weights='keep': the draft is the target itself)."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    expected = hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=[])
    for draft, options in (("pruned:0.5", {}), ("pruned:0.5+int4_weight_only", {"quantize": "int4_weight_only"})):
        with warnings.catch_warnings():  # a draft step's few tokens leave its refit out (warned); others still fail
            warnings.filterwarnings("ignore", "mmaccel: prune: .* calibration tokens", mmaccel.MmaccelFallbackWarning)
            actual = mmaccel.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, eos_token_id=[],
                                      draft=draft, speculative_k=3, options=EAGER)
        assert torch.equal(actual, expected), draft
        assert mmaccel.generation_report(model, **EAGER).speculative["draft"] == draft
        session = dict(EAGER, prune={"mlp_channels": 0.5}, accuracy_budget=0.99, weights="keep", **options)
        graphs = mmaccel.generation_report(model, **session).compile.graphs  # its prefill and draft step
        assert len(graphs) == 2 and all(any("2 of 2 MLP(s) pruned (keep_50% x2)" in change for p in g.passes if p.lossy
                                            for change in p.changes) for g in graphs)
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())  # nothing of the target released
    for bad in ("pruned:1.5", "pruned:half", "pruned:0.5+int3"):
        with pytest.raises(ValueError, match="write 'pruned:F' or 'pruned:F\\+SCHEME'"):
            mmaccel.generate(model, ids, mask, max_new_tokens=2, draft=bad, options=EAGER)


def small_qwen2(vocab: int = hf_tiny.VOCAB) -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return hf_tiny.inference(Qwen2ForCausalLM(config))


def test_user_draft_greedy_equals_plain_greedy_on_qwen2_and_bad_drafts_are_refused() -> None:
    """A separate 1-layer Qwen2 as the draft; bad drafts refused in words; a draft that raises falls back."""
    model = hf_tiny.qwen2()
    ids, mask = left_padded_batch([6, 6], seed=2)
    expected = hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=[])
    actual = mmaccel.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[], draft=small_qwen2(),
                              speculative_k=4, options=EAGER)
    assert torch.equal(actual, expected)
    # A module draft is named by class and size in the report and its graph notes, not by its multi-line repr.
    report = mmaccel.generation_report(model, **EAGER)
    assert report.speculative["draft"] == "Qwen2ForCausalLM (0.00M parameters)"
    assert "\n" not in str(report.speculative) and "Qwen2ForCausalLM (" in str(report)
    with pytest.raises(ValueError, match="vocabulary has 50 tokens, the target's 100"):
        mmaccel.generate(model, ids, mask, max_new_tokens=2, draft=small_qwen2(vocab=50), options=EAGER)
    with pytest.raises(ValueError, match="speculative_k must be an int >= 1"):
        mmaccel.generate(model, ids, mask, max_new_tokens=2, draft="layers:1", speculative_k=0, options=EAGER)
    with pytest.raises(ValueError, match="the draft is on meta"):
        mmaccel.generate(model, ids, mask, max_new_tokens=2, draft=small_qwen2().to("meta"), options=EAGER)
    with pytest.raises(ValueError, match=r"'quantized:SCHEME' or 'pruned:F\[\+SCHEME\]' with SCHEME one of"):
        mmaccel.generate(model, ids, mask, max_new_tokens=2, draft="quantized:int3", options=EAGER)
    with pytest.raises(ValueError, match="speculative_k needs a draft"):
        mmaccel.generate(model, ids, mask, max_new_tokens=2, speculative_k=4, options=EAGER)
    with pytest.raises(ValueError, match="keep 1 to 1 of the target's 2"):
        mmaccel.generate(model, ids, mask, max_new_tokens=2, draft="layers:2", options=EAGER)
    with pytest.raises(ValueError, match="encoder-decoder"):
        mmaccel.generate(hf_tiny.whisper(), torch.zeros(1, 16, 40), max_new_tokens=2, draft="layers:1")
    # A draft that raises (here in its prefill): plain decoding, the same tokens, one warning. One new token,
    # so the plain path needs only the prefill graph compiled above.
    broken = small_qwen2()
    broken.forward = _raise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = mmaccel.generate(model, ids, mask, max_new_tokens=1, eos_token_id=[], draft=broken,
                                    options=EAGER)
    assert torch.equal(fallback, expected[:, :ids.shape[1] + 1])
    assert [str(w.message) for w in caught if "draft failed" in str(w.message)] == [
        "mmaccel.generate: the draft failed (RuntimeError('draft broken')); decoding without it"]


def _raise(*args, **kwargs):
    raise RuntimeError("draft broken")


def test_llava_self_speculation_greedy_equals_hf_eager() -> None:
    """The image is merged in both prefills (the draft shares the vision tower); rounds are text only."""
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 5)
    mask = torch.ones_like(ids)
    expected = hf_generate(model, ids, mask, pixel_values=pixels, max_new_tokens=10, do_sample=False,
                           eos_token_id=[])
    actual = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=10, eos_token_id=[],
                              draft="layers:1", speculative_k=3, options=EAGER)
    assert torch.equal(actual, expected)


VOCAB8 = 8  # a vocabulary small enough to enumerate every 4-token continuation


def peaked_llama8() -> LlamaForCausalLM:
    """Weights 10x the usual init scale, so the next-token distributions are far from uniform and the draft
    (its first layer) disagrees with the target often: rejections and corrections are exercised."""
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    return hf_tiny.inference(LlamaForCausalLM(config))


def exact_joint(model: torch.nn.Module, prompt: torch.Tensor, new: int, sampler: Sampler,
                temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """P(t1..t_new | prompt) under plain sampling with this warping: [VOCAB8] * new, by enumeration."""
    args = torch.tensor(temperature), torch.tensor(top_p)
    continuations = torch.cartesian_prod(*[torch.arange(VOCAB8)] * new).reshape(-1, new)
    with torch.no_grad():
        logits = model(torch.cat([prompt.expand(len(continuations), -1), continuations[:, :-1]], 1)).logits
    probs = warp_scores(logits[:, -new:].float(), sampler, *args).softmax(-1)  # [V**new, new, V]
    chosen = probs.gather(-1, continuations[:, :, None])[..., 0]
    return chosen.prod(-1).reshape([VOCAB8] * new)


def chi_square(counts: torch.Tensor, expected_p: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic over the cells expecting at least 5 counts (the rest pooled), and its 0.999 quantile
    by the Wilson-Hilferty approximation (z = 3.09)."""
    total = counts.sum()
    expected = expected_p.flatten() * total
    big = expected >= 5
    observed = torch.cat([counts.flatten()[big], counts.flatten()[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = float(((observed - expected) ** 2 / expected.clamp_min(1e-9)).sum())
    df = len(observed) - 1
    return stat, df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_is_distributed_as_plain_sampling() -> None:
    """2048 rows of one prompt, 4 new tokens (the first from the prefill, then rounds of k=2, rolled back
    after each rejection): the joint of tokens 2-3 and the marginal of token 4 pass a chi-square test at 0.001
    against the exact distribution (enumerated); the draft's own distribution would fail it. (With this many
    rows the batch keeps the shortest accepted prefix, mostly none: test_rejection_sampling_step covers
    accepted prefixes.)"""
    model, rows, new = peaked_llama8(), 2048, 4
    prompt = torch.tensor([[1, 5, 3, 6]])
    sampler = Sampler(True, 6, False)
    out = mmaccel.generate(model, prompt.expand(rows, -1), max_new_tokens=new, do_sample=True, temperature=0.9,
                           top_k=6, seed=0, eos_token_id=[], draft="layers:1", speculative_k=2,
                           options=EAGER)[:, -new:]
    exact = exact_joint(model, prompt, new, sampler, 0.9)
    pairs = torch.bincount(out[:, 1] * VOCAB8 + out[:, 2], minlength=VOCAB8 ** 2).float()
    last = torch.bincount(out[:, 3], minlength=VOCAB8).float()
    for counts, p in ((pairs, exact.sum((0, 3))), (last, exact.sum((0, 1, 2)))):
        stat, bound = chi_square(counts, p)
        assert stat < bound, f"chi-square {stat:.1f} over its 0.999 quantile {bound:.1f}"
    assert 0.2 < mmaccel.generation_report(model, **EAGER).speculative["row_acceptance_rate"] < 0.95
    # The test's power: the draft's exact distribution, sampled as many times, would fail it.
    wrong = exact_joint(resolve_draft(model, "layers:1")[0], prompt, new, sampler, 0.9).sum((0, 3))
    stat, bound = chi_square(wrong * rows, exact.sum((0, 3)))
    assert stat > 3 * bound


def test_rejection_sampling_step_keeps_the_target_distribution() -> None:
    """The verify step's acceptance and correction alone, on 50000 rows of synthetic distributions over 6
    tokens that depend on the prefix (k=2): the first emitted token is distributed as p0; given the first
    proposal x accepted, the second as p1(.|x); given both accepted, the bonus as p2(.|x, y). A step that
    always accepted (or never corrected from max(0, p - q)) would fail the first check."""
    vocab, rows = 6, 50000
    gen = torch.Generator().manual_seed(0)
    p0, q0 = (torch.randn(vocab, generator=gen).mul(1.5).softmax(-1) for _ in range(2))
    p1, q1 = (torch.randn(vocab, vocab, generator=gen).mul(1.5).softmax(-1) for _ in range(2))
    p2 = torch.randn(vocab, vocab, vocab, generator=gen).mul(1.5).softmax(-1)
    x = torch.multinomial(q0, rows, replacement=True, generator=gen)
    y = torch.multinomial(q1[x], 1, generator=gen)[:, 0]
    logits = torch.stack([p0.expand(rows, -1), p1[x], p2[x, y]], 1).log()
    draft_q = torch.stack([q0.expand(rows, -1), q1[x]], 1)
    state = SimpleNamespace(sampler=Sampler(True, None, False),
                            sampling=(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(11)))
    tokens = torch.stack([torch.zeros_like(x), x, y], 1)
    emitted, accepted = _accept_sampled(state, logits, tokens, draft_q, torch.tensor([5]))
    first = accepted[:, 0]
    both = first & accepted[:, 1]
    checks = [(torch.bincount(emitted[:, 0], minlength=vocab), p0),
              (torch.bincount(x[first] * vocab + emitted[first, 1], minlength=vocab ** 2),
               (torch.bincount(x[first], minlength=vocab)[:, None] * p1).flatten() / first.sum()),
              (torch.bincount((x[both] * vocab + y[both]) * vocab + emitted[both, 2], minlength=vocab ** 3),
               (torch.bincount(x[both] * vocab + y[both], minlength=vocab ** 2)[:, None] *
                p2.reshape(vocab ** 2, vocab)).flatten() / both.sum())]
    for counts, p in checks:
        stat, bound = chi_square(counts.float(), p)
        assert stat < bound, f"chi-square {stat:.1f} over its 0.999 quantile {bound:.1f}"
    assert 0.1 < both.float().mean() < first.float().mean() < 0.9  # every path was taken
    stat, bound = chi_square(torch.bincount(x, minlength=vocab).float(), p0)  # the proposals alone: q0
    assert stat > 3 * bound


def test_auto_k_follows_the_acceptance_rate() -> None:
    """speculative_k='auto': a draft that is always accepted gets the largest k, one never accepted the
    smallest; a costly draft gets a smaller k than a cheap one at the same acceptance."""
    def settled(accepting: bool, cost: float) -> int:
        policy = _KPolicy(K_CHOICES, cost)
        for _ in range(30):
            k = policy.next_k()
            policy.record(k, k if accepting else 0, k if accepting else 0)
        return policy.next_k()

    assert settled(True, 0.05) == max(K_CHOICES) and settled(False, 0.05) == min(K_CHOICES)
    policy = _KPolicy(K_CHOICES, 0.05, accepted=8, rejected=2)
    assert policy.next_k() > _KPolicy(K_CHOICES, 0.5, accepted=8, rejected=2).next_k()


def test_self_speculation_on_h_layer_lists_and_sliding_windows() -> None:
    """draft='layers:1' finds Falcon's (and GPT-2's) decoder layers under transformer.h (refused before: 'cannot find
    the decoder layers'), and runs on a sliding-window Mistral whose rounds cross its window: greedy tokens equal
    HF eager, the draft a truncated view of the target."""
    import transformers

    def build(config_name: str, model_name: str, **extra) -> torch.nn.Module:
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(
            vocab_size=hf_tiny.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
        return getattr(transformers, model_name)(config).eval()

    models = {"falcon": build("FalconConfig", "FalconForCausalLM"),
              "mistral": build("MistralConfig", "MistralForCausalLM", intermediate_size=64, num_key_value_heads=2,
                               sliding_window=20)}
    ids, mask = left_padded_batch([9, 5])
    for name, model in models.items():
        expected = hf_generate(model, ids, mask, max_new_tokens=24, do_sample=False, eos_token_id=[])
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=24, pad_token_id=0, eos_token_id=[],
                                  draft="layers:1", speculative_k=3, options=EAGER)
        assert torch.equal(actual, expected), name
        assert mmaccel.generation_report(model, **EAGER).speculative["rounds"] > 0, name
        draft, _ = resolve_draft(model, "layers:1")
        assert {id(p) for p in draft.parameters()} < {id(p) for p in model.parameters()}, name


def test_options_the_steps_do_not_compile_run_hf_generate_with_a_draft_too() -> None:
    """With a draft, HF generate() options the steps do not compile (num_beams, repetition_penalty) skipped the
    check plain mmaccel.generate makes and reached the forward, which ignored them: greedy tokens where beam
    search was asked for, silently. They now run the model's own generate() with one warning, as without a draft."""
    from mmaccel.compiler import errors

    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    expected = hf_generate(model, ids, mask, max_new_tokens=5, do_sample=False, num_beams=2)
    errors._warned.clear()
    with pytest.warns(mmaccel.MmaccelFallbackWarning, match="num_beams=2.*does not compile"):
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=5, pad_token_id=0, draft="layers:1",
                                  num_beams=2, options=EAGER)
    assert torch.equal(actual, expected)
    embeddings = model.get_input_embeddings()(ids).detach()  # a prompt as embeddings alone: the same fallback
    expected = hf_generate(model, None, mask, inputs_embeds=embeddings, max_new_tokens=4, do_sample=False)
    with pytest.warns(mmaccel.MmaccelFallbackWarning, match="inputs_embeds"):
        actual = mmaccel.generate(model, inputs_embeds=embeddings, attention_mask=mask, max_new_tokens=4,
                                  pad_token_id=0, draft="layers:1", options=EAGER)
    assert torch.equal(actual, expected)
