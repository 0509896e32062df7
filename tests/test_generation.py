"""mmaccel.generate against HF's eager generate on tiny HF models (random weights), and the bucket policy."""
from __future__ import annotations

import random
import warnings

import pytest
import torch

import mmaccel
from mmaccel.compiler.buckets import cache_bucket, generation_buckets, prompt_bucket
from tests import hf_tiny

EAGER = {"target": "eager"}  # the cache writes are in place: ONNX Runtime would copy the cache every step
MODELS = {"llama": lambda: hf_tiny.llama("sdpa", use_cache=True), "qwen2": hf_tiny.qwen2}


def left_padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of `lengths` as one batch, left-padded with pad id 0 as HF tokenizers do for generation."""
    ids, mask = hf_tiny.token_batch(len(lengths), max(lengths), seed=seed)
    for row, length in enumerate(lengths):
        ids[row, :max(lengths) - length] = 0
        mask[row, :max(lengths) - length] = 0
    return ids, mask


def hf_generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP spinning against the other processes on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request) -> torch.nn.Module:
    return MODELS[request.param]()


def test_greedy_matches_hf_eager_with_left_padding(model) -> None:
    ids, mask = left_padded_batch([7, 4])
    expected = hf_generate(model, ids, mask, max_new_tokens=9, do_sample=False)
    actual = mmaccel.generate(model, ids, mask, max_new_tokens=9, do_sample=False, pad_token_id=0, options=EAGER)
    assert torch.equal(actual, expected)
    report = mmaccel.generation_report(model, **EAGER)
    assert [kind for kind, _, _ in report.graphs] == ["prefill", "decode"]
    assert report.buckets == {"prompt": [16], "cache": [64]}
    assert all(g.status == "optimized" for g in report.compile.graphs)
    one = mmaccel.generate(model, ids, mask, max_new_tokens=1, pad_token_id=0, options=EAGER)  # prefill only
    assert torch.equal(one, hf_generate(model, ids, mask, max_new_tokens=1, do_sample=False))
    assert len(report.graphs) == len(report.compile.graphs) == 2


def test_stop_token_pads_finished_rows_as_hf_does(model) -> None:
    """A stop token ends its row (pad after it); the call returns once every row has stopped."""
    ids, mask = left_padded_batch([6, 6], seed=3)
    free = hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=[])
    stop = int(free[0, 6 + 2])  # the third new token of the first row
    expected = hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=[stop, 99])
    actual = mmaccel.generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=[stop, 99],
                              pad_token_id=0, options=EAGER)
    assert (expected[0, 6 + 3:] == 0).all()
    assert torch.equal(actual, expected)


# Qwen2's case in the opt-in long set (-m coverage, 10 s; CI time): the sampler is the loop's, not the model's
@pytest.mark.parametrize("name", ["llama", pytest.param("qwen2", marks=pytest.mark.coverage)])
def test_sampling_is_seeded_and_top_k_1_is_greedy(name) -> None:
    model = MODELS[name]()
    ids, mask = left_padded_batch([5, 5], seed=4)
    sample = dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0,
                  eos_token_id=[], options=EAGER)
    first = mmaccel.generate(model, ids, mask, seed=7, **sample)
    assert torch.equal(first, mmaccel.generate(model, ids, mask, seed=7, **sample))
    assert not torch.equal(first, mmaccel.generate(model, ids, mask, seed=8, **sample))
    greedy = hf_generate(model, ids, mask, max_new_tokens=6, do_sample=False, eos_token_id=[])
    top1 = mmaccel.generate(model, ids, mask, seed=7, **{**sample, "top_k": 1})
    assert torch.equal(top1, greedy)


def test_graphs_bounded_over_20_random_calls() -> None:
    """Prompts of 1..40 tokens, 1..30 new tokens: every call equals HF eager, and the graphs are the buckets'."""
    model = hf_tiny.llama("sdpa", use_cache=True, max_positions=256)
    rng = random.Random(0)
    for call in range(20):
        lengths = [rng.randint(1, 40), rng.randint(1, 40)]
        new = rng.randint(1, 30)
        ids, mask = left_padded_batch(lengths, seed=call)
        expected = hf_generate(model, ids, mask, max_new_tokens=new, do_sample=False)
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=new, do_sample=False, options=EAGER)
        assert torch.equal(actual, expected), f"call {call}: prompts {lengths}, {new} new tokens"
    report = mmaccel.generation_report(model, **EAGER)
    prompts, caches = report.buckets["prompt"], report.buckets["cache"]
    assert set(prompts) <= {16, 24, 32, 48} and set(caches) <= {64, 128}
    assert len(report.compile.graphs) == len(report.graphs) <= len(prompts) * len(caches) + len(caches)
    print(report)


