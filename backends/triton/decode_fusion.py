"""A decode step's GEMVs with their neighbours fused in (issue 17): the RMSNorm in front of a linear, the
SiLU(gate) * up after a fused gate/up linear and the residual add after o_proj / down_proj ride along the
Triton GEMV (gemv.Fusion) instead of running as generated kernels of their own.

A Llama decoder layer on this target was 4 GEMVs, 5 generated kernels (rotary q; rotary k + KV-cache writes;
residual add + RMSNorm, twice; SiLU * mul) and attention. Each kernel boundary costs a launch gap and a
drain even under CUDA graphs, and the small kernels are pure latency at batch 1: with the norms,
SiLU * up and residual adds fused, a layer is 4 GEMVs, the rotary kernel(s) and attention (prepare.hoist_views
lets Q's and K's rotary share one kernel when they have as many heads). Pre-LayerNorm decoders (Whisper,
BART-style) take fc1's bias + GELU, the biases before residual adds and their LayerNorms the same way
(MMACCEL_GEMV_LAYERNORM=0 leaves the LayerNorms out: see LAYER_NORM_SWITCH): a tiny Whisper decoder step went
from 44 generated kernels and 4 plain GEMVs to 31 and none.

Matched on the graph after route_linears (matmul.linear nodes), over views (reshape) and dtype casts:
    norm:     linear(reshape(g * cast(hf * rsqrt(mean(hf ** 2, -1, keepdim) + eps))))  hf = cast(h)
    layernorm (one row): linear(cast(c * rsqrt(mean(c * c, -1, keepdim) + eps) * g + beta)), c = hf - mean(hf)
    glu:      mul(silu(split(linear(...))[0]), split(linear(...))[1])   the two halves of one output
    bias:     add(linear(...), b), b an [N] constant (a fused_linear's bias after its matmul); at one row then
              optionally gelu(., approximate="none" | "tanh")
    residual: add(linear(...) or the bias / GELU above, r)   r of the add's shape and dtype (no broadcasting)
The fused GEMV rounds once, where eager rounds the norm, the linear and the epilogue each to the activation
dtype: results differ by rounding only. MMACCEL_GEMV_FUSION in the environment of the compile is a switch for
measurements: 0 turns the rewrite off (bench/profile_decode.py profiles both in one run), a row count above 1
fuses decode batches up to that many rows on a GPU too (the padded-dot GEMV; unmeasured, see CUDA_MAX_ROWS)."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.fx as fx

from ...passes.patterns import (add_constant, cast_source, constant_value, drop_dead_nodes, is_op, same_shape,
                                single_user, strip_noop_views, val)
from . import gemv, matmul
from .prepare import emit

aten = torch.ops.aten
SWITCH = "MMACCEL_GEMV_FUSION"
# LayerNorm in front of a one-row GEMV: on unless this is 0. Its first form (two passes over x's row for the
# statistics before the first weight load) measured no faster on an H200 (Whisper large-v3 dims, 8 + 8 layers:
# 0.592 ms/token against 0.572 in another run); the statistics now ride along the main loop as RMSNorm's do,
# with W @ g and W @ beta computed here once (gemv.layer_norm_folds), and in one run that form decoded at
# 0.533 ms/token against 0.554 without it (bench/results/pdl_h200.json, call 3; tokens equal eager with it).
LAYER_NORM_SWITCH = "MMACCEL_GEMV_LAYERNORM"
# One activation row on CUDA: matmul.choose keeps wider decode batches on cuBLAS (H200, batch 8: 3.50 ms with
# the padded-dot GEMV, 3.30 ms with cuBLAS), and a fused GEMV has no cuBLAS twin. The interpreter takes every
# row count gemv does, so the tests cover the padded-dot kernel's fusions too.
CUDA_MAX_ROWS = 1
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  norm_weight: Optional[torch.Tensor], eps: float, glu: bool,
                  residual: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor] = None,
                  activation: str = "none", norm_wg: Optional[torch.Tensor] = None,
                  norm_wb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused GEMV; inputs it does not take at run time (strides, devices) get the unfused reference.
    norm_wg, norm_wb: a LayerNorm's gemv.layer_norm_folds, constants computed when the graph was compiled."""
    folds = None if norm_wg is None else (norm_wg, norm_wb)
    fusion = gemv.Fusion(norm_weight, eps, glu, residual, norm_bias, activation, folds)
    if gemv.supports(x, weight):
        return gemv.gemv(x, weight, bias, fusion)
    return gemv.fused_reference(x, weight, bias, fusion).to(x.dtype)


