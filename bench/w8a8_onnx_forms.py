"""Which ONNX form of a W8A8 dynamic linear runs fastest in ONNX Runtime on CPU, and with what error: the study
behind mmaccel::w8a8_linear's translation (ops/w8a8_linear.py). One linear y = x @ W.T + b at the ViT-B/16
shapes (x [B*197, K]; W 2304x768 qkv, 768x768 proj, 3072x768 fc1, 768x3072 fc2), each form a small ONNX file:

  fp32               MatMul + Add
  qdyn_tensor_w      quantize_dynamic's form: DynamicQuantizeLinear (per tensor, uint8) -> MatMulInteger ->
                     Cast -> Mul(x_scale * w_scale), one weight scale for the tensor
  ours_tensor        mmaccel::w8a8_linear granularity="tensor": the same with per-channel weight scales
  ours_token         mmaccel::w8a8_linear granularity="token": rows divided by their absmax first, then as above
  token_s8s8         per-token symmetric int8 written out (ReduceMax/Div/Round/Clip/Cast), int8 x int8 MatMulInteger
  token_u8_zp128     the same values shifted to uint8 with zero point 128, uint8 x int8 MatMulInteger
  token_asym_u8      per-token asymmetric uint8; the per-row zero point subtracted through the weight's column sums
                     (ONNX Runtime's MatMulInteger refuses a per-row zero point)
  nbits8             com.microsoft MatMulNBits, 8-bit weights in blocks of 128, accuracy_level 4 (int8 activations)

Latency: median of --repeats interleaved runs per shape (default 1 intra-op thread: on a shared 2-core machine
two threads measure the neighbours more than the kernels). Error: ||y - y64|| / ||y64|| against the float64
linear for several activation distributions, at M=197.

    python bench/w8a8_onnx_forms.py [--batch 1 4 8] [--threads 1] [--repeats 15]
    python bench/w8a8_onnx_forms.py --batch 1 --repeats 2 --out /tmp/w8a8_onnx_forms.json    # a smoke test
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from common import default_out, environment, write_json  # bench/ is on sys.path when a script here runs
from cpu_onnxruntime import ort_session
from mmaccel.ops import OPS
from mmaccel.ops.int8_linear import quantize_per_channel
from mmaccel.timing import interleaved_times_ms

SHAPES = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}  # (K, N)
FORMS = ("fp32", "qdyn_tensor_w", "ours_tensor", "ours_token", "token_s8s8", "token_u8_zp128", "token_asym_u8",
         "nbits8")
FLOAT, INT8, UINT8 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8
TINY = np.finfo(np.float32).tiny


def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> object:
    return helper.make_node(op, inputs, outputs, **attrs)


def onnx_model(nodes: list, initializers: dict[str, np.ndarray], microsoft: bool = False) -> bytes:
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", FLOAT, ["M", None])],
                              [helper.make_tensor_value_info("y", FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("com.microsoft", 1)] if microsoft else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model.SerializeToString()


def per_token_symmetric(nodes: list, init: dict) -> None:
    """x -> xc (rounded, clipped to +-127) and s [M, 1], written out in standard ops."""
    init.update(axes=np.array([-1], np.int64), c127=np.float32(127), m127=np.float32(-127), tiny=np.float32(TINY))
    nodes += [node("Abs", ["x"], ["ax"]), node("ReduceMax", ["ax", "axes"], ["amax"], keepdims=1),
              node("Div", ["amax", "c127"], ["s0"]), node("Max", ["s0", "tiny"], ["s"]),
              node("Div", ["x", "s"], ["xs"]), node("Round", ["xs"], ["xr"]),
              node("Clip", ["xr", "m127", "c127"], ["xc"])]


def scale_and_bias(nodes: list, acc: str, row_scale: str) -> None:
    nodes += [node("Cast", [acc], ["accf"], to=FLOAT), node("Mul", ["accf", row_scale], ["y1"]),
              node("Mul", ["y1", "ws"], ["y2"]), node("Add", ["y2", "bias"], ["y"])]


def build_form(form: str, w: np.ndarray, b: np.ndarray) -> bytes:
    """Every form but ours, built by hand; ours comes from the op's own translation (ours_model)."""
    n, k = w.shape
    q, s = (t.numpy() for t in quantize_per_channel(torch.from_numpy(w)))
    nodes: list = []
    init: dict = {"bias": b, "wq": q.T.copy(), "ws": s}
    if form == "fp32":
        init["wt"] = w.T.copy()
        nodes += [node("MatMul", ["x", "wt"], ["mm"]), node("Add", ["mm", "bias"], ["y"])]
    elif form == "qdyn_tensor_w":
        scale = np.float32(max(np.abs(w).max(), TINY) / 127)
        init.update(wq=np.clip(np.round(w.T / scale), -127, 127).astype(np.int8), ws=scale)
        nodes += [node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                  node("MatMulInteger", ["xq", "wq", "xz"], ["acc"]), node("Cast", ["acc"], ["accf"], to=FLOAT),
                  node("Mul", ["xs", "ws"], ["sc"]), node("Mul", ["accf", "sc"], ["y1"]),
                  node("Add", ["y1", "bias"], ["y"])]
    elif form in ("token_s8s8", "token_u8_zp128"):
        per_token_symmetric(nodes, init)
        if form == "token_s8s8":
            nodes += [node("Cast", ["xc"], ["xq"], to=INT8), node("MatMulInteger", ["xq", "wq"], ["acc"])]
        else:
            init.update(c128=np.float32(128), z128=np.uint8(128))
            nodes += [node("Add", ["xc", "c128"], ["xo"]), node("Cast", ["xo"], ["xq"], to=UINT8),
                      node("MatMulInteger", ["xq", "wq", "z128"], ["acc"])]
        scale_and_bias(nodes, "acc", "s")
    elif form == "token_asym_u8":
        init.update(axes=np.array([-1], np.int64), c255=np.float32(255), zero=np.float32(0), tiny=np.float32(TINY),
                    colsum=q.astype(np.float32).sum(1))
        nodes += [node("ReduceMax", ["x", "axes"], ["hi0"], keepdims=1),
                  node("ReduceMin", ["x", "axes"], ["lo0"], keepdims=1),
                  node("Max", ["hi0", "zero"], ["hi"]), node("Min", ["lo0", "zero"], ["lo"]),
                  node("Sub", ["hi", "lo"], ["rg"]), node("Div", ["rg", "c255"], ["s0"]),
                  node("Max", ["s0", "tiny"], ["s"]), node("Div", ["lo", "s"], ["los"]), node("Neg", ["los"], ["z0"]),
                  node("Round", ["z0"], ["z1"]), node("Clip", ["z1", "zero", "c255"], ["z"]),
                  node("Div", ["x", "s"], ["xs"]), node("Round", ["xs"], ["xr"]), node("Add", ["xr", "z"], ["xz"]),
                  node("Clip", ["xz", "zero", "c255"], ["xc"]), node("Cast", ["xc"], ["xq"], to=UINT8),
                  node("MatMulInteger", ["xq", "wq"], ["acc0"]), node("Cast", ["acc0"], ["acc0f"], to=FLOAT),
                  node("Mul", ["z", "colsum"], ["corr"]), node("Sub", ["acc0f", "corr"], ["acc1"]),
                  node("Mul", ["acc1", "s"], ["y1"]), node("Mul", ["y1", "ws"], ["y2"]),
                  node("Add", ["y2", "bias"], ["y"])]
    elif form == "nbits8":
        block = 128
        wb = w.reshape(n, k // block, block)
        scale = np.maximum(np.abs(wb).max(-1), TINY) / 127
        packed = (np.clip(np.round(wb / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        init = {"bias": b, "wq": packed, "ws": scale.astype(np.float32).reshape(-1)}
        nodes += [node("MatMulNBits", ["x", "wq", "ws"], ["mm"], domain="com.microsoft", K=k, N=n, bits=8,
                       block_size=block, accuracy_level=4), node("Add", ["mm", "bias"], ["y"])]
        return onnx_model(nodes, init, microsoft=True)
    else:
        raise ValueError(form)
    return onnx_model(nodes, init)


def ours_model(w: np.ndarray, b: np.ndarray, granularity: str) -> bytes:
    """One mmaccel::w8a8_linear exported through its OpSpec.onnx translation, as the ONNX target does."""
    from torch.export import Dim

    q, s = quantize_per_channel(torch.from_numpy(w))

    class Linear(torch.nn.Module):
        def forward(self, x):
            return torch.ops.mmaccel.w8a8_linear(x, q, s, torch.from_numpy(b), "none", None, granularity)

    table = {op: spec.onnx for op, spec in OPS.items() if spec.onnx is not None}
    program = torch.onnx.export(Linear().eval(), (torch.randn(4, w.shape[1]),), dynamo=True, opset_version=18,
                                custom_translation_table=table, dynamic_shapes=({0: Dim.DYNAMIC},), verbose=False)
    return program.model_proto.SerializeToString()


def activations(m: int, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    g = rng.standard_normal((m, k)).astype(np.float32)
    tokens, channels = g.copy(), g.copy()
    tokens[:4] *= 30  # a few tokens with massive activations (class token, attention sinks)
    channels[:, :6] *= 30  # a few outlier channels
    return {"gaussian": g, "gelu": (g * 0.5 * (1 + np.tanh(0.7978846 * (g + 0.044715 * g ** 3)))).astype(np.float32),
            "outlier_tokens": tokens, "outlier_channels": channels,
            "token_scales": (g * np.exp(rng.standard_normal((m, 1)))).astype(np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--forms", nargs="+", default=list(FORMS))
    parser.add_argument("--out", default=default_out("w8a8_onnx_forms.json"))
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    rng = np.random.default_rng(0)
    rows = []
    for layer, (k, n) in SHAPES.items():
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        w[rng.integers(0, n, 8)] *= 5  # a few larger output channels: per-channel weight scales matter
        b = (rng.standard_normal(n) * 0.02).astype(np.float32)
        sessions = {}
        for form in args.forms:
            model = ours_model(w, b, form.removeprefix("ours_")) if form.startswith("ours_") else build_form(form, w, b)
            sessions[form] = ort_session(model, args.threads)
        for name, x in activations(197, k, rng).items():
            y64 = x.astype(np.float64) @ w.T.astype(np.float64) + b
            for form, sess in sessions.items():
                y = sess.run(None, {"x": x})[0]
                rows.append({"layer": layer, "K": k, "N": n, "form": form, "activations": name,
                             "rel_err": float(np.linalg.norm(y - y64) / np.linalg.norm(y64))})
        for batch in args.batch:
            x = rng.standard_normal((batch * 197, k)).astype(np.float32)
            runs = {form: lambda sess=sess: sess.run(None, {"x": x}) for form, sess in sessions.items()}
            times = interleaved_times_ms(runs, args.repeats, warmup=1)
            for form, t in times.items():
                rows.append({"layer": layer, "K": k, "N": n, "M": batch * 197, "form": form,
                             "median_ms": statistics.median(t)})
            medians = "  ".join(f"{f}={statistics.median(t):.2f}" for f, t in times.items())
            print(f"{layer:5} M={batch * 197:5}  {medians}", flush=True)
    print("\nrelative error vs the float64 linear, M=197")
    for layer in SHAPES:
        for name in ("gaussian", "gelu", "outlier_tokens", "outlier_channels", "token_scales"):
            errs = {r["form"]: r["rel_err"] for r in rows if r.get("activations") == name and r["layer"] == layer}
            print(f"{layer:5} {name:17} " + "  ".join(f"{f}={e:.1e}" for f, e in errs.items()))
    env = environment("cpu", intra_op_threads=args.threads, repeats=args.repeats)
    write_json(args.out, {"environment": env, "results": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
