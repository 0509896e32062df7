"""export_onnx(..., generation=True) and mmaccel.onnx_generate on tiny HF models (random weights, fp32, CPU).

Each model is exported once per module (a folder: decoder with past/present K/V, manifest); its generated
tokens must equal HF eager generate()'s, left-padded batches included; the folder holds only standard ONNX and
the loop runs in a process where torch cannot be imported; mixed or half-written folders are refused.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import mmaccel  # noqa: E402
import mmaccel.compiler.export_generation as export_generation  # noqa: E402
from mmaccel.compiler.export import ExportError  # noqa: E402
from mmaccel.compiler.onnx_generate import ManifestError  # noqa: E402

import hf_tiny  # noqa: E402
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402
from test_export_onnx import assert_standard_onnx  # noqa: E402
from test_generation import hf_generate, left_padded_batch, one_thread  # noqa: E402,F401 (autouse fixture)

SDPA = torch.ops.aten.scaled_dot_product_attention
# HF's default sdpa attention (kept whole by the export), and Llama with its attention written out
# (attn_implementation="eager"), which attention_fusion must turn into SDPA on the decoder with a past.
# One export takes 15-45 s on the 2-core CI machine, so the default run exports Llama only; the others run
# with -m coverage (the opt-in set of tests/test_hf_coverage.py).
# Llama's heads of 16: ONNX Runtime's GroupQueryAttention rotates q and k itself (the default path); Qwen2's and
# eager Llama's of 8: RotaryEmbedding nodes before it (compiler/onnx_fusions.py).
MODELS = {"llama": lambda: hf_tiny.llama("sdpa", use_cache=True, head_dim=16), "qwen2": hf_tiny.qwen2,
          "llama_eager_attention": lambda: hf_tiny.llama("eager", use_cache=True)}
DEFAULT_SET = ("llama",)


def head_dim_of(model: torch.nn.Module) -> int:
    return getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads


def fused_per_layer(head_dim: int) -> dict[str, int]:
    """ONNX Runtime contrib ops the default export writes per decoder layer (compiler/onnx_fusions.py)."""
    rotary = {"RotaryEmbedding": 2} if head_dim % 16 else {}
    return {"GroupQueryAttention": 1, "SkipSimplifiedLayerNormalization": 2, **rotary}


@pytest.fixture(scope="module", params=[name if name in DEFAULT_SET else pytest.param(name, marks=pytest.mark.coverage)
                                        for name in MODELS])
def exported(request, tmp_path_factory):
    """(model, folder, report): the model exported once for the module's tests."""
    model = MODELS[request.param]()
    ids, mask = left_padded_batch([7, 4])
    folder = str(tmp_path_factory.mktemp(request.param) / "onnx")
    report = mmaccel.export_onnx(model, {"input_ids": ids, "attention_mask": mask}, folder, generation=True)
    return model, folder, report


def test_greedy_matches_hf_eager_with_left_padding(exported) -> None:
    model, folder, _ = exported
    generator = mmaccel.OnnxGenerator(folder)
    for lengths in ([7, 4], [5]):  # a left-padded batch, and batch 1 (exported with batch 2)
        ids, mask = left_padded_batch(lengths, seed=len(lengths))
        expected = hf_generate(model, ids, mask, max_new_tokens=9, do_sample=False)
        actual = mmaccel.onnx_generate(generator, ids, mask, max_new_tokens=9, pad_token_id=0)
        assert isinstance(actual, np.ndarray)
        assert torch.equal(torch.from_numpy(actual), expected), (actual, expected)


def test_stop_token_pads_finished_rows_as_hf_does(exported) -> None:
    model, folder, _ = exported
    ids, mask = left_padded_batch([6, 6], seed=3)
    free = hf_generate(model, ids, mask, max_new_tokens=8, do_sample=False, eos_token_id=[])
    stop = int(free[0, 6 + 2])
    expected = hf_generate(model, ids, mask, max_new_tokens=8, do_sample=False, eos_token_id=[stop, 99])
    actual = mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=8, eos_token_id=[stop, 99], pad_token_id=0)
    assert torch.equal(torch.from_numpy(actual), expected)


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported) -> None:
    _, folder, _ = exported
    generator = mmaccel.OnnxGenerator(folder)
    ids, mask = left_padded_batch([5, 5], seed=4)
    sample = dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=[])
    first = mmaccel.onnx_generate(generator, ids, mask, seed=7, **sample)
    assert np.array_equal(first, mmaccel.onnx_generate(generator, ids, mask, seed=7, **sample))
    assert not np.array_equal(first, mmaccel.onnx_generate(generator, ids, mask, seed=8, **sample))
    greedy = mmaccel.onnx_generate(generator, ids, mask, max_new_tokens=6, eos_token_id=[])
    assert np.array_equal(mmaccel.onnx_generate(generator, ids, mask, seed=7, **{**sample, "top_k": 1}), greedy)


def test_sessions_spin_briefly_unless_asked(exported) -> None:
    """ONNX Runtime's workers spin between kernels by default, which on a shared CPU takes the main thread's time
    slices (bench/onnx_spinning.py): OnnxGenerator bounds the spin to 20 us for every graph; spin_us=0 turns it
    off, spin_us=None keeps ONNX Runtime's default; tokens are the same either way."""
    _, folder, _ = exported
    ids, mask = left_padded_batch([5], seed=5)
    generators = {spin_us: mmaccel.OnnxGenerator(folder, spin_us=spin_us) for spin_us in (20, 0, None)}
    for session in generators[20].sessions.values():
        assert session.get_session_options().get_session_config_entry("session.intra_op.spin_duration_us") == "20"
    never, default = (generators[k].sessions["decoder"].get_session_options() for k in (0, None))
    assert never.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: ONNX Runtime's default
        default.get_session_config_entry("session.intra_op.allow_spinning")
    tokens = [mmaccel.onnx_generate(g, ids, mask, max_new_tokens=4, eos_token_id=[]) for g in generators.values()]
    assert all(np.array_equal(tokens[0], t) for t in tokens[1:])


