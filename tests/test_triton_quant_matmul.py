"""Weight-only quantized matmul kernels (int8 per channel, int4 per group) against the op references in
ops/, on the CPU interpreter (fp32/fp16) and, with a GPU, also bf16 and the GPU block sizes. Shapes are not
multiples of the blocks; one activation row takes the GEMV, more rows the tiled GEMM."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from mmaccel.backends.triton import quant_matmul as qm  # noqa: E402
from mmaccel.ops.int4_linear import dequantize_int4, int4_linear_reference, quantize_int4_groupwise  # noqa: E402
from mmaccel.ops.int8_linear import int8_linear_reference, quantize_per_channel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _close(actual, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", [(1, 64), (37, 128), (130, 512)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_matches_reference(dtype, M, N, K, with_bias):
    torch.manual_seed(0)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    bias = torch.randn(N, device=DEVICE, dtype=dtype) if with_bias else None
    q, s = quantize_per_channel(w)
    out = qm.linear(x, q, s, None, bias, bits=8)
    assert out.shape == (M, N) and out.dtype == dtype and out.is_contiguous()
    _close(out, int8_linear_reference(x.float(), q, s.float(), None if bias is None else bias.float(), "none", None), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", [(1, 64), (37, 128), (130, 512)])
@pytest.mark.parametrize("group", [32, 64])
def test_int4_matches_reference(dtype, M, N, K, group):
    torch.manual_seed(0)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    bias = torch.randn(N, device=DEVICE, dtype=dtype)
    p, s, z = quantize_int4_groupwise(w, group)
    out = qm.linear(x, p, s, z, bias, bits=4, group=group)
    expected = int4_linear_reference(x.float(), p, s.float(), z, group, bias.float(), "none", None)
    _close(out, expected, dtype)


@pytest.mark.parametrize("M,N,K,group,block_n,split", [(1, 40, 256, 128, 16, 1), (2, 33, 256, 64, 16, 2),
                                                     (5, 20, 128, 32, 16, 4), (16, 70, 384, 128, 32, 3),
                                                     (7, 19, 768, 128, 16, 8)])
def test_int4_tensor_core_kernel_matches_reference(M, N, K, group, block_n, split):
    """The 2-16 row int4 kernel (tensor cores, nibbles unpacked as 1024 + q in fp16, scale and zero point after
    the dot): rows and columns past the blocks, K split over programs (more splits than fit in one case: 6
    groups into 8), each launch leaving its split buffers zero for the next (three launches agree); on a GPU
    also bf16 and the PTX unpack against the plain-op one."""
    torch.manual_seed(0)
    dtypes = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
    for dtype in dtypes:
        w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K ** 0.5
        p, s, z = quantize_int4_groupwise(w, group)
        x = torch.randn(M, K, device=DEVICE, dtype=dtype)
        bias = torch.randn(N, device=DEVICE, dtype=dtype)
        expected = int4_linear_reference(x.float(), p, s.float(), z, group, bias.float(), "none", None)
        config = qm.TcConfig(block_n, split, 1 if DEVICE == "cpu" else 4, 1 if DEVICE == "cpu" else 3)
        runs = [qm.int4_tc_linear(x, p, s, z, bias, group, config, use_asm=False) for _ in range(3)]
        if DEVICE == "cuda":
            runs.append(qm.int4_tc_linear(x, p, s, z, bias, group, config, use_asm=True))
        assert runs[0].shape == (M, N) and runs[0].dtype == dtype
        for out in runs:
            _close(out, expected, dtype)
            torch.testing.assert_close(out, runs[0], rtol=0, atol=1e-2 * float(expected.abs().max()))
        if split > 1:
            partial, count = qm._SPLIT_BUFFERS[(x.device, N)]
            assert not partial.any() and not count.any()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 16), N=st.integers(1, 80), groups=st.integers(1, 6), group=st.sampled_from([32, 64, 128]),
       block_n=st.sampled_from([16, 32]), split=st.integers(1, 8), bias=st.booleans())
def test_int4_tensor_core_kernel_property(M, N, groups, group, block_n, split, bias):
    """Any row count up to 16, any width, any number of groups and splits (more splits than groups too): the
    tensor-core int4 kernel matches the op's reference (interpreter, fp16), and a second launch agrees with the
    first (the split buffers were left zero)."""
    torch.manual_seed(N * 131 + M)
    K = groups * group
    w = torch.randn(N, K, device=DEVICE, dtype=torch.float16) / K ** 0.5
    p, s, z = quantize_int4_groupwise(w, group)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
    b = torch.randn(N, device=DEVICE, dtype=torch.float16) if bias else None
    expected = int4_linear_reference(x.float(), p, s.float(), z, group, None if b is None else b.float(), "none", None)
    config = qm.TcConfig(block_n, split, 1 if DEVICE == "cpu" else 4, 1 if DEVICE == "cpu" else 3)
    first = qm.int4_tc_linear(x, p, s, z, b, group, config)
    _close(first, expected, torch.float16)
    # Bitwise on the interpreter; on a GPU the split partials arrive by float atomics in any order, so the last bit
    # may differ (seen on the H200: 6e-8 on one element of 413). A split buffer left non-zero would add a whole
    # partial sum (order 0.1), far outside this tolerance.
    exact = DEVICE == "cpu"
    torch.testing.assert_close(qm.int4_tc_linear(x, p, s, z, b, group, config), first,
                               rtol=0 if exact else 1e-3, atol=0 if exact else 1e-4)


def test_one_row_int4_kernel_is_chosen_by_measurement(tmp_path, monkeypatch):
    """One int4 activation row on CUDA runs whichever of the row kernel and the tensor-core kernel measured
    faster for the shape (the row kernel unless another beats it by tuning.MARGIN), kept on disk; MMACCEL_GEMV_TUNE=0 keeps
    the row kernel. Here the measurements are scripted and each candidate runs once (interpreter)."""
    from mmaccel.backends.triton.tuning import Choices

    monkeypatch.setenv("MMACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(qm, "_one_row_choices", Choices("int4_one_row.json"))
    monkeypatch.setattr(qm, "device_name", lambda device: "test")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU build has no CUDA
    monkeypatch.setattr(qm, "GEMV_CONFIGS", {**qm.GEMV_CONFIGS, 4: qm.INTERPRETER_CONFIG})
    monkeypatch.setattr(qm, "ONE_ROW_INT4_CANDIDATES", [("row", *qm.INTERPRETER_CONFIG), ("tc", 16, 2, 1, 1)])
    w = torch.randn(40, 128, device=DEVICE, dtype=torch.float16)
    p, s, z = quantize_int4_groupwise(w, 32)
    x = torch.randn(1, 128, device=DEVICE, dtype=torch.float16)
    expected = int4_linear_reference(x.float(), p, s.float(), z, 32, None, "none", None)
    for times, chosen in (([10.0, 8.5], "tc"), ([10.0, 9.5], "row")):
        script = iter(times * 2)  # two interleaved rounds
        outputs = []

        def fake_time(fn, script=script, outputs=outputs):
            outputs.append(fn())
            return next(script)

        monkeypatch.setattr(qm, "time_us", fake_time)
        choice = qm._one_row_int4(x, p, s, z, None, 32)
        assert choice[0] == chosen and len(outputs) == 4
        for out in outputs:  # what was timed computes the right thing
            _close(out, expected, torch.float16)
        assert tuple(qm._one_row_choices.get(f"v1|test|{x.dtype}|1x40x128|g32|bias=False")) == choice
        qm._one_row_choices.set(f"v1|test|{x.dtype}|1x40x128|g32|bias=False", None)  # measure again next round
    monkeypatch.setenv("MMACCEL_GEMV_TUNE", "0")
    assert qm._one_row_int4(x, p, s, z, None, 32)[0] == "row"


def test_int4_quantization_round_trip():
    """Packing is lossless (dequantize(quantize(w)) is w on the grid) and the error is what 4 bits allow."""
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    p, s, z = quantize_int4_groupwise(w, 32)
    assert p.dtype == torch.uint8 and p.shape == (16, 128) and s.shape == z.shape == (16, 8)
    deq = dequantize_int4(p, s, z, 32)
    # each value within half a step of its group's grid
    step = s.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    p2, s2, z2 = quantize_int4_groupwise(deq, 32)
    torch.testing.assert_close(dequantize_int4(p2, s2, z2, 32), deq, rtol=1e-5, atol=1e-6)


def test_supports_refuses_what_the_kernels_cannot_run():
    x = torch.randn(2, 64, device=DEVICE)
    q = torch.zeros(8, 64, dtype=torch.int8, device=DEVICE)
    assert qm.supports(x, q, 8)
    assert not qm.supports(x.t().contiguous().t(), q, 8)  # K not unit stride
    assert not qm.supports(x, q.to(torch.uint8), 8)
    packed = torch.zeros(8, 32, dtype=torch.uint8, device=DEVICE)
    assert qm.supports(x, packed, 4, group=32)
    assert not qm.supports(x, packed, 4, group=128)  # K not a multiple of the group


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 128)])
def test_dequantize_kernel_matches_reference(bits, group):
    torch.manual_seed(0)
    w = torch.randn(5, 256, device=DEVICE)
    if bits == 8:
        q, s = quantize_per_channel(w)
        z, expected = None, q.float() * s[:, None]
    else:
        q, s, z = quantize_int4_groupwise(w, group)
        expected = dequantize_int4(q, s, z, group)
    torch.testing.assert_close(qm.dequantize(q, s, z, bits, group, torch.float32), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 17])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_w8a8_matches_reference(dtype, M, granularity):
    """W8A8 dynamic: up to 16 rows the int8 kernels on the dequantized activation, beyond them the integer
    matmul; both give the reference's values up to float32 summation order."""
    from mmaccel.ops.w8a8_linear import w8a8_linear_reference

    torch.manual_seed(1)
    N, K = 37, 256
    w = torch.randn(N, K, device=DEVICE)
    x = (torch.randn(M, K, device=DEVICE) * torch.linspace(0.1, 3, M, device=DEVICE)[:, None]).to(dtype)
    bias = torch.randn(N, device=DEVICE, dtype=dtype)
    q, s = quantize_per_channel(w)
    out = qm.w8a8_linear(x, q, s, bias, granularity)
    assert out.shape == (M, N) and out.dtype == dtype
    _close(out, w8a8_linear_reference(x, q, s, bias, "none", None, granularity), dtype)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (8, 9), reason="needs fp8 tensor cores")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K", [(1, 4096), (5, 11008), (640, 4096)])