def fuse_decode_linears(gm: fx.GraphModule, device: torch.device) -> dict[str, Any]:
    """Rewrite each matched linear (and its prologue / epilogue) into one decode_linear call; returns the
    count and the near-misses, each with its reason."""
    fused, near_misses = 0, []
    max_rows = _max_rows(device)
    if max_rows == 0:
        return {"gemv_fusions": 0, "gemv_near_misses": [f"all: switched off by {SWITCH}=0"]}
    for node in list(gm.graph.nodes):
        if not (is_op(node, matmul.linear) and _rows_fit(node, max_rows)):
            continue
        norm, why_not_norm = _match_norm(node, max_rows)
        glu, why_not_glu = _match_glu(node)
        if norm and norm[3] is not None and glu:  # StableLM's MLP: the kernel's LayerNorm prologue feeds one plain output
            norm, why_not_norm = None, "LayerNorm in front of SiLU(gate) * up (the kernel's LayerNorm takes a plain GEMV)"
        epilogue = None if glu else _match_bias_activation(node)
        residual, why_not_residual = (None, None) if glu else _match_residual(epilogue[0] if epilogue else node)
        near_misses += [f"{node.name}: {why}" for why in (why_not_norm, why_not_glu, why_not_residual) if why]
        if norm or glu or epilogue or residual:
            _rewrite(gm, node, norm, glu, epilogue, residual)
            fused += 1
    drop_dead_nodes(gm.graph)
    return {"gemv_fusions": fused, "gemv_near_misses": near_misses}


def _max_rows(device: torch.device) -> int:
    # On by default since the RMSNorm prologue loads x and the norm weight once per step for 4 weight rows
    # (gemv.NORM_ROWS): on an H200 the fused GEMVs then cost what plain ones do (LM head 69.0 vs 68.4 us, qkv
    # 29.5 vs 29.9; bench/results/decode_kernels_sweep_gemv_h200.json) and the 16-layer decode step took 2.400 ms
    # against 2.646 with the tile-shaped loads. Before, fused lost: 2.713 against 2.525 unfused, the fused GEMVs
    # 0.34 ms slower from re-reading x and the norm weight for every weight row.
    switch = os.environ.get(SWITCH, "1")
    if not switch.isdigit():
        raise ValueError(f"{SWITCH}={switch!r}: use 0 (off), 1 (on, the default) or a row count up to "
                         f"{gemv.MAX_ROWS}")
    if device.type != "cuda":
        return min(int(switch), 1) * gemv.MAX_ROWS
    return min(int(switch), gemv.MAX_ROWS) if switch != "1" else CUDA_MAX_ROWS


def _rows_fit(linear: fx.Node, max_rows: int) -> bool:
    """A static row count the GEMV takes, on a float weight of x's dtype."""
    x, weight = val(linear.args[0]), val(linear.args[1])
    rows = x.shape[0]
    if not isinstance(rows, int) or weight.dtype != x.dtype or x.dtype not in _FLOATS:
        return False
    return 1 <= rows <= max_rows


def _is_view(node: Any) -> bool:
    """A reshape, or a slice / expand / clone that keeps the shape (HF's last-token slice in decode), read by one node."""
    return isinstance(node, fx.Node) and single_user(node) and (
        is_op(node, aten.reshape.default) or strip_noop_views(node) is not node)


def _through_views(node: fx.Node) -> fx.Node:
    """The value a chain of views starts from."""
    while _is_view(node):
        node = node.args[0]
    return node


def _after_views(node: fx.Node) -> fx.Node:
    """The end of the chain of views that is `node`'s only reader, and of theirs."""
    while single_user(node) and _is_view(next(iter(node.users))):
        node = next(iter(node.users))
    return node


def _match_norm(linear: fx.Node, max_rows: int) -> tuple[Optional[tuple], Optional[str]]:
    """(h, norm weight, eps, norm bias) when the linear reads RMSNorm(h) (norm bias None) or, at one row,
    LayerNorm(h) over its K; else a reason when it nearly does."""
    y = _through_views(linear.args[0])
    rms = _rms_parts(y) if is_op(y, aten.mul.Tensor) else None
    parts = (*rms, None) if rms else _layer_norm_parts(y)
    if parts is None:
        return None, None
    if parts[3] is not None and os.environ.get(LAYER_NORM_SWITCH, "1") == "0":
        return None, f"LayerNorm in front: switched off by {LAYER_NORM_SWITCH}=0"
    h, g, eps, beta = parts
    K = val(linear.args[1]).shape[1]
    if val(h).shape[-1] != K or val(g).shape != (K,) or val(h).dtype != val(linear.args[0]).dtype:
        return None, "the norm is over another width or dtype than the linear's"
    if beta is not None and (val(beta).shape != (K,) or val(linear.args[0]).shape[0] != 1):
        return None, "LayerNorm in front of a GEMV of more than one row (the one-row kernel takes it)"
    for user in y.users:
        reader = user
        while _is_view(reader):
            reader = next(iter(reader.users))
        if not (is_op(reader, matmul.linear) and _through_views(reader.args[0]) is y and _rows_fit(reader, max_rows)):
            return None, "the norm's output has another consumer, which needs it materialized"
    return (h, g, eps, beta), None


