"""Structural pruning (lossy, opt-in: prune="mlp_channels" | "heads" | ...): the pruned graph is the smaller MLP or
attention built by hand with the kept channels / heads and the refit consumer; grouped-query heads go by K/V group;
it fires on tiny HF models within the budget; over budget nothing is pruned; prune and quantize share one budget
and one report; structures it cannot follow (a static KV cache among them) are left whole with the reason; the
user's module is never changed."""
from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmaccel
from mmaccel.passes import prune
from mmaccel.passes.prune import KEEP, RIDGE, find_mlps, refit_columns, removal_order
from mmaccel.passes.prune_heads import KEEP_HEADS, find_attentions

import hf_tiny
from conftest import assert_matches_eager, relative_error

torch.manual_seed(0)
SAMPLES = [torch.randn(2, 128, 32) for _ in range(4)]  # 1024 calibration tokens: 16 per channel, the refit runs


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(32, 64, bias=False), nn.Linear(32, 64, bias=False)
        self.down = nn.Linear(64, 32, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate(x)) * self.up(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x))


class GeluMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.up(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.hidden(x))


def _model(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval().requires_grad_(False)


def _hand_kept(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, keep: int) -> torch.Tensor:
    """The `keep` channels the pass keeps for a refit, found by brute force: one at a time, the channel whose
    removal, the rest refit, adds least to ||Z (theta - theta0)||^2 (Z: [h, 1] over sqrt(ridge) I, theta0 =
    [W^T; b]), among a pool chosen every OBS_STEP drops; each candidate's error from its own normal equations (not
    the pass's inverse updates)."""
    x = h if bias is None else torch.cat([h, h.new_ones(len(h), 1)], dim=1)
    theta0 = w.T if bias is None else torch.cat([w.T, bias[None]])
    z = torch.cat([x, (RIDGE * float(h.pow(2).sum(0).mean())) ** 0.5 * torch.eye(x.shape[1], dtype=x.dtype)])
    target, extra = z @ theta0, [] if bias is None else [h.shape[1]]
    gram, cross, total = z.T @ z, z.T @ target, float(target.pow(2).sum())

    def without(alive: list[int], candidates: list[int]) -> list[float]:
        """The least squares residual over `alive` less each candidate, each solved anew (batched)."""
        c = torch.tensor([[a for a in alive if a != j] + extra for j in candidates])
        b = cross[c]
        return (total - (b * torch.linalg.solve(gram[c[:, :, None], c[:, None, :]], b)).sum((1, 2))).tolist()

    alive = list(range(h.shape[1]))
    while len(alive) > keep:  # a step: the pool is its 2 * OBS_STEP cheapest, then one drop at a time from it
        pool = [j for _, j in sorted(zip(without(alive, alive), alive))][:2 * prune.OBS_STEP]
        for _ in range(min(prune.OBS_STEP, len(alive) - keep)):
            pool = [j for j in pool if j in alive]
            alive.remove(min(zip(without(alive, pool), pool))[1])
    return torch.tensor(alive)


def _hand_pruned(model: nn.Module, keep: int, samples: list[torch.Tensor] = SAMPLES, refit: bool = True) -> Callable:
    """The smaller MLP, built by hand: the down projection refit by ridge least squares (torch.linalg.lstsq on the
    stacked system, not the pass's normal equations) over the channels _hand_kept chooses for it; without the
    refit, its top `keep` columns by ||h_j|| * ||W_down[:, j]|| on the calibration samples as they are."""
    h = torch.cat([model.hidden(s).reshape(-1, 64) for s in samples]).double()
    w, b = model.down.weight.double(), model.down.bias
    if refit:
        kept = _hand_kept(h, w, None if b is None else b.double(), keep)
    else:
        kept = (h.norm(dim=0) * w.norm(dim=0)).topk(keep).indices.sort().values
    target = h @ w.T
    hk = h[:, kept]
    if model.down.bias is not None:
        hk = torch.cat([hk, hk.new_ones(len(hk), 1)], dim=1)
        target = target + model.down.bias.double()
    ridge = RIDGE * float(hk[:, :keep].pow(2).sum(0).mean())
    stacked = torch.cat([hk, ridge ** 0.5 * torch.eye(hk.shape[1], dtype=hk.dtype)])
    solution = torch.linalg.lstsq(stacked, torch.cat([target, target.new_zeros(hk.shape[1], 32)])).solution
    small_w, small_b = solution[:keep].T.float(), (solution[keep].float() if model.down.bias is not None else None)
    if not refit:
        small_w, small_b = model.down.weight[:, kept], model.down.bias
    rows = kept

    def forward(x: torch.Tensor) -> torch.Tensor:
        if isinstance(model, SwiGLU):
            hidden = F.silu(F.linear(x, model.gate.weight[rows])) * F.linear(x, model.up.weight[rows])
            return F.linear(hidden, small_w)
        return x + F.linear(F.gelu(F.linear(x, model.up.weight[rows], model.up.bias[rows])), small_w, small_b)
    return forward


def _compile(model, target="eager", budget=0.9, prune="mlp_channels", calibration=SAMPLES, **options):
    with torch.no_grad():
        compiled = mmaccel.compile(model, target=target, prune=prune, accuracy_budget=budget,
                                   calibration=calibration, **options)
        compiled(calibration[0])
    return compiled, [p for p in compiled.mmaccel_report.graphs[-1].passes if p.lossy][-1]


@pytest.mark.parametrize("target", ["eager", "onnxruntime"])
@pytest.mark.parametrize("cls", [SwiGLU, GeluMlp])
def test_pruned_graph_is_the_smaller_mlp_built_by_hand(cls, target, monkeypatch):
    monkeypatch.setattr(prune, "OBS_STEP", 4)  # several steps of the inverse's updates on 64 channels
    model = _model(cls)
    compiled, result = _compile(model, target=target)
    assert compiled.mmaccel_report.graphs[-1].target == target
    (row,) = result.details["layers"]
    assert result.matched == 1 and row["lever"] == "prune:mlp_channels" and row["precision"] in KEEP
    keep = round(64 * KEEP[row["precision"]])
    assert row["bytes"] < row["original_bytes"]
    hand = _hand_pruned(model, keep)
    with torch.no_grad():
        for x in (*SAMPLES, torch.randn(2, 128, 32)):  # a held-out input too
            torch.testing.assert_close(compiled(x), hand(x), rtol=1e-4, atol=1e-4)
    linears = [n for n in compiled.mmaccel_report.graphs[-1].final_graph.graph.nodes
               if n.op == "call_function" and "fused_linear" in str(n.target)]
    ups = 2 * keep if cls is SwiGLU else keep  # gate and up: one matmul of both (parallel_linear_fusion)
    assert sorted(tuple(n.args[1].meta["val"].shape) for n in linears) == sorted([(ups, 32), (32, keep)])
    assert find_mlps(compiled.mmaccel_report.graphs[-1].final_graph) == ([], [])  # idempotent: pruned once


def test_a_channel_whose_copy_stays_goes_first_and_the_refit_moves_its_work_there():
    """32 channels each twice (h = [a, a]): keeping half, the refit can keep the MLP's output exactly when one copy
    of each channel stays. removal_order finds that; ranking by ||h_j|| * ||W[:, j]|| keeps both copies of the
    strongest channels and loses the others."""
    torch.manual_seed(0)
    a = torch.randn(2048, 32, dtype=torch.float64) * torch.linspace(0.2, 2, 32, dtype=torch.float64)
    h, w, b = torch.cat([a, a], dim=1), torch.randn(16, 64, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    x = torch.cat([h, h.new_ones(len(h), 1)], dim=1)
    gram, reference = x.T @ x, h @ w.T + b

    def error(kept: torch.Tensor) -> float:
        weight, bias = refit_columns(gram, w, b, kept)
        return float((h[:, kept] @ weight.T + bias - reference).norm() / reference.norm())

    kept = removal_order(gram, w, b)[32:].sort().values
    assert sorted((kept % 32).tolist()) == list(range(32)) and error(kept) < 1e-3
    by_score = (h.norm(dim=0) * w.norm(dim=0)).topk(32).indices.sort().values
    assert error(by_score) > 0.1


def test_too_few_calibration_tokens_keep_the_columns_unrefit_with_one_warning():
    """32 tokens for 64 channels: a refit would fit the very tokens the error is measured on."""
    model, samples = _model(GeluMlp), [torch.randn(2, 16, 32)]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        compiled = mmaccel.compile(model, target="eager", prune="mlp_channels", accuracy_budget=0.9,
                                   calibration=samples)
        actual = compiled(samples[0])
    (row,) = compiled.mmaccel_report.graphs[-1].pass_result("prune").details["layers"]
    hand = _hand_pruned(model, round(64 * KEEP[row["precision"]]), samples, refit=False)
    torch.testing.assert_close(actual, hand(samples[0]), rtol=1e-5, atol=1e-5)
    assert sum("32 calibration tokens" in str(w.message) for w in caught) == 1


def test_fires_on_tiny_llama_within_budget_and_leaves_the_module_alone():
    model = hf_tiny.llama("eager")
    samples = [hf_tiny.token_batch(2, 16, seed=s)[0] for s in range(32)]  # 1024 tokens: the refit runs
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", prune="mlp_channels", accuracy_budget=0.05,
                                   calibration=samples)
        actual = [compiled(s).logits for s in samples]
        expected = [model(s).logits for s in samples]
    graph = compiled.mmaccel_report.graphs[-1]
    result = graph.pass_result("prune")
    assert result.matched == 2 and "keep_25 x2" in result.changes[0]
    assert "constants 0.10 -> 0.06 MiB" in result.changes[0]
    assert {row["layer"] for row in result.details["layers"]} == {"model.layers.0.mlp", "model.layers.1.mlp"}
    diff = sum(float((a - e).pow(2).sum()) for a, e in zip(actual, expected))
    error = (diff / sum(float(e.pow(2).sum()) for e in expected)) ** 0.5
    assert 0 < result.measured_error <= 0.05 and error == pytest.approx(result.measured_error, rel=1e-3)
    assert "keep_" in str(compiled.mmaccel_report) and not result.near_misses  # attention is no MLP
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # the same Parameter objects with the same values (parallel_linear_fusion may have rebound Q/K/V and gate/up
    # as views of one fused buffer holding those values: issue 21's storage sharing, not a modification)
    assert all(p is params[k] for k, p in model.named_parameters())


def test_grams_in_groups_under_a_host_budget_give_the_same_pruned_model(monkeypatch):
    """Issue 21: the float64 grams are collected for groups of MLPs under GRAM_BYTES_AT_ONCE (one calibration pass
    per group) and dropped once each MLP's options are refit, instead of all held at once (31 GB of host memory
    at 7B dims, 32 layers). A budget of one gram per group gives the same pruned model as one group; no gram
    stays on the lever."""
    model = hf_tiny.llama("eager")
    samples = [hf_tiny.token_batch(2, 16, seed=s)[0] for s in range(32)]
    probes = []
    real_grams = prune.grams

    def counted(gm, ctx, nodes):
        probes.append(len(nodes))
        return real_grams(gm, ctx, nodes)

    monkeypatch.setattr(prune, "grams", counted)
    outputs = []
    for budget in (prune.GRAM_BYTES_AT_ONCE, 1):
        monkeypatch.setattr(prune, "GRAM_BYTES_AT_ONCE", budget)
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = mmaccel.compile(model, target="eager", prune="mlp_channels", accuracy_budget=0.05,
                                       calibration=samples)
            outputs.append([compiled(s).logits for s in samples[:4]])
    assert probes == [2, 1, 1]  # both MLPs in one pass, then one pass each
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert prune.gram_groups([3, 3, 100], budget=2 * 4 ** 2 * 8) == [[0, 1], [2]]


def test_over_budget_prunes_nothing_with_one_warning():
    model = _model(SwiGLU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, result = _compile(model, budget=1e-6)
        with torch.no_grad():
            assert_matches_eager(compiled(SAMPLES[1]), model(SAMPLES[1]))
    assert result.matched == 0 and result.changes[0].startswith("rolled back, over budget")
    assert sum("pruning not applied" in str(w.message) for w in caught) == 1


def test_prune_and_quantize_share_one_budget_and_one_report():
    model = _model(GeluMlp)
    compiled, result = _compile(model, budget=0.05, quantize="int8_weight_only")
    assert result.name == "prune+quantize"
    assert {row["lever"] for row in result.details["layers"]} == {"prune:mlp_channels", "quantize"}
    assert "mlp_channels: " in result.changes[0] and "int8_weight_only: " in result.changes[0]
    with torch.no_grad():
        outputs, references = [compiled(s) for s in SAMPLES], [model(s) for s in SAMPLES]
    diff = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, references))
    error = (diff / sum(float(r.pow(2).sum()) for r in references)) ** 0.5
    assert result.measured_error <= 0.05 and error == pytest.approx(result.measured_error, rel=1e-3)


