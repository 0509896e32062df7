"""mmaccel.export_onnx: the same passes as torch.compile, written to a standard ONNX file (opset 18).

Each exported file is run in ONNX Runtime at several sizes (one file, dynamic dims) and compared with eager;
the fusions must show in the exported graph; the file holds only standard ONNX ops and runs in a process
that never imports mmaccel; a failed export leaves nothing behind (and never touches an existing file);
big weights go to an external data file.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch.export import Dim

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import mmaccel  # noqa: E402
import mmaccel.compiler.export as export_module  # noqa: E402
from mmaccel.compiler.export import ExportError  # noqa: E402
from mmaccel.compiler.export_generation import all_nodes  # noqa: E402
from mmaccel.models import build, example_inputs  # noqa: E402

from conftest import assert_matches_eager  # noqa: E402

SDPA = torch.ops.aten.scaled_dot_product_attention
FUSED_LINEAR = torch.ops.mmaccel.fused_linear
STANDARD_DOMAINS = ("", "ai.onnx")


# ---------------------------------------------------------------------------------------------- helpers

def assert_standard_onnx(path: str) -> onnx.ModelProto:
    """Opset 18, only standard-domain nodes (no mmaccel or onnxscript custom ops), checker-clean."""
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path, load_external_data=False)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 18, opsets
    nodes = list(all_nodes(model.graph)) + [n for f in model.functions for n in all_nodes(f)]
    custom = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in STANDARD_DOMAINS})
    assert not custom, f"non-standard ops in the exported file: {custom}"
    assert not model.functions, f"local functions left in the file: {[f.name for f in model.functions]}"
    return model


def session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(out) for out in sess.run(None, feeds)]


def eager_outputs(model: Callable, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Eager outputs flattened the way the ONNX graph orders them (tensor, tuple or HF ModelOutput)."""
    with torch.no_grad():
        out = model(*inputs)
    return list(torch.utils._pytree.tree_leaves(out))


def assert_onnx_matches_eager(sess: ort.InferenceSession, model: Callable, inputs: tuple[torch.Tensor, ...]) -> None:
    assert_matches_eager(run_onnx(sess, inputs), eager_outputs(model, inputs))


def input_dims(model: onnx.ModelProto) -> list[list[int | str]]:
    """Each graph input's dims: an int when static, the symbol's name when dynamic."""
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]


def assert_fused(report: mmaccel.CompileReport) -> None:
    """The passes did their work on the exported graph, and it is the graph that was written."""
    assert len(report.graphs) == 1
    g = report.graphs[0]
    assert g.status == "optimized"
    failed = [(p.name, p.error) for p in g.passes if p.error]
    assert not failed, f"passes failed: {failed}"
    assert g.matched("attention_fusion") > 0, f"explicit attention was not fused:\n{report}"
    assert g.count(SDPA) >= g.matched("attention_fusion")
    assert g.count(torch.ops.aten._softmax) == 0, f"a softmax was left unfused:\n{report}"
    assert g.matched("parallel_linear_fusion") > 0, f"\n{report}"
    assert g.matched("linear_epilogue_fusion") > 0, f"\n{report}"
    assert g.count(FUSED_LINEAR) > 0


# ------------------------------------------------------------------- 1. reference models, one file many sizes

