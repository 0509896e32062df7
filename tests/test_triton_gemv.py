"""The decode matmul kernel against an fp32 matmul. Without a GPU it runs under Triton's interpreter
(conftest sets TRITON_INTERPRET), where its config uses small blocks: the sizes below are not multiples
of them, and the narrow ones ((17, 33), (64, 300)) take the split-K path."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mmaccel.backends.triton.gemv import Fusion, _config, fused_reference, gemv, supports  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 loads are wrong in the interpreter
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
SHAPES = [(1, 1), (17, 33), (64, 300), (130, 1000)]  # (N, K)


def check(x, weight, bias=None):
    assert supports(x, weight)
    out = gemv(x, weight, bias)
    expected = x.float() @ weight.float().T + (0 if bias is None else bias.float())
    assert out.is_contiguous() and out.dtype == x.dtype and out.shape == expected.shape
    rtol = RTOL[x.dtype]
    # atol scaled by the output's magnitude: cancellation leaves some entries near 0
    torch.testing.assert_close(out, expected.to(x.dtype), rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_shapes(dtype, M, N, K, with_bias):
    torch.manual_seed(0)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    weight = torch.randn(N, K, device=DEVICE, dtype=dtype)
    check(x, weight, torch.randn(N, device=DEVICE, dtype=dtype) if with_bias else None)


def test_split_k_is_covered():
    cpu = torch.device("cpu")
    assert _config(3, 17, 33, cpu, torch.float32).splits > 1
    assert _config(3, 64, 300, cpu, torch.float32).splits > 1
    assert _config(3, 130, 1000, cpu, torch.float32).splits == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["column_slice", "every_other_row"])
def test_strided_rows(dtype, layout):
    torch.manual_seed(0)
    N, K = 64, 300
    wide = torch.randn(6, K + 40, device=DEVICE, dtype=dtype)
    x = wide[:, :K] if layout == "column_slice" else wide[::2, 7:K + 7]
    assert not x.is_contiguous()
    check(x, torch.randn(N, K, device=DEVICE, dtype=dtype), torch.randn(N, device=DEVICE, dtype=dtype))


def test_supports_rejects():
    x = torch.randn(3, 40, device=DEVICE)
    weight = torch.randn(20, 40, device=DEVICE)
    assert supports(x, weight)
    assert not supports(torch.randn(17, 40, device=DEVICE), weight)
    assert not supports(x[:0], weight)
    assert not supports(x, torch.randn(40, 20, device=DEVICE).T)  # transposed: not contiguous
    assert not supports(x.T.contiguous().T, weight)  # unit stride along M, not K
    assert not supports(x.half(), weight)
    assert not supports(x.double(), weight.double())
    assert not supports(x, torch.randn(20, 41, device=DEVICE))
    assert not supports(x[None], weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("N,K", [(17, 33), (130, 100)])  # tails of every block; K split at 17, whole at 130
@pytest.mark.parametrize("parts", ["norm", "norm+glu", "residual", "norm+residual", "bias+norm+residual"])
def test_fused_prologue_and_epilogues_match_the_unfused_reference(dtype, M, N, K, parts):
    torch.manual_seed(0)
    rows = 2 * N if "glu" in parts else N
    x = torch.randn(M, K, device=DEVICE, dtype=dtype) * 3
    weight = torch.randn(rows, K, device=DEVICE, dtype=dtype) / K ** 0.5
    fusion = Fusion(norm_weight=torch.randn(K, device=DEVICE, dtype=dtype) if "norm" in parts else None,
                    eps=1e-5, glu="glu" in parts,
                    residual=torch.randn(M, N, device=DEVICE, dtype=dtype) if "residual" in parts else None)
    bias = torch.randn(N, device=DEVICE, dtype=dtype) if "bias" in parts else None
    out = gemv(x, weight, bias, fusion)
    expected = fused_reference(x, weight, bias, fusion)
    assert out.shape == (M, N) and out.dtype == dtype
    rtol = RTOL[dtype]
    torch.testing.assert_close(out, expected.to(dtype), rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.parametrize("M", [1, 3])
def test_the_fused_tests_cover_both_the_split_and_the_whole_k_path(M):
    """A fused GEMV splits K where the plain one does (the finishing kernel applies what rides along)."""
    assert _config(M, 17, 33, torch.device("cpu"), torch.float32).splits > 1
    assert _config(M, 130, 100, torch.device("cpu"), torch.float32).splits == 1


@pytest.mark.parametrize("N,K", [(17, 33), (130, 100)])
@pytest.mark.parametrize("parts", ["norm", "norm+glu", "bias+norm+residual"])
def test_norm_with_x_as_one_vector_matches_the_reference(monkeypatch, N, K, parts):
    """MMACCEL_GEMV_NORM_ROWS (gemv.NORM_ROWS): a fused RMSNorm at M = 1 loads x and the norm weight once per
    step as a vector over 2 weight rows (N = 17 leaves a partial last block), split K or not."""
    from mmaccel.backends.triton import gemv as gemv_module

    monkeypatch.setattr(gemv_module, "NORM_ROWS", 2)
    assert _config(1, N, K, torch.device(DEVICE), torch.float16, norm=True).x1d
    test_fused_prologue_and_epilogues_match_the_unfused_reference(torch.float16, 1, N, K, parts)


@pytest.mark.parametrize("N,K", [(17, 33), (130, 100)])  # K split at 17, whole at 130
@pytest.mark.parametrize("parts", ["layernorm", "layernorm+bias+gelu", "bias+gelu_tanh+residual", "layernorm+residual"])
def test_layer_norm_prologue_and_gelu_epilogue_match_the_reference(N, K, parts):
    """Whisper's and CLIP's decode layers: LayerNorm in front (statistics gathered in the main loop, W @ g and
    W @ beta folded), bias + GELU after; x far from zero mean, as a residual stream is."""
    torch.manual_seed(0)
    dtype = torch.float16
    x = torch.randn(1, K, device=DEVICE, dtype=dtype) * 3 + 5
    weight = torch.randn(N, K, device=DEVICE, dtype=dtype) / K ** 0.5
    layer_norm = "layernorm" in parts
    fusion = Fusion(norm_weight=torch.randn(K, device=DEVICE, dtype=dtype) if layer_norm else None,
                    norm_bias=torch.randn(K, device=DEVICE, dtype=dtype) if layer_norm else None, eps=1e-5,
                    activation="gelu_tanh" if "gelu_tanh" in parts else "gelu" if "gelu" in parts else "none",
                    residual=torch.randn(1, N, device=DEVICE, dtype=dtype) if "residual" in parts else None)
    bias = torch.randn(N, device=DEVICE, dtype=dtype) if "bias" in parts else None
    out = gemv(x, weight, bias, fusion)
    expected = fused_reference(x, weight, bias, fusion)
    assert out.shape == (1, N)
    torch.testing.assert_close(out, expected.to(dtype), rtol=1e-2, atol=1e-2 * float(expected.abs().max()))
    assert _config(1, N, K, torch.device(DEVICE), dtype, norm=layer_norm, layer_norm=layer_norm).x1d == layer_norm


@pytest.mark.parametrize("N,K", [(17, 33), (130, 100)])  # K split at 17, whole at 130
def test_layer_norm_prologue_keeps_a_row_whose_mean_dwarfs_its_spread(N, K):
    """x = 1000 +- 0.1 in fp32: var = E[x^2] - E[x]^2 loses every digit there (1e6 against 0.01), so the
    statistics are of x - x[0]; the output must still equal LayerNorm's to fp32 rounding."""
    torch.manual_seed(0)
    x = 1000 + 0.1 * torch.randn(1, K, device=DEVICE)
    weight = torch.randn(N, K, device=DEVICE) / K ** 0.5
    fusion = Fusion(norm_weight=torch.randn(K, device=DEVICE), norm_bias=torch.randn(K, device=DEVICE), eps=1e-5)
    out = gemv(x, weight, None, fusion)
    expected = torch.nn.functional.layer_norm(x.double(), (K,), fusion.norm_weight.double(),
                                              fusion.norm_bias.double(), 1e-5) @ weight.double().t()
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("parts", ["layernorm+bias+gelu", "norm+glu", "bias+residual"])
def test_every_tuning_candidate_matches_the_reference(parts):
    """Each config the one-row autotuner may pick (gemv.CANDIDATES, as real CUDA sizes: fp16 steps of 256 to
    2048 elements, 1 to 16 rows, X1D with or without a norm) computes the fused GEMV, split K or not: the
    tuner times them on the GPU and must be free to take any."""
    from mmaccel.backends.triton import gemv as gemv_module

    torch.manual_seed(0)
    dtype, (N, K) = torch.float16, (40, 2 * 1024 + 96)  # K covers whole and partial steps of every size
    x = torch.randn(1, K, device=DEVICE, dtype=dtype) * 3 + 5
    glu = "glu" in parts
    weight = torch.randn(N * (2 if glu else 1), K, device=DEVICE, dtype=dtype) / K ** 0.5
    fusion = Fusion(norm_weight=torch.rand(K, device=DEVICE, dtype=dtype) + 0.5 if "norm" in parts else None,
                    norm_bias=torch.randn(K, device=DEVICE, dtype=dtype) if "layernorm" in parts else None,
                    eps=1e-5, glu=glu, activation="gelu" if "gelu" in parts else "none",
                    residual=torch.randn(1, N, device=DEVICE, dtype=dtype) if "residual" in parts else None)
    bias = torch.randn(N, device=DEVICE, dtype=dtype) if "bias" in parts else None
    expected = fused_reference(x, weight, bias, fusion).to(dtype)
    # the static config as CUDA would build it (no GPU here, so by hand), 132 SMs
    static = gemv_module._split(gemv_module.GemvConfig(1, 1024, 0, 0, 4, 1, fusion.norm_weight is not None), N, K, 132)
    options = gemv_module.candidates(N, K, dtype, fusion, static, sms=8)
    assert options[0] == static and len(set(options)) == len(options) > 4
    assert {cfg.splits > 1 for cfg in options} == {True, False}
    assert fusion.norm_weight is None or all(cfg.x1d for cfg in options)
    for cfg in options:
        out = torch.empty(1, N, device=DEVICE, dtype=dtype)
        part = out if cfg.splits == 1 else torch.empty(cfg.splits, 1, N * (2 if glu else 1), device=DEVICE,
                                                         dtype=torch.float32)
        gemv_module._launch(x, weight, bias, part, out, fusion, cfg, N)
        torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()),
                                   msg=lambda m, cfg=cfg: f"{cfg}: {m}")