def test_folder_layout_and_passes(exported) -> None:
    """Optimum's names and dynamic dims, a manifest that says so, standard ONNX only; the passes fired."""
    model, folder, report = exported
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    config = manifest["config"]
    head_dim = head_dim_of(model)
    fused_ops = fused_per_layer(head_dim)
    assert config == {**config, "num_layers": hf_tiny.LAYERS, "num_kv_heads": 2, "head_dim": head_dim,
                      "vocab_size": 100, "dtype": "float32", "eos_token_id": [2], "pad_token_id": 0}
    decoder = manifest["graphs"]["decoder"]
    inputs = {i["name"]: i["shape"] for i in decoder["inputs"]}
    outputs = {o["name"]: o["shape"] for o in decoder["outputs"]}
    assert inputs["input_ids"] == inputs["position_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert outputs["logits"] == ["batch_size", "sequence_length", 100]
    for layer in range(hf_tiny.LAYERS):
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{layer}.{kind}"] == ["batch_size", 2, "past_sequence_length", head_dim]
            assert outputs[f"present.{layer}.{kind}"][2] in ("past_sequence_length + sequence_length",
                                                             "sequence_length + past_sequence_length")
    decoder = onnx.load(os.path.join(folder, "decoder.onnx"), load_external_data=False)
    contrib = {f"{n.domain}::{n.op_type}" for n in decoder.graph.node if n.domain not in ("", "ai.onnx")}
    assert contrib == {f"com.microsoft::{op}" for op in fused_ops}, contrib
    for op, per_layer in fused_ops.items():  # compiler/onnx_fusions.py fired on every layer
        assert sum(n.op_type == op for n in decoder.graph.node) == per_layer * hf_tiny.LAYERS, op
    assert config["max_positions"] == model.config.max_position_embeddings
    assert config["past_present_share_buffer"] is True  # onnx_generate's SharedCache
    graph = report.graphs[0]
    assert graph.status == "optimized" and not [p for p in graph.passes if p.error], f"\n{report}"
    assert graph.count(SDPA) == hf_tiny.LAYERS and graph.count(torch.ops.aten._softmax) == 0, f"\n{report}"
    if model.config._attn_implementation == "eager":
        assert graph.matched("attention_fusion") == hf_tiny.LAYERS, f"\n{report}"
    assert graph.matched("parallel_linear_fusion") >= hf_tiny.LAYERS
    # the embedding table read from the head's only where the head is tied (Qwen2's; Llama's is its own)
    assert graph.matched("onnx_share_tied_embedding") == int(model.config.tie_word_embeddings), f"\n{report}"
    # every RMSNorm (2 per layer + the final one) as Div(x, Sqrt); those after a residual add become
    # SkipSimplifiedLayerNormalization, the first one ONNX Runtime fuses at session start
    assert graph.matched("onnx_divide_by_square_roots") == 2 * hf_tiny.LAYERS + 1, f"\n{report}"
    assert fused_op_count(os.path.join(folder, "decoder.onnx"), "SimplifiedLayerNormalization") == 1
    # and per layer 2 linear groups (q/k/v, gate/up) on 3D inputs, their Reshapes gone; q/k/v packed into
    # GroupQueryAttention where it rotates them, their Split gone; the other Splits (gate/up, q/k/v where not
    # packed) one MatMul per part; a tied head's embedding gathers rows (ONNX Runtime folds their Transpose)
    packed = 0 if "RotaryEmbedding" in fused_ops else 1
    tied = int(model.config.tie_word_embeddings)
    assert graph.matched("onnx_contrib_fusion") == (sum(fused_ops.values()) + 4) * hf_tiny.LAYERS + tied, report
    assert fused_op_count(os.path.join(folder, "decoder.onnx"), "Split") == 0
    assert fused_op_count(os.path.join(folder, "decoder.onnx"), "Transpose") == 0
    # Qwen2's q/k/v biases are zeros at init (HF zeroes nn.Linear biases): their Adds leave
    biased = model.config.model_type == "qwen2"
    assert graph.matched("onnx_drop_zero_biases") == hf_tiny.LAYERS * biased, f"\n{report}"
    # HF's mask (Range, GatherND, a Reshape, ...) gone: attention_bias is attention_mask's pads alone
    assert fused_op_count(os.path.join(folder, "decoder.onnx"), "Reshape") == 0
    assert not [n for n in report.graphs[0].passes if n.name == "onnx_contrib_fusion"][0].near_misses


def fused_op_count(path: str, op_type: str) -> int:
    """How many `op_type` nodes ONNX Runtime's optimized graph of the file at `path` holds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = path + ".optimized.onnx"
    ort.InferenceSession(path, options)
    try:
        return sum(n.op_type == op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    finally:
        os.remove(options.optimized_model_filepath)


def test_divide_by_square_roots_leaves_near_misses_alone() -> None:
    """Mul(x, Reciprocal(Sqrt(v))) becomes Div(x, Sqrt(v)) with the same output; a Reciprocal read twice, or of
    something other than a Sqrt, stays."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from mmaccel.compiler.onnx_rewrites import divide_by_square_roots

    node = helper.make_node
    nodes = [node("Sqrt", ["v"], ["s"]), node("Reciprocal", ["s"], ["r"]), node("Mul", ["x", "r"], ["a"]),
             node("Sqrt", ["v"], ["s2"]), node("Reciprocal", ["s2"], ["r2"]), node("Mul", ["x", "r2"], ["b"]),
             node("Add", ["r2", "x"], ["c"]),  # a second reader of r2
             node("Reciprocal", ["v"], ["r3"]), node("Mul", ["r3", "x"], ["d"])]  # not of a Sqrt
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [4])
    model = helper.make_model(helper.make_graph(nodes, "g", [value("x"), value("v")], [value(n) for n in "abcd"]),
                              opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"x": np.array([1.0, -2.0, 3.0, 0.5], np.float32), "v": np.array([4.0, 2.0, 0.25, 9.0], np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    assert divide_by_square_roots(model.graph) == 1
    assert [n.op_type for n in model.graph.node].count("Reciprocal") == 2
    assert next(n for n in model.graph.node if n.output[0] == "a").op_type == "Div"
    after = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    for x, y in zip(after, before):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    assert divide_by_square_roots(model.graph) == 0  # idempotent


@pytest.fixture(scope="module")
def portable(exported, tmp_path_factory):
    """(model, folder): `exported`'s model exported again with portable=True (standard ONNX ops only)."""
    model = exported[0]
    ids, mask = left_padded_batch([7, 4])
    folder = str(tmp_path_factory.mktemp("portable") / "onnx")
    mmaccel.export_onnx(model, {"input_ids": ids, "attention_mask": mask}, folder, generation=True, portable=True)
    return model, folder


def decoder_outputs(path: str, lengths: list[int], past: int) -> list[np.ndarray]:
    """ONNX Runtime's outputs of the decoder at `path` for a left-padded batch with `past` random past positions:
    the logits of the last position and each present's rows without padding."""
    import onnxruntime as ort

    session = ort.InferenceSession(path)
    ids, mask = (t.numpy() for t in left_padded_batch(lengths, seed=past))
    mask = np.concatenate([np.ones((len(lengths), past), np.int64), mask], 1)
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[:, past:]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    rng = np.random.default_rng(past)
    for i in session.get_inputs()[3:]:
        feeds[i.name] = rng.standard_normal((len(lengths), i.shape[1], past, i.shape[3])).astype(np.float32)
    logits, *present = session.run(None, feeds)
    return [logits[:, -1], *[p[:, :, past + max(lengths) - min(lengths):] for p in present]]


def test_portable_export_is_standard_and_the_fusion_matches_it(portable, exported, tmp_path) -> None:
    """portable=True writes standard ONNX only; the default file's contrib ops give ONNX Runtime's outputs of
    the portable one, for left-padded prompts and for steps after a past (pads' K/V rows aside: masked)."""
    model, folder = portable
    assert_standard_onnx(os.path.join(folder, "decoder.onnx"))
    config = json.load(open(os.path.join(folder, "manifest.json")))["config"]
    assert "max_positions" not in config and "past_present_share_buffer" not in config
    fused = os.path.join(exported[1], "decoder.onnx")
    for lengths, past in (([6, 3], 0), ([1, 1], 5), ([3], 4), ([4, 2], 3)):  # a batch of several new tokens after a past too
        for got, want in zip(decoder_outputs(fused, lengths, past),
                             decoder_outputs(os.path.join(folder, "decoder.onnx"), lengths, past)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    ids, mask = left_padded_batch([7, 4], seed=3)
    assert np.array_equal(mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=6, pad_token_id=0),
                          mmaccel.onnx_generate(exported[1], ids, mask, max_new_tokens=6, pad_token_id=0))


def test_fusion_leaves_near_misses_alone(portable, tmp_path) -> None:
    """A layer whose rotation is not HF's rotate_half is left as it was, and so is a flattened linear whose
    output is read twice (kept fused with its Split too), each with the reason; the others fuse; a second run
    changes nothing."""
    from mmaccel.compiler.onnx_fusions import fuse_contrib_ops, linears_on_3d_inputs

    proto = onnx.load(os.path.join(portable[1], "decoder.onnx"))
    halves = [n for n in proto.graph.node if n.op_type == "Concat" and len(n.input) == 2
              and any(p.op_type == "Neg" and p.output[0] == n.input[0] for p in proto.graph.node)]
    halves[-1].input[:] = list(halves[-1].input)[::-1]  # the last layer's k: [x1, -x2], not [-x2, x1]
    gate_up = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[0].startswith("view")][-1]
    proto.graph.node.append(onnx.helper.make_node("Identity", [gate_up.output[0]], ["read_twice"]))
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info("read_twice"))
    counts, near = fuse_contrib_ops(proto.graph, 64)
    attention = {op: n * (hf_tiny.LAYERS - 1) for op, n in fused_per_layer(head_dim_of(portable[0])).items()
                 if op != "SkipSimplifiedLayerNormalization"}
    packed = {} if "RotaryEmbedding" in attention else {"packed QKV": hf_tiny.LAYERS - 1}
    # Splits made one MatMul per part: every gate/up but the one read twice, and q/k/v where not packed
    split = hf_tiny.LAYERS - 1 + (hf_tiny.LAYERS if not packed else 1)
    tied = {"tied table rows": 1} if portable[0].config.tie_word_embeddings else {}
    assert counts == {**attention, **packed, "SkipSimplifiedLayerNormalization": 2 * hf_tiny.LAYERS,
                      "3D linear groups": 2 * hf_tiny.LAYERS - 1, "split linears": split, **tied}, counts
    assert len(near) == 3 and "not rotate_half" in near[0] and "read 2 times" in near[1], near
    assert "read elsewhere too" in near[2], near
    assert sum(n.op_type == "Softmax" for n in proto.graph.node) == 1
    assert fuse_contrib_ops(proto.graph, 64) == ({}, near[:1])  # idempotent; the near-miss stays
    assert linears_on_3d_inputs(proto.graph) == (0, near[1:2])


