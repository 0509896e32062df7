"""Kernel generation: partition the prepared ATen graph into Triton kernels and write their source.

Every fusible node (pointwise op, view, cat, factory, last-dimension reduction) is an expression of its
output coordinates. A node is *materialized* (stored to memory) only when something outside the fused
code needs it: a library op (matmul, attention, embedding), a graph output, or a consumer that cannot
recompute it at its own coordinates. Each materialized node is a kernel *root*; its kernel inlines
every non-materialized node above it, down to loads of graph inputs, constants and library-op outputs.
Views are index remappings inside a kernel and plain ATen views (no copy) outside one.

Two kernel shapes:
- pointwise: 1-D blocks over the flat iteration space, coordinates recovered by div/mod;
- rows: one program per row of [*rows, R]; reductions over the last dimension (RMSNorm, LayerNorm,
  softmax) run over the whole row held in registers, so a norm reads its input once.
Roots with the same iteration space are merged into one kernel when the graph's order allows it
(Q and K rotary embeddings, a residual add and the norm after it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from ..common import is_view
from . import ops
from .device import pdl

aten = torch.ops.aten
MAX_ROW = 16384  # longest row a rows kernel holds in registers
VECTOR = re.compile(r"\b(xindex|rindex|row|[xr]\d+)\b")


class NeedMaterialize(Exception):
    """Raised while writing a kernel: this node must be stored, the plan is redone."""

    def __init__(self, node: fx.Node) -> None:
        super().__init__(node.name)
        self.node = node


class CannotMerge(Exception):
    def __init__(self, roots: Sequence[fx.Node]) -> None:
        super().__init__(", ".join(r.name for r in roots))
        self.roots = tuple(roots)


@dataclass
class Kernel:
    name: str
    roots: list[fx.Node]
    shape: tuple  # iteration space
    rows: bool
    inputs: list[fx.Node] = field(default_factory=list)  # external tensors it loads
    symbols: list[str] = field(default_factory=list)  # symbolic sizes it takes
    source: str = ""
    launcher: str = ""


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def size_code(size: Any, symbols: set[str] | None = None) -> str:
    """Source for one size: an int, or a polynomial in the graph's size symbols."""
    if isinstance(size, int):
        return str(size)
    expr = size.node.expr if isinstance(size, torch.SymInt) else size
    if isinstance(expr, (int, sympy.Integer)):
        return str(int(expr))
    if not all(isinstance(a, (sympy.Symbol, sympy.Integer, sympy.Add, sympy.Mul)) for a in sympy.preorder_traversal(expr)):
        raise NotImplementedError(f"size expression {expr} is not a polynomial")
    if symbols is not None:
        symbols.update(str(s) for s in expr.free_symbols)
    return f"({expr})"


def _supported_sizes(shape: Sequence[Any]) -> bool:
    try:
        for s in shape:
            size_code(s)
        return True
    except NotImplementedError:
        return False


def is_one(size: Any) -> bool:
    return isinstance(size, int) and size == 1 or (isinstance(size, torch.SymInt) and size.node.expr == 1)


def same_size(a: Any, b: Any) -> bool:
    return size_code(a) == size_code(b)


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def squeezed(shape: Sequence[Any]) -> list[str]:
    return [size_code(s) for s in shape if not is_one(s)]


def op_kind(node: fx.Node) -> str | None:
    t = node.target
    if t in ops.POINTWISE or t in ops.TYPED or t in ops.CASTS:
        if t is aten.pow.Tensor_Scalar and ops._pow("x", node.args[1]) is None:
            return None
        if t in (aten._to_copy.default, aten.clone.default) and not _plain_copy(node):
            return None
        return "pointwise"
    if t in ops.FACTORIES:
        return "pointwise"
    if t in ops.ARANGES and all(isinstance(a, (int, float)) for a in ops.arange_start_step(node)):
        return "pointwise"
    if t in ops.VIEWS:
        return "view"
    if t is ops.CAT:
        return "cat"
    if _gather_parts(node) is not None:
        return "gather"
    if t is aten.index_copy_.default and _plain_scatter(node):
        return "scatter"
    if t is aten.copy_.default and _plain_writeback(node):
        return "writeback"
    if t in ops.REDUCTIONS:
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else None
        rank = _val(x).dim()
        if (dims and list(dims) in ([-1], [rank - 1]) and _val(node).is_floating_point()
                and isinstance(_val(x).shape[-1], int) and _val(x).shape[-1] <= MAX_ROW and node.kwargs.get("dtype") is None
                and (len(node.args) < 4 or node.args[3] is None)):
            return "reduction"
    return None


