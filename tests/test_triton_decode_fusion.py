"""Decode GEMVs with RMSNorm or LayerNorm, SiLU(gate) * up, bias + GELU and residual adds fused in
(backends/triton/decode_fusion.py):
it fires on a decoder layer, the output matches eager, near-misses are left alone with their reason. Kernels
run under Triton's interpreter on CPU (fp32/fp16; bf16 loads are wrong there), with 1, 3 and 8 rows."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmaccel.models.decoder import RMSNorm
from mmaccel.models.registry import example_inputs
from mmaccel.models.vlm import VLM, VLMConfig, VLMDecode

from conftest import compile_and_check

pytest.importorskip("triton")

from mmaccel.backends.triton import decode_fusion  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM, HIDDEN = 40, 33  # neither a multiple of the interpreter's blocks: tails everywhere


@pytest.fixture(autouse=True)
def _fuse_wider_batches(monkeypatch):
    """Up to 8 rows on a GPU too (one by default there), so these tests check the same on both."""
    monkeypatch.setenv("MMACCEL_GEMV_FUSION", "8")


class Layer(nn.Module):
    """A Llama layer without attention: h = x + o(norm(x)); h + down(silu(gate(norm(h))) * up(norm(h))); the
    near-misses also return norm(h) or gate(norm(h))."""

    def __init__(self, expose_norm: bool = False, expose_gate: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(DIM, 1e-5), RMSNorm(DIM, 1e-6)
        for norm in (self.norm1, self.norm2):
            nn.init.normal_(norm.weight)
        self.o = nn.Linear(DIM, DIM, bias=False)
        self.gate, self.up = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)
        self.expose_norm, self.expose_gate = expose_norm, expose_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = x + self.o(self.norm1(x))
        n = self.norm2(h)
        gate = self.gate(n)
        out = h + self.down(F.silu(gate) * self.up(n))
        return (out, n) if self.expose_norm else (out, gate) if self.expose_gate else out


def _fusions(report) -> list[dict]:
    return [g.kernels for g in report.graphs]


@pytest.mark.parametrize("rows,dtype", [(1, torch.float32), (3, torch.float16), (8, torch.float32)])
def test_layer_fuses_norms_glu_and_residuals(rows, dtype):
    torch.manual_seed(0)
    layer = Layer().to(DEVICE, dtype)
    _, report = compile_and_check(layer, torch.randn(rows, 1, DIM, device=DEVICE, dtype=dtype), target="triton")
    (stats,) = _fusions(report)
    # o (norm + residual), gate/up (norm + SiLU*up), down (residual): nothing left to generate
    assert stats["gemv_fusions"] == 3 and stats["kernels"] == 0, stats
    assert not stats["gemv_near_misses"]


@pytest.mark.parametrize("kv_heads,rotary_kernels", [(2, 2), (4, 1)])
def test_decode_step_layers_are_gemvs_rotary_and_attention(kv_heads, rotary_kernels):
    """The registry's decode step: per layer the qkv, o, gate/up and down GEMVs and the rotary kernels (Q's
    and K's with the KV writes: one kernel when Q and K have as many heads, as Llama-2-7B, two under
    grouped-query attention); once per step the mask, the token embedding's row read (a generated kernel in
    place of ATen's embedding) and the lm_head with the final norm fused in."""
    torch.manual_seed(0)
    config = VLMConfig.tiny()
    vlm = VLM(dataclasses.replace(config, text=dataclasses.replace(config.text, kv_heads=kv_heads))).to(DEVICE)
    vlm.setup_cache(1)
    model = VLMDecode(vlm).eval().requires_grad_(False)
    _, report = compile_and_check(model, *example_inputs("vlm_decode", model, 1, 4), target="triton")
    (stats,) = _fusions(report)
    layers = config.text.layers
    assert stats["gemv_fusions"] == 4 * layers + 1 and stats["kernels"] == 2 + rotary_kernels * layers, stats


