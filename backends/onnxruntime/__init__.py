"""The onnxruntime target: the post-pass graph becomes standard ONNX (torch.onnx + mmaccel's op
translations) and runs in an ONNX Runtime session through IO binding.

The ONNX graph is functional. A graph that writes its inputs in place (a KV cache) gets those writes as
extra outputs, copied back into the caller's tensors after each run; size arguments Dynamo passes as
SymInts are recomputed inside the graph from the tensor shapes they came from.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.export import Dim

from ...compiler._torch_internals import onnx_arithmetic_kept, outside_dynamo_compile
from ...ops import OPS
from ...passes.graph import clone_module
from ..common import views_of_inputs

aten = torch.ops.aten
OPSET = 18
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                 torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_, torch.uint8: np.uint8,
                 torch.int8: np.int8}


class Unsupported(Exception):
    """This graph cannot run on ONNX Runtime; the message says why (the caller falls back to eager)."""


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=None)  # once per process
def integer_matmul_saturates() -> bool:
    """Whether this host's ONNX Runtime adds uint8 x int8 products in 16 bits with saturation (x86 without VNNI:
    ops/w8a8_linear.py). Probed once per process (5 ms) on the two forms that op's translation becomes, a plain
    MatMulInteger and the fused DynamicQuantizeMatMul, with every product at its largest; not from the CPU's
    flags, since which kernel runs is ONNX Runtime's choice. The onnxruntime target runs on this host, so the
    answer holds for it; an exported file may run anywhere, so export_onnx never asks."""
    return _probe_saturation() if available() else False


def _probe_saturation() -> bool:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 16
    weight = numpy_helper.from_array(np.full((k, n), 127, np.int8), "w")
    nodes = [helper.make_node("MatMulInteger", ["a", "w"], ["exact"]),
             helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"]),
             helper.make_node("MatMulInteger", ["q", "w", "zero"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "scale"], ["fused"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k]),
                                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("exact", TensorProto.INT32, None),
                               helper.make_tensor_value_info("fused", TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    want = 255 * 127 * k
    for rows in (1, 16):  # a GEMV-like and a GEMM-like call
        exact, fused = session.run(None, {"a": np.full((rows, k), 255, np.uint8), "x": np.ones((rows, k), np.float32)})
        # x = 1 quantizes to q = 255, scale 1/255: the fused form's exact answer is 127 * k
        if (exact != want).any() or not np.allclose(fused, 127 * k, rtol=1e-6):
            return True
    return False


def sdpa_onnx(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: float | None = None, enable_gqa: bool = False):
    """aten SDPA with PyTorch's semantics, in standard ONNX. Unlike torch.onnx's own translation, a query
    row whose keys are all masked gives 0, as every PyTorch SDPA kernel does, not NaN (left-padded
    batches have such rows, and a NaN there reaches every later token through the KV cache). Rows with
    at least one key keep plain softmax semantics, so NaN/Inf in q, k or v propagate as in eager.
    is_causal is PyTorch's top-left causal mask; enable_gqa (fewer K/V heads than query heads) repeats
    each K/V head for its group of query heads, as PyTorch does."""
    if dropout_p != 0.0:
        raise ValueError("sdpa_onnx: dropout has no translation (inference graphs have none)")
    return _attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)[0]


def flash_attention_for_cpu_onnx(query, key, value, dropout_p: float = 0.0, is_causal: bool = False,
                                 attn_mask=None, scale: float | None = None):
    """aten._scaled_dot_product_flash_attention_for_cpu (what tracing F.scaled_dot_product_attention gives on
    CPU when attention_fusion is off or rolled back): (output, logsumexp). Its K/V may have fewer heads than
    Q (HF's grouped-query attention with enable_gqa=True); torch.onnx's own translation assumes equal heads."""
    from onnxscript import opset18 as op

    if dropout_p != 0.0:
        raise ValueError("flash_attention_for_cpu_onnx: dropout has no translation (inference graphs have none)")
    out, scores = _attention(query, key, value, attn_mask, is_causal, scale, enable_gqa=True)
    return out, op.ReduceLogSumExp(scores, op.Constant(value_ints=[-1]), keepdims=0)


def _attention(query, key, value, attn_mask, is_causal: bool, scale: float | None, enable_gqa: bool):
    """(output, masked scaled scores) of SDPA; shared by the aten SDPA and CPU flash translations."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if is_causal and attn_mask is not None:
        raise ValueError("sdpa_onnx: is_causal with an explicit attn_mask (PyTorch rejects it too)")
    key_perm = _swap_last_two(len(key.shape))  # before the repeat: a new value has no shape yet
    if enable_gqa:
        key, value = _repeat_kv_heads(key, query), _repeat_kv_heads(value, query)
    if scale is None:
        scale = float(query.shape[-1]) ** -0.5
    scores = op.Mul(op.MatMul(query, op.Transpose(key, perm=key_perm)),
                    op.CastLike(scale, query))
    bool_mask = is_causal or (attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL)
    if is_causal:
        attn_mask = _causal_mask(query, key)
    last = op.Constant(value_ints=[-1])
    if attn_mask is not None:
        if bool_mask:
            scores = op.Where(attn_mask, scores, op.CastLike(float("-inf"), scores))
            allowed = op.ReduceMax(op.Cast(attn_mask, to=ir.DataType.INT32), last, keepdims=1)
            any_key = op.Greater(allowed, op.CastLike(0, allowed))
        else:
            scores = op.Add(scores, attn_mask)
            any_key = op.Greater(op.ReduceMax(attn_mask, last, keepdims=1), op.CastLike(float("-inf"), attn_mask))
    probs = op.Softmax(scores, axis=-1)
    if attn_mask is not None:  # only rows with no key at all: a NaN from the inputs still propagates
        probs = op.Where(any_key, probs, op.CastLike(0.0, probs))
    return op.MatMul(probs, value), scores


def _repeat_kv_heads(kv, query):
    """[B, Hkv, S, D] -> [B, H, S, D], K/V head j serving query heads j*g .. j*g+g-1 (g = H / Hkv), as
    PyTorch's enable_gqa (repeat_interleave over heads). Head counts are static in every HF model."""
    from onnxscript import opset18 as op

    heads, kv_heads = query.shape[1], kv.shape[1]
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads == 0):
        raise ValueError(f"sdpa_onnx: enable_gqa needs static head counts, H a multiple of Hkv ({heads}, {kv_heads})")
    if heads == kv_heads:
        return kv
    b, s_d = op.Shape(kv, start=0, end=1), op.Shape(kv, start=2, end=4)
    group = op.Constant(value_ints=[heads // kv_heads])
    expanded = op.Expand(op.Unsqueeze(kv, op.Constant(value_ints=[2])),
                         op.Concat(op.Shape(kv, start=0, end=2), group, s_d, axis=0))  # [B, Hkv, g, S, D]
    return op.Reshape(expanded, op.Concat(b, op.Constant(value_ints=[heads]), s_d, axis=0))


def _causal_mask(query, key):
    """[Lq, Lk] bool, True where key j <= query i: torch's is_causal (top-left aligned, tril(ones))."""
    from onnxscript import opset18 as op

    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    rows = op.Range(zero, op.Squeeze(op.Shape(query, start=-2, end=-1)), one)
    cols = op.Range(zero, op.Squeeze(op.Shape(key, start=-2, end=-1)), one)
    return op.LessOrEqual(op.Unsqueeze(cols, op.Constant(value_ints=[0])),
                          op.Unsqueeze(rows, op.Constant(value_ints=[1])))


def _swap_last_two(rank: int) -> list[int]:
    return [*range(rank - 2), rank - 1, rank - 2]


def grouped_mm_onnx(mat_a, mat_b, offs):
    """transformers' grouped_mm_fallback, its mixture-of-experts matmul (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek V3,
    Jamba on CPU): rows of mat_a [M, K] sorted by expert, mat_b [E, K, N], offs [E] each expert's cumulative row
    end; out[r] = mat_a[r] @ mat_b[expert of r]. With no translation the whole graph ran on the eager target. The
    experts are static: one Gather and MatMul per expert, then one Concat, never the [M, K, N] gather of a weight
    per row."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    experts = mat_b.shape[0]
    if not isinstance(experts, int):
        raise ValueError("grouped_mm_onnx: the number of experts (weight.shape[0]) must be static")
    axis0, one = op.Constant(value_ints=[0]), op.Constant(value_int=1)
    ends = op.Cast(offs, to=ir.DataType.INT64)
    ends, weights = (op.Split(ends, axis=0, num_outputs=experts), op.Split(mat_b, axis=0, num_outputs=experts)) \
        if experts > 1 else ([ends], [mat_b])
    outputs, start = [], axis0
    for end, weight in zip(ends, weights):
        rows = op.Range(op.Squeeze(start, axis0), op.Squeeze(end, axis0), one)
        outputs.append(op.MatMul(op.Gather(mat_a, rows, axis=0), op.Squeeze(weight, axis0)))
        start = end
    return op.Concat(*outputs, axis=0)


def squeeze_dims_onnx(self, dims):
    """aten.squeeze.dim / .dims: torch drops only the listed dims of size 1, a dim of another size stays (a no-op),
    where ONNX's Squeeze fails on it. torch.onnx emitted Squeeze for every listed dim, so ORT refused the graph at
    session creation (Mistral 3's image_features.squeeze(0) of a [4, 32] tensor: that graph ran on eager). A
    dynamic dim is taken as not 1, as torch.export takes it."""
    from onnxscript import opset18 as op

    dims = [dims] if isinstance(dims, int) else list(dims)
    if self.shape is None:  # no shape known here: the listed dims, as torch.onnx did
        return op.Squeeze(self, op.Constant(value_ints=dims))
    rank = len(self.shape)
    ones = sorted({d % rank for d in dims if isinstance(self.shape[d % rank], int) and self.shape[d % rank] == 1}) \
        if rank else []
    return op.Squeeze(self, op.Constant(value_ints=ones)) if ones else op.Identity(self)


ATEN_TRANSLATIONS = {aten.scaled_dot_product_attention.default: sdpa_onnx,
                     aten._scaled_dot_product_flash_attention_for_cpu.default: flash_attention_for_cpu_onnx,
                     aten.squeeze.dim: squeeze_dims_onnx, aten.squeeze.dims: squeeze_dims_onnx}


def _library_translations() -> dict[Any, Callable]:
    """Translations of other libraries' custom ops, for those registered in this process."""
    found = {}
    grouped_mm = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if grouped_mm is not None:
        found[grouped_mm.default] = grouped_mm_onnx
    return found


def to_onnx(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]):
    """torch.onnx.export of a functional, tensor-only graph; symbolic dims stay dynamic in the file."""
    translations = {op: spec.onnx for op, spec in OPS.items() if spec.onnx is not None}
    translations.update(ATEN_TRANSLATIONS)
    translations.update(_library_translations())
    gm.eval()
    # opset 18 unless an op's translation needs a later one (fp8: float8 QuantizeLinear with block_size, 21)
    opset = max([OPSET] + [OPS[n.target].onnx_opset for n in gm.graph.nodes
                           if n.op == "call_function" and n.target in OPS])
    with onnx_arithmetic_kept():  # the optimizer would drop x + 1e-8 (an RMSNorm's epsilon) as x + 0
        return torch.onnx.export(gm, tuple(example_inputs), dynamo=True, opset_version=opset,
                                 dynamic_shapes=dynamic_dims(gm), custom_translation_table=translations,
                                 optimize=True, verbose=False)


def dynamic_dims(gm: fx.GraphModule) -> tuple[dict[int, Any], ...]:
    specs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        shape = node.meta["val"].shape
        specs.append({i: Dim.DYNAMIC for i, d in enumerate(shape) if isinstance(d, torch.SymInt)})
    return tuple(specs)


def _functionalize(gm: fx.GraphModule) -> tuple[list[int], list[int]]:
    """Rewrite `gm` in place into a tensor-in, tensor-out graph. Returns (indices of the inputs the new
    graph takes, indices of the inputs written in place, in the order their new values are returned)."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    for node in graph.nodes:
        writes_input = (isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
                        and any(a in placeholders for a in node.args))
        if writes_input and not (node.target is aten.copy_.default and not node.users):
            raise Unsupported(f"{node.format_node()} writes a graph input in a way the ONNX graph cannot return")
    output = graph.output_node()
    outputs = list(output.args[0])
    mutated = []
    for node in list(graph.nodes):
        if node.target is aten.copy_.default and node.args[0] in placeholders and not node.users:
            mutated.append(placeholders.index(node.args[0]))
            outputs.append(node.args[1])
            graph.erase_node(node)
    tensors = [p for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)]
    for p in placeholders:
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor):
            continue
        if not isinstance(val, torch.SymInt):
            raise Unsupported(f"graph input {p.name} is a {type(val).__name__}, not a tensor or size")
        source = next(((t, d) for t in tensors for d, size in enumerate(t.meta["val"].shape)
                       if isinstance(size, torch.SymInt) and size.node.expr == val.node.expr), None)
        if source is None:
            raise Unsupported(f"size input {p.name}={val} is not the size of any tensor input "
                              "(a Python int passed as a dynamic value)")
        with graph.inserting_after(source[0]):
            size = graph.call_function(aten.sym_size.int, source)
        size.meta["val"] = val
        p.replace_all_uses_with(size)
        graph.erase_node(p)
    # An output that is an input unchanged (Gemma 3, Idefics3, InternVL and Aya Vision return their
    # inputs_embeds from a graph between breaks) is an Identity in the file; the caller gets the input itself
    # (_input_views), as eager returns it. Before, such graphs ran on the eager target, with a warning.
    for i, o in enumerate(outputs):
        if isinstance(o, fx.Node) and o.op == "placeholder" and isinstance(o.meta.get("val"), torch.Tensor):
            with graph.inserting_before(output):
                outputs[i] = graph.call_function(aten.clone.default, (o,))
            outputs[i].meta["val"] = o.meta["val"]
    output.args = (tuple(outputs),)
    gm.recompile()
    kept = [i for i, p in enumerate(placeholders) if p in tensors]
    return kept, mutated


def _root_cause(e: BaseException) -> str:
    """torch.onnx wraps the translation's own error in two layers of generic advice: report the innermost."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def conversion_failure_site(gm: fx.GraphModule, e: BaseException) -> str:
    """' at <op> (node <name>), from <file>, line <n>: <code>' for the graph node torch.onnx could not
    translate, else ''. torch.export keeps the node names of the graph it re-traces."""
    messages = []
    while e is not None:
        messages.append(str(e))
        e = e.__cause__
    found = re.search(r"Error when translating node %(\w+)", "\n".join(messages))
    return _describe(gm, found.group(1)) if found else ""


def session_failure_site(gm: fx.GraphModule, program: Any, e: BaseException) -> str:
    """The same for an ONNX node ONNX Runtime rejects: torch.onnx records on each ONNX node the name scopes
    of the exported-program node it came from (the last scope is its name), and torch.export records on
    that node the graph node it re-traced (`from_node`, outermost first; the innermost is ours)."""
    found = re.search(r"Node \((\S+)\)", str(e))
    proto = program.model_proto
    onnx_node = next((n for n in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]
                      if found and n.name == found.group(1)), None)
    if onnx_node is None:
        return ""
    scopes = ast.literal_eval({p.key: p.value for p in onnx_node.metadata_props}.get("pkg.torch.onnx.name_scopes", "[]"))
    exported = next((n for n in program.exported_program.graph.nodes if scopes and n.name == scopes[-1]), None)
    if exported is None:
        return ""
    sources = exported.meta.get("from_node") or []
    while sources and sources[-1].from_node:
        sources = sources[-1].from_node
    return _describe(gm, sources[-1].name if sources else exported.name)


def _describe(gm: fx.GraphModule, name: str) -> str:
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        return f" at node {name}"
    return f" at {node.target} (node {name}){source_line(node)}"


def source_line(node: fx.Node) -> str:
    """', from <file>, line <n>: <code>', the user's source line Dynamo recorded for the node (the last frame
    of its stack trace), or ''."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    path, line, code = frames[-1]
    return f", from {path}, line {line}: {code.strip()}"


def _input_views(gm: fx.GraphModule) -> tuple[list[int], fx.GraphModule] | None:
    """(positions, a graph computing just those outputs) for the outputs that are views of graph inputs.
    ONNX Runtime returns a fresh tensor for them, which AOTAutograd would read as if it had the view's
    strides (as_strided on the caller's input): a strided input [2, 2, 1] came back as the first four
    elements of its storage. The views are cheap, so they are taken in PyTorch from the inputs; an output that is
    an input unchanged is that input."""
    positions = views_of_inputs(gm)
    if not positions:
        return None
    view_gm = clone_module(gm)
    output = view_gm.graph.output_node()
    output.args = ([output.args[0][i] for i in positions],)
    # Only what the views read: eliminate_dead_code keeps in-place ops, and a cache.add_(1) beside an output
    # that is an input unchanged ran twice (once in ONNX Runtime, once here)
    needed: set[fx.Node] = set()
    stack = [n for n in output.args[0] if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    for node in reversed(list(view_gm.graph.nodes)):
        if node.op == "call_function" and node not in needed:
            view_gm.graph.erase_node(node)
    view_gm.recompile()
    return positions, view_gm


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[[list[Any]], Any]:
    """Raises Unsupported when the graph cannot run on ONNX Runtime."""
    import onnxruntime as ort

    for node in gm.graph.nodes:  # inputs, intermediates and outputs alike: ORT and numpy must hold them
        allowed = _NUMPY_DTYPES if node.op != "get_attr" else (*_NUMPY_DTYPES, torch.float8_e4m3fn)  # initializers
        for val in torch.utils._pytree.tree_leaves(node.meta.get("val")):
            if isinstance(val, torch.Tensor) and (val.device.type != "cpu" or val.dtype not in allowed):
                raise Unsupported(f"{node.name} is {val.dtype} on {val.device}; the ONNX Runtime target runs CPU "
                                  f"tensors of {sorted(str(d).removeprefix('torch.') for d in _NUMPY_DTYPES)}")
    views = _input_views(gm)
    gm = clone_module(gm)  # on Unsupported the caller falls back with the untouched graph
    num_outputs = len(gm.graph.output_node().args[0])
    kept, mutated = _functionalize(gm)
    try:
        with outside_dynamo_compile():
            program = to_onnx(gm, [example_inputs[i] for i in kept])
    except Exception as e:
        raise Unsupported(f"ONNX conversion failed{conversion_failure_site(gm, e)}: {_root_cause(e)}") from e
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(program.model_proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. ORT's CPU provider has no fp16 MatMul
        raise Unsupported(f"ONNX Runtime cannot run the converted graph{session_failure_site(gm, program, e)}: "
                          f"{_first_line(e)}") from e
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]

    def run(args: list[Any]) -> Any:
        binding = session.io_binding()
        keep_alive = []
        for name, i in zip(input_names, kept):
            t = args[i].contiguous()
            keep_alive.append(t)
            binding.bind_input(name, "cpu", 0, _NUMPY_DTYPES[t.dtype], tuple(t.shape), t.data_ptr())
        for name in output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        results = [torch.from_numpy(np.asarray(o)) for o in binding.copy_outputs_to_cpu()]
        for i, new_value in zip(mutated, results[num_outputs:]):
            args[i].copy_(new_value)
        if views is not None:  # outputs that are views of inputs: the views themselves (see _input_views)
            positions, view_gm = views
            for position, value in zip(positions, view_gm(*args)):
                results[position] = value
        return tuple(results[:num_outputs])

    return run