def _rms_parts(y: fx.Node) -> Optional[tuple[fx.Node, fx.Node, float]]:
    """g * cast(hf * rsqrt(mean(hf ** 2, [-1], keepdim=True) + eps)), hf a cast of h: (h, g, eps)."""
    for g, normed in (y.args, reversed(y.args)):
        if not (isinstance(g, fx.Node) and g.op == "get_attr" and isinstance(normed, fx.Node)):
            continue
        n = cast_source(normed)
        if not (is_op(n, aten.mul.Tensor) and single_user(n)):
            continue
        for hf, r in (n.args, reversed(n.args)):
            found = _rsqrt_of_last_dim_mean(r)
            square = found[0] if found else None
            if is_op(square, aten.pow.Tensor_Scalar) and single_user(square) and square.args == (hf, 2):
                return _norm_input(hf), g, found[1]
    return None


def _layer_norm_parts(y: fx.Node) -> Optional[tuple[fx.Node, fx.Node, float, fx.Node]]:
    """cast(c * rstd * g + beta) with c = hf - mean(hf, [-1], keepdim), rstd = rsqrt(mean(c * c, [-1], keepdim) +
    eps), hf h or h's upcast: the Triton target's own writing-out of native_layer_norm (prepare._layer_norm),
    each node read only by the next (c by both of its readers; hf may have other readers: the residual stream).
    (h, g, eps, beta)."""
    add = y.args[0] if is_op(y, aten._to_copy.default) and set(y.kwargs) <= {"dtype"} and single_user(y.args[0]) else y
    if not (is_op(add, aten.add.Tensor) and len(add.args) == 2):
        return None
    for scaled, beta in (add.args, reversed(add.args)):
        if not (is_op(scaled, aten.mul.Tensor) and single_user(scaled) and isinstance(beta, fx.Node)
                and beta.op == "get_attr"):
            continue
        for normed, g in (scaled.args, reversed(scaled.args)):
            if not (is_op(normed, aten.mul.Tensor) and single_user(normed) and isinstance(g, fx.Node)
                    and g.op == "get_attr"):
                continue
            for c, r in (normed.args, reversed(normed.args)):
                if not (is_op(c, aten.sub.Tensor) and len(c.users) == 2):
                    continue
                hf, mean = c.args
                found = _rsqrt_of_last_dim_mean(r)
                square = found[0] if found else None
                if (_is_last_dim_mean(mean, hf) and single_user(mean) and is_op(square, aten.mul.Tensor)
                        and single_user(square) and square.args == (c, c)):
                    return _norm_input(hf), g, found[1], beta
    return None


def _norm_input(hf: fx.Node) -> fx.Node:
    """h of a norm over hf: h itself, or h's upcast that only the norm reads (its two readers in the norm)."""
    upcast = is_op(hf, aten._to_copy.default) and len(hf.users) == 2 and val(hf.args[0]).dtype in _FLOATS
    return hf.args[0] if upcast else hf


def _rsqrt_of_last_dim_mean(r: Any) -> Optional[tuple[fx.Node, float]]:
    """(x, eps) when r = rsqrt(mean(x, [-1], keepdim=True) + eps), each node read only by the next: the statistic
    both norms share (x the square of RMSNorm's input, or of LayerNorm's centred input)."""
    if not (is_op(r, aten.rsqrt.default) and single_user(r)):
        return None
    add = r.args[0]
    if not (is_op(add, aten.add.Tensor) and single_user(add) and isinstance(add.args[1], float)):
        return None
    mean = add.args[0]
    if not (is_op(mean, aten.mean.dim) and _is_last_dim_mean(mean, mean.args[0]) and single_user(mean)):
        return None
    return mean.args[0], add.args[1]


def _is_last_dim_mean(mean: Any, x: Any) -> bool:
    return (is_op(mean, aten.mean.dim) and mean.args[0] is x and list(mean.args[1]) in ([-1], [val(x).dim() - 1])
            and bool(mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)))