def test_quantized_steps_measure_their_error_on_the_logits() -> None:
    """A step's outputs are tokens and flags; with a lossy option it also returns its logits, which the budget
    is measured on (before, int8 measured 0.0 on the integer outputs: the budget went unchecked)."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = hf_tiny.token_batch(1, 12)
    # weights="keep": with generate's default (release), the decode graph reuses the prefill's int8 weights unmeasured
    options = dict(EAGER, quantize="int8_weight_only", accuracy_budget=0.05, weights="keep")
    mmaccel.generate(model, ids, mask, max_new_tokens=3, options=options)
    graphs = mmaccel.generation_report(model, **options).compile.graphs
    errors = [g.pass_result("quantize").measured_error for g in graphs]
    assert len(errors) == 2 and all(0 < e <= 0.05 for e in errors), errors


def test_too_long_names_the_limit() -> None:
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([50])
    with pytest.raises(ValueError, match="limit of 64"):
        mmaccel.generate(model, ids, mask, max_new_tokens=20, options=EAGER)


def test_buckets() -> None:
    assert [prompt_bucket(n) for n in (1, 16, 17, 25, 33, 49, 65, 200, 257, 600, 641, 1025)] == \
        [16, 16, 24, 32, 48, 64, 96, 256, 320, 640, 768, 1280]
    assert [cache_bucket(n, 4096) for n in (1, 64, 65, 900, 5000)] == [64, 64, 128, 1024, 4096]
    assert generation_buckets(640, 256, 4096) == (640, 1024)
    assert generation_buckets(50, 14, 64) == (50, 64)  # near the limit the prompt pads less


def test_llava_image_prompt_matches_hf_eager_in_one_prefill_graph() -> None:
    """The image features are merged into the prompt inside the prefill graph (no graph break at
    transformers' placeholder check, which mmaccel.generate runs on the host instead)."""
    model = hf_tiny.llava()
    for before, after, new in ((3, 5, 6), (1, 2, 5)):
        ids, pixels = hf_tiny.llava_prompt(before, after)
        mask = torch.ones_like(ids)
        expected = hf_generate(model, ids, mask, pixel_values=pixels, max_new_tokens=new, do_sample=False)
        actual = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=new, options=EAGER)
        assert torch.equal(actual, expected)
    report = mmaccel.generation_report(model, **EAGER)
    assert [kind for kind, _, _ in report.graphs] == ["prefill", "decode"]  # both prompts in the 24 bucket
    assert len(report.compile.graphs) == 2
    with pytest.raises(ValueError, match="15 image placeholder tokens"):
        mmaccel.generate(model, ids[:, 2:], mask[:, 2:], pixel_values=pixels, max_new_tokens=2, options=EAGER)