# name -> (export-time sizes, dynamic_shapes, other sizes run through the same file). Sizes avoid the tiny
# models' fixed dims (3 channels, 4 heads, head dim 8, 16 audio positions, 17 image tokens, width 32, ...) and 1.
REFERENCE_CASES: dict[str, tuple[dict, Any, list[dict]]] = {
    "vit": (dict(batch=5), ({0: Dim("batch", min=2, max=64)},), [dict(batch=2), dict(batch=7)]),
    # Dim.DYNAMIC, not a named Dim with a range: torch.export's solver cannot prove its own guard
    # (64*(k+1)) % (8*(k+1)) == 0 (k = (frames-1)//2, from view(B, T, heads, -1)) for a named range and
    # rejects it ("Constraints violated"); the unnamed dynamic dim stays symbolic and odd lengths still work.
    "whisper_encoder": (dict(batch=2, seq=20), ({2: Dim.DYNAMIC},), [dict(batch=2, seq=26), dict(batch=2, seq=27)]),
    # max 31, not n_text_ctx=32: torch.export guards tokens != 32 (= d_model, a fixed dim) and refuses the range.
    "whisper_decoder": (dict(batch=2, seq=5), ({1: Dim("tokens", min=2, max=31)}, None),
                        [dict(batch=2, seq=9), dict(batch=2, seq=13), dict(batch=2, seq=3)]),
}
DYNAMIC_INPUT_DIM = {"vit": (0, 0), "whisper_encoder": (0, 2), "whisper_decoder": (0, 1)}  # (input, dim)


@pytest.fixture(scope="module")
def reference_export(tmp_path_factory):
    """Exports each reference model once for the module: name -> (model, path, report)."""
    cache: dict[str, tuple[torch.nn.Module, str, mmaccel.CompileReport]] = {}

    def get(name: str):
        if name not in cache:
            first, dynamic_shapes, _ = REFERENCE_CASES[name]
            torch.manual_seed(0)
            model, inputs = build(name, **first)
            path = str(tmp_path_factory.mktemp(name) / f"{name}.onnx")
            report = mmaccel.export_onnx(model, inputs, path, dynamic_shapes=dynamic_shapes)
            cache[name] = (model, path, report)
        return cache[name]

    return get


# Whisper's encoder and decoder in the opt-in long set (-m coverage, 7 and 8 s; CI time): HF's Whisper encoder
# round-trips below, and the ONNX generation tests export HF's Whisper decoder
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.coverage) if n in ("whisper_encoder", "whisper_decoder")
                                  else n for n in REFERENCE_CASES])
def test_reference_model_round_trip_across_sizes(name, reference_export):
    model, path, report = reference_export(name)
    first, _, others = REFERENCE_CASES[name]
    proto = assert_standard_onnx(path)
    index, dim = DYNAMIC_INPUT_DIM[name]
    assert isinstance(input_dims(proto)[index][dim], str), f"dim {dim} was specialized: {input_dims(proto)}"
    sess = session(path)
    torch.manual_seed(1)
    for size in [first, *others]:
        assert_onnx_matches_eager(sess, model, example_inputs(name, model, **size))


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_reference_model_export_is_fused(name, reference_export):
    _, _, report = reference_export(name)
    assert_fused(report)
    # 2 layers of explicit attention in each tiny model (self- and cross-attention in the decoder).
    assert report.graphs[0].matched("attention_fusion") >= 2, f"\n{report}"


def test_passes_option_reaches_the_export(tmp_path):
    """Switching a pass off through export_onnx's options: nothing fused by it, still correct."""
    torch.manual_seed(0)
    model, inputs = build("vit", batch=2)
    path = str(tmp_path / "vit.onnx")
    report = mmaccel.export_onnx(model, inputs, path, passes={"linear_epilogue_fusion": False})
    g = report.graphs[0]
    assert g.matched("linear_epilogue_fusion") == 0 and g.count(FUSED_LINEAR) == 0
    assert g.matched("parallel_linear_fusion") > 0
    assert_standard_onnx(path)
    assert_onnx_matches_eager(session(path), model, inputs)


# ---------------------------------------------------------------------- 2. HF transformers architectures

def _hf_clip_vision(impl: str):
    from hf_tiny import clip_vision

    g = torch.Generator().manual_seed(1)
    pixels = [(torch.randn(b, 3, 32, 32, generator=g),) for b in (5, 2, 7)]
    return clip_vision(impl), pixels, ({0: Dim("batch", min=2, max=64)},), (0, 0)