def test_fp8_rows_and_scaled_mm_match_reference(dtype, M, K):
    """The one-kernel token quantization gives the reference's fp8 bits and scales; the op through it and
    torch._scaled_mm gives the reference's values (Hopper's fp8 sums: 2.5e-4 of the largest output)."""
    from mmaccel.ops.fp8_linear import fp8_linear_reference, quantize_fp8_activation, quantize_fp8_weight

    torch.manual_seed(2)
    x = (torch.randn(M, K, device=DEVICE) * torch.linspace(0.01, 10, M, device=DEVICE)[:, None]).to(dtype)
    xq, sx = qm.quantize_fp8_rows(x)
    ref_q, ref_s = quantize_fp8_activation(x, "row")
    assert torch.equal(sx, ref_s) and torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8))
    qweight, wscale = quantize_fp8_weight(torch.randn(96, K, device=DEVICE), "row")
    bias = torch.randn(96, device=DEVICE, dtype=dtype)
    expected = fp8_linear_reference(x, qweight, wscale, bias, "none", None, "row").float()
    out = qm.fp8_linear(x, qweight, wscale, bias, "row").float()
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (8, 9), reason="needs fp8 tensor cores")
@pytest.mark.parametrize("N,K", [(37, 4096), (4096, 11008)])
def test_fp8_gemv_matches_reference(N, K):
    from mmaccel.ops.fp8_linear import fp8_linear_reference, quantize_fp8_weight

    torch.manual_seed(4)
    x = torch.randn(1, K, device=DEVICE, dtype=torch.bfloat16)
    qweight, wscale = quantize_fp8_weight(torch.randn(N, K, device=DEVICE), "row")
    bias = torch.randn(N, device=DEVICE, dtype=torch.bfloat16)
    expected = fp8_linear_reference(x, qweight, wscale, bias, "none", None, "row")
    _close(qm.fp8_gemv(x, qweight, wscale, bias), expected, torch.bfloat16)
    _close(qm.fp8_linear(x, qweight, wscale, bias, "tensor"), expected, torch.bfloat16)


