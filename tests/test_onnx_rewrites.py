"""The ONNX-level rewrites that trim a decode step's nodes (issue 18), each on a toy graph: what it matches
(it fired), that ONNX Runtime's outputs stay the same, and the near-misses it must leave alone. The rewrites
on whole exported decoders: tests/test_onnx_generation.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mmaccel.compiler.onnx_fusions import split_linears, tied_table_rows  # noqa: E402
from mmaccel.compiler.onnx_rewrites import drop_zero_biases  # noqa: E402

node = helper.make_node


def model_of(nodes: list, inputs: list, outputs: list[str], initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_empty_tensor_value_info(o) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_zero_biases_leave_and_the_others_stay() -> None:
    """Add(MatMul(x, W), zeros [N]) -> the MatMul's output, Gemm's zero C dropped; same outputs. Left alone: a
    bias with one nonzero value, a zero bias that would broadcast the output wider, a matmul output also read
    elsewhere, an Add of two activations."""
    rng = np.random.default_rng(0)
    w = {f"w{i}": rng.standard_normal((4, 3)).astype(np.float32) for i in range(5)}
    consts = {**w, "zeros": np.zeros(3, np.float32), "nonzero": np.array([0, 0, 1e-30], np.float32),
              "wide": np.zeros((2, 1, 3), np.float32), "x2": rng.standard_normal((2, 4)).astype(np.float32),
              "c0": np.zeros((1, 3), np.float32), "c1": np.ones(3, np.float32)}
    nodes = [node("MatMul", ["x", "w0"], ["m0"]), node("Add", ["m0", "zeros"], ["a"]),  # drops
             node("MatMul", ["x", "w1"], ["m1"]), node("Add", ["nonzero", "m1"], ["b"]),  # one value is not 0
             node("MatMul", ["x", "w2"], ["m2"]), node("Add", ["m2", "wide"], ["c"]),  # [2, 1, 3]: broadcasts
             node("MatMul", ["x", "w3"], ["m3"]), node("Add", ["m3", "zeros"], ["d"]),
             node("Relu", ["m3"], ["e"]),  # m3 read twice
             node("Add", ["m1", "m2"], ["f"]),  # no constant
             node("Gemm", ["x2", "w4", "c0"], ["g"]), node("Gemm", ["x2", "w4", "c1"], ["h"])]  # drops; stays
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])
    model = model_of(nodes, [x], list("abcdefgh"), consts)
    feeds = {"x": rng.standard_normal((2, 5, 4)).astype(np.float32)}
    before = run(model, feeds)
    dropped = drop_zero_biases(model.graph)
    assert len(dropped) == 2 and "bias zeros" in dropped[0] and "bias c0" in dropped[1], dropped
    assert ops(model).count("Add") == 4 and "c0" not in {t.name for t in model.graph.initializer}
    assert [len(n.input) for n in model.graph.node if n.op_type == "Gemm"] == [2, 3]
    for got, want in zip(run(model, feeds), before):
        np.testing.assert_array_equal(got, want)
    assert drop_zero_biases(model.graph) == []  # idempotent


def test_split_linears_become_one_matmul_per_part() -> None:
    """MatMul(x, W [4, 2 + 3]) -> Split(last dim) becomes two MatMuls on W's columns, same outputs; a Split of a
    matmul output also read elsewhere, and one on another dim, stay."""
    rng = np.random.default_rng(1)
    consts = {"w": rng.standard_normal((4, 5)).astype(np.float32), "v": rng.standard_normal((4, 6)).astype(np.float32),
              "u": rng.standard_normal((4, 4)).astype(np.float32), "sizes": np.array([2, 3], np.int64),
              "halves": np.array([3, 3], np.int64), "rows": np.array([1, 1], np.int64)}
    nodes = [node("MatMul", ["x", "w"], ["m"]), node("Split", ["m", "sizes"], ["gate", "up"], axis=-1),
             node("MatMul", ["x", "v"], ["n"]), node("Split", ["n", "halves"], ["p", "q"], axis=2),
             node("Relu", ["n"], ["r"]),  # n read twice
             node("MatMul", ["x", "u"], ["o"]), node("Split", ["o", "rows"], ["s", "t"], axis=0)]  # the batch dim
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 4])
    model = model_of(nodes, [x], ["gate", "up", "p", "q", "r", "s", "t"], consts)
    feeds = {"x": rng.standard_normal((2, 1, 4)).astype(np.float32)}
    before = run(model, feeds)
    count, near = split_linears(model.graph)
    assert count == 1 and ops(model).count("Split") == 2 and ops(model).count("MatMul") == 4, ops(model)
    assert len(near) == 2 and "read elsewhere" in near[0] and "split on dim 0" in near[1], near
    assert "w" not in {t.name for t in model.graph.initializer}
    for got, want in zip(run(model, feeds), before):
        np.testing.assert_array_equal(got, want)
    assert split_linears(model.graph)[0] == 0


def test_tied_table_rows_gather_rows_of_a_folded_transpose(tmp_path) -> None:
    """Gather(T [D, V], ids, axis=1) -> Transpose(perm [1, 2, 0]) becomes Gather(Transpose(T), ids): same
    values, and ONNX Runtime folds the Transpose at session start (its optimized graph runs no Transpose). A
    column Gather whose result is read otherwise stays, with the reason."""
    table = np.random.default_rng(2).standard_normal((3, 7)).astype(np.float32)  # [D, V]
    nodes = [node("Gather", ["table", "ids"], ["columns"], axis=1),
             node("Transpose", ["columns"], ["embedding"], perm=[1, 2, 0]),
             node("Gather", ["table", "ids"], ["columns2"], axis=1), node("Relu", ["columns2"], ["other"])]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 2])
    model = model_of(nodes, [ids], ["embedding", "other"], {"table": table})
    feeds = {"ids": np.array([[4, 1]], np.int64)}
    before = run(model, feeds)
    count, near = tied_table_rows(model.graph)
    assert count == 1 and len(near) == 1 and "columns2" not in near[0] and "not only moved last" in near[0]
    for got, want in zip(run(model, feeds), before):
        np.testing.assert_array_equal(got, want)
    path, options = str(tmp_path / "rows.onnx"), ort.SessionOptions()
    onnx.save(model, path)
    options.optimized_model_filepath = path + ".optimized.onnx"
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    assert "Transpose" not in ops(onnx.load(options.optimized_model_filepath))
    os.remove(options.optimized_model_filepath)
    assert tied_table_rows(model.graph)[0] == 0