class SharedHidden(GeluMlp):
    def forward(self, x):
        h = self.hidden(x)
        return self.down(h), h


class InputDown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)

    def forward(self, x, w_down):
        return F.linear(F.gelu(self.up(x)), w_down)


@pytest.mark.parametrize("cls,inputs,reason", [
    (SharedHidden, (SAMPLES[0],), "is also used by"),
    (InputDown, (SAMPLES[0], torch.randn(32, 64)), "weight or bias is not a constant"),
])
def test_near_misses_are_left_whole_with_the_reason(cls, inputs, reason):
    model = _model(cls)
    with torch.no_grad():
        expected = model(*inputs)
        compiled = mmaccel.compile(model, target="eager", prune="mlp_channels", accuracy_budget=0.5,
                                   calibration=[inputs])
        actual = compiled(*inputs)
    result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    assert result.matched == 0 and result.changes == ["mlp_channels: nothing to change"]
    assert len(result.near_misses) == 1 and reason in result.near_misses[0]
    assert result.near_misses[0] in str(compiled.mmaccel_report)  # explain lists it under the pass
    assert_matches_eager(actual, expected)


def test_export_onnx_file_is_smaller_and_plain_onnxruntime_gives_the_measured_error(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model(SwiGLU)
    full, pruned = tmp_path / "full.onnx", tmp_path / "pruned.onnx"
    mmaccel.export_onnx(model, (SAMPLES[0],), full)
    report = mmaccel.export_onnx(model, (SAMPLES[0],), pruned, prune="mlp_channels", accuracy_budget=0.9,
                                 calibration=SAMPLES)
    result = report.graphs[0].pass_result("prune")
    assert result.matched == 1 and pruned.stat().st_size < full.stat().st_size * 0.8
    session = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(session.run(None, {session.get_inputs()[0].name: s.numpy()})[0]) for s in SAMPLES]
    with torch.no_grad():
        references = [model(s) for s in SAMPLES]
    assert relative_error(torch.cat(outputs), torch.cat(references)) == pytest.approx(result.measured_error, rel=1e-3)