def test_only_a_mask_of_attention_mask_alone_becomes_the_padding_bias() -> None:
    """HF's mask, whose values come from attention_mask alone (other inputs through their shapes), is replaced
    by attention_mask's pads (GroupQueryAttention masks causally itself); a mask that also reads another
    input's values is kept whole as the bias, with the reason."""
    from onnx import TensorProto, helper
    from mmaccel.compiler.onnx_fusions import Graph, Shared

    node = helper.make_node
    nodes = [node("Cast", ["attention_mask"], ["keep"], to=TensorProto.BOOL), node("Shape", ["input_ids"], ["n"]),
             node("Expand", ["keep", "n"], ["hf_mask"]),  # attention_mask's values, input_ids' shape
             node("Cast", ["input_ids"], ["ids_bool"], to=TensorProto.BOOL),
             node("And", ["hf_mask", "ids_bool"], ["other_mask"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "T"]) for n in
              ("attention_mask", "input_ids", "position_ids")]
    graph = helper.make_graph(nodes, "g", inputs, [])
    shared = Shared(Graph(graph), 64)
    assert shared.bias("hf_mask", additive=False) == "_fusion_padding_bias"
    for _ in range(2):  # every layer reads it: one Where, one reason
        assert shared.bias("other_mask", additive=False) == "other_mask_bias"
    assert len(shared.near) == 1 and "reads ['attention_mask', 'input_ids']" in shared.near[0], shared.near
    assert sum(n.op_type == "Where" for n in shared.nodes) == 2  # the padding bias's and other_mask's


