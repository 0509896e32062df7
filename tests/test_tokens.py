"""Token merging (lossy, opt-in: tokens="merge"): the op is ToMe's bipartite soft matching, written here once more
as a plain loop; the compiled tiny CLIP equals ToMe written by hand on the HF modules; it fires on the HF vision
towers (ViT, SigLIP, LLaVA's, Whisper's encoder) with the output within the error it reports and static shapes;
text models and towers whose tokens cannot be followed are left alone with the reason; bad options are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mmaccel
from mmaccel.models.vit import ViTBlock, ViTConfig
from mmaccel.ops.token_merge import token_merge_reference
from mmaccel.passes.lossy import ORIGINAL
from mmaccel.passes.tokens import AUTO_ON_ONE_GRAPH, MergeLever
from mmaccel.ops.token_unmerge import token_unmerge_reference

import hf_tiny
from conftest import assert_matches_eager, relative_error

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tome_loop(x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, r: int, metric: torch.Tensor | None = None):
    """ToMe, one image at a time: even tokens (but the first) each point at their most similar odd token (cosine of
    `metric`, by default the tokens); the r best-matched are averaged into it, weighted by size; kept even tokens
    first, in order, then the odd."""
    outs = []
    for b in range(x.shape[0]):
        unit = (x if metric is None else metric)[b]
        unit = unit / unit.norm(dim=-1, keepdim=True)
        odd = list(range(1, x.shape[1], 2))
        match = {a: max(odd, key=lambda j: float(unit[a] @ unit[j])) for a in range(2, x.shape[1], 2)}
        merged = sorted(match, key=lambda a: -float(unit[a] @ unit[match[a]]))[:r]
        groups = [[a] for a in range(0, x.shape[1], 2) if a not in merged]
        groups += [[j] + [a for a in merged if match[a] == j] for j in odd]
        where = {i: p for p, g in enumerate(groups) for i in g}
        weights = [size[b, g] for g in groups]
        outs.append((torch.stack([(x[b, g] * w[:, None]).sum(0) / w.sum() for g, w in zip(groups, weights)]),
                     torch.stack([w.sum() for w in weights]), torch.tensor([where[int(i)] for i in index[b]])))
    return [torch.stack(parts) for parts in zip(*outs)]


@pytest.mark.parametrize("tokens", [17, 16])
def test_merge_op_is_tome(tokens: int) -> None:
    x = torch.randn(2, tokens, 8, generator=torch.Generator().manual_seed(0))
    state = (x, torch.ones(2, tokens), torch.arange(tokens).expand(2, tokens))
    merged = None
    for r in (3, 2, 0):  # chained, as in a tower: sizes and index carried from merge to merge
        expected = tome_loop(*state, r)
        merged = token_merge_reference(*(merged or (x, None, None)), r)
        for actual, want in zip(merged, expected):
            torch.testing.assert_close(actual, want.to(actual.dtype))
        state = expected
    restored = token_unmerge_reference(merged[0], merged[2])
    assert restored.shape == x.shape
    torch.testing.assert_close(restored[:, 0], x[:, 0])  # the first token is never merged


def test_merge_matches_on_the_metric_given() -> None:
    """ToMe's similarity on other features than the tokens (its attention keys, averaged over heads): matched on
    the metric, averaged on the tokens; bench/token_merge_accuracy.py measures it on a trained tower."""
    x = torch.randn(2, 17, 8, generator=torch.Generator().manual_seed(0))
    keys = torch.randn(2, 17, 4, generator=torch.Generator().manual_seed(1))
    state = (torch.ones(2, 17), torch.arange(17).expand(2, 17))
    merged = token_merge_reference(x, None, None, 5, keys)
    for actual, want in zip(merged, tome_loop(x, *state, 5, keys)):
        torch.testing.assert_close(actual, want.to(actual.dtype))
    assert not torch.equal(merged[2], token_merge_reference(x, None, None, 5)[2])  # other matches than on x


def _hand_tome_clip(model, pixels: torch.Tensor, r: int):
    """ToMe on HF's CLIP vision modules, by hand: merge before each layer, log(size) added to the attention
    scores, the last hidden state unmerged, the pooled class token as it is."""
    vision = getattr(model, "vision_model", model)  # transformers 5.24 has no vision_model level
    x = vision.pre_layrnorm(vision.embeddings(pixels))
    state = (torch.ones(x.shape[:2]), torch.arange(x.shape[1]).expand(x.shape[:2]))
    for layer in vision.encoder.layers:
        x, *state = tome_loop(x, *state, min(r, (x.shape[1] - 1) // 2))
        bias = state[0].log()[:, None, None, :].expand(-1, 1, x.shape[1], -1)
        x = layer(x, bias)
    last = x.gather(1, state[1][..., None].expand(-1, -1, x.shape[-1]))
    return last, vision.post_layernorm(x[:, 0])


def _lossy_pass(compiled):
    return next(p for g in compiled.mmaccel_report.graphs for p in g.passes if p.lossy)


def test_clip_equals_hand_written_tome() -> None:
    """Budget wide enough for the cheapest option everywhere: r40% of 17 tokens = 7 per layer, clamped by ToMe's
    rule to 4 of the 10 tokens reaching the second."""
    model = hf_tiny.clip_vision("sdpa")
    compiled = mmaccel.compile(model, target="eager", tokens="merge", accuracy_budget=0.99)
    with torch.no_grad():
        out = compiled(pixel_values=PIXELS)
        reference = model(pixel_values=PIXELS)
        last, pooled = _hand_tome_clip(model, PIXELS, r=7)
    result = _lossy_pass(compiled)
    assert result.matched == 2 and "r40% x2" in result.changes[0]
    assert out.last_hidden_state.shape == reference.last_hidden_state.shape  # unmerged for the consumer
    assert_matches_eager(out.last_hidden_state, last)
    assert_matches_eager(out.pooler_output, pooled)
    assert relative_error(out.last_hidden_state, reference.last_hidden_state) == pytest.approx(
        result.measured_error, rel=1e-4)  # the error reported is the error given (one output, one sample)
    rows = result.details["layers"]
    assert [row["unit"] for row in rows] == ["token-blocks"] * 2 and rows[0]["cost"] == (17 - 7) * 2


def test_auto_on_one_graph_is_merge() -> None:
    """tokens="auto" outside mmaccel.generate is the merge lever alone (the prompt levers rewrite a prompt, which
    only mmaccel.generate does), and the report says so. A graph without a tower: the lever is the one tested
    above, 2 s of CLIP compile saved."""
    model = nn.Linear(4, 4)
    compiled = mmaccel.compile(model, target="eager", tokens="auto", accuracy_budget=0.5)
    with torch.no_grad():
        assert_matches_eager(compiled(torch.ones(2, 4)), model(torch.ones(2, 4)))
    result = _lossy_pass(compiled)
    assert result.name == "tokens" and result.changes == ["merge: nothing to change"]
    assert result.near_misses[0] == AUTO_ON_ONE_GRAPH


def test_calibrated_graph_merges() -> None:
    """The graph optimized after the calibration samples ran (outside Dynamo's TracingContext) merges as a first
    call's graph does. It kept the CPU flash kernel attention_fusion had replaced, unread (FX's dead-code
    elimination keeps nondeterministic_seeded ops there), and the tower was left alone at that kernel."""
    model, pixels = hf_tiny.clip_vision("sdpa"), PIXELS[:1]
    compiled = mmaccel.compile(model, target="eager", tokens="merge", accuracy_budget=0.99, calibration=[pixels])
    with torch.no_grad():
        out = compiled(pixels)
        last, pooled = _hand_tome_clip(model, pixels, r=7)
    graphs = compiled.mmaccel_report.graphs
    result = _lossy_pass(compiled)
    assert len(graphs) == 1 and result.matched == 2 and not result.near_misses
    assert "1 calibration input(s)" in result.changes[0]
    assert not [n for n in graphs[0].final_graph.graph.nodes if "_scaled_dot_product" in str(n.target)]
    assert_matches_eager(out.last_hidden_state, last)
    assert_matches_eager(out.pooler_output, pooled)


# Whisper's encoder (the audio analogue) is in the opt-in coverage set: 5 s more than the suite's budget allows
@pytest.mark.parametrize("arch", ["vit", "siglip_vision",
                                  pytest.param("whisper_encoder", marks=pytest.mark.coverage)])
def test_fires_within_reported_error(arch: str) -> None:
    spec = next(a for a in hf_tiny.ARCHITECTURES if a.name == arch)
    model, inputs = spec.build(), spec.inputs()
    compiled = mmaccel.compile(model, target="eager", tokens="merge", accuracy_budget=0.9)
    with torch.no_grad():
        out, reference = compiled(*inputs), model(*inputs)
        compiled(*(torch.randn_like(t) for t in inputs))  # new values, same shapes: no recompile
    result = _lossy_pass(compiled)
    assert result.matched == 2 and not result.near_misses
    assert len(compiled.mmaccel_report.graphs) == 1
    for name in reference.keys():
        assert out[name].shape == reference[name].shape
        assert relative_error(out[name], reference[name]) <= result.measured_error * (1 + 1e-4)


def _projected(out) -> torch.Tensor:
    """The projector's output: transformers 5.24 returns it as pooler_output, a list per image; 5.17 as is."""
    features = getattr(out, "pooler_output", out)
    return torch.cat(list(features)) if isinstance(features, (list, tuple)) else features


