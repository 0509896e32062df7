"""Planning: which nodes each kernel computes and stores, and the graph that calls the kernels.

The plan is redone when writing a kernel finds that a value must be stored after all (a reduction read
at other coordinates than its row, a merged root read at another element): the rule stays simple and
the generator, which knows the indices, has the last word."""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from .codegen import (CannotMerge, space_shape, Kernel, NeedMaterialize, Writer, _val, fusible_kinds, input_aliases,
                      materialize, root_index, same_shape)

aten = torch.ops.aten
MERGE_WINDOW = 4  # recent kernels a new root may join


def _inline_set(root: fx.Node, fusible: dict[fx.Node, str], stored: set[fx.Node]) -> set[fx.Node]:
    seen, stack = {root}, [root]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in fusible and a not in stored and a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def store_shared(fusible: dict[fx.Node, str], stored: set[fx.Node]) -> None:
    """Store values that several kernels would otherwise recompute, when recomputing is not cheap: a
    reduction in their cone, or more than one load (a residual stream recomputed layer after layer)."""
    while True:
        cones = {}
        for root in stored:
            cones[root] = _inline_set(root, fusible, stored)
        count: dict[fx.Node, int] = {}
        for cone in cones.values():
            for n in cone:
                count[n] = count.get(n, 0) + 1
        shared = []
        for n, c in count.items():
            if c < 2 or n in stored or fusible[n] == "view":
                continue
            cone = _inline_set(n, fusible, stored)
            loads = {a for m in cone for a in m.all_input_nodes if a not in cone}
            if any(fusible[m] == "reduction" for m in cone) or len(loads) > 1:
                shared.append(n)
        if not shared:
            return
        stored.update(shared)


def _space(root: fx.Node, inline: set[fx.Node], fusible: dict[fx.Node, str]) -> tuple[tuple, bool]:
    """Iteration space of a root's kernel: the input of the reductions it inlines, else its own shape."""
    reductions = [n for n in inline if fusible[n] == "reduction"]
    if not reductions:
        return space_shape(root), False
    shape = tuple(_val(reductions[0].args[0]).shape)
    for r in reductions[1:]:
        if not same_shape(_val(r.args[0]).shape, shape):
            raise NeedMaterialize(r)
    try:  # the root must sit in the rows it reduces (not behind a transposing view)
        root_index(Kernel(name="probe", roots=[], shape=shape, rows=True), root, tuple(map(str, range(len(shape)))))
    except NotImplementedError:
        raise NeedMaterialize(reductions[0]) from None
    return shape, True


def plan(gm: fx.GraphModule, device: torch.device) -> tuple[list[Kernel], dict[fx.Node, str]]:
    forced: set[fx.Node] = set()
    unmergeable: set[tuple] = set()
    plain: set[fx.Node] = set()  # write-backs left as ATen copies (see _late_readers)
    for _ in range(len(gm.graph.nodes) + 1):
        fusible = fusible_kinds(gm, device, frozenset(plain))
        stored = materialize(gm, fusible, forced)
        store_shared(fusible, stored)
        try:
            kernels = _group(gm, fusible, stored, unmergeable)
            owner = {r: k for k in kernels for r in k.roots}
            for k in kernels:
                Writer(k, fusible, stored, owner).write()
            late = _late_readers(gm, kernels, fusible)
            for w in late:  # a later kernel recomputing the new value from the old input reads it stored
                src = w.args[1]  # instead; if that was tried already, the update stays an ATen copy
                if fusible.get(src) not in (None, "view") and src not in forced:
                    forced.add(src)
                else:
                    plain.add(w)
            if late:
                continue
            return kernels, fusible
        except NeedMaterialize as e:
            if e.node in forced:
                raise NotImplementedError(f"cannot generate a kernel for {e.node.format_node()}") from None
            forced.add(e.node)
        except CannotMerge as e:
            unmergeable.add(e.roots)
    raise NotImplementedError("kernel planning did not converge")