def test_generation_past_the_rotary_tables_is_refused(exported) -> None:
    """The fused decoder's rotary tables hold max_position_embeddings (64) positions; the loop stops before."""
    _, folder, _ = exported
    ids, mask = left_padded_batch([60])
    assert mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=5).shape == (1, 65)  # last position fed: 63
    with pytest.raises(ValueError, match="position 64 is past the 64 positions"):
        mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=6)


def test_shared_buffer_loop_equals_the_growing_loop(exported, portable) -> None:
    """The fused decoder runs with one K/V buffer per key and value, written in place by GroupQueryAttention
    (SharedCache): tokens equal the loop that grows the past (share_buffer=False), left-padded, greedy and
    sampled; the portable decoder (presents from Concat) is never run so, as the export's check says."""
    from mmaccel.compiler.onnx_fusions import share_buffer_check
    from mmaccel.compiler.onnx_generate import GrowingCache, SharedCache

    _, folder, report = exported
    fusion = next(p for p in report.graphs[0].passes if p.name == "onnx_contrib_fusion")
    assert "past and present share one buffer" in fusion.changes[0], fusion.changes
    shared, growing = mmaccel.OnnxGenerator(folder), mmaccel.OnnxGenerator(folder, share_buffer=False)
    assert isinstance(shared._cache(np.ones((2, 9), np.int64), None), SharedCache)
    assert isinstance(growing._cache(np.ones((2, 9), np.int64), None), GrowingCache)
    for lengths, options in (([7, 4], {}), ([5], {}), ([6, 6], dict(do_sample=True, top_k=20, seed=3))):
        ids, mask = left_padded_batch(lengths, seed=len(lengths))
        tokens = [mmaccel.onnx_generate(g, ids, mask, max_new_tokens=7, eos_token_id=[], **options)
                  for g in (shared, growing)]
        assert np.array_equal(*tokens), tokens
    ids, mask = left_padded_batch([5], seed=1)  # the prompt's 5 positions written in place, the rest untouched
    cache = shared._cache(np.concatenate([mask.numpy(), np.ones((1, 3), np.int64)], 1), None)
    cache.run(ids.numpy(), 5, np.arange(5)[None])
    assert all(np.abs(b[:, :, :5]).min() > 0 and not b[:, :, 5:].any() for b in cache.buffers.values())
    assert mmaccel.OnnxGenerator(portable[1])._cache(np.ones((1, 8), np.int64), None).__class__ is GrowingCache
    assert share_buffer_check(os.path.join(portable[1], "decoder.onnx"), [], []) == \
        "past and present apart: a present is not a GroupQueryAttention's output"


def test_a_full_buffer_is_refused_naming_max_length(exported) -> None:
    """OnnxGenerator(max_length=...) holds that many positions; a call that needs more is refused before any
    run (the growing loop's too), one that fits gives the same tokens."""
    _, folder, _ = exported
    ids, mask = left_padded_batch([7, 4], seed=2)
    bounded = mmaccel.OnnxGenerator(folder, max_length=11)
    want = mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=5, eos_token_id=[])
    assert np.array_equal(mmaccel.onnx_generate(bounded, ids, mask, max_new_tokens=5, eos_token_id=[]), want)
    for generator in (bounded, mmaccel.OnnxGenerator(folder, share_buffer=False, max_length=11)):
        with pytest.raises(ValueError, match=r"holds max_length=11 positions; this call needs 12"):
            mmaccel.onnx_generate(generator, ids, mask, max_new_tokens=6)