@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("kind", ["normal", "positive", "negative", "zeros", "outlier"])
def test_w8a8_gemv_quantizes_the_token_as_the_reference(granularity, kind):
    """One row: the kernel quantizes x itself; in float32 it gives the reference's integer sums up to the
    float32 rounding of the final sum (here 1e-6 relative), whatever the token's range."""
    from mmaccel.ops.w8a8_linear import w8a8_linear_reference

    torch.manual_seed(5)
    N, K = 45, 1000  # K not a multiple of the block
    x = {"normal": torch.randn(1, K), "positive": torch.rand(1, K), "negative": -torch.rand(1, K),
         "zeros": torch.zeros(1, K), "outlier": torch.randn(1, K) * torch.where(torch.arange(K) == 7, 300.0, 1.0)}[kind]
    q, s = quantize_per_channel(torch.randn(N, K))
    bias = torch.randn(N)
    x, q, s, bias = (t.to(DEVICE) for t in (x, q, s, bias))
    out = qm.w8a8_gemv(x, q, s, bias, granularity)
    expected = w8a8_linear_reference(x, q, s, bias, "none", None, granularity)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_bench_int4_word_variants_match_reference():
    """bench/int4_gemv_variants.py's repacked-word GEMVs (a diagnosis, not shipped) compute the op: the repacking
    keeps every nibble, and both tile orders match the reference, with a step count that does not divide the
    groups (gcd fallback) and rows that do not fill the last tile."""
    import sys
    from pathlib import Path
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        import int4_gemv_variants as V
    finally:
        sys.path.remove(bench)
    torch.manual_seed(0)
    for N, K, cfg in [(33, 384, (8, 2, 2)), (40, 512, (16, 4, 4))]:
        w = torch.randn(N, K, device=DEVICE) / K ** 0.5
        p, s, z = quantize_int4_groupwise(w.to(torch.float16), V.GROUP)
        x = torch.randn(1, K, device=DEVICE, dtype=torch.float16)
        w32 = V.pack_words(p, V.GROUP)
        assert w32.dtype == torch.int32 and w32.shape == (N, K // 8)
        ref = x.float() @ dequantize_int4(p, s, z, V.GROUP).float().T
        for fn in (V.words, V.words_t):
            _close(fn(x, w32, s, z, *cfg), ref, torch.float16)
