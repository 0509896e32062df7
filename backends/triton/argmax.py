"""argmax over the last dimension of a few long rows (greedy decoding's next token over a vocabulary) on the
Triton target: ATen reduces such a row in one thread block, 14.0 us per Whisper token on an H200 for 51,866
logits (bench/results/profile_step_whisper8_nopdl_h200.json, 3% of the step), where reading 207 KB needs
well under 1 us of bandwidth. Here blocks of each row are reduced by programs in parallel and one more
program per row picks among their partial results: two short kernels.

Semantics are torch.argmax's: a NaN is the maximum (the first NaN's index), ties give the first index,
int64 indices. Other argmax calls (other dims, no dim, short rows, many rows) keep ATen's kernel."""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Optional

import torch
import torch.fx as fx
import triton
import triton.language as tl

from .device import pdl_launch

aten = torch.ops.aten
# Rows at least this long go to the kernels below (a 4096-entry row is one of ATen's blocks' worth of work);
# at most MAX_ROWS rows (decode batches, a speculative verify's k + 1 positions): more rows fill the GPU with
# ATen's one block per row.
MIN_LENGTH = 4096
MAX_ROWS = 64
BLOCK = 4096  # entries per program in the first kernel (16 KB of fp32 logits)
NONE = tl.constexpr(2**31 - 1)  # the index of an empty candidate (past the row's end)


@triton.jit
def _best(val, idx, nan):
    """(value, index, is-NaN) of the first maximum of candidate lists: a NaN beats every number, the earliest
    index breaks ties (an index of NONE marks an empty candidate)."""
    nan_idx = tl.min(tl.where(nan, idx, NONE), axis=0)
    top = tl.max(tl.where(nan, float("-inf"), val), axis=0)
    top_idx = tl.min(tl.where((val == top) & ~nan, idx, NONE), axis=0)
    has_nan = nan_idx < NONE
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, nan_idx, top_idx), has_nan


@triton.jit
def _argmax_blocks_kernel(X, Val, Idx, Nan, V, stride_x, blocks, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:  # launched with programmatic dependent launch (device.pdl): the logits' writes first
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row, blk = tl.program_id(0), tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=ok, other=float("-inf")).to(tl.float32)
    val, idx, nan = _best(x, tl.where(ok, offs, NONE), (x != x) & ok)
    tl.store(Val + row * blocks + blk, val)
    tl.store(Idx + row * blocks + blk, idx)
    tl.store(Nan + row * blocks + blk, nan.to(tl.int8))


@triton.jit
def _argmax_rows_kernel(Val, Idx, Nan, Out, blocks, BLOCKS: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCKS)
    ok = offs < blocks
    val = tl.load(Val + row * blocks + offs, mask=ok, other=float("-inf"))
    idx = tl.load(Idx + row * blocks + offs, mask=ok, other=NONE)
    nan = tl.load(Nan + row * blocks + offs, mask=ok, other=0) != 0
    _, best, _ = _best(val, idx, nan)
    tl.store(Out + row, best.to(tl.int64))


def supports(x: torch.Tensor, dim: Optional[int]) -> bool:
    """A float tensor's last dimension of at least MIN_LENGTH entries, unit stride, at most MAX_ROWS rows, on
    CUDA (or under the interpreter, for the tests)."""
    if dim is None or x.dim() == 0 or dim not in (-1, x.dim() - 1) or x.dtype not in (torch.float16, torch.bfloat16,
                                                                                        torch.float32):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.shape[-1] >= MIN_LENGTH and 1 <= rows <= MAX_ROWS and x.stride(-1) == 1
            and (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")))


def argmax(x: torch.Tensor, dim: Optional[int] = None, keepdim: bool = False) -> torch.Tensor:
    """torch.argmax(x, dim, keepdim): the two kernels where `supports` says so, ATen's otherwise."""
    if not supports(x, dim):
        return aten.argmax.default(x, dim, keepdim)
    V = x.shape[-1]
    rows = x.reshape(-1, V)  # a view when the rows are evenly strided (HF's last-position slice is), else a copy
    n, blocks = rows.shape[0], triton.cdiv(V, BLOCK)
    val = torch.empty(n, blocks, device=x.device, dtype=torch.float32)
    idx = torch.empty(n, blocks, device=x.device, dtype=torch.int32)
    nan = torch.empty(n, blocks, device=x.device, dtype=torch.int8)
    out = torch.empty(n, device=x.device, dtype=torch.int64)
    launch = pdl_launch(x.device)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _argmax_blocks_kernel[(n, blocks)](rows, val, idx, nan, V, rows.stride(0) if n > 1 else V, blocks,
                                           BLOCK=BLOCK, num_warps=8, **launch)
        _argmax_rows_kernel[(n,)](val, idx, nan, out, blocks, BLOCKS=max(16, triton.next_power_of_2(blocks)),
                                  num_warps=1, **launch)
    shape = x.shape[:-1] + ((1,) if keepdim else ())
    return out.reshape(shape)


def route_argmax(gm: fx.GraphModule) -> int:
    """aten.argmax.default nodes -> argmax (which decides per call)."""
    count = 0
    for node in gm.graph.find_nodes(op="call_function", target=aten.argmax.default):
        x, *rest = node.args
        dim = rest[0] if rest else node.kwargs.get("dim")
        keepdim = rest[1] if len(rest) > 1 else node.kwargs.get("keepdim", False)
        node.target, node.args, node.kwargs = argmax, (x, dim, keepdim), {}
        count += 1
    return count