RUN_WITHOUT_TORCH = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np
    sys.modules["torch"] = None  # any `import torch` now fails
    module_path, folder, prompt_path, out_path = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("onnx_generate", module_path)
    runtime = sys.modules["onnx_generate"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    prompt = np.load(prompt_path)
    np.save(out_path, runtime.onnx_generate(folder, prompt["ids"], prompt["mask"], max_new_tokens=5, pad_token_id=0))
    assert not [m for m in sys.modules if m.split(".")[0] in ("mmaccel", "compiler") or m == "torch._C"]
""")


def test_generation_runs_without_torch_or_mmaccel(exported, tmp_path) -> None:
    model, folder, _ = exported
    ids, mask = left_padded_batch([6, 3])
    np.savez(tmp_path / "prompt.npz", ids=ids.numpy(), mask=mask.numpy())
    script = tmp_path / "run.py"
    script.write_text(RUN_WITHOUT_TORCH)
    module = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "compiler", "onnx_generate.py")
    subprocess.run([sys.executable, str(script), module, folder, str(tmp_path / "prompt.npz"), str(tmp_path / "out.npy")],
                   check=True, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    expected = hf_generate(model, ids, mask, max_new_tokens=5, do_sample=False)
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected.numpy())


def test_graph_from_another_export_is_refused(exported, tmp_path) -> None:
    _, folder, _ = exported
    mixed = str(tmp_path / "mixed")
    shutil.copytree(folder, mixed)
    proto = onnx.load(os.path.join(mixed, "decoder.onnx"))
    for prop in proto.metadata_props:
        if prop.key == "mmaccel.export_id":
            prop.value = "another-export"
    onnx.save(proto, os.path.join(mixed, "decoder.onnx"))
    with pytest.raises(ManifestError, match="mixes files of different exports"):
        mmaccel.OnnxGenerator(mixed)
    os.remove(os.path.join(mixed, "manifest.json"))
    with pytest.raises(ManifestError, match="no manifest.json"):
        mmaccel.OnnxGenerator(mixed)


def test_pixel_values_without_a_vision_graph_are_refused(exported) -> None:
    _, folder, _ = exported
    ids, _ = hf_tiny.token_batch(1, 4)
    with pytest.raises(ValueError, match="no vision graph"):
        mmaccel.onnx_generate(folder, ids, pixel_values=np.zeros((1, 3, 32, 32), np.float32), max_new_tokens=2)


# ------------------------------------------------------------------------------------ LLaVA

@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    model = hf_tiny.llava()
    ids, pixels = hf_tiny.llava_prompt(3, 4)
    folder = str(tmp_path_factory.mktemp("llava") / "onnx")
    report = mmaccel.export_onnx(model, {"input_ids": ids, "pixel_values": pixels}, folder, generation=True)
    return model, folder, report


def _llava_batch(prompts: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image prompts of different lengths, left-padded into one batch; one image each."""
    rows = [hf_tiny.llava_prompt(before, after, seed=i) for i, (before, after) in enumerate(prompts)]
    width = max(ids.shape[1] for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, _) in enumerate(rows):
        ids[row, width - prompt.shape[1]:], mask[row, width - prompt.shape[1]:] = prompt, 1
    return ids, mask, torch.cat([pixels for _, pixels in rows])


@pytest.mark.coverage
def test_llava_matches_hf_eager(llava_folder) -> None:
    """Vision graph -> features merged at the placeholders -> decoder over embeddings: HF eager's tokens."""
    model, folder, report = llava_folder
    generator = mmaccel.OnnxGenerator(folder)
    assert sorted(generator.sessions) == ["decoder", "embed", "vision"]
    for prompts in ([(3, 5)], [(1, 2), (4, 3)]):
        ids, mask, pixels = _llava_batch(prompts)
        expected = hf_generate(model, ids, mask, pixel_values=pixels, max_new_tokens=6, do_sample=False)
        actual = mmaccel.onnx_generate(generator, ids, mask, pixel_values=pixels, max_new_tokens=6, pad_token_id=0)
        assert torch.equal(torch.from_numpy(actual), expected), (actual, expected)
    ids, pixels = hf_tiny.llava_prompt(1, 2)
    with pytest.raises(ValueError, match="15 image placeholder tokens"):  # the first placeholder cut off
        mmaccel.onnx_generate(generator, ids[:, 2:], pixel_values=pixels, max_new_tokens=2)
    for name in ("embed", "vision"):
        assert_standard_onnx(os.path.join(folder, f"{name}.onnx"))
    assert fused_op_count(os.path.join(folder, "decoder.onnx"), "GroupQueryAttention") == hf_tiny.LAYERS
    assert all(g.status == "optimized" and not [p for p in g.passes if p.error] for g in report.graphs), f"\n{report}"


@pytest.mark.coverage
def test_whisper_matches_hf_generic_generate(tmp_path) -> None:
    """Encoder graph -> cross-attention K/V, read by every decoder step. Compared with transformers'
    GenerationMixin.generate (decoder prompt + new tokens), as tests/test_generation.py does."""
    from transformers import GenerationMixin
    model = hf_tiny.whisper()
    features = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(2))
    mmaccel.export_onnx(model, {"input_features": features}, tmp_path / "onnx", generation=True)
    generator = mmaccel.OnnxGenerator(tmp_path / "onnx")
    manifest = generator.manifest
    assert [o["shape"] for o in manifest["graphs"]["encoder"]["outputs"]] == [["batch_size", 4, 20, 8]] * 4
    assert manifest["config"]["decoder_start_token_id"] == 3
    for batch, new in ((2, 6), (1, 9)):
        features = torch.randn(batch, 16, 40, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = GenerationMixin.generate(model, features, max_new_tokens=new, do_sample=False)
        actual = mmaccel.onnx_generate(generator, input_features=features, max_new_tokens=new)
        assert torch.equal(torch.from_numpy(actual), expected), (actual, expected)
    for name in ("encoder", "decoder"):
        assert_standard_onnx(str(tmp_path / "onnx" / f"{name}.onnx"))
    with pytest.raises(ValueError, match="give input_features"):
        mmaccel.onnx_generate(generator, torch.tensor([[3]]), max_new_tokens=2)


# ------------------------------------------------------------------------------------ int4 as MatMulNBits

def matmul_nbits_model(n: int, k: int, group: int):
    """(ONNX model of one com.microsoft::MatMulNBits holding a random int4 weight, its input x [3, k],
    int4_linear's output on x)."""
    from onnx import TensorProto, helper, numpy_helper
    from mmaccel.ops.int4_linear import int4_linear_reference, quantize_int4_groupwise
    from mmaccel.ops.int4_matmul_nbits import int4_matmul_nbits_reference, to_matmul_nbits

    torch.manual_seed(0)
    packed, scale, zero = quantize_int4_groupwise(torch.randn(n, k), group)
    b, scales, zero_points = to_matmul_nbits(packed, scale, zero, group)
    x = torch.randn(3, k)
    expected = int4_linear_reference(x, packed, scale, zero, group, None, "none", None)
    assert torch.equal(int4_matmul_nbits_reference(x, b, scales, zero_points, None, "none", None), expected)
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=group)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(t.numpy(), name) for name, t in
                               zip("bsz", (b, scales, zero_points))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return model, x, expected


@pytest.mark.parametrize("n, k, group", [(48, 96, 32), (40, 256, 128)])  # 3 blocks: an odd zero-point count
def test_matmul_nbits_layout_is_what_onnxruntime_reads(n, k, group) -> None:
    """The repacked weight, run by ONNX Runtime's MatMulNBits kernel alone, gives int4_linear's output."""
    import onnxruntime as ort

    model, x, expected = matmul_nbits_model(n, k, group)
    actual = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-5, atol=1e-4)


def accuracy_levels(path) -> list[int]:
    """Each MatMulNBits' accuracy_level in the file (0, ONNX Runtime's default, where the attribute is absent)."""
    proto = onnx.load(str(path), load_external_data=False)
    return [next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
            for n in proto.graph.node if n.op_type == "MatMulNBits"]


def with_fp32_activations(folder, copy) -> str:
    """`folder` copied to `copy` (same export id, so it loads as a folder), its decoder's MatMulNBits reset to
    accuracy_level 0: ONNX Runtime's exact kernel, whose output is the quantized graph's. The decoder's path."""
    from mmaccel.compiler.export_accuracy_level import set_accuracy_level

    shutil.copytree(folder, copy)
    path = str(copy / "decoder.onnx")
    proto = onnx.load(path)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            set_accuracy_level(node, 0)
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("budget, level", [(0.5, 4), (1e-9, 0)])
def test_int8_activations_only_within_the_budget(budget, level, tmp_path) -> None:
    """accuracy_level=4 (int8 activations) is written when ONNX Runtime's error against the reference fits the
    budget, and measured on ONNX Runtime's output; over it the file is left as it was, with a warning."""
    from mmaccel.compiler.errors import MmaccelFallbackWarning
    from mmaccel.compiler.export_accuracy_level import int8_activation_matmuls

    model, x, expected = matmul_nbits_model(48, 256, 32)
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    if level == 0:  # the reference is the int4 weight with fp32 activations: ~0 error at level 0
        with pytest.warns(MmaccelFallbackWarning, match="left at accuracy_level 0"):
            result = int8_activation_matmuls(path, [x], [expected], budget)
    else:
        result = int8_activation_matmuls(path, [x], [expected], budget)
    assert accuracy_levels(path) == [level] and result.matched == (1 if level else 0), result.changes
    assert result.lossy and os.listdir(tmp_path) == ["m.onnx"]  # the candidate file is gone either way
    if level:  # the int8 rounding is measured, not zero, and within the budget
        assert 1e-5 < result.measured_error <= budget
    else:
        assert result.measured_error < 1e-5 and "rolled back" in result.changes[0]



