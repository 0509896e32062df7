"""Issue 21, lossless part: a compiled model holds one copy of its weights. parallel_linear_fusion
concatenates Q/K/V and gate/up weights; the user's parameters are rebound as views of the concatenation, so
the bytes reachable from the module and the compiled graphs together stay the module's own (accounted by
tensor storage, deduplicated: no torch.cuda needed)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import mmaccel

from hf_tiny import llama


def storage_bytes(*objects: nn.Module) -> int:
    """Bytes of the distinct storages behind the parameters and buffers of `objects`."""
    seen: dict[int, int] = {}
    for obj in objects:
        for t in (*obj.parameters(), *obj.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _compiled_graphs(compiled) -> list[nn.Module]:
    return [g.final_graph for g in compiled.mmaccel_report.graphs if g.final_graph is not None]


def _fired(compiled, name: str) -> int:
    return sum(p.matched for g in compiled.mmaccel_report.graphs for p in g.passes if p.name == name)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_lossless_compile_holds_one_copy_of_the_weights(impl) -> None:
    model = llama(impl)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
        weights = storage_bytes(model)
        compiled = mmaccel.compile(model, target="eager")
        torch.testing.assert_close(compiled(ids).logits, expected)
        compiled(torch.randint(0, 100, (1, 9)))  # a second graph over the same (now fused) weights
    assert _fired(compiled, "parallel_linear_fusion") >= 2  # it fired: Q/K/V and gate/up per layer
    extra = storage_bytes(model, *_compiled_graphs(compiled)) - weights
    assert extra < 0.05 * weights, f"compiled model holds {extra / weights:.1%} more than its weights"
    for graph in compiled.mmaccel_report.graphs:  # the report says the same
        assert graph.own_weight_bytes < 0.05 * weights < graph.graph_weight_bytes
    assert "not shared with the model" in str(compiled.mmaccel_report)
    with torch.no_grad():  # the module itself still computes the same (its parameters are views now)
        torch.testing.assert_close(model(ids).logits, expected)


def test_frozen_weight_check_still_sees_updates_after_rebinding() -> None:
    model = llama("eager")
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager")
        compiled(ids)
        model.model.layers[0].self_attn.k_proj.weight.mul_(2.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = compiled(ids).logits
        assert any("have changed since" in str(w.message) for w in caught)
        torch.testing.assert_close(out, model(ids).logits)


class TiedPair(nn.Module):
    """Near-miss: one Parameter is the weight of two linears on the same input (different biases): a group of
    two rows from one parameter. Whatever the fusion does with it, values and the module stay right."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))
        self.b1, self.b2 = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.w, self.b1) * nn.functional.linear(x, self.w, self.b2).relu()


def test_tied_weight_stays_right() -> None:
    torch.manual_seed(0)
    model = TiedPair().eval().requires_grad_(False)
    x = torch.randn(3, 16)
    expected, w = model(x), model.w.detach().clone()
    compiled = mmaccel.compile(model, target="eager")
    torch.testing.assert_close(compiled(x), expected)
    assert _fired(compiled, "parallel_linear_fusion") == 1
    torch.testing.assert_close(model.w, w)
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(compiled(x), expected)  # frozen checks still pass: no warning, same result