def _match_glu(linear: fx.Node) -> tuple[Optional[fx.Node], Optional[str]]:
    """The mul of silu(gate) * up when the linear's output is split in two halves read only by it; else a
    reason when the output is split in two halves."""
    split = _after_views(linear)
    split = next(iter(split.users)) if single_user(split) else None
    n = val(linear).shape[-1]
    if not (is_op(split, aten.split_with_sizes.default) and list(split.args[1]) == [n // 2, n // 2]):
        return None, None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if dim not in (-1, val(split.args[0]).dim() - 1) or linear.args[2] is not None:
        return None, None
    halves = sorted(split.users, key=lambda u: u.args[1])
    miss = "the gate/up halves are not read only by SiLU(gate) * up"
    if [h.args[1] for h in halves] != [0, 1]:
        return None, miss
    gate, up = (_after_views(h) for h in halves)
    silu = next(iter(gate.users)) if single_user(gate) else None
    if not (is_op(silu, aten.silu.default) and single_user(silu) and single_user(up)):
        return None, miss
    mul = next(iter(silu.users))
    if not (is_op(mul, aten.mul.Tensor) and set(mul.args) == {silu, up} and mul.args[0] is not mul.args[1]
            and same_shape(val(silu).shape, val(up).shape) and val(mul).dtype == val(linear).dtype):
        return None, miss
    return mul, None


def _match_bias_activation(linear: fx.Node) -> Optional[tuple[fx.Node, fx.Node, str]]:
    """(last node, bias, activation) when a linear without a bias of its own only feeds add(., b), b a [N]
    constant of its dtype (a fused_linear's bias, written out after the matmul), then, at one row, optionally
    GELU (the one-row kernel's epilogue)."""
    n = val(linear).shape[-1]
    if linear.args[2] is not None:
        return None
    end = _after_views(linear)
    add = next(iter(end.users)) if single_user(end) else None
    if not (is_op(add, aten.add.Tensor) and not add.kwargs and len(add.args) == 2):
        return None
    b = add.args[1] if add.args[0] is end else add.args[0]
    if not (isinstance(b, fx.Node) and b.op == "get_attr" and tuple(val(b).shape) == (n,)
            and val(b).dtype == val(add).dtype == val(linear).dtype and same_shape(val(add).shape, val(end).shape)):
        return None
    gelu = next(iter(add.users)) if single_user(add) else None
    if is_op(gelu, aten.gelu.default) and val(gelu).dtype == val(add).dtype and val(linear.args[0]).shape[0] == 1:
        approximate = gelu.kwargs.get("approximate", gelu.args[1] if len(gelu.args) > 1 else "none")
        if approximate in ("none", "tanh"):
            return gelu, b, "gelu" if approximate == "none" else "gelu_tanh"
    return add, b, "none"


def _match_residual(linear: fx.Node) -> tuple[Optional[tuple], Optional[str]]:
    """(add, r) when the linear's output (or the end of its bias / activation epilogue) only feeds add(., r)
    with r of the add's shape and dtype."""
    end = _after_views(linear)
    add = next(iter(end.users)) if single_user(end) else None
    if not (is_op(add, aten.add.Tensor) and not add.kwargs and len(add.args) == 2):
        return None, None
    r = add.args[1] if add.args[0] is end else add.args[0]
    if not isinstance(r, fx.Node) or r is end:
        return None, None
    if not same_shape(val(r).shape, val(add).shape):
        return None, "the residual add broadcasts"
    if not (val(r).dtype == val(add).dtype == val(linear).dtype):
        return None, "the residual add changes dtype"
    return (add, r), None


def _rewrite(gm: fx.GraphModule, linear: fx.Node, norm: Optional[tuple], glu: Optional[fx.Node],
             epilogue: Optional[tuple], residual: Optional[tuple]) -> None:
    graph = gm.graph
    anchor = glu or (residual[0] if residual else epilogue[0] if epilogue else linear)
    if epilogue and not residual:
        # through the views after the activation too: a copy left there (HF Whisper's dropout in eval is a clone)
        # would otherwise be a generated kernel of its own, which the GELU kernel used to absorb
        anchor = _after_views(anchor)
    x, weight, bias = linear.args
    bias, activation = (epilogue[1], epilogue[2]) if epilogue else (bias, "none")
    rows, width = val(x).shape[0], val(linear).shape[1] // (2 if glu else 1)
    with graph.inserting_before(anchor):
        if norm:
            x = emit(graph, aten.reshape.default, norm[0], [rows, val(x).shape[1]])
        r = emit(graph, aten.reshape.default, residual[1], [rows, width]) if residual else None
        folds = []
        if norm and norm[3] is not None:  # LayerNorm: W @ g and W @ beta, once, here
            for name, t in zip(("_ln_wg", "_ln_wb"), gemv.layer_norm_folds(
                    *(constant_value(gm, n.target) for n in (weight, norm[1], norm[3])))):
                folds.append(graph.get_attr(add_constant(gm, name, t)))
                folds[-1].meta["val"] = t
        call = graph.call_function(decode_linear, (x, weight, bias, norm[1] if norm else None,
                                                   norm[2] if norm else 0.0, glu is not None, r,
                                                   norm[3] if norm else None, activation, *folds))
        call.meta["val"] = val(x).new_empty((rows, width))
        out = call if anchor is linear else emit(graph, aten.reshape.default, call, list(val(anchor).shape))
    anchor.replace_all_uses_with(out)