@pytest.mark.coverage
def test_int4_decoder_runs_matmul_nbits(tmp_path) -> None:
    """quantize="int4_weight_only": every int4 linear of the decoder is one MatMulNBits, and with fp32
    activations (accuracy_level 0) ONNX Runtime's output is the quantized graph's (the error the lossy pass
    measured is the file's; the int8 activations of the file as written add the error their own pass measured)."""
    import onnxruntime as ort

    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    report = mmaccel.export_onnx(model, {"input_ids": ids}, tmp_path / "onnx", generation=True,
                                 quantize="int4_weight_only", accuracy_budget=0.5)
    graph = report.graphs[0]
    quantized = graph.count(torch.ops.mmaccel.int4_matmul_nbits)
    assert quantized == 9 and graph.count(torch.ops.mmaccel.int4_linear) == 0, f"\n{report}"  # 7 per layer + head
    proto = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"))
    assert sum(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in proto.graph.node) == quantized
    inputs = one_step(graph.context.example_inputs)
    with torch.no_grad():
        expected = graph.final_graph(*inputs)
    session = ort.InferenceSession(with_fp32_activations(tmp_path / "onnx", tmp_path / "exact"))
    actual = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    for a, e in zip(actual, expected):
        torch.testing.assert_close(torch.from_numpy(a), e, rtol=1e-4, atol=1e-5)
    tokens = mmaccel.onnx_generate(tmp_path / "onnx", ids, mask, max_new_tokens=4, pad_token_id=0)
    assert tokens.shape == (2, 7 + 4)