def _late_readers(gm: fx.GraphModule, kernels: list[Kernel], fusible: dict[fx.Node, str]) -> set[fx.Node]:
    """Write-backs whose kernel would launch before another kernel that reads the input they write (kernels
    launch after their last root, so a reader of the old value can land after the write); ATen readers
    always come first (fusible_kinds)."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    launch = {id(k): max(position[r] for r in k.roots) for k in kernels}
    late = set()
    for k in kernels:
        for root in k.roots:
            if fusible[root] != "writeback":
                continue
            memory = input_aliases(root.args[0])  # the input and its views
            if any(other is not k and launch[id(other)] >= launch[id(k)] and memory & set(other.inputs)
                   for other in kernels):
                late.add(root)
    return late


def _group(gm: fx.GraphModule, fusible: dict[fx.Node, str], stored: set[fx.Node],
           unmergeable: set[tuple]) -> list[Kernel]:
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    kernels: list[Kernel] = []
    members: dict[int, set[fx.Node]] = {}
    for root in sorted(stored, key=position.__getitem__):
        inline = _inline_set(root, fusible, stored)
        shape, rows = _space(root, inline, fusible)
        joined = None
        for k in reversed(kernels[-MERGE_WINDOW:]):
            if not _fits(k, root, shape, rows) or any(set(k.roots + [root]) >= set(pair) for pair in unmergeable):
                continue
            everything = members[id(k)] | inline
            # `rewrite` launches a kernel after its last root, this one: every input of the root is ready by
            # then (an ancestor, or a root of a kernel launched at an earlier root), so what decides is that no
            # reader of the kernel's roots comes before that launch. (Asking the inputs to exist before the
            # kernel's first node kept a decode layer's V-cache write out of the K rotary + K-write kernel
            # whenever V's view came later in the graph: one kernel more per grouped-query layer.)
            if all(position[u] > position[root] for r in k.roots + [root] for u in r.users if u not in everything):
                joined = k
                break
        if joined is None:
            joined = Kernel(name=f"k{len(kernels)}", roots=[], shape=shape, rows=rows)
            kernels.append(joined)
            members[id(joined)] = set()
        elif rows and not joined.rows:
            joined.shape, joined.rows = shape, True
        joined.roots.append(root)
        members[id(joined)] |= inline
    return kernels


def _fits(k: Kernel, root: fx.Node, shape: tuple, rows: bool) -> bool:
    """Whether `root`, whose own kernel would iterate over `shape` (`rows`: one program per reduced row), can
    join `k`: a rows kernel iterates over its own space only; pointwise roots need a place in the space."""
    if rows or k.rows:
        if not same_shape(shape, k.shape):
            return False
        if rows and k.rows:
            return True
    probe = Kernel(name="probe", roots=[], shape=k.shape, rows=rows or k.rows)
    base = tuple(f"c{d}" for d in range(len(probe.shape)))
    try:
        for r in k.roots + [root]:
            root_index(probe, r, base)
    except NotImplementedError:
        return False
    return True


def rewrite(gm: fx.GraphModule, kernels: list[Kernel], fusible: dict[fx.Node, str],
            launchers: dict[str, Callable], sym_nodes: dict[str, fx.Node]) -> None:
    """Replace each kernel's nodes by a call of its launcher, placed after its last root."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    produced: dict[fx.Node, fx.Node] = {}
    for k in sorted(kernels, key=lambda k: max(position[r] for r in k.roots)):
        last = max(k.roots, key=position.__getitem__)
        args = [produced.get(a, a) for a in k.inputs] + [sym_nodes[s] for s in k.symbols]
        with gm.graph.inserting_after(last):
            call = gm.graph.call_function(launchers[k.name], tuple(args))
        call.meta["val"] = tuple(_val(r) for r in k.roots)
        after = call
        for i, r in enumerate(k.roots):
            with gm.graph.inserting_after(after):
                item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta["val"] = _val(r)
            produced[r] = after = item
    for r, item in produced.items():
        r.replace_all_uses_with(item, delete_user_cb=lambda u: u not in fusible)
    for node in reversed(list(gm.graph.nodes)):
        if node in fusible and not node.users:
            gm.graph.erase_node(node)


def symbol_nodes(gm: fx.GraphModule, symbols: set[str]) -> dict[str, fx.Node]:
    """An FX node giving each size symbol's value at run time (a SymInt input, or a size of a tensor input)."""
    found: dict[str, fx.Node] = {}
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for ph in placeholders:
        v = _val(ph)
        if isinstance(v, torch.SymInt) and str(v.node.expr) in symbols:
            found.setdefault(str(v.node.expr), ph)
    for ph in placeholders:
        v = _val(ph)
        if not isinstance(v, torch.Tensor):
            continue
        for d, s in enumerate(v.shape):
            name = str(s.node.expr) if isinstance(s, torch.SymInt) else None
            if name in symbols and name not in found:
                with gm.graph.inserting_after(placeholders[-1]):
                    node = gm.graph.call_function(aten.sym_size.int, (ph, d))
                node.meta["val"] = s
                found[name] = node
    missing = symbols - set(found)
    if missing:
        raise NotImplementedError(f"size symbols {sorted(missing)} are not sizes of any graph input")
    return found