def _plain_scatter(node: fx.Node) -> bool:
    """index_copy_(cache, dim, index, src) into a graph input (a KV cache write): the kernel that computes
    `src` stores it straight into the cache rows that `index` names."""
    cache, dim, index, src = node.args
    return (cache.op == "placeholder" and isinstance(dim, int) and isinstance(_val(index), torch.Tensor)
            and _val(index).dim() == 1 and not _val(index).is_floating_point() and isinstance(_val(src), torch.Tensor)
            and _val(src).dtype == _val(cache).dtype)


def _gather_parts(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(table, ids) of a read of a table's entries by integer ids: embedding(table, ids) (a token embedding),
    table[ids] (index.Tensor with one index, on the first dimension: a position embedding), or
    table[ids0, ids1, ...] (one integer index per leading dimension, broadcast together: HF's padding mask
    read as mask[batch_idx, kv_idx] in every decode step); out[i..., rest] = table[ids0[i...], ..., rest].
    Each was an ATen kernel of its own."""
    if node.target is aten.embedding.default:
        table, ids = node.args[0], [node.args[1]]
    elif (node.target is aten.index.Tensor and node.args[1]
          and all(isinstance(i, fx.Node) for i in node.args[1])):
        table, ids = node.args[0], list(node.args[1])
    else:
        return None
    if not (isinstance(table, fx.Node) and isinstance(_val(table), torch.Tensor) and _val(table).dim() >= len(ids)
            and all(isinstance(_val(i), torch.Tensor) and _val(i).dtype in (torch.int32, torch.int64) for i in ids)):
        return None
    return table, ids


def _plain_writeback(node: fx.Node) -> bool:
    """copy_(input, value) that functionalization leaves at a graph's end for an in-place update of a graph
    input (HF's StaticLayer advances `cumulative_length` once per layer and step): the kernel that computes
    `value` stores it into the input, instead of a copy of its own (H200, Whisper 8 + 8 layers: 8 of the ~9
    memcpy kernels a decode step ran). Same shape only (no broadcasting), no users; fusible_kinds checks that
    every other reader of the input comes earlier in the graph, plan() that they are launched earlier."""
    if len(node.args) != 2 or node.kwargs.get("non_blocking") or node.users:
        return False
    dest, src = node.args
    return (dest.op == "placeholder" and isinstance(src, fx.Node) and isinstance(_val(src), torch.Tensor)
            and same_shape(_val(src).shape, _val(dest).shape) and _val(src).device == _val(dest).device)


def input_aliases(node: fx.Node) -> set[fx.Node]:
    """`node` and every view of it (ops whose schema returns an alias of their input), transitively: what
    reads the memory a write-back writes."""
    found, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in found and is_view(user) and user.args[0] in found:
                found.add(user)
                stack.append(user)
    return found


def space_shape(node: fx.Node) -> tuple:
    """The shape a root is computed over: a scatter's source, any other node's own."""
    return tuple(_val(node.args[3] if node.target is aten.index_copy_.default else node).shape)


def _plain_copy(node: fx.Node) -> bool:
    allowed = {"dtype", "memory_format", "layout", "device", "pin_memory"}
    if set(node.kwargs) - allowed:
        return False
    device = node.kwargs.get("device")
    return device is None or torch.device(device) == _val(node).device


def fusible_kinds(gm: fx.GraphModule, device: torch.device,
                  plain: frozenset[fx.Node] = frozenset()) -> dict[fx.Node, str]:
    """Nodes the generator may fuse. A view of a non-fusible value stays an ATen view. `plain`: write-backs
    that planning found it cannot order safely, left as ATen copies."""
    fusible: dict[fx.Node, str] = {}
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.copy_.default and (node in plain or any(
                position[u] > position[node] for a in input_aliases(node.args[0]) for u in a.users
                if u is not node)):
            continue  # a write-back may only follow every other reader of the input it writes
        v = _val(node)
        if not isinstance(v, torch.Tensor) or v.dtype not in ops.TL_DTYPES or v.device != device:
            continue
        kind = op_kind(node)
        if kind is None or not _supported_sizes(v.shape):
            continue
        tensor_args = [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]
        if len(tensor_args) != len(node.all_input_nodes):
            # an operand computed as a number in the graph (a SymInt from a symbolic size: Hugging Face's dynamic
            # cache under the default recipe) has no tensor to load; the kernel writer took it for one and the
            # whole graph fell back unoptimized ("'SymInt' object has no attribute 'shape'"): left to ATen
            continue
        if any(_val(a).device != device or _val(a).dtype not in ops.TL_DTYPES or not _supported_sizes(_val(a).shape)
               for a in tensor_args):
            continue
        if kind == "view" and fusible.get(node.args[0], "scatter") == "scatter":
            continue
        fusible[node] = kind
    return fusible


def materialize(gm: fx.GraphModule, fusible: dict[fx.Node, str], forced: set[fx.Node]) -> set[fx.Node]:
    """Decide what is stored. Mutates `fusible`: views that feed library ops leave it (they become ATen
    views of their stored source)."""
    stored = {n for n in forced if n in fusible} | {n for n, kind in fusible.items() if kind in ("scatter", "writeback")}
    changed = True
    while changed:
        changed = False
        for node in list(fusible):
            if node in stored:
                continue
            if fusible[node] == "view" and node.args[0] not in fusible:
                del fusible[node]
                changed = True
            elif any(u not in fusible for u in node.users):
                if fusible[node] == "view":
                    del fusible[node]
                else:
                    stored.add(node)
                changed = True
    return stored


class Writer:
    """Writes one kernel: the expression of each root at its coordinates, loads and stores."""

    def __init__(self, kernel: Kernel, fusible: dict[fx.Node, str], stored: set[fx.Node],
                 owner: dict[fx.Node, Kernel]) -> None:
        self.k, self.fusible, self.stored, self.owner = kernel, fusible, stored, owner
        self.lines: list[str] = []
        self.cache: dict[tuple, tuple[str, torch.dtype]] = {}
        self.inputs: dict[fx.Node, str] = {}
        self.strides: dict[fx.Node, list[int]] = {}
        self.symbols: set[str] = set()
        self.count = 0
        self.home: dict[fx.Node, tuple[str, ...]] = {}
        self.read_offsets: dict[fx.Node, set[str]] = {}  # each input node read: the offsets it was read at

    # ---- iteration space
    def coords(self) -> tuple[str, ...]:
        shape = self.k.shape
        if self.k.rows:
            rows = shape[:-1]
            # Row coordinates are vectors (all lanes equal), not scalars: Triton's interpreter mishandles
            # masks built from scalar comparisons, and the tests run generated code there.
            self.lines.append("rindex = tl.arange(0, RBLOCK)")
            self.lines.append("row = tl.program_id(0) + rindex * 0")
            self.lines.append(f"rmask = rindex < {self.size(shape[-1])}")
            return (*self._unflatten("row", rows, "r"), "rindex")
        self.lines.append("xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)")
        self.lines.append(f"xmask = xindex < {self.numel(shape)}")
        return self._unflatten("xindex", shape, "x")

    def _unflatten(self, flat: str, shape: Sequence[Any], prefix: str) -> tuple[str, ...]:
        out = []
        for d, s in enumerate(shape):
            if is_one(s):
                out.append("0")
                continue
            inner = self.numel(shape[d + 1:])
            expr = flat if inner == "1" else f"({flat} // {inner})"
            if any(not is_one(x) for x in shape[:d]):
                expr = f"({expr} % {self.size(s)})"
            name = f"{prefix}{d}"
            self.lines.append(f"{name} = {expr}")
            out.append(name)
        return tuple(out)

    @property
    def lane_zero(self) -> str:
        return "rindex * 0" if self.k.rows else "xindex * 0"

    def size(self, s: Any) -> str:
        return size_code(s, self.symbols)

    def numel(self, shape: Sequence[Any]) -> str:
        return product([self.size(s) for s in shape if not is_one(s)])

    def tmp(self) -> str:
        self.count += 1
        return f"t{self.count}"

    def mask(self, index: Sequence[str], guard: str | None) -> str | None:
        base = ("rmask" if self.k.rows else "xmask") if any(VECTOR.search(c) for c in index) else None
        if guard is None:
            return base
        return guard if base is None else f"{base} & {guard}"

    # ---- values
    def value(self, node: Any, index: tuple[str, ...], guard: str | None = None) -> tuple[str, torch.dtype]:
        """(source name, compute dtype) of `node` at `index`."""
        if not isinstance(node, fx.Node):
            return ops.literal(node), torch.float32
        key = (node, index, guard)
        if key not in self.cache:
            self.cache[key] = self._compute(node, index, guard)
        return self.cache[key]

    def _compute(self, node: fx.Node, index: tuple[str, ...], guard: str | None) -> tuple[str, torch.dtype]:
        if self.fusible.get(node) == "scatter":
            if self.owner.get(node) is self.k:
                raise CannotMerge(self.k.roots)  # reading the cache it writes, in the same kernel: a race
            return self.load(node, index, guard)
        if node in self.stored and self.owner.get(node) is not self.k or node not in self.fusible:
            return self.load(node, index, guard)
        if node in self.stored and index != self.home_index(node):
            raise CannotMerge(self.k.roots) if len(self.k.roots) > 1 else NeedMaterialize(node)
        kind = self.fusible[node]
        if kind == "view":
            return self.value(node.args[0], view_index(node, index), guard)
        if kind == "cat":
            return self.cat(node, index, guard)
        if kind == "reduction":
            return self.reduce(node, index)
        if kind == "gather":
            return self.gather(node, index, guard)
        return self.pointwise(node, index, guard)

    def gather(self, node: fx.Node, index: tuple[str, ...], guard: str | None) -> tuple[str, torch.dtype]:
        """The table's entry that the ids at these coordinates name (negative ids count from the end, as
        index.Tensor's do; ids outside the table read nothing, where eager would raise)."""
        table, ids = _gather_parts(node)
        if self.fusible.get(table) in ("reduction", "cat") and table not in self.stored:
            raise NeedMaterialize(table)  # a row chosen by data cannot steer a fused reduction's rows
        lead = len(_val(node).shape) - (_val(table).dim() - len(ids))  # the ids' broadcast rank
        rows, inside = [], []
        for d, i in enumerate(ids):
            ident, _ = self.value(i, broadcast_index(index[:lead], _val(node).shape[:lead], _val(i).shape), guard)
            size = self.size(_val(table).shape[d])
            row = self.tmp()
            # a vector even when one id serves every lane: the masks built from it must be (see scatter)
            self.lines.append(f"{row} = {ident}.to(tl.int64) + {self.lane_zero}")
            self.lines.append(f"{row} = tl.where({row} < 0, {row} + {size}, {row})")
            rows.append(row)
            inside.append(f"({row} >= 0) & ({row} < {size})")
        inside = " & ".join(inside)
        return self.value(table, (*rows, *index[lead:]), inside if guard is None else f"{guard} & {inside}")

    def home_index(self, node: fx.Node) -> tuple[str, ...]:
        if node not in self.home:
            self.home[node] = root_index(self.k, node, self.base)
        return self.home[node]

    def register(self, node: fx.Node) -> str:
        if node not in self.inputs:
            self.inputs[node] = f"in{len(self.inputs)}"
            self.strides[node] = [d for d, s in enumerate(_val(node).shape) if not is_one(s)]
        return self.inputs[node]

    def load(self, node: fx.Node, index: tuple[str, ...], guard: str | None) -> tuple[str, torch.dtype]:
        v = _val(node)
        if self.fusible.get(node) == "scatter":
            node = node.args[0]
        name = self.register(node)
        offset = " + ".join(f"{index[d]} * {name}_st{d}" for d in self.strides[node] if index[d] != "0") or "0"
        self.read_offsets.setdefault(node, set()).add(offset)
        mask = self.mask(index, guard)
        if mask is not None and not VECTOR.search(offset):
            offset = f"{offset} + {self.lane_zero}"  # a masked load needs a pointer per lane
        out = self.tmp()
        load = f"tl.load({name} + ({offset})" + (f", mask={mask}, other=0)" if mask else ")")
        self.lines.append(f"{out} = {load}")
        return self.converted(out, v.dtype)

    def converted(self, name: str, dtype: torch.dtype) -> tuple[str, torch.dtype]:
        if dtype in ops.HALF or dtype == torch.float32:
            if dtype in ops.HALF:
                self.lines.append(f"{name} = {name}.to(tl.float32)")
            return name, torch.float32
        if dtype == torch.bool:
            self.lines.append(f"{name} = {name} != 0")
        return name, dtype

    def pointwise(self, node: fx.Node, index: tuple[str, ...], guard: str | None) -> tuple[str, torch.dtype]:
        out_val = _val(node)
        out_dtype = out_val.dtype
        compute = torch.float32 if out_dtype.is_floating_point else out_dtype
        t = node.target
        if t in ops.FACTORIES:
            expr = ops.literal(ops.factory_value(node))
            name = self.tmp()
            self.lines.append(f"{name} = tl.full([], {expr}, {ops.TL_DTYPES[torch.float32 if out_dtype.is_floating_point else out_dtype]})")
            return ops.cast(name, torch.float32, out_dtype) if out_dtype in ops.HALF else name, compute
        if t in ops.ARANGES:
            start, step = ops.arange_start_step(node)
            kind = ops.TL_DTYPES[compute]
            name = self.tmp()
            # a vector even for one element (the coordinate "0"): masks built from it (a cache row) must be
            # vectors, which the interpreter needs (see scatter)
            coord = index[0] if index[0] != "0" else self.lane_zero
            self.lines.append(f"{name} = tl.full([], {ops.literal(start)}, {kind}) + ({coord}).to({kind}) * {ops.literal(step)}")
            return ops.cast(name, torch.float32, out_dtype) if out_dtype in ops.HALF else name, compute

        def arg(a: Any) -> Any:
            if isinstance(a, fx.Node):
                name, dtype = self.value(a, broadcast_index(index, _val(node).shape, _val(a).shape), guard)
                if out_dtype.is_floating_point and not dtype.is_floating_point and t not in ops.CASTS \
                        and t not in (aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
                    name = f"{name}.to(tl.float32)"
                return name
            return a

        args = [arg(a) for a in node.args]
        if t in ops.CASTS:
            src, src_dtype = self.value(node.args[0], broadcast_index(index, out_val.shape, _val(node.args[0]).shape), guard)
            if out_dtype.is_floating_point and not src_dtype.is_floating_point:
                src, src_dtype = f"{src}.to(tl.float32)", torch.float32
            expr = ops.cast(src, src_dtype, out_dtype) if out_dtype != torch.float32 else src
        elif t in ops.TYPED:
            expr = ops.TYPED[t](out_dtype, *args)
        else:
            kwargs = {k: v for k, v in node.kwargs.items() if k in ("alpha", "approximate")}
            expr = ops.POINTWISE[t](*args, **kwargs)
        name = self.tmp()
        self.lines.append(f"{name} = {expr}")
        return name, compute

    def cat(self, node: fx.Node, index: tuple[str, ...], guard: str | None) -> tuple[str, torch.dtype]:
        parts = [p for p in node.args[0] if _val(p).numel() != 0 or not isinstance(_val(p).numel(), int)]
        dim = node.args[1] if len(node.args) > 1 else 0
        dim = dim % _val(node).dim()
        c = index[dim]
        offsets, total = [], "0"
        for p in parts:
            offsets.append(total)
            total = f"({total} + {self.size(_val(p).shape[dim])})" if total != "0" else self.size(_val(p).shape[dim])
        result, compute = None, torch.float32 if _val(node).dtype.is_floating_point else _val(node).dtype
        for i in reversed(range(len(parts))):
            start = offsets[i]
            end = offsets[i + 1] if i + 1 < len(parts) else None
            conds = ([f"({c} >= {start})"] if start != "0" else []) + ([f"({c} < {end})"] if end else [])
            cond = " & ".join(conds) if conds else None
            sub = list(index)
            sub[dim] = f"({c} - {start})" if start != "0" else c
            g = cond if guard is None else (f"{guard} & {cond}" if cond else guard)
            name, _ = self.value(parts[i], tuple(sub), g)
            if result is None:
                result = name
            else:
                tmp = self.tmp()
                self.lines.append(f"{tmp} = tl.where({c} < {end}, {name}, {result})")
                result = tmp
        return result, compute

    def reduce(self, node: fx.Node, index: tuple[str, ...]) -> tuple[str, torch.dtype]:
        x = node.args[0]
        keepdim = len(node.args) > 2 and bool(node.args[2])
        if not self.k.rows or not same_shape(_val(x).shape, self.k.shape):
            raise NeedMaterialize(node)
        full = self.base
        expected = (*full[:-1], "0") if keepdim else full[:-1]
        if tuple(broadcast_index(index, _val(node).shape, _val(node).shape)) != tuple(expected):
            raise NeedMaterialize(node)
        src, _ = self.value(x, full)
        how = ops.REDUCTIONS[node.target]
        neutral = {"sum": "0.0", "mean": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}[how]
        masked = f"tl.where(rmask, {src}, {neutral})"
        fn = {"sum": "tl.sum", "mean": "tl.sum", "max": "tl.max", "min": "tl.min"}[how]
        expr = f"{fn}({masked}, axis=0)"
        if how == "mean":
            expr = f"{expr} / {self.size(self.k.shape[-1])}"
        name = self.tmp()
        self.lines.append(f"{name} = {expr}")
        if _val(node).dtype in ops.HALF:
            self.lines.append(f"{name} = {ops.cast(name, torch.float32, _val(node).dtype)}")
        return name, torch.float32

    def scatter(self, root: fx.Node, index: tuple[str, ...]) -> str:
        """Store the source at its coordinates, with coordinate `dim` replaced by index[coordinate]: the
        rows of index_copy_. Rows outside the cache are not written (eager would raise)."""
        cache, dim, rows, src = root.args
        dim %= _val(cache).dim()
        value, _ = self.value(src, index)
        # A vector even for one row: the interpreter mishandles masks built from scalar comparisons.
        row, _ = self.value(rows, (index[dim],) if not is_one(_val(rows).shape[0]) else (self.lane_zero,))
        name = self.register(cache)
        target = list(index)
        target[dim] = row
        offset = " + ".join(f"{c} * {name}_st{d}" for d, c in enumerate(target) if d in self.strides[cache] and c != "0") or "0"
        inside = f"({row} >= 0) & ({row} < {self.size(_val(cache).shape[dim])})"
        mask = self.mask(index, inside) or inside
        dtype = ops.TL_DTYPES[_val(cache).dtype]
        return f"tl.store({name} + ({offset}), {value}.to({dtype}), mask={mask})"

    # ---- the kernel
    def write(self) -> None:
        self.base = self.coords()
        stores, writebacks = [], []
        for i, root in enumerate(self.k.roots):
            index = self.home_index(root)
            if self.fusible[root] == "scatter":
                stores.append(self.scatter(root, index))
                continue
            if self.fusible[root] == "writeback":  # into the input it updates, at the input's strides
                dest, src = root.args
                name, _ = self.value(src, index)
                out = self.register(dest)
                offset = " + ".join(f"{index[d]} * {out}_st{d}" for d in self.strides[dest] if index[d] != "0") or "0"
                writebacks.append((dest, src, offset))
            else:
                name, _ = self.value(root, index)
                out = f"out{i}"
                shape = _val(root).shape
                strides = contiguous_strides([self.size(s) for s in shape])
                offset = " + ".join(f"{c} * {st}" for c, st, s in zip(index, strides, shape) if c != "0" and not is_one(s)) or "0"
            mask = self.mask(index, None)
            if self.k.rows and not any("rindex" in c for c in index):
                mask = "rmask & (rindex == 0)"  # one value per row: one lane stores it
            if not VECTOR.search(offset):  # a pointer per lane: a masked store needs it, and a value computed
                offset = f"{offset} + {self.lane_zero}"  # from a vector (an arange of one) is a vector
            dtype = ops.TL_DTYPES[_val(root).dtype]
            value = f"{name}.to({dtype})" if _val(root).dtype != torch.bool else f"({name} != 0).to(tl.int1)"
            stores.append(f"tl.store({out} + ({offset}), {value}" + (f", mask={mask})" if mask else ")"))
        self.lines.extend(stores)
        for dest, src, offset in writebacks:
            if any(o != offset for o in self.read_offsets.get(dest, ())) or any(
                    a in self.inputs for a in input_aliases(dest) if a is not dest):
                # the kernel reads the input at other elements than it writes (or through a view of it),
                # which another program may have written already: the value gets a kernel of its own first
                raise CannotMerge(self.k.roots) if len(self.k.roots) > 1 else NeedMaterialize(src)
        written = [self.inputs[r.args[0]] for r in self.k.roots if self.fusible[r] in ("scatter", "writeback")]
        if len(set(written)) != len(written) or any(r.args[0] in self.read_offsets for r in self.k.roots
                                                    if self.fusible[r] == "scatter"):
            raise CannotMerge(self.k.roots)  # two writes to one cache, or a read of a cache being written
        self.k.inputs = list(self.inputs)
        self.k.symbols = sorted(self.symbols)
        params = []
        for node, name in self.inputs.items():
            params.append(name)
            params.extend(f"{name}_st{d}" for d in self.strides[node])
        params += [f"out{i}" for i in range(len(self.k.roots))] + self.k.symbols
        params.append("RBLOCK: tl.constexpr" if self.k.rows else "XBLOCK: tl.constexpr")
        # programmatic dependent launch (device.pdl): wait for the previous kernel's writes before any load
        self.pdl = pdl(_val(self.k.roots[0]).device)
        body = "\n".join("    " + line for line in (["tl.extra.cuda.gdc_wait()", "tl.extra.cuda.gdc_launch_dependents()"] if self.pdl else []) + self.lines)
        self.k.source = f"@triton.jit\ndef {self.k.name}({', '.join(params)}):\n{body}\n"
        self.k.launcher = self.launcher()

    def launcher(self) -> str:
        k = self.k
        args = [self.inputs[n] for n in k.inputs] + k.symbols
        device = next((f"{self.inputs[n]}.device" for n in k.inputs), repr(str(_val(k.roots[0]).device)))
        lines = [f"def launch_{k.name}({', '.join(args)}):"]
        for i, root in enumerate(k.roots):
            v = _val(root)
            if self.fusible[root] in ("scatter", "writeback"):
                lines.append(f"    out{i} = {self.inputs[root.args[0]]}  # written in place")
                continue
            shape = ", ".join(self.size(s) for s in v.shape)
            lines.append(f"    out{i} = torch.empty(({shape}{',' if v.dim() == 1 else ''}), dtype={v.dtype}, device={device})")
        call = []
        for node in k.inputs:
            name = self.inputs[node]
            call.append(name)
            call.extend(f"{name}.stride({d})" for d in self.strides[node])
        call += [f"out{i}" for i in range(len(k.roots))] + k.symbols
        if k.rows:
            block = next_pow2(int(k.shape[-1]))
            warps = min(8, max(1, block // 256))
            work, grid = self.numel(k.shape[:-1]), self.numel(k.shape[:-1])
            call.append(f"RBLOCK={block}, num_warps={warps}")
        else:
            work = self.numel(k.shape)
            static = all(isinstance(s, int) for s in k.shape)
            block = min(1024, max(16, next_pow2(int(torch.Size(k.shape).numel())))) if static else 1024
            grid = f"triton.cdiv({work}, {block})"
            call.append(f"XBLOCK={block}, num_warps={4 if block >= 512 else 1}")
        lines.append(f"    if {work} > 0:")
        if self.pdl:
            call.append("launch_pdl=True")
        lines.append(f"        {k.name}[({grid},)]({', '.join(call)})")
        lines.append(f"    return ({''.join(f'out{i}, ' for i in range(len(k.roots)))})")
        return "\n".join(lines) + "\n"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def product(parts: Sequence[str]) -> str:
    parts = [p for p in parts if p != "1"]
    if not parts:
        return "1"
    return parts[0] if len(parts) == 1 else "(" + " * ".join(parts) + ")"


def contiguous_strides(sizes: Sequence[str]) -> list[str]:
    return [product(sizes[d + 1:]) for d in range(len(sizes))]


def broadcast_index(index: Sequence[str], out_shape: Sequence[Any], in_shape: Sequence[Any]) -> tuple[str, ...]:
    """Coordinates of an input broadcast to the output's shape (aligned on the right)."""
    lead = len(out_shape) - len(in_shape)
    return tuple("0" if is_one(s) else index[lead + d] for d, s in enumerate(in_shape))


def root_index(k: Kernel, node: fx.Node, base: tuple[str, ...]) -> tuple[str, ...]:
    """Where a root's element sits in the kernel's iteration space."""
    shape = space_shape(node)
    if same_shape(shape, k.shape):
        return tuple(base)
    if k.rows and len(shape) == len(k.shape) and same_shape(shape[:-1], k.shape[:-1]) and is_one(shape[-1]):
        return (*base[:-1], "0")
    if k.rows and same_shape(shape, k.shape[:-1]):
        return tuple(base[:-1])
    if squeezed(shape) == squeezed(k.shape):
        kept = iter(c for c, s in zip(base, k.shape) if not is_one(s))
        return tuple("0" if is_one(s) else next(kept) for s in shape)
    raise NotImplementedError(f"{node.name} does not fit its kernel's iteration space")


def view_index(node: fx.Node, index: Sequence[str]) -> tuple[str, ...]:
    """Output coordinates of a view -> coordinates in its input."""
    t, args = node.target, node.args
    in_shape, out_shape = _val(args[0]).shape, _val(node).shape
    rank = len(in_shape)
    if t in (aten.transpose.int, aten.t.default):
        d0, d1 = (args[1] % rank, args[2] % rank) if t is aten.transpose.int else (0, 1)
        idx = list(index)
        if rank >= 2 or t is aten.transpose.int:
            idx[d0], idx[d1] = idx[d1], idx[d0]
        return tuple(idx)
    if t is aten.permute.default:
        idx = [""] * rank
        for i, d in enumerate(args[1]):
            idx[d % rank] = index[i]
        return tuple(idx)
    if t is aten.unsqueeze.default:
        d = args[1] % len(out_shape)
        return tuple(index[:d]) + tuple(index[d + 1:])
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        dims = [args[1]] if t is aten.squeeze.dim else list(args[1])
        dims = {d % rank for d in dims if is_one(in_shape[d % rank])}
        it = iter(index)
        return tuple("0" if d in dims else next(it) for d in range(rank))
    if t is aten.expand.default:
        return broadcast_index(index, out_shape, in_shape)
    if t is aten.slice.Tensor:
        d = (args[1] if len(args) > 1 else 0) % rank
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        step = args[4] if len(args) > 4 else 1
        if isinstance(start, int) and start < 0:
            start = f"({size_code(in_shape[d])} + {start})" if not isinstance(in_shape[d], int) else max(in_shape[d] + start, 0)
        elif isinstance(start, int) and isinstance(in_shape[d], int):
            start = min(start, in_shape[d])
        elif not isinstance(start, int):
            start = size_code(start)
        idx = list(index)
        c = idx[d] if step == 1 else f"({idx[d]} * {step})"
        idx[d] = c if start in (0, "0") else f"({start} + {c})"
        return tuple(idx)
    if t is aten.select.int:
        d, i = args[1] % rank, args[2]
        if isinstance(i, int) and i < 0:
            i = f"({size_code(in_shape[d])} + {i})"
        idx = list(index)
        idx.insert(d, str(i))
        return tuple(idx)
    return reshape_index(index, out_shape, in_shape)


def reshape_index(index: Sequence[str], out_shape: Sequence[Any], in_shape: Sequence[Any]) -> tuple[str, ...]:
    if squeezed(out_shape) == squeezed(in_shape):
        kept = iter(c for c, s in zip(index, out_shape) if not is_one(s))
        return tuple("0" if is_one(s) else next(kept) for s in in_shape)
    out_sizes = [size_code(s) for s in out_shape]
    terms = [f"{c} * {st}" if st != "1" else c for c, st, s in zip(index, contiguous_strides(out_sizes), out_shape)
             if c != "0" and not is_one(s)]
    flat = "(" + " + ".join(terms) + ")" if terms else "0"
    in_sizes = [size_code(s) for s in in_shape]
    out = []
    for d, (s, st) in enumerate(zip(in_shape, contiguous_strides(in_sizes))):
        if is_one(s):
            out.append("0")
            continue
        expr = flat if st == "1" else f"({flat} // {st})"
        out.append(expr if d == 0 else f"({expr} % {in_sizes[d]})")
    return tuple(out)