def one_step(trace_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One new token per row after the trace inputs' past: a batch GroupQueryAttention takes with a past."""
    ids, mask, _, *past = trace_inputs
    batch, length = ids.shape[0], past[0].shape[2]
    return [ids[:, :1], mask.new_ones(batch, length + 1), torch.full((batch, 1), length), *past]


def greedy_with_graph(gm: torch.fx.GraphModule, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy tokens of the exported decoder graph itself, run by torch (batch without padding)."""
    past = [torch.zeros(ids.shape[0], 2, 0, 8)] * (2 * hf_tiny.LAYERS)
    tokens = step = ids
    with torch.no_grad():
        for _ in range(new):
            positions = torch.arange(tokens.shape[1] - step.shape[1], tokens.shape[1]).expand(ids.shape[0], -1)
            logits, *past = gm(step, torch.ones_like(tokens), positions, *past)
            step = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step], dim=1)
    return tokens


# in the opt-in long set (-m coverage, 30 s; CI time): the rewrite itself is checked on a toy graph by default
@pytest.mark.coverage
def test_int4_export_with_a_tied_head_reads_the_embedding_from_the_head(tmp_path) -> None:
    """Qwen2 ties lm_head to the token embedding: the head stays MatMulNBits and the embedding reads the head's own
    4-bit weights through GatherBlockQuantized (the table once in the file, as ONNX Runtime GenAI's builder stores
    it; no fp32 or int8 table left, nor in ONNX Runtime's optimized graph), its error in the report; the
    MatMulNBits take int8 activations (accuracy_level 4, ONNX Runtime's error measured and in the report), and
    with that level reset to 0 ONNX Runtime's outputs and greedy tokens are the quantized graph's own."""
    import onnxruntime as ort
    from mmaccel.compiler.export_accuracy_level import NAME as LEVEL_PASS

    report = mmaccel.export_onnx(hf_tiny.qwen2(), {"input_ids": left_padded_batch([7, 4])[0]}, tmp_path / "onnx",
                                 generation=True, quantize="int4_weight_only", accuracy_budget=0.5)
    graph = report.graphs[0]
    assert graph.count(torch.ops.mmaccel.int4_matmul_nbits) == 9, f"\n{report}"  # 4 per layer + the tied head
    assert graph.count(torch.ops.mmaccel.int4_embedding_nbits) == 1 and graph.count(torch.ops.aten.embedding) == 0
    assert graph.count(torch.ops.mmaccel.int8_embedding) == 0
    embedding = next(p for p in graph.passes if p.name == "quantize_embedding")
    assert embedding.lossy and 0 < embedding.measured_error <= 0.5 and "tied int4 head" in embedding.changes[0]
    level = next(p for p in graph.passes if p.name == LEVEL_PASS)
    assert level.lossy and level.matched == 9 and 0 < level.measured_error <= 0.5, level.changes
    assert accuracy_levels(tmp_path / "onnx" / "decoder.onnx") == [4] * 9
    path = with_fp32_activations(tmp_path / "onnx", tmp_path / "exact")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(path, options)
    for proto in (onnx.load(path), onnx.load(options.optimized_model_filepath)):
        assert not [i.name for i in proto.graph.initializer if list(i.dims) == [hf_tiny.VOCAB, 32]]
        gather = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
        heads = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and list(n.input[1:2]) == gather[0].input[:1]]
        assert len(gather) == 1 and len(heads) == 1  # the one packed table both read
    inputs = one_step(graph.context.example_inputs)
    with torch.no_grad():
        expected = graph.final_graph(*inputs)
    actual = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    for a, e in zip(actual, expected):
        torch.testing.assert_close(torch.from_numpy(a), e, rtol=1e-4, atol=1e-5)
    ids, _ = hf_tiny.token_batch(1, 6, seed=5)
    tokens = mmaccel.onnx_generate(tmp_path / "exact", ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(torch.from_numpy(tokens), greedy_with_graph(graph.final_graph, ids, 8))

    # Near-miss: a budget below the shared table's error but above the int8 rows' gives the int8 rows (the first
    # candidate's error in the report); an untied head is tests/test_export_embeddings.py's
    tighter = embedding.measured_error * 0.99
    report = mmaccel.export_onnx(hf_tiny.qwen2(), {"input_ids": left_padded_batch([7, 4])[0]}, tmp_path / "int8",
                                 generation=True, quantize="int4_weight_only", accuracy_budget=tighter)
    graph = report.graphs[0]
    embedding = next(p for p in graph.passes if p.name == "quantize_embedding")
    assert graph.count(torch.ops.mmaccel.int8_embedding) == 1, embedding.changes
    assert "int8 per row" in embedding.changes[0] and "tried first, over budget" in embedding.changes[1]
    assert embedding.measured_error <= tighter


def test_a_tied_head_and_its_embedding_share_one_table_in_the_file(tmp_path, monkeypatch) -> None:
    """Qwen2 ties lm_head to the token embedding: the fp32 file holds the table once (the Gather reads the head's
    transposed copy, axis 1, then a Transpose), also when the weights are stored beside the model, whose data
    file then drops the table's bytes; greedy tokens still equal HF eager's."""
    monkeypatch.setattr(export_generation, "EXTERNAL_DATA_BYTES", 0)  # external data, as a model over 1.8 GB
    model = hf_tiny.qwen2()
    ids, mask = left_padded_batch([7, 4])
    folder = tmp_path / "onnx"
    report = mmaccel.export_onnx(model, {"input_ids": ids, "attention_mask": mask}, folder, generation=True)
    assert report.graphs[0].matched("onnx_share_tied_embedding") == 1, f"\n{report}"
    decoder = onnx.load(folder / "decoder.onnx", load_external_data=False)
    tables = [i for i in decoder.graph.initializer if sorted(i.dims) == sorted([hf_tiny.VOCAB, 32])]
    assert len(tables) == 1 and list(tables[0].dims) == [32, hf_tiny.VOCAB], [list(t.dims) for t in tables]
    data = [f for f in os.listdir(folder) if f.endswith(".data")]
    referenced = sum(int(next(e.value for e in t.external_data if e.key == "length"))
                     for t in decoder.graph.initializer if t.external_data)
    assert data and os.path.getsize(folder / data[0]) < referenced + 4096 * len(decoder.graph.initializer)
    onnx.checker.check_model(str(folder / "decoder.onnx"))
    ids, mask = left_padded_batch([6, 3], seed=2)
    expected = hf_generate(model, ids, mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(torch.from_numpy(mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=6, pad_token_id=0)),
                       expected)


# ------------------------------------------------------------------------------------ refusals, staging

def _half_written(spec, staged, *args):
    with open(os.path.join(staged, f"{spec.name}.onnx"), "w") as f:
        f.write("half")
    raise ExportError("conversion failed")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_export_leaves_no_folder_and_an_existing_one_untouched(existing, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(export_generation, "_export_graph", _half_written)
    folder = tmp_path / "out"
    if existing:
        folder.mkdir()
        (folder / "keep.txt").write_text("old")
    ids, mask = hf_tiny.token_batch(2, 4)
    with pytest.raises(ExportError, match="conversion failed"):
        mmaccel.export_onnx(hf_tiny.llama("sdpa"), {"input_ids": ids}, folder, generation=True)
    assert sorted(os.listdir(tmp_path)) == (["out"] if existing else [])
    if existing:
        assert os.listdir(folder) == ["keep.txt"] and (folder / "keep.txt").read_text() == "old"


def test_sliding_window_decoder_matches_hf_past_the_window(tmp_path) -> None:
    """A sliding-window model exports with full-length pasts, the window applied by the model's own mask, and
    the contrib fusion keeps that mask whole as GroupQueryAttention's bias (they were refused before): as a
    padding bias (a mask of attention_mask alone, as the window mask is) it would drop the window, as it did for a
    tiny Mistral once the refusal was lifted: other tokens than HF from its second new token, while the fusion's
    check on the trace's prompt and decode step, inside the window, passed.
    Greedy tokens equal HF eager well past an 8-token window, with left padding."""
    model = _sliding_window_qwen2(window=8)
    ids, mask = left_padded_batch([7, 4])
    folder = str(tmp_path / "onnx")
    report = mmaccel.export_onnx(model, {"input_ids": ids, "attention_mask": mask}, folder, generation=True)
    fusion = next(p for g in report.graphs for p in g.passes if p.name == export_generation.FUSION)
    assert fusion.matched and any("sliding windows: kept whole as the bias" in m for m in fusion.near_misses)
    expected = hf_generate(model, ids, mask, max_new_tokens=14, do_sample=False)
    actual = mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=14, pad_token_id=0)
    assert torch.equal(torch.from_numpy(actual), expected)


def _sliding_window_qwen2(window: int = 4):
    torch.manual_seed(0)
    config = hf_tiny.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                 sliding_window=window, max_window_layers=0)
    return hf_tiny.inference(hf_tiny.Qwen2ForCausalLM(config))


@pytest.mark.parametrize("build, options, match", [
    (lambda: T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                 num_heads=4)), {}, "encoder-decoder models other than Whisper"),
    (lambda: hf_tiny.inference(__import__("transformers").Lfm2ForCausalLM(__import__("transformers").Lfm2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention"]))), {},
     "full-attention and sliding-window layers only"),
    (lambda: torch.nn.Linear(4, 4), {}, "takes a Hugging Face generating model"),
    (lambda: hf_tiny.llama("sdpa"), {"prune": "mlp_channels"}, "no prune or calibration option yet"),
])
def test_unsupported_models_are_refused_before_any_work(build, options, match, tmp_path) -> None:
    ids, _ = hf_tiny.token_batch(2, 4)
    with pytest.raises(ExportError, match=match):
        mmaccel.export_onnx(build(), {"input_ids": ids}, tmp_path / "out", generation=True, **options)
    assert not os.listdir(tmp_path)


def test_images_of_a_vision_language_model_other_than_llava_are_refused(tmp_path) -> None:
    """PaliGemma with pixel_values in the example: the folder would hold its text decoder alone and drop the
    images (only onnx_generate said so, later); refused before any work, naming the way out."""
    ids, pixels = hf_tiny.vlm_inputs()
    with pytest.raises(ExportError, match="vision graph of LLaVA only.*pixel_values"):
        mmaccel.export_onnx(hf_tiny.paligemma(), {"input_ids": ids, "pixel_values": pixels}, tmp_path / "out",
                            generation=True)
    assert not os.listdir(tmp_path)


def test_dynamic_shapes_do_not_apply(tmp_path) -> None:
    ids, _ = hf_tiny.token_batch(2, 4)
    with pytest.raises(ValueError, match="dynamic_shapes does not apply"):
        mmaccel.export_onnx(hf_tiny.llama("sdpa"), {"input_ids": ids}, tmp_path / "out", generation=True,
                            dynamic_shapes=({0: torch.export.Dim("batch")},))


@pytest.mark.coverage
def test_multi_query_falcon_exports_its_one_kv_head(tmp_path) -> None:
    """Falcon's config counts no K/V heads of its own (num_kv_heads reads the attention heads) while multi_query
    gives its attention one: the past is declared from the attention module (from the config, torch.export
    failed: cat sizes 4 against 1); greedy tokens equal HF eager."""
    import transformers

    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=hf_tiny.VOCAB, hidden_size=32, num_hidden_layers=hf_tiny.LAYERS, num_attention_heads=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    ids, mask = left_padded_batch([7, 4])
    folder = str(tmp_path / "onnx")
    mmaccel.export_onnx(model, {"input_ids": ids, "attention_mask": mask}, folder, generation=True)
    assert json.load(open(os.path.join(folder, "manifest.json")))["config"]["num_kv_heads"] == 1
    expected = hf_generate(model, ids, mask, max_new_tokens=6, do_sample=False)
    actual = mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(torch.from_numpy(actual), expected)


def test_mixture_of_experts_decoder_exports_and_generates_as_hf(tmp_path) -> None:
    """Mixtral: torch.export gives transformers' expert layers an aten.empty_permuted, which torch.onnx does not
    translate (the export stopped there, naming it); now exported as an empty tensor, and the experts' matmul
    (grouped_mm_fallback) has its own translation. Greedy tokens as HF's on a left-padded batch."""
    import transformers

    config = transformers.MixtralConfig(vocab_size=hf_tiny.VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                        pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    ids, mask = left_padded_batch([7, 4])
    folder = str(tmp_path / "onnx")
    mmaccel.export_onnx(model, {"input_ids": ids, "attention_mask": mask}, folder, generation=True)
    expected = hf_generate(model, ids, mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    actual = mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=6, pad_token_id=0, eos_token_id=[])
    assert torch.equal(torch.from_numpy(actual), expected), (actual, expected)


def test_sampling_defaults_and_a_missing_mask_follow_hf(exported) -> None:
    """onnx_generate sampled from every token where HF's generate() samples from the 50 likeliest (its default when
    the generation config sets none): do_sample, temperature, top_k and top_p now default to the exported model's
    (the manifest's "sampling"), top_k=0 turns top-k off. Without an attention_mask it attended to a left-padded
    row's pads, where HF infers the mask from the pad id: the tokens differed."""
    model, folder, _ = exported
    generator = mmaccel.OnnxGenerator(folder)
    assert generator.config["sampling"] == {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                            "repetition_penalty": 1.0, "suppress_tokens": None,
                                            "begin_suppress_tokens": None}
    ids, mask = left_padded_batch([7, 4])
    sample = dict(max_new_tokens=6, do_sample=True, seed=5, eos_token_id=[], pad_token_id=0)
    assert np.array_equal(mmaccel.onnx_generate(generator, ids, mask, **sample),
                          mmaccel.onnx_generate(generator, ids, mask, top_k=50, **sample))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    actual = mmaccel.onnx_generate(generator, ids, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(torch.from_numpy(actual), expected)


def test_logits_processors_follow_hf(exported, tmp_path) -> None:
    """repetition_penalty (from the call, or from the generation config the export writes into the manifest: a
    chat model's configured penalty was ignored, silently), suppress_tokens and begin_suppress_tokens: greedy
    tokens equal HF's on a left-padded batch, and differ from plain greedy."""
    model, folder, _ = exported
    generator = mmaccel.OnnxGenerator(folder)
    ids, mask = left_padded_batch([7, 4])
    plain = hf_generate(model, ids, mask, max_new_tokens=10, do_sample=False)
    first = plain[:, ids.shape[1]].tolist()
    for processor in (dict(repetition_penalty=1.3), dict(suppress_tokens=sorted(set(plain[0, 7:].tolist()))[:3]),
                      dict(begin_suppress_tokens=first)):
        expected = hf_generate(model, ids, mask, max_new_tokens=10, do_sample=False, **processor)
        assert not torch.equal(expected, plain), processor
        actual = mmaccel.onnx_generate(generator, ids, mask, max_new_tokens=10, pad_token_id=0, **processor)
        assert torch.equal(torch.from_numpy(actual), expected), processor
    model.generation_config.repetition_penalty = 1.3
    try:
        configured = str(tmp_path / "configured")
        mmaccel.export_onnx(model, {"input_ids": ids, "attention_mask": mask}, configured, generation=True)
        expected = hf_generate(model, ids, mask, max_new_tokens=10, do_sample=False)
    finally:
        model.generation_config.repetition_penalty = 1.0
    actual = mmaccel.onnx_generate(configured, ids, mask, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(torch.from_numpy(actual), expected)


def test_repetition_penalty_counts_the_left_padding_as_the_exporting_hf_does(exported, tmp_path,
                                                                           monkeypatch) -> None:
    """transformers before 5.23 penalizes the ids of a prompt's left padding too (the export writes the rule
    into the manifest, so onnx_generate follows the HF it was exported with, installed or not)."""
    from test_generation import penalized_padding_before_5_23
    model, _, _ = exported
    ids, mask, expected = penalized_padding_before_5_23(model, monkeypatch, 10)
    folder = str(tmp_path / "before_5_23")
    mmaccel.export_onnx(model, {"input_ids": ids, "attention_mask": mask}, folder, generation=True)
    actual = mmaccel.onnx_generate(folder, ids, mask, max_new_tokens=10, pad_token_id=0, repetition_penalty=1.3)
    assert torch.equal(torch.from_numpy(actual), expected)