def test_llava_vision_tower_unmerges_for_the_projector() -> None:
    """LLaVA-1.5's layout (hf_tiny.llava: features of the second-to-last layer, class token dropped, all 16 patch
    tokens projected): the tower's live layer merges, the projector reads every patch token, unmerged."""
    model = hf_tiny.llava()
    features = lambda pixels: model.model.get_image_features(pixel_values=pixels)  # noqa: E731
    compiled = mmaccel.compile(features, target="eager", tokens="merge", accuracy_budget=0.9)
    with torch.no_grad():
        out, reference = compiled(PIXELS[:1]), features(PIXELS[:1])
    passes = [p for g in compiled.mmaccel_report.graphs for p in g.passes if p.lossy]
    merged = [p for p in passes if p.matched]
    assert len(merged) == 1 and "1 of 1 block(s)" in merged[0].changes[0]
    out, reference = (_projected(t) for t in (out, reference))
    assert out.shape == reference.shape
    assert relative_error(out, reference) < 1.0 and torch.isfinite(out).all()


class _TransposedExit(nn.Module):
    """A block that hands its stream on as [N, B, D]: tokens at dim 0, which token_unmerge cannot restore."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.block = ViTBlock(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x).transpose(0, 1)


class _Tower(nn.Module):
    def __init__(self, last: type) -> None:
        super().__init__()
        config = ViTConfig(hidden=32, layers=2, heads=4)
        self.blocks = nn.ModuleList([ViTBlock(config), last(config)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("tokens, options", [
    (65, {"r40%": 26, "r32%": 21, "r24%": 16, "r16%": 10, "r8%": 5, "r4%": 3}),  # the trained digits tower
    (17, {"r40%": 7, "r32%": 5, "r24%": 4, "r16%": 3, "r8%": 1}),  # r4% is 1 token too: one name per r
    (4, {"r32%": 1}),  # r40% = 2 tokens would break ToMe's rule, r <= (N - 1) // 2
    (2, {})])
def test_options_keep_tomes_rule(tokens: int, options: dict[str, int]) -> None:
    assert MergeLever._options(tokens) == options


def test_block_left_no_token_to_merge_runs_as_it_was() -> None:
    """3 tokens, 2 blocks: r40% (1 token) before the first leaves 2, of which ToMe's rule merges none before the
    second: that site is reported as it was, and the output is within the error reported."""
    torch.manual_seed(0)
    model, x = _Tower(ViTBlock).eval().requires_grad_(False), torch.randn(2, 3, 32)
    compiled = mmaccel.compile(model, target="eager", tokens="merge", accuracy_budget=0.99)
    with torch.no_grad():
        out, reference = compiled(x), model(x)
    result = _lossy_pass(compiled)
    assert result.matched == 1 and [row["precision"] for row in result.details["layers"]] == ["r40%", ORIGINAL]
    assert out.shape == reference.shape and relative_error(out, reference) <= result.measured_error * (1 + 1e-4)


# dynamic=True takes 11 s to compile here, over the suite's budget: in the opt-in coverage set
@pytest.mark.parametrize("case", ["transposed exit", "no attention",
                                  pytest.param("dynamic batch", marks=pytest.mark.coverage)])
def test_near_misses_left_alone(case: str) -> None:
    torch.manual_seed(0)
    model, expected = {
        "transposed exit": (_Tower(_TransposedExit), "a layout token_unmerge cannot restore"),
        "no attention": (nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)), "no attention over"),
        "dynamic batch": (_Tower(ViTBlock), "has symbolic sizes"),
    }[case]
    x = torch.randn(2, 17, 32)
    compiled = mmaccel.compile(model.eval().requires_grad_(False), target="eager", tokens="merge",
                               accuracy_budget=0.9, dynamic=case == "dynamic batch")
    with torch.no_grad():
        assert_matches_eager(compiled(x), model(x))
    result = _lossy_pass(compiled)
    assert result.matched == 0
    assert expected in result.near_misses[0]


@pytest.mark.parametrize("value, message", [("resolution", "only mmaccel.generate rewrites"),
                                            ("prune", "only mmaccel.generate rewrites"),
                                            ("tome", "not valid"), (True, "not valid")])
def test_bad_options(value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mmaccel.compile(nn.Linear(2, 2), tokens=value)


def test_one_budget_with_quantize() -> None:
    """tokens and quantize run as one lossy pass: one report, each row in its lever's unit."""
    model = hf_tiny.clip_vision("sdpa")
    compiled = mmaccel.compile(model, target="eager", tokens="merge", quantize="int8_weight_only",
                               accuracy_budget=0.9)
    with torch.no_grad():
        out, reference = compiled(pixel_values=PIXELS), model(pixel_values=PIXELS)
    result = _lossy_pass(compiled)
    assert result.name == "tokens+quantize"
    assert {row["unit"] for row in result.details["layers"]} == {"token-blocks", "bytes"}
    assert relative_error(out.last_hidden_state, reference.last_hidden_state) <= result.measured_error * (1 + 1e-4)


@pytest.mark.coverage
@pytest.mark.parametrize("target", ["onnxruntime", "triton"])
def test_targets_run_the_merged_graph(target: str) -> None:
    """The ops' ONNX twins (ONNX Runtime) and the Triton target (the references, beside generated kernels; under
    the interpreter here) give the eager target's merged output. Opt-in (-m coverage): 11 to 16 s each on CPU."""
    model = hf_tiny.clip_vision("sdpa")
    outputs = []
    for name in ("eager", target):
        torch._dynamo.reset()
        compiled = mmaccel.compile(model, target=name, tokens="merge", accuracy_budget=0.9)
        with torch.no_grad():
            outputs.append(compiled(pixel_values=PIXELS))
        assert f"target: {name}" in str(compiled.mmaccel_report) and _lossy_pass(compiled).matched == 2
    assert_matches_eager(outputs[1], outputs[0])
