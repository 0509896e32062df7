"""quantize_embedding (compiler/export_embeddings.py) on toy graphs: a token embedding on a frozen table becomes
int8 per row (it fired, output near the model's, the fp32 table gone) or reads a tied int4 head's bits, a table
a tied fp32 head also reads is left alone (near-miss), an int8 table over the budget is rolled back with a
warning, and a second run changes nothing."""
from __future__ import annotations

import pytest
import torch

from mmaccel.compiler.export import export_options, lower_for_export
from mmaccel.compiler.export_embeddings import EMBEDDING, quantize_embeddings
from mmaccel.compiler.report import GraphReport
from mmaccel.passes.patterns import constant_value

INT8_EMBEDDING = torch.ops.mmaccel.int8_embedding.default
VOCAB = 50


class TinyLM(torch.nn.Module):
    def __init__(self, width: int, tied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(VOCAB, width), torch.nn.Linear(width, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(ids)))


def lowered(model: torch.nn.Module, **options):
    """(graph after the pass pipeline, its inputs, the model's own outputs on them)."""
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    record = GraphReport(index=0, target="test", target_reason="test")
    gm, inputs = lower_for_export(model, (ids,), None, export_options(options), record)
    with torch.no_grad():
        return gm, inputs, [model(ids)]


def float_tables(gm: torch.fx.GraphModule) -> list[tuple[int, ...]]:
    values = [constant_value(gm, n.target) for n in gm.graph.find_nodes(op="get_attr")]
    return [tuple(v.shape) for v in values if v.is_floating_point() and v.dim() == 2 and v.shape[1] > 1]


def count(gm: torch.fx.GraphModule, target) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=target))


@pytest.mark.parametrize("tied", [False, True])
def test_table_becomes_int8_rows_and_the_fp32_table_goes(tied) -> None:
    """Untied; and tied to a head the quantize pass made int4 (width 64: groups of 32 fit), whose own int4
    weights stay while the embedding reads its int8 copy."""
    options = {"quantize": "int4_weight_only", "accuracy_budget": 0.5} if tied else {}
    gm, inputs, reference = lowered(TinyLM(64, tied), **options)
    with torch.no_grad():
        before = gm(*inputs)[0]
    result = quantize_embeddings(gm, inputs, reference, budget=0.5)
    assert result.matched == 1 and result.lossy and not result.near_misses, result
    assert count(gm, INT8_EMBEDDING) == 1 and count(gm, EMBEDDING) == 0
    assert float_tables(gm) == ([] if tied else [(VOCAB, 64)])  # the untied head's fp32 weight stays
    assert count(gm, torch.ops.mmaccel.int4_linear.default) == int(tied)
    with torch.no_grad():
        after = gm(*inputs)[0]
    error = float((after - reference[0]).norm() / reference[0].norm())
    assert result.measured_error == pytest.approx(error, rel=1e-5) and 0 < error < (0.2 if tied else 0.02)  # int4 head
    assert f"{error:.2e}" in result.changes[0] and (tied or torch.allclose(before, reference[0], atol=1e-6))
    again = quantize_embeddings(gm, inputs, reference, budget=0.5)  # idempotent
    assert again.matched == 0 and count(gm, INT8_EMBEDDING) == 1


def test_table_a_tied_fp32_head_reads_is_left_alone() -> None:
    """Width 48: no int4 group divides it, the head stays fp32 and keeps the table in the file anyway."""
    gm, inputs, reference = lowered(TinyLM(48, tied=True), quantize="int4_weight_only", accuracy_budget=0.5)
    result = quantize_embeddings(gm, inputs, reference, budget=0.5)
    assert result.matched == 0 and count(gm, EMBEDDING) == 1 and set(float_tables(gm)) == {(VOCAB, 48)}
    assert len(result.near_misses) == 1 and "tied lm_head" in result.near_misses[0], result.near_misses


def test_over_budget_is_rolled_back_with_a_warning() -> None:
    gm, inputs, reference = lowered(TinyLM(64, tied=False))
    with pytest.warns(UserWarning, match="left fp32: every quantized form is over accuracy_budget .*int8 per row"):
        result = quantize_embeddings(gm, inputs, reference, budget=1e-6)
    assert result.matched == 0 and "rolled back, over budget" in result.changes[0]
    assert count(gm, EMBEDDING) == 1 and count(gm, INT8_EMBEDDING) == 0 and float_tables(gm) == [(VOCAB, 64)] * 2


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_int4_head_lends_the_embedding_its_bits(tied) -> None:
    """Once the int4 head is in MatMulNBits' layout (as export_onnx(generation=True) has it), a table whose int4
    bits are the head's reads them (int4_embedding_nbits on the head's own b constant: one copy), and its values
    are the dequantized table's rows; a head of the same shape quantized from other weights (untied) is a
    near-miss: the table becomes int8 rows without trying it."""
    from mmaccel.compiler.export_generation import use_matmul_nbits
    from mmaccel.ops.int4_linear import dequantize_int4, quantize_int4_groupwise

    model = TinyLM(64, tied)
    gm, inputs, reference = lowered(model, quantize="int4_weight_only", accuracy_budget=0.5)
    assert use_matmul_nbits(gm) == 1
    result = quantize_embeddings(gm, inputs, reference, budget=0.5)
    shared = gm.graph.find_nodes(op="call_function", target=torch.ops.mmaccel.int4_embedding_nbits.default)
    assert result.matched == 1 and len(shared) == int(tied) and count(gm, INT8_EMBEDDING) == int(not tied)
    assert len(result.changes) == 1 and ("tied int4 head" in result.changes[0]) == tied, result.changes
    if tied:
        head = next(iter(gm.graph.find_nodes(op="call_function", target=torch.ops.mmaccel.int4_matmul_nbits.default)))
        assert shared[0].args[1].target == head.args[1].target and float_tables(gm) == []
        b, scales, zero_points = (constant_value(gm, n.target) for n in shared[0].args[1:])
        group = 2 * b.shape[2]  # the quantize pass's choice
        rows = torch.ops.mmaccel.int4_embedding_nbits(torch.arange(VOCAB), b, scales, zero_points)
        table = model.embed.weight.detach()
        assert torch.equal(rows, dequantize_int4(*quantize_int4_groupwise(table, group), group))