def test_default_never_prunes():
    with torch.no_grad():
        compiled = mmaccel.compile(_model(SwiGLU), target="eager")
        compiled(SAMPLES[0])
    assert not any(p.lossy for p in compiled.mmaccel_report.graphs[-1].passes)


@pytest.mark.parametrize("options,match", [
    ({"prune": "channels"}, "'channels' is not valid; choose among"),
    ({"prune": ["heads", "rows"]}, "'rows' is not valid"),
    ({"prune": []}, "not valid; give one of"),
    ({"prune": 0.5}, "not valid; give one of"),
    ({"prune": "mlp_channels", "calibration": []}, "is empty"),
    ({"prune": {"mlp_channels": 1.0}}, "must be a number in \\(0, 1\\)"),
    ({"prune": {"heads": 0}}, "must be a number in \\(0, 1\\)"),
    ({"prune": {"mlp_channels": "half"}}, "must be a number in \\(0, 1\\)"),
    ({"prune": {"blocks": 0.25}}, "'blocks' takes no fraction"),
    ({"prune": {"rows": 0.25}}, "'rows' is not valid"),
    ({"prune": "mlp_channels", "metric": "top1"}, "'metric' must be a callable"),
    ({"metric": lambda out, ref: 0.0}, "'metric' only matters to lossy passes"),
    ({"prune": "mlp_channels", "metric": lambda out, ref: 0.0, "accuracy_budget": -1}, "must be a positive number"),
])
def test_bad_prune_options_name_the_problem(options, match):
    with pytest.raises(ValueError, match=match):
        mmaccel.compile(nn.Linear(2, 2), **options)


