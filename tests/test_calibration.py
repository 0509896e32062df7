"""Calibration as users hold it (issue 19): samples of any length and batch size, as keyword dicts (Hugging Face
tokenizers and processors), mixed positional + keyword, from a generator or a DataLoader; on mmaccel.compile and
export_onnx (with and without dynamic_shapes). The error is pooled over every sample; a sample the lossy pass
cannot measure on stops the compile or export with an error naming it, unless lossy_fallback=True."""
from __future__ import annotations

import warnings

import pytest
import torch

import mmaccel
from mmaccel.compiler.errors import InvalidOptionError, LossyPassError
from mmaccel.compiler.export import ExportError
from mmaccel.compiler.options import CompileOptions, Sample

from conftest import pooled_relative_error

pytest.importorskip("transformers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hf_tiny import bert, clip_vision, token_batch  # noqa: E402

INT8 = {"quantize": "int8_weight_only", "accuracy_budget": 0.2}


def bert_samples():
    """HF-style batches of several lengths and batch sizes, padded (a mask per batch), from a generator."""
    for seed, (batch, seq) in enumerate([(2, 5), (3, 11), (2, 8), (4, 3)]):
        ids, mask = token_batch(batch, seq, padded_from=seq - 2, seed=seed)
        yield {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------- the forms a sample may take


def test_samples_as_users_hold_them_are_read_once_into_args_and_kwargs():
    ids, mask = token_batch(2, 5)
    loader = torch.utils.data.DataLoader([{"input_ids": ids[0], "attention_mask": mask[0]}] * 4, batch_size=2)
    options = CompileOptions.from_user({"quantize": "int8_weight_only", "calibration": (
        s for s in [ids, (ids, mask), {"input_ids": ids}, ((ids,), {"attention_mask": mask})])})
    assert [(len(s.args), sorted(s.kwargs)) for s in options.calibration] == [
        (1, []), (2, []), (0, ["input_ids"]), (1, ["attention_mask"])]
    from_loader = CompileOptions.from_user({"quantize": "int8_weight_only", "calibration": loader}).calibration
    assert len(from_loader) == 2 and from_loader[0].kwargs["input_ids"].shape == (2, 5)


@pytest.mark.parametrize("calibration,message", [
    ({"input_ids": torch.ones(1, 3)}, "one dict is one sample"),
    ([torch.ones(1, 3), "text"], "sample 1 is a str"),
])
def test_calibration_that_is_not_samples_names_the_fix(calibration, message):
    with pytest.raises(InvalidOptionError, match=message):
        CompileOptions.from_user({"quantize": "int8_weight_only", "calibration": calibration})


# ------------------------------------------------------------------- mmaccel.compile


def test_compile_pools_the_error_over_samples_of_several_lengths_and_batch_sizes():
    """Dict samples of four shapes: one dynamic graph takes them all, and the reported error is the error
    pooled over all four (not over those sharing the first sample's shape)."""
    torch._dynamo.reset()
    model, samples = bert("eager"), list(bert_samples())
    with torch.no_grad():
        references = [model(**s) for s in samples]
        compiled = mmaccel.compile(model, target="eager", calibration=iter(samples), **INT8)
        outputs = [compiled(**s) for s in samples]
    graph = compiled.mmaccel_report.graphs[-1]
    assert not graph.calibration_note
    result = graph.pass_result("quantize")
    assert result.matched > 0 and "on 4 calibration input(s)" in result.changes[0]
    # the worst of the model's outputs, each pooled over the samples
    error = max(pooled_relative_error([o[field] for o in outputs], [r[field] for r in references])
                for field in ("last_hidden_state", "pooler_output"))
    assert result.measured_error == pytest.approx(error, rel=1e-3)
    assert result.measured_error <= INT8["accuracy_budget"]


def test_compile_with_pixel_values_of_several_batch_sizes():
    torch._dynamo.reset()
    model = clip_vision("sdpa")
    g = torch.Generator().manual_seed(0)
    samples = [{"pixel_values": torch.randn(b, 3, 32, 32, generator=g)} for b in (2, 3, 5)]
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", calibration=samples, **INT8)
        compiled(**samples[0])
    result = compiled.mmaccel_report.graphs[-1].pass_result("quantize")
    assert result.matched > 0 and "on 3 calibration input(s)" in result.changes[0]


def test_compile_sample_that_does_not_fit_the_model_is_named():
    model = bert("eager")
    ids, mask = token_batch(2, 5)
    samples = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids, "attention_mask": mask[:, :3]}]
    with pytest.raises(LossyPassError, match=r"calibration sample 1 \(input_ids=int64\[2, 5\], "
                                             r"attention_mask=int64\[2, 3\]\) does not run through the model"):
        mmaccel.compile(model, target="eager", calibration=samples, **INT8)


