"""The Triton target's argmax for a few long rows (backends/triton/argmax.py) against torch.argmax: ties, NaN,
infinities, block edges, several rows, keepdim; the graph rewrite fires on greedy decoding's argmax and leaves
the calls it does not take to ATen."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mmaccel.backends.triton import argmax as am  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(x: torch.Tensor, dim=-1, keepdim=False):
    assert am.supports(x, dim)
    out = am.argmax(x, dim, keepdim)
    expected = torch.argmax(x, dim, keepdim)
    assert out.dtype == torch.int64 and out.shape == expected.shape
    assert torch.equal(out.cpu(), expected.cpu()), (out, expected)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 3), extra=st.integers(0, am.BLOCK + 7), seed=st.integers(0, 2**16),
       special=st.sampled_from(["none", "tie", "nan", "nan_twice", "inf", "all_neg_inf", "tie_across_blocks"]),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_matches_torch_argmax(rows, extra, seed, special, dtype):
    """Vocabularies just over MIN_LENGTH to two blocks and a bit: a tail block of any length."""
    g = torch.Generator().manual_seed(seed)
    V = am.MIN_LENGTH + extra
    x = torch.randn(rows, V, generator=g).to(dtype)
    where = torch.randint(0, V, (4,), generator=g).tolist()
    if special == "tie":
        x[:, where[0]] = x[:, where[1]] = 100.0
    elif special == "tie_across_blocks":
        x[:, 3] = x[:, V - 1] = 100.0
    elif special == "nan":
        x[:, where[0]] = float("nan")
    elif special == "nan_twice":
        x[:, where[0]] = x[:, where[1]] = float("nan")
        x[:, where[2]] = float("inf")
    elif special == "inf":
        x[:, where[0]] = float("inf")
        x[:, where[1]] = float("inf")
    elif special == "all_neg_inf":
        x[:] = float("-inf")
    _check(x.to(DEVICE))


def test_leading_dims_keepdim_and_a_strided_batch():
    x = torch.randn(2, 3, am.MIN_LENGTH + 5, device=DEVICE)
    _check(x, -1, True)
    _check(x, 2, False)
    logits = torch.randn(2, 5, am.MIN_LENGTH + 9, device=DEVICE)[:, -1, :]  # HF's last position: rows strided
    _check(logits)


def test_calls_it_does_not_take_go_to_aten():
    short = torch.randn(1, am.MIN_LENGTH - 1)
    assert not am.supports(short, -1)
    assert not am.supports(torch.randn(3, am.MIN_LENGTH), 0)
    assert not am.supports(torch.randn(1, am.MIN_LENGTH), None)
    assert not am.supports(torch.randn(am.MAX_ROWS + 1, am.MIN_LENGTH), -1)
    assert not am.supports(torch.randint(0, 5, (1, am.MIN_LENGTH)), -1)
    assert not am.supports(torch.randn(am.MIN_LENGTH, 2).t(), -1)  # last dim not unit stride
    for x, dim in [(short, -1), (torch.randn(3, am.MIN_LENGTH), 0), (torch.randn(2, 7), None)]:
        assert torch.equal(am.argmax(x, dim), torch.argmax(x, dim))


def test_greedy_step_graph_is_routed_and_matches():
    """Through the Triton target: the decode step's argmax over the vocabulary runs the kernels (fired: the
    routed node), a short argmax in the same graph stays ATen's call inside `argmax` (near-miss), outputs equal."""
    import torch.fx as fx

    def step(logits, scores):
        return logits[:, -1, :].argmax(-1), scores.argmax(-1, keepdim=True)

    from torch.fx.experimental.proxy_tensor import make_fx

    gm = fx.symbolic_trace(step)
    logits, scores = torch.randn(1, 3, am.MIN_LENGTH + 100, device=DEVICE), torch.randn(1, 10, device=DEVICE)
    aten_gm = make_fx(gm)(logits, scores)
    assert am.route_argmax(aten_gm) == 2
    aten_gm.recompile()
    routed = [n for n in aten_gm.graph.nodes if n.target is am.argmax]
    assert len(routed) == 2
    out = aten_gm(logits, scores)
    assert torch.equal(out[0], step(logits, scores)[0]) and torch.equal(out[1], step(logits, scores)[1])
    assert am.supports(logits[:, -1, :], -1) and not am.supports(scores, -1)