# --- attention heads ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Attention as HF Llama writes it: q/k/v projections, heads split off by views, rotate-half rotary on q and k,
    SDPA (grouped-query when kv_heads < heads), heads merged back, o_proj, residual. MHA variant: biases, no rotary."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, rotary: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.rotary, d = heads, kv_heads, rotary, 8
        self.q, self.o = nn.Linear(32, heads * d, bias=bias), nn.Linear(heads * d, 32, bias=bias)
        self.k, self.v = nn.Linear(32, kv_heads * d, bias=bias), nn.Linear(32, kv_heads * d, bias=bias)
        angles = torch.arange(128)[:, None] * 10000 ** (-torch.arange(0, d, 2) / d)
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos())
        self.register_buffer("sin", torch.cat([angles, angles], -1).sin())

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:  # t: [B, H, L, D]
        if not self.rotary:
            return t
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * self.cos[:t.shape[2]] + rotated * self.sin[:t.shape[2]]

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, length, _ = x.shape
        q = self._rotate(self.q(x).view(b, length, -1, 8).transpose(1, 2))
        k = self._rotate(self.k(x).view(b, length, -1, 8).transpose(1, 2))
        return q, k, self.v(x).view(b, length, -1, 8).transpose(1, 2)

    def merged(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # [B, L, H * D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o(self.merged(x))


def _hand_pruned_attention(model: Attention, keep: int, by_refit: bool = False) -> Attention:
    """The smaller attention built by hand: the `keep` K/V groups whose heads add most to o_proj's output on the
    calibration samples (||h_g W_o[:, g]^T||), or with `by_refit` those left after dropping, one at a time, the
    group whose loss leaves the least refit residual; their rows of q/k/v, o_proj refit by ridge least squares
    (torch.linalg.lstsq on the stacked system) over their columns."""
    group, width = model.heads // model.kv_heads, model.heads // model.kv_heads * 8
    h = torch.cat([model.merged(s).reshape(-1, model.heads * 8) for s in SAMPLES]).double()
    w = model.o.weight.double()
    target = h @ w.T + (model.o.bias.double() if model.o.bias is not None else 0)

    def columns(groups: list[int], per_group: int) -> torch.Tensor:
        return torch.cat([torch.arange(g * per_group, (g + 1) * per_group) for g in groups])

    def refit(groups: list[int]) -> tuple[torch.Tensor, float]:
        hk = h[:, columns(groups, width)]
        if model.o.bias is not None:
            hk = torch.cat([hk, hk.new_ones(len(hk), 1)], dim=1)
        ridge = RIDGE * float(hk[:, :len(groups) * width].pow(2).sum(0).mean())
        stacked = torch.cat([hk, ridge ** 0.5 * torch.eye(hk.shape[1], dtype=hk.dtype)])
        solution = torch.linalg.lstsq(stacked, torch.cat([target, target.new_zeros(hk.shape[1], 32)])).solution
        return solution, float((hk @ solution - target).pow(2).sum())

    if by_refit:
        kept = list(range(model.kv_heads))
        while len(kept) > keep:
            kept.remove(min(kept, key=lambda g: refit([k for k in kept if k != g])[1]))
    else:
        scores = [(h[:, g * width:(g + 1) * width] @ w[:, g * width:(g + 1) * width].T).norm()
                  for g in range(model.kv_heads)]
        kept = torch.stack(scores).topk(keep).indices.sort().values.tolist()
    solution, _ = refit(kept)

    def rows(per_group: int) -> torch.Tensor:
        return columns(kept, per_group)

    small = Attention(keep * group, keep, model.rotary, model.o.bias is not None).eval().requires_grad_(False)
    for name, per_group in (("q", width), ("k", 8), ("v", 8)):
        getattr(small, name).weight.copy_(getattr(model, name).weight[rows(per_group)])
        if getattr(model, name).bias is not None:
            getattr(small, name).bias.copy_(getattr(model, name).bias[rows(per_group)])
    small.o.weight.copy_(solution[:keep * width].T)
    if model.o.bias is not None:
        small.o.bias.copy_(solution[-1])
    return small


@pytest.mark.parametrize("heads,kv_heads,rotary,bias,target", [(4, 2, True, False, "eager"),
                                                               (4, 4, False, True, "eager"),
                                                               (4, 2, True, False, "onnxruntime")],
                         ids=["gqa_rotary", "mha_bias", "gqa_rotary_onnxruntime"])
def test_pruned_heads_are_the_smaller_attention_built_by_hand(heads, kv_heads, rotary, bias, target):
    torch.manual_seed(0)
    model = Attention(heads, kv_heads, rotary, bias).eval().requires_grad_(False)
    compiled, result = _compile(model, target=target, prune="heads")
    (row,) = result.details["layers"]
    # the same heads kept two ways (by output, by refit): the one that measured the lower error
    sensitivity = row["sensitivity"]
    assert row["precision"] == min(("keep_50", "keep_50+refit"), key=lambda option: sensitivity[option])
    assert result.matched == 1 and row["lever"] == "prune:heads"
    assert row["bytes"] < row["original_bytes"] and row["shape"] == [heads, kv_heads]
    hand = _hand_pruned_attention(model, kv_heads // 2, by_refit=row["precision"].endswith("+refit"))
    with torch.no_grad():
        for x in (*SAMPLES, torch.randn(2, 128, 32)):  # a held-out input too
            torch.testing.assert_close(compiled(x), hand(x), rtol=1e-4, atol=1e-4)
    final = compiled.mmaccel_report.graphs[-1].final_graph
    (sdpa,) = [n for n in final.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    # grouped-query: a K/V head and its query heads go together (2 query heads over the 1 K/V head kept)
    assert [n.meta["val"].shape[1] for n in sdpa.args[:3]] == [heads // 2, kv_heads // 2, kv_heads // 2]
    linears = sorted(tuple(n.args[1].meta["val"].shape) for n in final.graph.nodes if "fused_linear" in str(n.target))
    assert linears == sorted([(8 * (heads + 2 * kv_heads) // 2, 32), (32, 8 * heads // 2)])  # q/k/v fused, o_proj
    assert find_attentions(final) == ([], [])  # idempotent: pruned once


def test_a_fraction_that_keeps_every_kv_group_is_a_near_miss():
    torch.manual_seed(0)
    model = Attention(4, 2, True, False).eval().requires_grad_(False)
    compiled, result = _compile(model, prune={"heads": 0.2}, budget=0.99)  # 2 groups x 0.8 rounds to 2
    assert result.matched == 0 and "no fraction offered (0.8) keeps fewer" in result.near_misses[0]


def test_a_fixed_fraction_of_heads_is_the_smaller_attention():
    torch.manual_seed(0)
    model = Attention(4, 4, False, True).eval().requires_grad_(False)
    compiled, result = _compile(model, prune={"heads": 0.75}, budget=0.99)
    (row,) = result.details["layers"]
    assert row["lever"] == "prune:heads" and row["precision"].removesuffix("+refit") == "keep_25%"
    hand, x = _hand_pruned_attention(model, 1, by_refit=row["precision"].endswith("+refit")), torch.randn(2, 128, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), hand(x), rtol=1e-4, atol=1e-4)


def test_heads_fire_on_tiny_hf_llama_within_budget():
    model = hf_tiny.llama("eager")
    samples = [hf_tiny.token_batch(2, 32, seed=s)[0] for s in range(2)]
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", prune="heads", accuracy_budget=0.5, calibration=samples)
        actual, expected = compiled(samples[1]).logits, model(samples[1]).logits
    result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    assert result.matched == 2 and not result.near_misses and "keep_50 x2" in result.changes[0]
    layers = {row["layer"] for row in result.details["layers"]}
    assert layers == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert 0 < relative_error(actual, expected) < 0.5


def test_heads_fire_on_tiny_hf_clip_through_its_shape_keeping_view():
    """HF CLIP views the SDPA output to the same [B, H, L, D] before its transpose: followed, its sizes rewritten."""
    model = hf_tiny.clip_vision("sdpa")
    size = model.config.image_size
    samples = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", prune={"heads": 0.5}, accuracy_budget=0.99,
                                   calibration=samples)
        outs = [compiled(x) for x in samples]
        refs = [model(x) for x in samples]
    result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    assert result.matched == 2 and not result.near_misses
    final = compiled.mmaccel_report.graphs[-1].final_graph
    sdpas = [n for n in final.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert [n.meta["val"].shape[1] for n in sdpas] == [model.config.num_attention_heads // 2] * 2
    measured = max(relative_error(torch.cat([getattr(o, k) for o in outs]), torch.cat([getattr(r, k) for r in refs]))
                   for k in ("last_hidden_state", "pooler_output"))
    assert measured == pytest.approx(result.measured_error, rel=1e-3)


class CacheOut(Attention):
    def forward(self, x):
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape(x.shape)
        return x + self.o(out), k


class StaticCache(Attention):
    def forward(self, x, k_cache, v_cache):  # caches: [B, Hkv, positions, D], written in place as mmaccel.generate does
        q, k, v = self.qkv(x)
        k_cache[:, :, :x.shape[1]].copy_(k)
        v_cache[:, :, :x.shape[1]].copy_(v)
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True).transpose(1, 2)
        return x + self.o(out.reshape(x.shape))


class PerHeadMask(Attention):
    def forward(self, x, mask):
        return x + self.o(self.merged(x, mask))


class MultiQuery(Attention):
    def __init__(self) -> None:
        super().__init__(heads=4, kv_heads=1)


# --- residual blocks ---------------------------------------------------------------------------------------------

class NormedBlock(nn.Module):
    """A transformer block: h = x + attn(x), then h + mlp(norm(h)) (GeluMlp adds its own input: taken off again)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.norm, self.mlp = Attention(), nn.LayerNorm(32), GeluMlp()

    def forward(self, x):
        h = self.attn(x)
        return h + self.mlp(self.norm(h)) - self.norm(h)


class Blocks(nn.Module):
    """Residual blocks in a ModuleList; block 1 nearly an identity (its o_proj and down projection scaled down):
    the most redundant."""

    def __init__(self, make: Callable[[], nn.Module] = NormedBlock, blocks: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(blocks))
        with torch.no_grad():
            self.layers[1].mlp.down.weight.mul_(0.01)
            self.layers[1].mlp.down.bias.mul_(0.01)
            self.layers[1].attn.o.weight.mul_(0.01)

    def forward(self, x: torch.Tensor, skip: tuple[int, ...] = ()) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i not in skip:
                x = layer(x)
        return x


def test_dropped_block_is_the_model_without_it_built_by_hand():
    torch.manual_seed(0)
    model = Blocks().eval().requires_grad_(False)
    samples = [torch.randn(2, n, 32) for n in (32, 48, 64)]  # lengths differ: compiled dynamic (symbolic sizes)
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", prune="blocks", accuracy_budget=0.02, calibration=samples)
        compiled(samples[0])
    result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    rows = {row["layer"]: row for row in result.details["layers"]}
    assert set(rows) == {"layers.0", "layers.1", "layers.2"} and result.matched == 1
    assert [name for name, row in rows.items() if row["precision"] == "drop"] == ["layers.1"]
    cosines = {name: row["score"]["cosine(in, out)"] for name, row in rows.items()}
    assert max(cosines, key=cosines.get) == "layers.1" and cosines["layers.1"] > 0.99  # the most redundant
    assert rows["layers.1"]["bytes"] == 0 and rows["layers.1"]["original_bytes"] > 0
    with torch.no_grad():
        for x in (SAMPLES[0], torch.randn(2, 128, 32)):
            torch.testing.assert_close(compiled(x), model(x, skip=(1,)), rtol=1e-5, atol=1e-5)
    assert "constants" in result.changes[0] and result.measured_error <= 0.02
    assert "cosine(in, out) 1.0000" in str(compiled.mmaccel_report)  # explain shows each block's redundancy


class CacheOutBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CacheOut() for _ in range(2))

    def forward(self, x):
        keys = []
        for layer in self.layers:
            x, k = layer(x)
            keys.append(k)
        return x, keys


class StaticCacheBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(StaticCache() for _ in range(2))

    def forward(self, x, k_cache, v_cache):  # caches: [layers, B, Hkv, positions, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, k_cache[i], v_cache[i])
        return x


CACHES = (torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16, 8))  # [B, Hkv, positions, D]


@pytest.mark.parametrize("cls,extra,prune,reason", [
    (CacheOut, (), "heads", "(k) is also used by"),
    (StaticCache, CACHES, "heads", "written in place (a static KV cache)"),
    (PerHeadMask, (torch.randn(2, 4, 16, 16),), "heads", "differs per head"),
    (MultiQuery, (), "heads", "one K/V head (multi-query attention)"),
    (CacheOutBlocks, (), "blocks", "values other than its output leave it"),
    (StaticCacheBlocks, tuple(torch.stack([c, c]) for c in CACHES), "blocks", "in place (a static KV cache)"),
])
def test_attention_and_block_near_misses_are_left_whole_with_the_reason(cls, extra, prune, reason):
    torch.manual_seed(0)
    model = cls().eval().requires_grad_(False)
    inputs = (SAMPLES[0][:, :16], *extra)
    with torch.no_grad():
        expected = model(*[a.clone() for a in inputs])
        compiled = mmaccel.compile(model, target="eager", prune=prune, accuracy_budget=0.9,
                                   calibration=[tuple(a.clone() for a in inputs)])
        actual = compiled(*[a.clone() for a in inputs])
    result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    assert result.matched == 0 and result.changes == [f"{prune}: nothing to change"]
    assert result.near_misses and all(reason in miss for miss in result.near_misses), result.near_misses
    assert_matches_eager(actual, expected)


def test_auto_chooses_channels_heads_and_blocks_in_one_solve():
    model = hf_tiny.llama("eager")
    samples = [hf_tiny.token_batch(2, 32, seed=s)[0] for s in range(2)]
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", prune="auto", accuracy_budget=0.3, calibration=samples)
        actual = [compiled(s).logits for s in samples]
        expected = [model(s).logits for s in samples]
    result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    assert not result.near_misses
    assert {row["lever"] for row in result.details["layers"]} == {"prune:mlp_channels", "prune:heads", "prune:blocks"}
    assert all(f"{label}: " in result.changes[0] for label in ("mlp_channels", "heads", "blocks"))
    assert result.matched > 0 and 0 < result.measured_error <= 0.3
    assert relative_error(torch.cat(actual), torch.cat(expected)) == pytest.approx(result.measured_error, rel=1e-3)


def test_prune_names_structures_in_a_list_or_auto():
    options = mmaccel.CompileOptions.from_user
    assert options({"prune": ["heads", "mlp_channels", "heads"]}).prune == ("heads", "mlp_channels")
    assert options({"prune": "auto"}).prune == ("mlp_channels", "heads", "blocks")
    fixed = options({"prune": {"mlp_channels": 0.5, "blocks": None}})
    assert fixed.prune == ("mlp_channels", "blocks") and fixed.prune_fractions == {"mlp_channels": 0.5}


@pytest.mark.parametrize("removed,kept", [(0.5, 32), (0.3, 45), (0.75, 16)])
def test_a_fixed_fraction_is_the_one_option_offered(removed, kept):
    # width 64 is under the lever's granule threshold (4 x 32), so any channel count can be kept
    compiled, result = _compile(_model(SwiGLU), prune={"mlp_channels": removed}, budget=0.99)
    (row,) = result.details["layers"]
    assert row["precision"] == f"keep_{round(100 * (1 - removed))}%"
    hand, x = _hand_pruned(_model(SwiGLU), kept), torch.randn(2, 128, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), hand(x), rtol=1e-4, atol=1e-4)


class GeluMlps(nn.Module):
    """`count` residual GELU MLPs of 96 channels (the trained digits ViT's: 3 of them)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 32)) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mlp in self.mlps:
            x = x + mlp(x)
        return x


WIDE_SAMPLES = [*SAMPLES, *SAMPLES[:2]]  # 1536 tokens: 16 per channel of 96, the refit runs
FINE_OPTIONS = {"keep_17", "keep_33", "keep_50", "keep_67", "keep_83"}  # every 16 channels of 96


def _linear_shapes(compiled) -> list[tuple[int, ...]]:
    return sorted(tuple(n.args[1].meta["val"].shape) for n in compiled.mmaccel_report.graphs[-1].final_graph.graph.nodes
                  if n.op == "call_function" and "fused_linear" in str(n.target))


def _mlp_shapes(keep: int, count: int = 1) -> list[tuple[int, ...]]:
    return sorted([(keep, 32), (32, keep)] * count)


def test_few_mlps_are_offered_every_16_channels_and_keep_what_was_measured():
    model = _model(lambda: GeluMlps(1))
    compiled, result = _compile(model, budget=0.1, calibration=WIDE_SAMPLES)
    (row,) = result.details["layers"]
    # 32 channels: between the quarters' 24 (error 0.12 here, over budget) and 48
    assert set(row["sensitivity"]) == FINE_OPTIONS and row["precision"] == "keep_33"
    assert _linear_shapes(compiled) == _mlp_shapes(32)
    with torch.no_grad():
        actual, expected = torch.cat([compiled(s) for s in WIDE_SAMPLES]), torch.cat([model(s) for s in WIDE_SAMPLES])
    assert 0 < relative_error(actual, expected) == pytest.approx(result.measured_error, rel=1e-3)


@pytest.mark.parametrize("count,prune_option,cheapest,kept", [
    (4, "mlp_channels", "keep_25", 24),  # enough MLPs: quarters are step enough (fine steps' cheapest: 16)
    (1, {"mlp_channels": 0.25}, "keep_75%", 72),  # the user's fraction, exactly, not rounded to 16 channels
])
def test_many_mlps_or_a_fixed_fraction_keep_the_quarters(count, prune_option, cheapest, kept):
    # a budget every option fits: each MLP at its cheapest option, measured once
    compiled, result = _compile(_model(lambda: GeluMlps(count)), budget=0.99, prune=prune_option,
                                calibration=WIDE_SAMPLES)
    assert result.matched == count and {row["precision"] for row in result.details["layers"]} == {cheapest}
    assert _linear_shapes(compiled) == _mlp_shapes(kept, count)


def test_a_fixed_fraction_over_budget_leaves_the_mlp_whole():
    compiled, result = _compile(_model(SwiGLU), prune={"mlp_channels": 0.75}, budget=1e-6)
    assert result.matched == 0 and compiled.mmaccel_report.graphs[-1].target == "eager"


def _disagreement(outputs, references):
    """A user metric: the fraction of rows whose argmax differs from the reference's."""
    pairs = [(o[0].argmax(-1), r[0].argmax(-1)) for o, r in zip(outputs, references)]
    return float(sum((a != b).sum() for a, b in pairs)) / sum(b.numel() for _, b in pairs)


def test_a_user_metric_replaces_the_output_error():
    model = _model(SwiGLU)
    compiled, result = _compile(model, prune={"mlp_channels": 0.5}, budget=0.9, metric=_disagreement)
    assert result.matched == 1 and "measured metric" in result.changes[0]
    with torch.no_grad():
        expected = _disagreement([[compiled(s)] for s in SAMPLES], [[model(s)] for s in SAMPLES])
    assert result.measured_error == pytest.approx(expected) and 0 < expected <= 0.9
    # the same fraction, a budget the metric does not fit: left whole
    compiled, result = _compile(model, prune={"mlp_channels": 0.5}, budget=expected / 2, metric=_disagreement)
    assert result.matched == 0 and "measured metric" in result.changes[0]


@pytest.mark.parametrize("arch", ["phi", "gptj", "gpt_neox", "persimmon", "phi3"])
def test_heads_fire_on_parallel_blocks_and_the_report_is_the_error(arch):
    """Phi and GPT-J compute Q, K, V and the MLP's input in one matmul (parallel_linear_fusion joins them: a
    parallel block), GPT-J's rotary interleaves pairs inside each head (a stack and a [..., H, D/2, 2] -> [..., H, D]
    view); GPT-NeoX cuts each head's q, k, v out of [..., H, 3 * D] with a split, Persimmon out of [..., H, 3, D]
    with selects and normalizes q and k per head, Phi-3 slices Q, K and V (grouped-query) out of one matmul. All
    were left whole ("a parallel block", "mixes the heads with other dims", "is not followed"). The MLP's rows of
    a shared matmul stay whole; the measured error is the error the compiled model gives."""
    import transformers as T

    config = {"phi": (T.PhiConfig, T.PhiModel, dict(hf_tiny._MHA)),
              "gptj": (T.GPTJConfig, T.GPTJModel, dict(vocab_size=hf_tiny.VOCAB, n_embd=32, n_layer=hf_tiny.LAYERS,
                                                       n_head=4, rotary_dim=4, n_positions=64)),
              "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXModel, dict(hf_tiny._DECODER)),
              "persimmon": (T.PersimmonConfig, T.PersimmonModel, dict(hf_tiny._DECODER)),
              "phi3": (T.Phi3Config, T.Phi3Model, dict(hf_tiny._GQA))}[arch]
    model = hf_tiny._tiny(config[0], config[1], **config[2])()
    samples = [hf_tiny.token_batch(2, 32, seed=s)[0] for s in range(2)]
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", prune="heads", accuracy_budget=0.99, calibration=[((x,), {"use_cache": False}) for x in samples])
        actual = [compiled(x, use_cache=False).last_hidden_state for x in samples]
        expected = [model(x, use_cache=False).last_hidden_state for x in samples]
    result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    assert result.matched == hf_tiny.LAYERS and not result.near_misses, (result.changes, result.near_misses)
    assert 0 < relative_error(torch.cat(actual), torch.cat(expected)) == pytest.approx(result.measured_error, rel=1e-3)


def test_parallel_block_heads_are_left_to_the_mlp_lever_when_both_are_asked():
    """Both levers would write the shared matmul's weight from the original; with mlp_channels asked too, the
    attention is left whole with its reason, and the MLP lever prunes its channels in that matmul."""
    import transformers as T

    model = hf_tiny._tiny(T.PhiConfig, T.PhiModel, **hf_tiny._MHA)()
    samples = [hf_tiny.token_batch(2, 32, seed=s)[0] for s in range(2)]
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", prune=["mlp_channels", "heads"], accuracy_budget=0.99,
                                   calibration=[((x,), {"use_cache": False}) for x in samples])
        actual = [compiled(x, use_cache=False).last_hidden_state for x in samples]
        expected = [model(x, use_cache=False).last_hidden_state for x in samples]
    result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    assert sum("parallel block" in why for why in result.near_misses) == hf_tiny.LAYERS, result.near_misses
    assert result.matched == hf_tiny.LAYERS  # the MLPs
    assert relative_error(torch.cat(actual), torch.cat(expected)) == pytest.approx(result.measured_error, rel=1e-3)


def test_heads_cut_inside_each_head_keep_whole_heads_of_the_projection():
    """GPT-NeoX's projection output is [..., H, 3 * D]: head h is rows [h * 3D, (h + 1) * 3D) (its q, k and v side
    by side), so the pruned projection is whole blocks of those rows, in order."""
    import transformers as T

    model = hf_tiny._tiny(T.GPTNeoXConfig, T.GPTNeoXModel, **hf_tiny._DECODER)()
    samples = [{"input_ids": hf_tiny.token_batch(2, 32, seed=s)[0], "use_cache": False} for s in range(2)]
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", prune={"heads": 0.5}, accuracy_budget=0.99,
                                   calibration=samples)
        compiled(**samples[0])
    graph = compiled.mmaccel_report.graphs[-1]
    original = model.layers[0].attention.query_key_value.weight
    per_head = original.shape[0] // model.config.num_attention_heads
    pruned = [v for k, v in graph.final_graph.named_buffers() if v.shape == (original.shape[0] // 2, original.shape[1])]
    pruned += [getattr(graph.final_graph, n.target) for n in graph.final_graph.graph.find_nodes(op="get_attr")
               if getattr(getattr(graph.final_graph, n.target), "shape", None) == (original.shape[0] // 2,
                                                                                   original.shape[1])]
    blocks = original.split(per_head)
    found = [w for w in pruned if all(any(torch.equal(b, o) for o in blocks) for b in w.split(per_head))]
    assert found, "no pruned projection made of whole per-head blocks of layer 0's"
    kept = [next(i for i, o in enumerate(blocks) if torch.equal(b, o)) for b in found[0].split(per_head)]
    assert kept == sorted(kept) and len(set(kept)) == len(kept)


def test_blocks_of_parallel_layers_are_found_through_their_fused_matmul():
    """Phi's Q, K, V and MLP input are one matmul after parallel_linear_fusion, named after the four modules. The
    name lost their common path ("{model.layers.0.self_attn.q_proj,...,model.layers.0.mlp.fc1}"), so the matmul
    sat in no numbered block and every block was left whole ("values other than its output leave it", also
    GPT-J, CodeGen, Cohere, Falcon). Now the blocks are dropped and the report's error is the compiled model's."""
    import transformers as T
    from mmaccel.passes.patterns import merged_layer_name

    assert merged_layer_name(["m.layers.0.self_attn.q_proj", "m.layers.0.mlp.fc1"]) == \
        "m.layers.0.{self_attn.q_proj,mlp.fc1}"
    assert merged_layer_name(["a.q_proj", "a.k_proj"]) == "a.{q_proj,k_proj}"
    model = hf_tiny._tiny(T.PhiConfig, T.PhiModel, **hf_tiny._MHA)()
    samples = [{"input_ids": hf_tiny.token_batch(2, 32, seed=s)[0], "use_cache": False} for s in range(2)]
    with torch.no_grad():
        compiled = mmaccel.compile(model, target="eager", prune="blocks", accuracy_budget=0.99, calibration=samples)
        actual = [compiled(**x).last_hidden_state for x in samples]
        expected = [model(**x).last_hidden_state for x in samples]
    result = compiled.mmaccel_report.graphs[-1].pass_result("prune")
    assert result.matched >= 1 and not result.near_misses, (result.changes, result.near_misses)
    assert relative_error(torch.cat(actual), torch.cat(expected)) == pytest.approx(result.measured_error, rel=1e-3)


def test_slices_that_tile_a_projection_become_one_split_and_others_stay():
    """passes/prune.slices_as_splits: slices that cut a fused_linear's output into consecutive pieces from 0 to its
    width are one split_with_sizes (the form the levers follow); a gap or an overlap is left as it is."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from mmaccel.passes.prune import slices_as_splits

    weight = torch.randn(12, 4)
    linear = torch.ops.mmaccel.fused_linear.default

    def tiled(x):
        y = linear(x, weight, None, "none", None)
        return y[..., :6] * 2, y[..., 6:9] + 1, y[..., 9:]

    def gap(x):
        y = linear(x, weight, None, "none", None)
        return y[..., :6], y[..., 7:]

    x = torch.randn(2, 4)
    for fn, expected in ((tiled, 1), (gap, 0)):
        gm = make_fx(fn)(x)
        before = fn(x)
        assert slices_as_splits(gm) == expected
        assert all(torch.equal(a, b) for a, b in zip(gm(x), before))
        splits = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.split_with_sizes.default)
        assert len(splits) == expected and (not splits or list(splits[0].args[1]) == [6, 3, 3])
