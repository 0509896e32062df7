"""Quantizing a model called in a decoding loop (dynamic text length) compiles the same graphs as not quantizing
it: measuring the error must not specialize the dynamic graph to the length it was compiled at, and the
calibration samples must reach that dynamic graph."""
from __future__ import annotations

import pytest
import torch

import mmaccel
from mmaccel.models import digits

from conftest import assert_optimized

pytest.importorskip("sklearn")

IMAGES = 3
QUANTIZE = {"target": "eager", "quantize": "int8_weight_only", "accuracy_budget": 0.05}


@pytest.fixture(scope="module")
def captioner():
    return digits.load_captioner()


@pytest.fixture(scope="module")
def pixels():
    return digits.load_digits("test")[0][:IMAGES]


def caption_graphs(model: torch.nn.Module, pixels: torch.Tensor, **options) -> list[mmaccel.GraphReport]:
    torch._dynamo.reset()
    compiled = mmaccel.compile(model, **options)
    digits.caption(compiled, pixels)
    assert_optimized(compiled.mmaccel_report)
    return compiled.mmaccel_report.graphs


def dynamic_graphs(graphs: list[mmaccel.GraphReport]) -> list[mmaccel.GraphReport]:
    return [g for g in graphs if any(i.startswith("SymInt") for i in g.inputs)]


@pytest.fixture(scope="module")
def unquantized_graph_count(captioner, pixels):
    graphs = caption_graphs(captioner, pixels, target="eager")
    assert len(dynamic_graphs(graphs)) == 1  # BOS alone, then one graph for every longer prefix
    return len(graphs)


# in the opt-in long set (-m coverage, 9 s; CI time): the calibration test below checks the same graph count
@pytest.mark.coverage
def test_measuring_on_example_inputs_keeps_the_graph_dynamic(captioner, pixels, unquantized_graph_count):
    """Without calibration the pass measures on the compiled call's inputs, a size among them (a SymInt):
    running the graph on it used to guard it to that value, one recompile per caption length."""
    graphs = caption_graphs(captioner, pixels, **QUANTIZE)
    assert len(graphs) == unquantized_graph_count
    assert len(dynamic_graphs(graphs)) == 1


# in the opt-in long set (-m coverage, 28 s with its fixture; CI time): tests/test_calibration.py runs calibration
@pytest.mark.coverage
def test_calibration_reaches_the_dynamic_graph(captioner, pixels, unquantized_graph_count):
    """Samples sliced from one teacher-forcing batch (ids[:, :t], not contiguous) as bench/quantize_accuracy.py
    gives them: the dynamic graph is measured on the four longer prefixes, the static one on BOS alone."""
    train_pixels, train_labels = digits.load_digits("train")
    ids = digits.caption_ids(train_labels[:IMAGES])
    calibration = [(train_pixels[:IMAGES], ids[:, :t]) for t in range(1, 6)]
    graphs = caption_graphs(captioner, pixels, calibration=calibration, **QUANTIZE)
    assert len(graphs) == unquantized_graph_count
    assert [g.calibration_note for g in graphs] == [""] * len(graphs)
    (dynamic,) = dynamic_graphs(graphs)
    assert "on 4 calibration input(s)" in dynamic.pass_result("quantize").changes[0]