def test_tuner_keeps_the_static_config_unless_another_is_clearly_faster(tmp_path, monkeypatch):
    """tuning.pick (the GEMV's and decode attention's): best of two rounds per option; the static config
    (first) stays on a near tie; the choice is written to the cache folder and read back by a fresh process's
    table; no measuring off CUDA."""
    from mmaccel.backends.triton import gemv as gemv_module
    from mmaccel.backends.triton.tuning import Choices, pick

    monkeypatch.setenv("MMACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemv_module, "_tuned", Choices("gemv_configs.json"))
    a, b, c = (gemv_module.GemvConfig(rows, 512, 512, 1, 4, 1, True) for rows in (1, 2, 4))
    calls = []

    def measure(times):
        def fn(cfg):
            calls.append(cfg)
            return times[cfg]
        return fn

    assert pick(gemv_module._tuned, "near", [a, b, c], measure({a: 10.0, b: 9.5, c: 11.0})) == a  # 5% faster: kept
    assert pick(gemv_module._tuned, "far", [a, b, c], measure({a: 10.0, b: 8.5, c: 11.0})) == b
    assert calls == [a, b, c] * 4  # two interleaved rounds per pick
    assert Choices("gemv_configs.json").get("far") == list(b)

    def refuses_b(cfg):
        if cfg == b:
            raise RuntimeError("out of resources")
        return {a: 10.0, c: 9.0}[cfg]
    assert pick(gemv_module._tuned, "refused", [a, b, c], refuses_b) == c  # measured once, then left out
    with pytest.raises(RuntimeError):
        pick(gemv_module._tuned, "static refused", [b, a], refuses_b)
    # tuning.tuned: a kept choice is restored; while a CUDA graph is captured, the static option, nothing kept
    from mmaccel.backends.triton.tuning import tuned
    assert tuned(gemv_module._tuned, "far", lambda: [a, c], measure({}), lambda known: gemv_module.GemvConfig(*known)) == b
    with monkeypatch.context() as capturing:
        capturing.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert tuned(gemv_module._tuned, "new", lambda: [c, a], measure({}), lambda known: None) == c
    assert Choices("gemv_configs.json").get("new") is None
    x, w = torch.randn(1, 64), torch.randn(8, 64)
    static = _config(1, 8, 64, x.device, x.dtype)
    assert gemv_module._tuned_config(x, w, None, Fusion(), 8, static) == static  # CPU: static, nothing timed
    assert len(calls) == 12
