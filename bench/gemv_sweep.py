"""Sweep of Triton decode-matmul (GEMV) kernels, out[M, N] = x[M, K] @ w[N, K].T in bf16, against cuBLAS and a
weight copy. One GPU run of a few minutes:

    python bench/gemv_sweep.py [--out $OUT/gemv_sweep.json] [--budget-s 420]
    TRITON_INTERPRET=1 python bench/gemv_sweep.py --smoke      # CPU: correctness of every kernel family only
    TRITON_INTERPRET=1 python bench/gemv_sweep.py --dry --out /tmp/gemv_sweep.json   # CPU: the whole flow, tiny

Kernel families (all with fp32 accumulation and optional split-K, whose fp32 partials a second kernel sums):
    dot   the current backend kernel: tl.dot with x padded to 16 rows, acc [16, BLOCK_N]
    dotT  the same with the operands swapped (acc [BLOCK_N, 16] = w @ x.T), so BLOCK_N >= 64 can use wgmma
    tma   dotT with both operands loaded by TMA descriptors (zero fill past M, N and K)
    red   dot-free: acc_r[BLOCK_N, BLOCK_K] += w * x_r for ROWS activation rows (a static unroll), one tl.sum
          per row after the K loop; M > ROWS is handled by row groups (adjacent programs, so the second read
          of a weight tile comes from L2)
Split-K ("split" = target programs per SM) puts more programs on the chip when the column blocks leave SMs idle.

Phase 1 times every config on 22016x4096 and 4096x4096 at M=1 (configs built for one row) and M=8 (configs
for several rows): the median of --reps calls timed by CUDA events (mmaccel/timing.py), L2 cleared by a
256 MiB memset before each call (the H200 results in bench/results/ were taken with triton.testing.do_bench,
which clears L2 the same way and takes the median of as many calls as fit in 20-50 ms). Phase 2
times the best few of each class on all four 7B-decoder shapes and M in {1, 4, 8}, plus a "clean" time where
the L2 is emptied by reading a 256 MiB buffer instead (the memset leaves up to an L2's worth of dirty lines
that the timed kernel then pays to write back). Kernels are compiled up front in a process pool.
GB/s counts weight bytes read once; copy GB/s counts read + write.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, wait, FIRST_COMPLETED
from typing import Optional

import torch
import triton
import triton.language as tl

from common import default_out, environment, gb_per_s, rel_err, write_json
from mmaccel.timing import median_ms

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: no TMA family
    TensorDescriptor = None

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # (N, K) of a 7B decoder's linears
PHASE1_SHAPES = [(22016, 4096), (4096, 4096)]


# ----------------------------------------------------------------------------------------------- kernels
# _dot_kernel mirrors backends/triton/gemv.py `_gemv_kernel` at commit 0c1a114 (the backend's kernel before this
# sweep; its M > 1 kernel is still this form at 80d7613), without bias and DOT_PRECISION, plus SWAP.
@triton.jit
def _dot_kernel(X, W, Out, M, N, K, stride_xm, k_per_split, SWAP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = split * k_per_split + tl.arange(0, BLOCK_K)
    w_rows = offs_n % N
    w_ptrs = W + w_rows[:, None].to(tl.int64) * K + offs_k[None, :]
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    m_ok = offs_m < M
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        k_ok = offs_k < K - k
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ok = m_ok[:, None] & (offs_n < N)[None, :]
    out_ptrs = Out + (split * M + offs_m[:, None]) * N + offs_n[None, :]
    if SWAP:
        tl.store(out_ptrs, tl.trans(acc).to(Out.dtype.element_ty), mask=out_ok)
    else:
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=out_ok)


@triton.jit
def _red_row(acc, x_ptrs, r: tl.constexpr, ROWS: tl.constexpr, row0, M, stride_xm, k_ok, wf, X2D: tl.constexpr):
    if r < ROWS:
        # rows past M read row M - 1 (a valid row) rather than taking a mask; the store drops them
        x = tl.load(x_ptrs + tl.minimum(r, M - 1 - row0) * stride_xm, mask=k_ok, other=0.0)
        if X2D:
            acc += wf * x.to(tl.float32)
        else:
            acc += wf * x.to(tl.float32)[None, :]
    return acc


@triton.jit
def _red_store(acc, out_ptrs, r: tl.constexpr, ROWS: tl.constexpr, row0, M, N, offs_n):
    if r < ROWS:
        # a row past M stores nothing: its column limit drops to 0
        n_ok = offs_n < tl.where(r < M - row0, N, 0)
        tl.store(out_ptrs + r * N, tl.sum(acc, axis=1).to(out_ptrs.dtype.element_ty), mask=n_ok)


# The candidate family of this sweep: its ROWS=1, X2D, evict_first case became backends/triton/gemv.py
# `_gemv_row_kernel` in commit 84acd2f.
@triton.jit
def _red_kernel(X, W, Out, M, N, K, stride_xm, k_per_split, row_groups, ROWS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVICT: tl.constexpr, X2D: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    # row groups of one weight tile are adjacent programs: they run together and share the tile through L2
    row0 = (pid % row_groups) * ROWS
    offs_n = (pid // row_groups) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = split * k_per_split + tl.arange(0, BLOCK_K)
    w_ptrs = W + (offs_n % N)[:, None].to(tl.int64) * K + offs_k[None, :]
    if X2D:  # x read in the weight tile's shape (rows repeated): its layout, with no shuffle through shared memory
        x_ptrs = X + row0 * stride_xm + (offs_n * 0)[:, None] + offs_k[None, :]
    else:
        x_ptrs = X + row0 * stride_xm + offs_k
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc4 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc5 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc6 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc7 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        k_ok = offs_k < K - k
        wf = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy=EVICT).to(tl.float32)
        acc0 = _red_row(acc0, x_ptrs, 0, ROWS, row0, M, stride_xm, k_ok, wf, X2D)
        acc1 = _red_row(acc1, x_ptrs, 1, ROWS, row0, M, stride_xm, k_ok, wf, X2D)
        acc2 = _red_row(acc2, x_ptrs, 2, ROWS, row0, M, stride_xm, k_ok, wf, X2D)
        acc3 = _red_row(acc3, x_ptrs, 3, ROWS, row0, M, stride_xm, k_ok, wf, X2D)
        acc4 = _red_row(acc4, x_ptrs, 4, ROWS, row0, M, stride_xm, k_ok, wf, X2D)
        acc5 = _red_row(acc5, x_ptrs, 5, ROWS, row0, M, stride_xm, k_ok, wf, X2D)
        acc6 = _red_row(acc6, x_ptrs, 6, ROWS, row0, M, stride_xm, k_ok, wf, X2D)
        acc7 = _red_row(acc7, x_ptrs, 7, ROWS, row0, M, stride_xm, k_ok, wf, X2D)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out_ptrs = Out + (split * M + row0) * N + offs_n
    _red_store(acc0, out_ptrs, 0, ROWS, row0, M, N, offs_n)
    _red_store(acc1, out_ptrs, 1, ROWS, row0, M, N, offs_n)
    _red_store(acc2, out_ptrs, 2, ROWS, row0, M, N, offs_n)
    _red_store(acc3, out_ptrs, 3, ROWS, row0, M, N, offs_n)
    _red_store(acc4, out_ptrs, 4, ROWS, row0, M, N, offs_n)
    _red_store(acc5, out_ptrs, 5, ROWS, row0, M, N, offs_n)
    _red_store(acc6, out_ptrs, 6, ROWS, row0, M, N, offs_n)
    _red_store(acc7, out_ptrs, 7, ROWS, row0, M, N, offs_n)


@triton.jit
def _tma_kernel(x_desc, w_desc, Out, M, N, K, k_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    off_n = pid_n * BLOCK_N
    k0 = split * k_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k in range(k0, tl.minimum(k0 + k_per_split, K), BLOCK_K):
        w = w_desc.load([off_n, k])
        x = x_desc.load([0, k])
        acc = tl.dot(w, tl.trans(x), acc)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    out_ptrs = Out + (split * M + offs_m[None, :]) * N + offs_n[:, None]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


# Mirrors backends/triton/gemv.py `_sum_splits_kernel` at commit 0c1a114, without the bias.
@triton.jit
def _sum_splits_kernel(Part, Out, MN, num_splits, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(num_splits):
        acc += tl.load(Part + s * MN + offs, mask=ok, other=0.0)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class Cfg:
    kind: str  # dot, dotT, tma, red
    bn: int
    bk: int
    warps: int
    stages: int
    rows: int = 16  # red: activation rows per program (ROWS); the dot kinds pad to 16
    evict: str = ""  # red: eviction policy of the weight loads
    split: int = 0  # split K until there are this many programs per SM (0: never split)
    x2d: bool = True  # red: x loaded in the weight tile's shape (no per-step layout shuffle through smem)

    @property
    def name(self) -> str:
        s = f"{self.kind} n{self.bn} k{self.bk} w{self.warps} s{self.stages}"
        if self.kind == "red":
            s += f" r{self.rows}" + (" ef" if self.evict else "") + ("" if self.x2d else " x1d")
        return s + (f" split{self.split}" if self.split else "")


@dataclasses.dataclass(frozen=True)
class Plan:
    grid: tuple
    rows: int
    row_groups: int
    splits: int
    k_per_split: int


def plan(cfg: Cfg, M: int, N: int, K: int, sms: int, splits: Optional[int] = None) -> Plan:
    rows = min(cfg.rows, M) if cfg.kind == "red" else 16
    row_groups = triton.cdiv(M, rows)
    n_blocks = triton.cdiv(N, cfg.bn)
    if splits is None:
        progs = n_blocks * row_groups
        splits = 1
        if cfg.split and progs < cfg.split * sms:
            splits = min(triton.cdiv(cfg.split * sms, progs), triton.cdiv(K, cfg.bk))
    kps = triton.cdiv(triton.cdiv(K, splits), cfg.bk) * cfg.bk
    splits = triton.cdiv(K, kps)
    return Plan((n_blocks * row_groups, splits), rows, row_groups, splits, kps)


class Runner:
    """One config on one problem: buffers and descriptors made once, so a call is only the launches."""

    def __init__(self, cfg: Cfg, x: torch.Tensor, w: torch.Tensor, sms: int, splits: Optional[int] = None):
        (M, K), N = x.shape, w.shape[0]
        self.cfg, self.x, self.w, self.M, self.N, self.K = cfg, x, w, M, N, K
        self.p = plan(cfg, M, N, K, sms, splits)
        self.out = torch.empty(M, N, device=x.device, dtype=x.dtype)
        self.part = self.out if self.p.splits == 1 else torch.empty(self.p.splits, M, N, device=x.device,
                                                                    dtype=torch.float32)
        if cfg.kind == "tma":
            self.x_desc = TensorDescriptor.from_tensor(x, [16, cfg.bk])
            self.w_desc = TensorDescriptor.from_tensor(w, [cfg.bn, cfg.bk])

    def __call__(self, warmup: bool = False) -> torch.Tensor:
        c, p, x, w = self.cfg, self.p, self.x, self.w
        M, N, K = self.M, self.N, self.K
        opts = dict(num_warps=c.warps, num_stages=c.stages)
        if c.kind in ("dot", "dotT"):
            args = (x, w, self.part, M, N, K, x.stride(0), p.k_per_split)
            kw = dict(SWAP=c.kind == "dotT", BLOCK_M=16, BLOCK_N=c.bn, BLOCK_K=c.bk, **opts)
            kernel = _dot_kernel
        elif c.kind == "red":
            args = (x, w, self.part, M, N, K, x.stride(0), p.k_per_split, p.row_groups)
            kw = dict(ROWS=p.rows, BLOCK_N=c.bn, BLOCK_K=c.bk, EVICT=c.evict, X2D=c.x2d, **opts)
            kernel = _red_kernel
        else:
            args = (self.x_desc, self.w_desc, self.part, M, N, K, p.k_per_split)
            kw = dict(BLOCK_M=16, BLOCK_N=c.bn, BLOCK_K=c.bk, **opts)
            kernel = _tma_kernel
        if warmup and hasattr(kernel, "warmup"):  # compile only
            kernel.warmup(*args, grid=p.grid, **kw)
            if p.splits > 1:
                _sum_splits_kernel.warmup(self.part, self.out, M * N, p.splits, BLOCK=1024, grid=(1,))
            return self.out
        kernel[p.grid](*args, **kw)
        if p.splits > 1:
            _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](self.part, self.out, M * N, p.splits, BLOCK=1024)
        return self.out


def dot_configs() -> list[Cfg]:
    out = []
    for bn in (16, 32, 64, 128):
        for bk in (64, 128, 256, 512):
            for warps in (2, 4, 8):
                for stages in (2, 3, 4, 5, 6):
                    smem = stages * (16 + bn) * bk * 2
                    if smem > 160 * 1024 or bn * bk < 2048 or (warps == 2 and bn > 32) or (warps == 8 and bn < 32):
                        continue
                    if stages not in {64: (4, 6), 128: (3, 4, 6), 256: (2, 3, 4, 5, 6), 512: (2, 3, 4)}[bk]:
                        continue
                    if warps != 4 and stages not in (3, 4):  # warps swept at the two common depths only
                        continue
                    out.append(Cfg("dot", bn, bk, warps, stages))
    return out


def swapped_configs() -> list[Cfg]:
    out = []
    for kind in ("dotT", "tma"):
        for bn in (64, 128):
            for bk in (64, 128, 256):
                for stages in (3, 4, 6):
                    if stages * (16 + bn) * bk * 2 > 200 * 1024:
                        continue
                    for warps in ((4,) if bn == 64 else (4, 8)):
                        out.append(Cfg(kind, bn, bk, warps, stages))
    return out


def red_configs(rows: int) -> list[Cfg]:
    out = []
    for bn in (1, 2, 4, 8, 16, 32):
        for bk in (128, 256, 512, 1024, 2048):
            for warps in (2, 4, 8):
                per_thread = bn * bk // (32 * warps)  # weight elements a thread holds per K step
                if per_thread < 8 or rows * per_thread > (64 if rows == 1 else 96) or bk > 2048:
                    continue
                out.append(Cfg("red", bn, bk, warps, 1, rows))
                if rows == 1 and warps == 4:  # the cache hint and the 1-D x load, on a slice of the space
                    out.append(Cfg("red", bn, bk, warps, 1, rows, "evict_first"))
                    out.append(Cfg("red", bn, bk, warps, 1, rows, x2d=False))
    return out


def with_splits(cfgs: list[Cfg]) -> list[Cfg]:
    """Each config without and with split-K (4 programs per SM; large tiles also 8)."""
    out = []
    for c in cfgs:
        out += [c, dataclasses.replace(c, split=4)]
        if c.bn >= 64:
            out.append(dataclasses.replace(c, split=8))
    return out


def interleave(*lists: list) -> list:
    """Round-robin over the families, so a sweep cut short by its time budget still covers each."""
    out, n = [], max(map(len, lists))
    for i in range(n):
        out += [lst[i] for lst in lists if i < len(lst)]
    return out


def class_configs(multi_row: bool) -> list[Cfg]:
    red = red_configs(8) + red_configs(4) if multi_row else red_configs(1)
    fams = [with_splits(red), with_splits(dot_configs())]
    if TensorDescriptor is not None:
        fams.append(with_splits(swapped_configs()))
    else:
        fams.append(with_splits([c for c in swapped_configs() if c.kind == "dotT"]))
    return interleave(*fams)


# ----------------------------------------------------------------------------------------------- compile pool
def _compile_one(spec) -> tuple:
    cfg, M, splits = spec
    t = time.perf_counter()
    try:
        x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)  # same specialization as the real shapes
        Runner(cfg, x, w, 132, splits)(warmup=True)
        return spec, None, time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
        return spec, f"{type(e).__name__}: {str(e)[:200]}", time.perf_counter() - t


def precompile(specs: list, workers: int, deadline: float) -> dict:
    """Compile every (config, M, splits>1) variant in worker processes into Triton's disk cache, so the timing
    loop only loads binaries. Returns counts and errors; whatever is left at the deadline compiles on first use."""
    t0, done, errors = time.time(), 0, {}
    if not specs:
        return {"specs": 0}
    import multiprocessing as mp
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        pending = {ex.submit(_compile_one, s) for s in specs}
        while pending and time.time() < deadline:
            finished, pending = wait(pending, timeout=max(0.1, deadline - time.time()), return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    spec, err, _ = f.result()
                except Exception as e:  # noqa: BLE001 - a dead worker
                    err, spec = f"worker: {e}", None
                done += 1
                if err and spec is not None:
                    errors[spec[0].name + f" M{spec[1]}"] = err
        for f in pending:
            f.cancel()
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
    return {"specs": len(specs), "done": done, "seconds": time.time() - t0, "errors": errors}


# ----------------------------------------------------------------------------------------------- timing
DEV = "cuda"  # --dry: "cpu" under the interpreter, to exercise this script's flow without a GPU
DTYPE = torch.bfloat16


_FLUSH = []


def bench(fn, reps: int) -> float:
    """Median us of `reps` calls, L2 cleared by a 256 MiB memset before each; off CUDA, one wall-clock call."""
    if DEV != "cuda":
        return median_ms(fn, 1, 0) * 1e3
    if not _FLUSH:
        _FLUSH.append(torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda"))
    return median_ms(fn, reps, 5, DEV, before=_FLUSH[0].zero_) * 1e3


_SCRUB = []


def bench_clean(fn, reps: int = 100) -> float:
    """Median us with the L2 emptied by a 256 MiB read instead, so no dirty lines are left for the timed kernel
    to write back."""
    if DEV != "cuda":
        return bench(fn, 1)
    if not _SCRUB:
        _SCRUB.append(torch.randn(64 * 1024 * 1024, device="cuda"))
    return median_ms(fn, reps, 1, DEV, before=_SCRUB[0].sum) * 1e3


class Problem:
    def __init__(self, M: int, N: int, K: int, seed: int = 0):
        g = torch.Generator(device=DEV).manual_seed(seed + 7 * M + N + K)
        self.M, self.N, self.K = M, N, K
        self.x = torch.randn(M, K, device=DEV, dtype=torch.float32, generator=g).to(DTYPE)
        self.w = (torch.randn(N, K, device=DEV, dtype=torch.float32, generator=g) / K ** 0.5).to(DTYPE)
        self.ref = (self.x.double() @ self.w.double().T).float()
        self.bytes = N * K * self.w.element_size()

    def time_torch(self, reps: int, clean: bool = False) -> dict:
        err = rel_err(self.x @ self.w.T, self.ref)
        fn = lambda: torch.mm(self.x, self.w.t())  # noqa: E731
        us = bench(fn, reps)
        row = {"us": us, "gbps": gb_per_s(self.bytes, us), "err": err}
        if clean:
            row["clean_us"] = bench_clean(fn)
            row["clean_gbps"] = gb_per_s(self.bytes, row["clean_us"])
        return row

    def time_copy(self, clean: bool) -> dict:
        dst = torch.empty_like(self.w)
        fn = lambda: dst.copy_(self.w)  # noqa: E731
        us = bench(fn, 100)
        row = {"us": us, "gbps": gb_per_s(2 * self.bytes, us)}
        if clean:
            row["clean_us"] = bench_clean(fn)
            row["clean_gbps"] = gb_per_s(2 * self.bytes, row["clean_us"])
        return row


def time_cfg(cfg: Cfg, prob: Problem, sms: int, reps: int, clean: bool = False) -> dict:
    row = {"cfg": cfg.name, **dataclasses.asdict(cfg), "M": prob.M, "N": prob.N, "K": prob.K}
    try:
        run = Runner(cfg, prob.x, prob.w, sms)
        row.update(splits=run.p.splits, programs=run.p.grid[0] * run.p.grid[1])
        run.out.fill_(float("nan"))
        err = rel_err(run(), prob.ref)
        row["err"] = err
        if not err < 1e-2:
            row["error"] = f"wrong result: rel err {err:.3g}"
            return row
        run.out.fill_(float("nan"))
        row["err2"] = rel_err(run(), prob.ref)  # a second call: a moving error is a race
        us = bench(run, reps)
        row.update(us=us, gbps=gb_per_s(prob.bytes, us))
        if clean:
            row["clean_us"] = bench_clean(run)
            row["clean_gbps"] = gb_per_s(prob.bytes, row["clean_us"])
    except Exception as e:  # noqa: BLE001 - recorded; the sweep goes on
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if "illegal" in str(e).lower() or "unspecified launch" in str(e).lower():
            raise  # the CUDA context is gone
    return row


# ----------------------------------------------------------------------------------------------- main
def pick(rows: list, top: int) -> list:
    """Names of the best `top` configs by geometric-mean slowdown over the phase-1 shapes (configs timed on
    all of them), then the best of each family and the best on each shape alone."""
    rows = [r for r in rows if "us" in r]
    best_us = {}
    for r in rows:
        best_us[r["N"]] = min(best_us.get(r["N"], 1e30), r["us"])
    score = {}
    for r in rows:
        score.setdefault(r["cfg"], []).append(math.log(r["us"] / best_us[r["N"]]))
    kind = {r["cfg"]: r["kind"] for r in rows}
    ranked = sorted((n for n, s in score.items() if len(s) == len(best_us)), key=lambda n: sum(score[n]))
    chosen = ranked[:top]
    for k in ("red", "dot", "dotT", "tma"):
        fam = [n for n in ranked if kind[n] == k]
        if fam and fam[0] not in chosen:
            chosen.append(fam[0])
    for N in best_us:
        n = min((r for r in rows if r["N"] == N), key=lambda r: r["us"])["cfg"]
        if n not in chosen:
            chosen.append(n)
    return chosen


def main() -> None:
    global DEV, DTYPE
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=default_out("gemv_sweep.json"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="no new timing after this many seconds")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--reps", type=int, default=100, help="timed calls per config and shape (phase 2: twice)")
    ap.add_argument("--smoke", action="store_true", help="correctness only, small shapes (CPU interpreter)")
    ap.add_argument("--dry", action="store_true", help="the whole flow on tiny shapes and few configs (CPU)")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    t_start = time.time()
    budget = args.budget_s
    shapes, phase1_shapes = SHAPES, PHASE1_SHAPES
    if args.dry:
        DEV, DTYPE = "cpu", torch.float16
        shapes, phase1_shapes = [(48, 256), (17, 128), (96, 256), (32, 640)], [(96, 256), (17, 128)]
        name, sms = "cpu (interpreter)", 4
    else:
        props = torch.cuda.get_device_properties(0)
        name, sms = props.name, props.multi_processor_count
    torch.manual_seed(0)
    result = {"env": {**environment(DEV, sms=sms, reps=args.reps), "device": name},
              "phase1": [], "phase2": [], "baselines": {}, "notes": []}

    def save():
        result["seconds"] = time.time() - t_start
        write_json(args.out, result, indent=1)

    try:
        run_sweep(args, result, save, t_start, budget, shapes, phase1_shapes, sms)
    finally:
        save()
    report(result)


def run_sweep(args, result, save, t_start, budget, shapes, phase1_shapes, sms) -> None:
    classes = {1: class_configs(False), 8: class_configs(True)}
    if args.dry:
        classes = {M: [c for k in ("red", "dot", "dotT") for c in [c for c in cs if c.kind == k and c.bk <= 512][:3]]
                   for M, cs in classes.items()}
    print(f"{result['env']['device']}, {sms} SMs; configs: M=1 {len(classes[1])}, M=8 {len(classes[8])}", flush=True)

    # compile every (config, M, splits > 1 or not) that phase 1 launches
    specs = set()
    for M, cfgs in classes.items():
        for c in cfgs:
            for N, K in phase1_shapes:
                p = plan(c, M, N, K, sms)
                specs.add((dataclasses.replace(c, split=0), M, 2 if p.splits > 1 else 1))
    if not args.dry:
        workers = args.workers or max(1, min(15, (os.cpu_count() or 2) - 1))
        comp = precompile(sorted(specs, key=lambda s: (s[0].name, s[1], s[2])), workers, t_start + 150)
        result["compile"] = comp
        print(f"precompiled {comp.get('done')}/{comp.get('specs')} in {comp.get('seconds', 0):.0f}s with {workers} "
              f"workers, {len(comp.get('errors', {}))} errors", flush=True)
        save()

    # phase 1: every config on the phase-1 shapes
    p1_end = {1: t_start + 0.55 * budget, 8: t_start + 0.78 * budget}
    for M, cfgs in classes.items():
        probs = [Problem(M, N, K) for N, K in phase1_shapes]
        for prob in probs:
            result["baselines"][f"{M}x{prob.N}x{prob.K}"] = {"torch": prob.time_torch(args.reps),
                                                             "copy": prob.time_copy(False)}
        seen = set()
        for i, c in enumerate(cfgs):
            if time.time() > p1_end[M]:
                result["notes"].append(f"phase 1 M={M}: time budget hit after {i}/{len(cfgs)} configs")
                print(result["notes"][-1], flush=True)
                break
            for prob in probs:
                key = (dataclasses.replace(c, split=0), prob.N, plan(c, M, prob.N, prob.K, sms).splits)
                if key in seen:  # the split target changes nothing on this shape
                    continue
                seen.add(key)
                result["phase1"].append(time_cfg(c, prob, sms, reps=args.reps))
            if i % 100 == 99:
                print(f"  M={M}: {i + 1}/{len(cfgs)} configs at {time.time() - t_start:.0f}s", flush=True)
        del probs
        if DEV == "cuda":
            torch.cuda.empty_cache()
        save()
        print(f"phase 1 M={M} done at {time.time() - t_start:.0f}s", flush=True)

    # phase 2: the picks of each class on every shape, M in {1, 4, 8}, next to today's gemv.py config
    picks = {}
    for M in classes:
        rows = [r for r in result["phase1"] if r["M"] == M]
        by_name = {r["cfg"]: r for r in rows}
        names = pick(rows, args.top)
        picks[M] = [Cfg(**{f.name: by_name[n][f.name] for f in dataclasses.fields(Cfg)}) for n in names]
        result[f"picks_M{M}"] = names
    for N, K in shapes:
        for M in (1, 4, 8):
            if time.time() > t_start + budget:
                result["notes"].append(f"phase 2: time budget hit before {M}x{N}x{K}")
                break
            prob = Problem(M, N, K, seed=1)
            base = result["baselines"].setdefault(f"{M}x{N}x{K}", {})
            base["torch"] = prob.time_torch(2 * args.reps, clean=True)
            if M == 1:
                result[f"copy_{N}x{K}"] = prob.time_copy(True)
            current = Cfg("dot", 32 if M > 4 and triton.cdiv(N, 32) >= 2 * sms else 16, 256, 4, 4)  # gemv.py before the sweep
            for j, c in enumerate([current] + picks[1 if M == 1 else 8]):
                row = time_cfg(c, prob, sms, reps=2 * args.reps, clean=True)
                row["current"] = j == 0
                result["phase2"].append(row)
            del prob
        save()
        print(f"phase 2 {N}x{K} done at {time.time() - t_start:.0f}s", flush=True)


def report(result: dict) -> None:
    env = result["env"]
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}   (us: median, L2 cleared by a memset; "
          f"clean: L2 emptied by a read; GB/s: weight bytes; %copy: of the copy's read+write GB/s)")
    print(f"{'MxNxK':>14} {'copyGB/s':>8} {'cuBLAS':>7} {'GB/s':>5} {'clean':>6} | {'now':>6} | {'best config':38} "
          f"{'us':>6} {'GB/s':>5} {'%copy':>5} {'clean':>6} {'GB/s':>5}")
    for key, base in sorted(result["baselines"].items(), key=lambda kv: [int(v) for v in kv[0].split("x")][::-1]):
        M, N, K = map(int, key.split("x"))
        rows = [r for r in result["phase2"] if (r["M"], r["N"], r["K"]) == (M, N, K) and "us" in r]
        if not rows or "torch" not in base:
            continue
        cp = result.get(f"copy_{N}x{K}", {})
        cur = next((r for r in rows if r.get("current")), {})
        best = min(rows, key=lambda r: r["us"])
        t, nan = base["torch"], float("nan")
        print(f"{key:>14} {cp.get('gbps', nan):8.0f} {t['us']:7.1f} {t['gbps']:5.0f} {t.get('clean_us', nan):6.1f} | "
              f"{cur.get('us', nan):6.1f} | {best['cfg']:38} {best['us']:6.1f} {best['gbps']:5.0f} "
              f"{100 * best['gbps'] / cp.get('gbps', nan):5.0f} {best.get('clean_us', nan):6.1f} "
              f"{best.get('clean_gbps', nan):5.0f}")
    for M in (1, 8):
        rows = [r for r in result["phase1"] if r["M"] == M and "us" in r]
        for N in sorted({r["N"] for r in rows}):
            top = sorted((r for r in rows if r["N"] == N), key=lambda r: r["us"])[:4]
            print(f"phase-1 top M={M} N={N}: " + ", ".join(f"{r['cfg']} {r['us']:.1f}" for r in top))
            for kind in ("red", "dot", "dotT", "tma"):
                fam = [r for r in rows if r["N"] == N and r["kind"] == kind]
                if fam:
                    b = min(fam, key=lambda r: r["us"])
                    print(f"    best {kind:4}: {b['cfg']:38} {b['us']:6.1f} us {b['gbps']:5.0f} GB/s")
    bad = [r for r in result["phase1"] + result["phase2"] if "error" in r]
    print(f"{len(bad)} timed configs failed" + (": " if bad else "") +
          "; ".join(f"{r['cfg']}: {r['error'][:100]}" for r in bad[:3]))
    for n in result["notes"]:
        print("note:", n)


def smoke() -> None:
    """Correctness of each family on small odd shapes (CPU interpreter or GPU), no timing."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16  # bf16 loads are wrong in the interpreter
    cfgs = [Cfg("dot", 16, 64, 4, 2), Cfg("dot", 32, 64, 4, 2, split=4), Cfg("dotT", 64, 64, 4, 3, split=4),
            Cfg("red", 4, 128, 2, 1, 1), Cfg("red", 2, 128, 2, 1, 4, split=4), Cfg("red", 8, 64, 2, 1, 8),
            Cfg("red", 1, 256, 2, 3, 1, "evict_first", split=8), Cfg("red", 4, 64, 2, 1, 1, x2d=False),
            Cfg("red", 2, 64, 2, 1, 4, x2d=False)]
    if TensorDescriptor is not None and dev == "cuda":
        cfgs += [Cfg("tma", 64, 64, 4, 3), Cfg("tma", 128, 64, 4, 3, split=4)]
    fails = 0
    for M in (1, 3, 8, 16):
        for N, K in ((17, 96), (130, 1000), (64, 300)):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            w = torch.randn(N, K, device=dev, dtype=dtype)
            ref = (x.double() @ w.double().T).float()
            for c in cfgs:
                if c.kind == "red" and M > 8 and c.rows < 2:
                    continue
                if c.kind == "tma" and K % 8:
                    continue
                run = Runner(c, x, w, 8)
                run.out.fill_(float("nan"))
                err = rel_err(run(), ref)
                if not err < 1e-2:
                    fails += 1
                    print(f"FAIL {c.name} M={M} N={N} K={K}: {err}")
    print(f"smoke: {fails} failures")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