def test_paligemma_prefix_lm_matches_hf_eager_with_left_padding() -> None:
    """A fifth family (issue 13): PaliGemma, whose image and prompt attend to each other both ways
    (token_type_ids 0), with 1-indexed positions; one row left-padded. Weights rescaled and the head untied so
    that greedy tokens vary (at init the tied head echoes the input token)."""
    model = hf_tiny.paligemma()
    ids, pixels = hf_tiny.vlm_inputs()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kinds = {"token_type_ids": torch.zeros_like(ids)}
    expected = hf_generate(model, ids, mask, pixel_values=pixels, max_new_tokens=6, do_sample=False, **kinds)
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 2
    actual = mmaccel.generate(model, ids, mask, pixel_values=pixels, max_new_tokens=6, options=EAGER, **kinds)
    assert torch.equal(actual, expected)
    unpadded = hf_generate(model, ids[:1], mask[:1], pixel_values=pixels[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(mmaccel.generate(model, ids[:1], pixel_values=pixels[:1], max_new_tokens=6, options=EAGER),
                       unpadded)  # no token_type_ids: the prefix LM, as HF attends without padding


def test_whisper_matches_hf_generic_generate() -> None:
    """The encoder runs in the prefill graph; decode steps read the cross-attention cache it filled. Compared
    with transformers' GenerationMixin.generate (decoder prompt + new tokens): Whisper's own generate adds
    language detection and timestamps, which mmaccel.generate does not implement."""
    from transformers import GenerationMixin
    model = hf_tiny.whisper()
    for batch, new in ((2, 6), (1, 9)):
        features = torch.randn(batch, 16, 40, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = GenerationMixin.generate(model, features, max_new_tokens=new, do_sample=False)
        assert torch.equal(mmaccel.generate(model, features, max_new_tokens=new, options=EAGER), expected)
    report = mmaccel.generation_report(model, **EAGER)
    assert len(report.compile.graphs) == len(report.graphs) == 4  # prefill + decode per batch size
    # The cross-attention cache is read, not written, by decode steps, and transformers marks it static: it
    # must not be frozen as a weight (the next call's prefill rewrites it).
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(g.frozen_bytes <= weight_bytes for g in report.compile.graphs)


def test_dtype_change_between_calls_recompiles() -> None:
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([5, 3])
    mmaccel.generate(model, ids, mask, max_new_tokens=3, options=EAGER)
    model.to(torch.float64)
    expected = hf_generate(model, ids, mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(mmaccel.generate(model, ids, mask, max_new_tokens=3, options=EAGER), expected)
    whys = [why for _, _, why in mmaccel.generation_report(model, **EAGER).graphs]
    assert whys == ["first call", "first call", "new dtype=torch.float64", "new dtype=torch.float64"]


def test_hf_static_cache_recipe_through_the_backend() -> None:
    """HF's documented recipe, model.forward compiled with backend="mmaccel" and generate() on a static
    cache, matches eager across two lengths (the cache marked static by transformers is not frozen); the
    second cache length makes Dynamo's sizes symbolic, and on the Triton target (no CUDA graphs then) one
    warning points at mmaccel.generate."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([6, 4])
    expected = [hf_generate(model, ids, mask, max_new_tokens=n, do_sample=False) for n in (4, 7)]
    model.forward = torch.compile(model.forward, backend=mmaccel.Backend(target="triton"))
    try:
        with pytest.warns(mmaccel.MmaccelFallbackWarning, match="mmaccel.generate"):  # the second length
            for n, want in zip((4, 7), expected):
                got = hf_generate(model, ids, mask, max_new_tokens=n, do_sample=False, cache_implementation="static")
                assert torch.equal(got, want)
    finally:
        del model.forward


def test_hf_recipe_on_llava_is_two_graphs_with_scalar_capture() -> None:
    """LLaVA through HF's recipe: its forward reads Tensor.item() (image-token counts), a graph break per read
    unless torch._dynamo.config.capture_scalar_outputs is on. With it the prefill and the decode step are one
    graph each, both optimized on the Triton target (interpreted here), tokens equal HF eager (README: the recipe
    for vision-language models)."""
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 4)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=False, eos_token_id=[],
                  pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=mmaccel.Backend(target="triton"))
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad(), \
                mmaccel.collect_reports() as report:
            got = model.generate(ids, **kwargs, cache_implementation="static")
    finally:
        del model.forward
    assert torch.equal(got, expected)
    assert [(g.status, g.target) for g in report.graphs] == [("optimized", "triton")] * 2


def test_triton_target_runs_the_steps(monkeypatch) -> None:
    """The step graphs on the Triton target (interpreted on CPU; CUDA graphs on a GPU): greedy equals HF
    eager, and the hash-seeded sampling draws the same tokens as on the eager target; the decode GEMV fusions
    (on by default) fire on HF Llama's step."""
    monkeypatch.delenv("MMACCEL_GEMV_FUSION", raising=False)
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 5])
    expected = hf_generate(model, ids, mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(mmaccel.generate(model, ids, mask, max_new_tokens=4, options={"target": "triton"}), expected)
    sample = dict(max_new_tokens=4, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=3, eos_token_id=[])
    assert torch.equal(mmaccel.generate(model, ids, mask, **sample, options={"target": "triton"}),
                       mmaccel.generate(model, ids, mask, **sample, options=EAGER))
    report = mmaccel.generation_report(model, target="triton")
    assert {(g.status, g.target) for g in report.compile.graphs} == {("optimized", "triton")}
    if not torch.cuda.is_available():  # two rows: fused on the interpreter (on a GPU only one row is)
        # per layer q/k/v, o, gate/up, down; the lm_head through HF's last-token slice with the final norm
        assert max(g.kernels["gemv_fusions"] for g in report.compile.graphs) == 4 * hf_tiny.LAYERS + 1


@pytest.mark.parametrize("family", ["llama", "whisper"])
def test_cache_reset_equals_transformers_in_one_zeroing_call(family, monkeypatch) -> None:
    """mmaccel.generate's reset of its static cache (one multi-tensor zeroing instead of three launches per
    layer) leaves keys, values, length counters and Whisper's is_updated flags as transformers' reset() does;
    a layer class with a reset of its own keeps it (the fallback)."""
    from transformers.cache_utils import StaticLayer

    from mmaccel.compiler import generation

    model = hf_tiny.llama("sdpa", use_cache=True) if family == "llama" else hf_tiny.whisper()
    caches = [generation._static_cache(model, 2, 64, torch.float32, torch.device("cpu")) for _ in range(2)]
    layers = []
    for cache in caches:
        parts = [cache.self_attention_cache, cache.cross_attention_cache] if family == "whisper" else [cache]
        layers.append([layer for part in parts for layer in part.layers])
        for layer in layers[-1]:
            layer.keys.normal_(), layer.values.normal_(), layer.cumulative_length.fill_(7)
        for index in getattr(cache, "is_updated", {}):
            cache.is_updated[index] = True
    caches[0].reset()
    calls = []
    zero = torch._foreach_zero_
    monkeypatch.setattr(torch, "_foreach_zero_", lambda tensors: calls.append(len(tensors)) or zero(tensors))
    monkeypatch.setattr(StaticLayer, "reset", lambda self: pytest.fail("the per-layer reset ran"))
    generation._reset_cache(caches[1])
    assert calls == [3 * len(layers[1])]
    for a, b in zip(*layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert torch.equal(a.cumulative_length, b.cumulative_length) and not b.cumulative_length.any()
    assert getattr(caches[0], "is_updated", None) == getattr(caches[1], "is_updated", None)

    monkeypatch.undo()

    class OwnReset(StaticLayer):
        def reset(self) -> None:
            calls.append("own")
    layers[1][0].__class__ = OwnReset
    generation._reset_cache(caches[1])
    assert calls[-1] == "own"


def _decoder(config_name: str, model_name: str, **extra) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=hf_tiny.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=hf_tiny.LAYERS,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


# A window longer than the prompt's bucket (16 positions) and shorter than prompt + new tokens: the decode steps
# cross it, where the ring buffer's branch changes (a window under the bucket is full from the prefill on and
# never showed the fault).
SLIDING = {"mistral": lambda: _decoder("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=20),
           "gemma2": lambda: _decoder("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=8,
                                      sliding_window=20)}


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_models_match_hf_past_the_window(family) -> None:
    """transformers' sliding-window cache layer is a ring buffer steered by a Python int, which the compiled
    steps (guards checked once a call, CUDA-graph blocks) cannot follow: mmaccel.generate gave other tokens than
    HF from the first position past the window, silently. Its cache holds those layers at full length instead,
    the window applied by the model's mask: greedy tokens equal HF eager across and past a 20-token window, with
    left padding, and no warning (the compiled path ran)."""
    model = SLIDING[family]()
    ids, mask = left_padded_batch([9, 5])
    expected = hf_generate(model, ids, mask, max_new_tokens=24, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmaccel.MmaccelFallbackWarning)
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                                  options=EAGER)
    assert torch.equal(actual, expected)
    assert mmaccel.generation_report(model, **EAGER).compile.graphs


def test_multi_query_falcon_gets_a_cache_of_its_kv_heads() -> None:
    """Falcon's config has no num_key_value_heads (num_kv_heads reads the attention heads) while multi_query
    gives its attention one K/V head: the cache is sized from the attention module (it was sized with 4 heads and
    the prefill failed in Dynamo); tokens equal HF eager."""
    import transformers

    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=hf_tiny.VOCAB, hidden_size=32, num_hidden_layers=hf_tiny.LAYERS, num_attention_heads=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    ids, mask = left_padded_batch([7, 4])
    expected = hf_generate(model, ids, mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(mmaccel.generate(model, ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                        options=EAGER), expected)


def test_cache_with_state_the_steps_cannot_carry_falls_back_to_hf_generate() -> None:
    """A model whose cache layers keep state beside static key/value tensors (here LFM2's convolution state)
    runs the model's own generate() with one warning naming the layer type, tokens as HF's."""
    model = _decoder("Lfm2Config", "Lfm2ForCausalLM", num_key_value_heads=2, layer_types=["conv", "full_attention"])
    _assert_falls_back_to_hf_generate(model, left_padded_batch([6]), "LinearAttentionLayer.*own generate")


def _assert_falls_back_to_hf_generate(model: torch.nn.Module, prompt: tuple[torch.Tensor, torch.Tensor],
                                      match: str) -> None:
    """mmaccel.generate on `model` warns once (`match`) and gives HF generate()'s greedy tokens."""
    from mmaccel.compiler import errors

    ids, mask = prompt
    expected = hf_generate(model, ids, mask, max_new_tokens=5, do_sample=False)
    errors._warned.clear()
    with pytest.warns(mmaccel.MmaccelFallbackWarning, match=match):
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=5, do_sample=False, pad_token_id=0, options=EAGER)
    assert torch.equal(actual, expected)


def test_encoder_decoders_other_than_whisper_fall_back_to_hf_generate() -> None:
    """BART and T5: the prompt is the encoder's, which mmaccel.generate (built for Whisper's input_features)
    would have taken as the decoder's; it asked BART for input_features and failed on T5's missing
    max_position_embeddings. Now: the model's own generate() with one warning, tokens as HF's."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=hf_tiny.VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)).eval()
    _assert_falls_back_to_hf_generate(model, left_padded_batch([6, 4]), "encoder-decoder models other than Whisper")


def test_hf_generation_options_it_does_not_compile_run_hf_generate_and_defaults_are_named() -> None:
    """HF generate() options mmaccel.generate does not compile (num_beams, no_repeat_ngram_size, ...) were passed on
    to the model's forward, which ignored them: greedy tokens where beam search was asked for, no word said.
    Given in a call, they now run the model's own generate() with one warning naming them (tokens as HF's); at
    their defaults (num_beams=1, use_cache=True) they change nothing and the steps stay compiled; set in the
    model's generation config (HF applies it by default), one warning says mmaccel.generate does not apply it."""
    from mmaccel.compiler import errors

    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    errors._warned.clear()
    for extra in (dict(num_beams=2), dict(no_repeat_ngram_size=2)):
        expected = hf_generate(model, ids, mask, max_new_tokens=5, do_sample=False, **extra)
        name = next(iter(extra))
        with pytest.warns(mmaccel.MmaccelFallbackWarning, match=f"{name}=.*does not compile"):
            actual = mmaccel.generate(model, ids, mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                      options=EAGER, **extra)
        assert torch.equal(actual, expected), name
    expected = hf_generate(model, ids, mask, max_new_tokens=5, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmaccel.MmaccelFallbackWarning)
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=5, do_sample=False, pad_token_id=0, options=EAGER,
                                  num_beams=1, use_cache=True, output_scores=False)
    assert torch.equal(actual, expected)
    model.generation_config.no_repeat_ngram_size = 2
    try:
        with pytest.warns(mmaccel.MmaccelFallbackWarning, match="generation config sets no_repeat_ngram_size"):
            mmaccel.generate(model, ids, mask, max_new_tokens=5, do_sample=False, pad_token_id=0, options=EAGER)
    finally:
        model.generation_config.no_repeat_ngram_size = None


@pytest.mark.parametrize("processor", [dict(repetition_penalty=1.3), dict(repetition_penalty=0.6),
                                       dict(suppress_tokens=[9, 15, 73]),  # ids plain greedy picks
                                       dict(begin_suppress_tokens=[91, 93])])  # its first new tokens
def test_hf_logits_processors_are_compiled_and_match_hf(processor) -> None:
    """repetition_penalty (chat models' generation configs set it: Qwen2.5-Instruct 1.05), suppress_tokens and
    begin_suppress_tokens (Whisper's configs) ran the model's own generate(), uncompiled, when given in a call,
    and were ignored with a warning when set in the generation config. The steps now apply them as HF's processors
    do (the penalty leaves a row's left padding out), in the call or in the config: greedy tokens equal HF's on a
    left-padded batch, and differ from plain greedy (so the processor mattered)."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    expected = hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, **processor)
    assert not torch.equal(expected, hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmaccel.MmaccelFallbackWarning)
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, options=EAGER, **processor)
        assert torch.equal(actual, expected)
        (name, value), = processor.items()
        setattr(model.generation_config, name, value)
        try:  # from the generation config, as HF's generate() applies it
            actual = mmaccel.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, options=EAGER)
        finally:
            setattr(model.generation_config, name, 1.0 if name == "repetition_penalty" else None)
    assert torch.equal(actual, expected)


def emulate_hf_before_5_23(monkeypatch) -> None:
    """HF's generate() and mmaccel's rule as with transformers before 5.23 (the H200's 5.17): the repetition
    penalty counts the ids of a prompt's left padding too (5.23 passes prompt_ignore_length=padding_lengths)."""
    from transformers.generation import utils

    from mmaccel.compiler import generation, hf_geometry
    original = utils.RepetitionPenaltyLogitsProcessor
    monkeypatch.setattr(utils, "RepetitionPenaltyLogitsProcessor",
                        lambda penalty, prompt_ignore_length=None: original(penalty))
    for module in (generation, hf_geometry):
        monkeypatch.setattr(module, "penalty_covers_left_padding", lambda: True)


def penalized_padding_before_5_23(model, monkeypatch, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """(ids, mask, HF's greedy tokens with repetition_penalty=1.3 as before 5.23) for a left-padded batch whose
    padding holds ids greedy picks, so that whether the padding counts changes the tokens (checked)."""
    ids, mask = left_padded_batch([7, 3])
    plain = hf_generate(model, ids, mask, max_new_tokens=new_tokens, do_sample=False)
    ids[1, :4] = plain[1, 7:11]
    since_5_23 = hf_generate(model, ids, mask, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.3)
    emulate_hf_before_5_23(monkeypatch)
    expected = hf_generate(model, ids, mask, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.3)
    assert not torch.equal(expected, since_5_23)
    return ids, mask, expected


def test_repetition_penalty_counts_the_left_padding_where_the_installed_hf_does(monkeypatch) -> None:
    """The steps penalize a prompt's left padding as the installed transformers does: before 5.23 its ids count,
    since then they do not. Found on the H200 (transformers 5.17): with repetition_penalty, greedy tokens differed
    from HF's on a padded batch whose padding held ids other than the pad id (the CPU's 5.24 matched)."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask, expected = penalized_padding_before_5_23(model, monkeypatch, 12)
    actual = mmaccel.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, options=EAGER,
                              repetition_penalty=1.3)
    assert torch.equal(actual, expected)


def test_sampling_keeps_suppressed_tokens_out_and_a_draft_steps_aside() -> None:
    """Sampling draws after the processors: no suppressed id is ever drawn, and no id suppressed at the first new
    token comes first. Speculative decoding does not apply them yet: with a draft, one warning and the plain
    compiled steps (greedy tokens as HF's)."""
    from mmaccel.compiler import errors

    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    suppress, begin = list(range(0, 100, 3)), list(range(1, 100, 3))  # hf_tiny's vocabulary: 100 ids
    for seed in range(3):
        out = mmaccel.generate(model, ids, mask, max_new_tokens=10, pad_token_id=0, do_sample=True, top_k=20,
                               repetition_penalty=1.4, suppress_tokens=suppress, begin_suppress_tokens=begin,
                               seed=seed, options=EAGER)[:, ids.shape[1]:]
        assert not torch.isin(out, torch.tensor(suppress)).any() and not torch.isin(out[:, 0], torch.tensor(begin)).any()
    errors._warned.clear()
    expected = hf_generate(model, ids, mask, max_new_tokens=6, do_sample=False, repetition_penalty=1.3)
    with pytest.warns(mmaccel.MmaccelFallbackWarning, match="speculative decoding does not apply repetition_penalty"):
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=6, pad_token_id=0, repetition_penalty=1.3,
                                  draft="layers:1", options=EAGER)
    assert torch.equal(actual, expected)


def test_max_length_counts_the_prompt_as_in_hf() -> None:
    """max_length (prompt + new tokens) is taken as HF takes it: alone, the new tokens are what the prompt leaves
    (steps compiled, no fallback); beside max_new_tokens, max_new_tokens wins; one that leaves no new token is a
    ValueError naming max_new_tokens."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmaccel.MmaccelFallbackWarning)
        for kwargs in (dict(max_length=12), dict(max_length=30, max_new_tokens=3)):
            expected = hf_generate(model, ids, mask, do_sample=False, **kwargs)
            actual = mmaccel.generate(model, ids, mask, do_sample=False, pad_token_id=0, options=EAGER, **kwargs)
            assert torch.equal(actual, expected), kwargs
    with pytest.raises(ValueError, match="max_length=7 leaves no new token.*max_new_tokens"):
        mmaccel.generate(model, ids, mask, max_length=7, options=EAGER)


def test_arguments_merge_with_the_generation_config_as_in_hf() -> None:
    """HF's generate() takes an argument given in the call over the generation config, None included:
    eos_token_id=None means no stop id, where mmaccel.generate took the config's eos id and cut the row short (seen
    on a tiny Mixtral whose row met the config's eos 2); a field the call leaves out comes from the config, then
    from the defaults generate() applies (top_k 50 when sampling, where mmaccel.generate sampled from every token)."""
    from mmaccel.compiler.generation import _resolve_config

    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    free = hf_generate(model, ids, mask, max_new_tokens=8, do_sample=False, eos_token_id=[])
    eos = int(free[0, 7 + 1])  # the second new token of the first row, as the model's eos id
    model.generation_config.eos_token_id = eos
    try:
        for kwargs in (dict(eos_token_id=None), dict()):
            expected = hf_generate(model, ids, mask, max_new_tokens=8, do_sample=False, **kwargs)
            actual = mmaccel.generate(model, ids, mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                      options=EAGER, **kwargs)
            assert torch.equal(actual, expected), kwargs
            assert torch.equal(expected, free) == ("eos_token_id" in kwargs), kwargs  # the config's eos stops a row
    finally:
        model.generation_config.eos_token_id = None
    sampling = _resolve_config(model, dict(max_new_tokens=2, do_sample=True))
    assert sampling.sampler.top_k == 50 and sampling.temperature == 1.0 and not sampling.sampler.use_top_p
    assert _resolve_config(model, dict(max_new_tokens=2, do_sample=True, top_k=None)).sampler.top_k is None
    model.generation_config.top_k = 7
    try:
        assert _resolve_config(model, dict(max_new_tokens=2, do_sample=True)).sampler.top_k == 7
    finally:
        model.generation_config.top_k = None


def _tiny(config_name: str, model_name: str, **config) -> torch.nn.Module:
    """A tiny model from exactly these config fields (architectures whose configs take other names than Llama's)."""
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()


def test_models_without_a_position_limit_generate_as_hf() -> None:
    """Bloom (ALiBi) names no position limit in its config: mmaccel.generate raised a ValueError for it (and for
    MPT and Mamba) before compiling anything; now its caches are sized by the buckets alone, tokens as HF's."""
    model = _tiny("BloomConfig", "BloomForCausalLM", vocab_size=hf_tiny.VOCAB, hidden_size=32, n_layer=2, n_head=4,
                  pad_token_id=0)
    ids, mask = left_padded_batch([7, 4])
    expected = hf_generate(model, ids, mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    actual = mmaccel.generate(model, ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0, options=EAGER)
    assert torch.equal(actual, expected)


def test_decode_steps_with_graph_breaks_keep_every_guard() -> None:
    """MPT's attention reads the cache's length with .item() (a graph break) and slices its ALiBi bias with it:
    every decode step runs Python whose values change. Its second decode step raised "Recompilation triggered with
    skip_guard_eval_unsafe stance" (repeated steps skipped the guards); steps whose first call broke the graph
    now keep every guard, tokens as HF's."""
    model = _tiny("MptConfig", "MptForCausalLM", d_model=32, n_heads=4, n_layers=1, vocab_size=hf_tiny.VOCAB,
                  max_seq_len=64, pad_token_id=0)
    ids, mask = left_padded_batch([5])
    expected = hf_generate(model, ids, mask, max_new_tokens=4, do_sample=False, eos_token_id=None)
    actual = mmaccel.generate(model, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0, options=EAGER)
    assert torch.equal(actual, expected)


def test_latent_attention_and_state_space_models_fall_back_to_hf_generate() -> None:
    """DeepSeek V3's multi-head latent attention caches keys and values at other widths than a head's: the static
    cache allocated from its config failed in Dynamo at the prefill's cache write; Mamba (no position limit, a
    state-space cache) raised a ValueError. Both now run the model's own generate() with one warning."""
    deepseek = _decoder("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, head_dim=4,
                        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, first_k_dense_replace=1,
                        n_group=1, topk_group=1)
    _assert_falls_back_to_hf_generate(deepseek, left_padded_batch([6, 4]), "multi-head latent attention")
    mamba = _tiny("MambaConfig", "MambaForCausalLM", vocab_size=hf_tiny.VOCAB, hidden_size=32, num_hidden_layers=2,
                  state_size=4, pad_token_id=0)
    _assert_falls_back_to_hf_generate(mamba, left_padded_batch([6]), "own generate")


# Any-resolution tiling (LLaVA-NeXT) and multimodal rotary positions (Qwen2-VL) by default; the other families
# transformers ships in the full coverage set (-m coverage, ~1 min)
@pytest.mark.parametrize("name", [n if n in ("llava_next", "qwen2_vl") else pytest.param(n, marks=pytest.mark.coverage)
                                  for n in hf_tiny.VLMS])
def test_vision_language_families_match_hf_eager_in_two_graphs(name) -> None:
    """Each family's prompt (its image placeholders, its processor's extra inputs) generates HF eager's greedy
    tokens through mmaccel.generate, twice, in one prefill and one decode graph."""
    model, images = hf_tiny.VLMS[name]()
    ids = hf_tiny.vlm_prompt(name, model, images)
    mask = torch.ones_like(ids)
    expected = hf_generate(model, ids, mask, max_new_tokens=6, do_sample=False, eos_token_id=None, **images)
    for _ in range(2):
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0,
                                  options=EAGER, **images)
        assert torch.equal(actual, expected)
    assert [kind for kind, _, _ in mmaccel.generation_report(model, **EAGER).graphs] == ["prefill", "decode"]


def test_whisper_options_of_its_own_generate_run_it_and_multilingual_prompts_are_named() -> None:
    """Whisper's generate() takes language, task, return_timestamps, ... (not GenerationMixin's options): they
    stayed in the model inputs, which the forward ignored, so generate(features, task="translate") gave other
    tokens than HF's, silently. Given, they now run the model's own generate() with one warning (HF's tokens).
    A multilingual generation config (lang_to_id) without decoder_input_ids: one warning that Whisper's own
    language and task tokens are not added, naming decoder_input_ids."""
    from mmaccel.compiler import errors

    model = hf_tiny.whisper()
    config = model.generation_config
    config.lang_to_id, config.task_to_id = {"<|en|>": 50, "<|fr|>": 51}, {"transcribe": 52, "translate": 53}
    config.is_multilingual, config.no_timestamps_token_id = True, 54
    features = torch.randn(1, 16, 40, generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(language="fr", task="translate"), dict(return_timestamps=True)):
        with torch.no_grad():
            expected = model.generate(features, max_new_tokens=5, do_sample=False, **kwargs)
        errors._warned.clear()
        with pytest.warns(mmaccel.MmaccelFallbackWarning, match=f"{next(iter(kwargs))}=.*does not compile"):
            actual = mmaccel.generate(model, features, max_new_tokens=5, options=EAGER, **kwargs)
        assert torch.equal(actual, expected), kwargs
    errors._warned.clear()
    with pytest.warns(mmaccel.MmaccelFallbackWarning, match="language and task tokens.*decoder_input_ids"):
        mmaccel.generate(model, features, max_new_tokens=2, options=EAGER)


def test_missing_attention_mask_is_inferred_and_embeddings_alone_run_hf_generate() -> None:
    """HF's generate() infers a missing attention_mask from the pad id (pad positions masked, unless the pad id is
    a stop id): mmaccel.generate attended to a left-padded row's pads, and its tokens differed, silently. A prompt
    given as inputs_embeds alone (or none) raised a ValueError; it now runs the model's own generate() with one
    warning."""
    from mmaccel.compiler import errors

    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(expected, hf_generate(model, ids, mask, max_new_tokens=5, do_sample=False))
    actual = mmaccel.generate(model, ids, max_new_tokens=5, pad_token_id=0, options=EAGER)
    assert torch.equal(actual, expected)
    embeddings = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        expected = model.generate(inputs_embeds=embeddings, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                  pad_token_id=0)
    errors._warned.clear()
    with pytest.warns(mmaccel.MmaccelFallbackWarning, match="inputs_embeds.*own generate"):
        actual = mmaccel.generate(model, inputs_embeds=embeddings, attention_mask=mask, max_new_tokens=5,
                                  pad_token_id=0, options=EAGER)
    assert torch.equal(actual, expected)