def _hf_bert(impl: str):
    from hf_tiny import bert, token_batch

    batches = [token_batch(2, 10, padded_from=6), token_batch(2, 13, padded_from=5, seed=2),
               token_batch(2, 7, padded_from=3, seed=3)]
    seq = Dim("seq", min=2, max=64)
    return bert(impl), batches, ({1: seq}, {1: seq}), (0, 1)


def _hf_whisper_encoder(impl: str):
    from hf_tiny import whisper_encoder

    # HF's Whisper encoder insists on exactly 2 * max_source_positions mel frames: the batch is what varies.
    g = torch.Generator().manual_seed(1)
    mels = [(torch.randn(b, 16, 40, generator=g),) for b in (3, 2, 5)]
    return whisper_encoder(impl), mels, ({0: Dim("batch", min=2, max=64)},), (0, 0)


from hf_tiny import LAYERS  # noqa: E402


HF_MODELS = {"clip_vision": _hf_clip_vision, "bert": _hf_bert, "whisper_encoder": _hf_whisper_encoder}


# BERT's and Whisper's encoder with eager attention in the opt-in long set (-m coverage, 7 and 6 s; CI time): their
# sdpa twins and CLIP's eager attention run by default
@pytest.mark.parametrize("arch,impl", [pytest.param(a, i, marks=pytest.mark.coverage) if i == "eager" and a != "clip_vision"
                                       else (a, i) for a in HF_MODELS for i in ("eager", "sdpa")])
def test_hf_model_round_trip(arch, impl, tmp_path):
    pytest.importorskip("transformers")
    model, batches, dynamic_shapes, (index, dim) = HF_MODELS[arch](impl)
    path = str(tmp_path / f"{arch}.onnx")
    report = mmaccel.export_onnx(model, batches[0], path, dynamic_shapes=dynamic_shapes)
    proto = assert_standard_onnx(path)
    assert isinstance(input_dims(proto)[index][dim], str), f"dim {dim} was specialized: {input_dims(proto)}"
    sess = session(path)
    for inputs in batches:  # the export size, then others through the same file
        assert_onnx_matches_eager(sess, model, inputs)
    g = report.graphs[0]
    assert g.status == "optimized" and not [p for p in g.passes if p.error], f"\n{report}"
    assert g.matched("parallel_linear_fusion") >= LAYERS, f"\n{report}"  # q/k/v of every layer
    assert g.matched("linear_epilogue_fusion") > 0, f"\n{report}"
    if impl == "eager":  # attention written out: one SDPA per layer, no softmax left
        assert g.matched("attention_fusion") == LAYERS, f"\n{report}"
        assert g.count(SDPA) == LAYERS
        assert g.count(torch.ops.aten._softmax) == 0
    if arch == "bert" and impl == "eager":  # the padding mask must reach the fused attention
        sdpa = [n for n in g.final_graph.graph.nodes if n.target is SDPA.default]
        assert sdpa and all(n.kwargs.get("attn_mask") is not None for n in sdpa)


# ------------------------------------------------------------------- 3. a plain ONNX Runtime, no mmaccel

STANDALONE = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort

    model_path, inputs_path, out_prefix = sys.argv[1:]
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    batches = np.load(inputs_path)
    for i in range(len(batches.files)):
        outputs = sess.run(None, {sess.get_inputs()[0].name: batches[f"x{i}"]})
        for j, out in enumerate(outputs):
            np.save(f"{out_prefix}{i}_{j}.npy", out)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mmaccel", "torch", "models", "compiler"))
    assert not loaded, f"the runtime process imported {loaded}"
    assert "mmaccel" not in sys.modules
    print("standalone ok")