class PreNormLayer(nn.Module):
    """Whisper's / CLIP's decoder MLP half: h = x + o(LayerNorm(x)); h + fc2(GELU(fc1(LayerNorm(h)))), all
    linears with biases; approximate picks GELU's form."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        for norm in (self.norm1, self.norm2):
            nn.init.normal_(norm.weight)
            nn.init.normal_(norm.bias)
        self.o, self.fc1, self.fc2 = nn.Linear(DIM, DIM), nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.o(self.norm1(x))
        # dropout after the activation, as Whisper has: a copy in the inference graph, which must not be left
        # as a kernel of its own once GELU rides along fc1
        a = F.dropout(F.gelu(self.fc1(self.norm2(h)), approximate=self.approximate), p=0.1, training=self.training)
        return h + self.fc2(a)


@pytest.mark.parametrize("approximate,dtype", [("none", torch.float32), ("tanh", torch.float16)])
def test_pre_norm_layer_fuses_layer_norms_bias_gelu_and_residuals(approximate, dtype):
    """One row: o takes LayerNorm + bias + residual, fc1 LayerNorm + bias + GELU, fc2 bias + residual; nothing
    is left to generate. The input sits far from zero mean, as a residual stream does."""
    torch.manual_seed(0)
    layer = PreNormLayer(approximate).to(DEVICE, dtype).eval()
    _, report = compile_and_check(layer, torch.randn(1, 1, DIM, device=DEVICE, dtype=dtype) * 2 + 3, target="triton")
    (stats,) = _fusions(report)
    assert stats["gemv_fusions"] == 3 and stats["kernels"] == 0, stats


def test_layer_norm_prologue_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("MMACCEL_GEMV_LAYERNORM", "0")
    torch.manual_seed(0)
    _, report = compile_and_check(PreNormLayer().to(DEVICE).eval(), torch.randn(1, 1, DIM, device=DEVICE), target="triton")
    (stats,) = _fusions(report)
    # o and fc2 take bias + residual, fc1 bias + GELU; the two LayerNorms stay generated kernels
    assert stats["gemv_fusions"] == 3 and stats["kernels"] == 2, stats
    assert any("MMACCEL_GEMV_LAYERNORM=0" in why for why in stats["gemv_near_misses"]), stats


def test_layer_norm_of_several_rows_is_left_to_its_own_kernel():
    torch.manual_seed(0)
    _, report = compile_and_check(PreNormLayer().to(DEVICE).eval(), torch.randn(3, 1, DIM, device=DEVICE), target="triton")
    (stats,) = _fusions(report)
    assert any("LayerNorm in front of a GEMV of more than one row" in why for why in stats["gemv_near_misses"]), stats
    # o and fc2 take bias + residual, fc1 its bias; the norms and GELU stay generated kernels
    assert stats["gemv_fusions"] == 3 and stats["kernels"] == 3, stats


class LayerNormGluLayer(nn.Module):
    """StableLM's MLP: LayerNorm (with bias) in front of SiLU(gate) * up."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        nn.init.normal_(self.norm.weight)
        nn.init.normal_(self.norm.bias)
        self.gate, self.up = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        return x + self.down(F.silu(self.gate(n)) * self.up(n))


def test_layer_norm_in_front_of_glu_stays_its_own_kernel():
    """The GEMV kernel's LayerNorm prologue takes one plain output, not gate and up: StableLM's one-row decode
    step asserted in gemv() on a GPU (found by bench/hf_generate_coverage.py --device cuda). The GLU still fuses;
    the LayerNorm is left, with its reason."""
    torch.manual_seed(0)
    _, report = compile_and_check(LayerNormGluLayer().to(DEVICE).eval(), torch.randn(1, 1, DIM, device=DEVICE) * 2 + 3,
                                  target="triton")
    (stats,) = _fusions(report)
    assert stats["gemv_fusions"] == 2 and stats["kernels"] == 1, stats  # gate/up: SiLU*up; down: residual; the norm
    assert any("LayerNorm in front of SiLU(gate) * up" in why for why in stats["gemv_near_misses"]), stats


def test_norm_read_elsewhere_stays_materialized():
    torch.manual_seed(0)
    _, report = compile_and_check(Layer(expose_norm=True).to(DEVICE), torch.randn(3, 1, DIM, device=DEVICE),
                                  target="triton")
    (stats,) = _fusions(report)
    assert stats["gemv_fusions"] == 3  # o: norm + residual; gate/up: SiLU*up but not the norm; down: residual
    assert stats["kernels"] == 1  # the exposed norm
    assert any("another consumer" in why for why in stats["gemv_near_misses"]), stats


def test_gate_read_elsewhere_is_not_fused_with_up():
    torch.manual_seed(0)
    _, report = compile_and_check(Layer(expose_gate=True).to(DEVICE), torch.randn(3, 1, DIM, device=DEVICE),
                                  target="triton")
    (stats,) = _fusions(report)
    assert stats["gemv_fusions"] == 3  # o: norm + residual; gate/up: the norm only; down: residual
    assert any("SiLU(gate) * up" in why for why in stats["gemv_near_misses"]), stats


def test_broadcasting_residual_is_left_alone():
    torch.manual_seed(0)
    linear = nn.Linear(DIM, HIDDEN, bias=False).to(DEVICE)
    _, report = compile_and_check(lambda x, r: linear(x) + r, torch.randn(3, DIM, device=DEVICE),
                                  torch.randn(1, HIDDEN, device=DEVICE), target="triton")
    (stats,) = _fusions(report)
    assert stats["gemv_fusions"] == 0 and any("broadcasts" in why for why in stats["gemv_near_misses"]), stats


def test_switch_turns_the_fusions_off(monkeypatch):
    monkeypatch.setenv("MMACCEL_GEMV_FUSION", "0")
    torch.manual_seed(0)
    _, report = compile_and_check(Layer().to(DEVICE), torch.randn(1, 1, DIM, device=DEVICE), target="triton")
    (stats,) = _fusions(report)
    assert stats["gemv_fusions"] == 0 and stats["kernels"] == 4, stats  # 2 norms (1 with a residual add), SiLU*up, residual


@pytest.mark.parametrize("switch,cpu_rows,cuda_rows", [("0", 0, 0), ("1", 16, 1), ("8", 16, 8)])
def test_switch_values(monkeypatch, switch, cpu_rows, cuda_rows):
    monkeypatch.setenv("MMACCEL_GEMV_FUSION", switch)
    assert decode_fusion._max_rows(torch.device("cpu")) == cpu_rows
    assert decode_fusion._max_rows(torch.device("cuda")) == cuda_rows
    monkeypatch.setenv("MMACCEL_GEMV_FUSION", "on")
    with pytest.raises(ValueError, match="MMACCEL_GEMV_FUSION"):
        decode_fusion._max_rows(torch.device("cpu"))