def test_compile_samples_of_several_shapes_with_dynamic_false_is_an_error():
    ids = [token_batch(2, t)[0] for t in (4, 6)]
    with pytest.raises(InvalidOptionError, match=r"sample 1 \(int64\[2, 6\]\) differs in shape from sample 0"):
        mmaccel.compile(bert("eager"), dynamic=False, calibration=ids, **INT8)


# ------------------------------------------------------------------- export_onnx


def test_export_measures_every_sample_and_the_file_takes_them(tmp_path):
    """No dynamic_shapes: the dims in which the samples differ become dynamic, the error is pooled over all
    samples, and ONNX Runtime runs each of them with that error."""
    model, samples = bert("eager"), list(bert_samples())
    example = samples[0]
    path = str(tmp_path / "bert.onnx")
    # the same samples as a user may hold them: a dict, (args, kwargs), positional, a dict
    held = [samples[0], ((samples[1]["input_ids"],), {"attention_mask": samples[1]["attention_mask"]}),
            (samples[2]["input_ids"], samples[2]["attention_mask"]), samples[3]]
    report = mmaccel.export_onnx(model, example, path, calibration=(s for s in held), **INT8)
    graph = report.graphs[0]
    result = graph.pass_result("quantize")
    assert result.matched > 0 and "on 4 calibration input(s)" in result.changes[0]
    assert "input_ids[0], input_ids[1]" in graph.calibration_note
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [session.run(None, dict(zip(names, (s["input_ids"].numpy(), s["attention_mask"].numpy()))))
               for s in samples]
    with torch.no_grad():
        references = [model(**s) for s in samples]
    error = max(pooled_relative_error([torch.from_numpy(o[i]) for o in outputs], [r[field] for r in references])
                for i, field in enumerate(("last_hidden_state", "pooler_output")))
    assert error == pytest.approx(result.measured_error, rel=0.05)


def test_export_sample_outside_the_users_dynamic_shapes_stops_unless_fallback_is_asked_for(tmp_path):
    """dynamic_shapes keeps the length static: a sample of another length cannot be measured. The export stops
    naming the sample; with lossy_fallback=True it warns and writes the unquantized file."""
    from torch.export import Dim

    model = bert("eager")
    example, other = token_batch(2, 6), token_batch(3, 9)
    shapes = ({0: Dim("batch", min=2, max=64)}, {0: Dim("batch", min=2, max=64)})
    path = str(tmp_path / "bert.onnx")
    with pytest.raises(LossyPassError, match=r"quantize' could not run.*calibration sample 1 .*does not fit"):
        mmaccel.export_onnx(model, example, path, dynamic_shapes=shapes, calibration=[example, other], **INT8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = mmaccel.export_onnx(model, example, path, dynamic_shapes=shapes, calibration=[example, other],
                                     lossy_fallback=True, **INT8)
    assert report.graphs[0].pass_result("quantize").error
    assert any("pass 'quantize' failed" in str(w.message) for w in caught)


def test_export_sample_with_other_arguments_than_the_example_is_named(tmp_path):
    ids, mask = token_batch(2, 5)
    with pytest.raises(ExportError, match=r"calibration sample 0 .* passes \['attention_mask', 'input_ids'\]"):
        mmaccel.export_onnx(bert("eager"), (ids,), tmp_path / "bert.onnx",
                            calibration=[{"input_ids": ids, "attention_mask": mask}], **INT8)


def test_export_sample_larger_than_a_unit_example_dim_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"calibration sample 0 .*size 3 in dim 0 of 'input_ids'"):
        mmaccel.export_onnx(bert("eager"), (token_batch(1, 5)[0],), tmp_path / "bert.onnx",
                            calibration=[token_batch(3, 5)[0]], **INT8)


def test_sample_dataclass_describes_itself():
    assert Sample((torch.ones(2, 3),), {"mask": torch.ones(2, 3, dtype=torch.long)}).describe() == \
        "(float32[2, 3], mask=int64[2, 3])"