""")


def test_file_runs_in_plain_onnxruntime_without_mmaccel(reference_export, tmp_path):
    model, path, _ = reference_export("vit")
    torch.manual_seed(2)
    batches = [example_inputs("vit", model, batch=b) for b in (2, 6)]
    np.savez(tmp_path / "inputs.npz", **{f"x{i}": b[0].numpy() for i, b in enumerate(batches)})
    script = tmp_path / "run_onnx.py"
    script.write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    # -I: isolated mode, neither the script's folder nor the current directory lands on sys.path.
    proc = subprocess.run([sys.executable, "-I", str(script), path, str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "standalone ok" in proc.stdout
    for i, inputs in enumerate(batches):
        expected = eager_outputs(model, inputs)
        actual = [torch.from_numpy(np.load(tmp_path / f"out{i}_{j}.npy")) for j in range(len(expected))]
        assert_matches_eager(actual, expected)


# ---------------------------------------------------------------------------------------------- 4. errors

class TinyMLP(torch.nn.Module):
    """Cheap to export: one fused linear epilogue, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(12, 24)
        self.down = torch.nn.Linear(24, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x))) + x


def _tiny_mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return TinyMLP().eval().requires_grad_(False), (torch.randn(3, 5, 12),)


def _changed_buffers(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Buffers an eager call writes in place (on a copy: the model itself stays untouched)."""
    probe = copy.deepcopy(model)
    before = {k: v.clone() for k, v in probe.named_buffers()}
    with torch.no_grad():
        probe(*inputs)
    return [k for k, v in probe.named_buffers() if not torch.equal(v, before[k])]


@pytest.mark.parametrize("name", ["vlm_prefill", "vlm_decode", "chameleon"])
def test_static_kv_cache_raises_naming_the_buffers(name, tmp_path):
    torch.manual_seed(0)
    model, inputs = build(name, batch=2, seq=5)
    written = _changed_buffers(model, inputs)
    assert written, "the reference model no longer writes a KV cache in place"
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    path = tmp_path / "out" / f"{name}.onnx"
    with pytest.raises(ExportError) as info:
        mmaccel.export_onnx(model, inputs, path)
    message = str(info.value)
    missing = [b for b in written if b not in message]
    assert not missing, f"the error does not name {missing}: {message}"
    assert "torch.compile" in message  # says what to do instead
    assert not path.exists()
    assert not path.parent.exists() or not os.listdir(path.parent)
    for k, v in model.named_buffers():  # export traced with fake tensors: the cache is untouched
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)


@pytest.mark.parametrize("options", [
    {"no_such_option": True},
    {"passes": {"no_such_pass": False}},
    {"passes": {"attention_fusion": "off"}},
    {"target": "eager"},  # the file is the target
], ids=["unknown_option", "unknown_pass", "non_bool_pass", "target"])
def test_invalid_options_raise_value_error_before_any_work(options, tmp_path):
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the model must not be traced before options are validated")

    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError) as info:
        mmaccel.export_onnx(Untraceable(), (torch.randn(2, 3),), path, **options)
    assert isinstance(info.value, mmaccel.InvalidOptionError)
    name = next(iter(options))
    assert name in str(info.value)
    assert not os.listdir(tmp_path)


class InjectedFailure(RuntimeError):
    pass


def _fail_onnx_conversion(monkeypatch) -> None:
    def broken_export(*args, **kwargs):
        raise InjectedFailure("torch.onnx.export broke on purpose")

    # torch.onnx.export itself, wherever mmaccel calls it from (compiler/export.py or a backend helper).
    monkeypatch.setattr(torch.onnx, "export", broken_export)


def _fail_onnx_checker(monkeypatch) -> None:
    """The file is fully written (aside) and then fails validation."""
    def broken_check(model, *args, **kwargs):
        assert os.path.getsize(model) > 0, "the checker should see the written file"
        raise InjectedFailure("onnx.checker rejected the model on purpose")

    monkeypatch.setattr(onnx.checker, "check_model", broken_check)


def test_failed_onnx_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    model, inputs = _tiny_mlp()
    _fail_onnx_conversion(monkeypatch)
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="broke on purpose"):
        mmaccel.export_onnx(model, inputs, path)
    assert not path.exists()
    assert os.listdir(tmp_path) == [], f"stray files: {os.listdir(tmp_path)}"


def test_failed_validation_leaves_nothing_behind(tmp_path, monkeypatch):
    model, inputs = _tiny_mlp()
    _fail_onnx_checker(monkeypatch)
    path = tmp_path / "model.onnx"
    with pytest.raises(Exception, match="rejected the model on purpose"):
        mmaccel.export_onnx(model, inputs, path)
    assert not path.exists()
    assert os.listdir(tmp_path) == [], f"stray files or temp folder: {os.listdir(tmp_path)}"


@pytest.mark.parametrize("failure", ["static_kv_cache", "onnx_conversion", "onnx_checker"])
def test_failed_export_leaves_an_existing_file_untouched(failure, tmp_path, monkeypatch):
    if failure == "static_kv_cache":
        torch.manual_seed(0)
        model, inputs = build("vlm_decode", batch=2, seq=5)
    else:
        model, inputs = _tiny_mlp()
        (_fail_onnx_conversion if failure == "onnx_conversion" else _fail_onnx_checker)(monkeypatch)
    path = tmp_path / "model.onnx"
    previous = b"a previous export, not to be clobbered\x00\x01"
    path.write_bytes(previous)
    mtime = path.stat().st_mtime_ns
    with pytest.raises(Exception):
        mmaccel.export_onnx(model, inputs, path)
    assert path.read_bytes() == previous
    assert path.stat().st_mtime_ns == mtime
    assert os.listdir(tmp_path) == ["model.onnx"], f"stray files: {os.listdir(tmp_path)}"


def test_successful_export_replaces_an_existing_file(tmp_path):
    model, inputs = _tiny_mlp()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"stale")
    mmaccel.export_onnx(model, inputs, path)
    assert_standard_onnx(str(path))
    assert_onnx_matches_eager(session(str(path)), model, inputs)
    assert os.listdir(tmp_path) == ["model.onnx"], f"stray files: {os.listdir(tmp_path)}"


# --------------------------------------------------------------------------- 5. weights as external data

def test_large_weights_are_saved_as_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 0)
    torch.manual_seed(0)
    model, inputs = build("vit", batch=2)
    folder = tmp_path / "export"
    path = folder / "vit.onnx"
    report = mmaccel.export_onnx(model, inputs, path)
    assert report.graphs[0].frozen_bytes > 0

    files = sorted(os.listdir(folder))
    data_files = [f for f in files if f.endswith(".data")]
    assert len(data_files) == 1 and set(files) == {"vit.onnx", data_files[0]}, files
    assert os.path.getsize(folder / data_files[0]) > 0

    proto = onnx.load(str(path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "no initializer stored as external data"
    locations = {entry.value for t in external for entry in t.external_data if entry.key == "location"}
    assert locations == {data_files[0]}, locations  # relative, next to the model
    # The protobuf itself no longer holds the weights.
    assert os.path.getsize(path) < os.path.getsize(folder / data_files[0])

    onnx.checker.check_model(str(path))
    assert_standard_onnx(str(path))
    full = onnx.load(str(path))  # resolves the external data
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in full.graph.initializer)
    assert_onnx_matches_eager(session(str(path)), model, inputs)


def test_op_without_onnx_translation_is_named_with_its_source_line(tmp_path):
    class Eig(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvalsh(x @ x.transpose(-1, -2)) * 2  # no ONNX translation exists

    path = tmp_path / "eig.onnx"
    with pytest.raises(ExportError) as info:
        mmaccel.export_onnx(Eig(), (torch.randn(3, 3),), path)
    message = str(info.value)
    assert "_linalg_eigh" in message and "test_export_onnx.py" in message and "Fallback" in message
    assert not path.exists() and list(tmp_path.iterdir()) == []
