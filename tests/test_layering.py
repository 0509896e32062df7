"""The house's layering, checked from the source: no import cycle among mmaccel's modules (imports inside
functions count: a late import hides a cycle, it does not remove it), and no target under backends/ imports
another target (targets share code through backends/common.py, passes/ and ops/ only)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compiler", "passes", "backends", "ops", "models", "mmaccel")


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imports(mods: dict[str, Path], name: str) -> set[str]:
    """The project modules `name` imports (from-imports, relative or absolute through `mmaccel.`)."""
    found = set()
    for node in ast.walk(ast.parse(mods[name].read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = name.split(".") if mods[name].name == "__init__.py" else name.split(".")[:-1]
            base = base[:len(base) - node.level + 1] + (node.module.split(".") if node.module else [])
        elif (node.module or "").startswith("mmaccel"):
            rest = node.module[len("mmaccel"):].lstrip(".")
            base = rest.split(".") if rest else ["mmaccel"]
        else:
            continue
        for alias in node.names:
            sub = ".".join(base + [alias.name])
            found.add(sub if sub in mods else ".".join(base))
    return {m for m in found if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(mods, m) for m in mods}


def test_no_import_cycles() -> None:
    graph, state, stack, cycles = _graph(), {}, [], []

    def visit(u: str) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_target_imports_another_target() -> None:
    targets = {p.name for p in (ROOT / "backends").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    bad = [f"{m} -> {v}" for m, vs in _graph().items() for v in vs
           if m.split(".")[:1] == ["backends"] and len(m.split(".")) > 1 and m.split(".")[1] in targets
           and v.split(".")[:1] == ["backends"] and len(v.split(".")) > 1 and v.split(".")[1] in targets
           and v.split(".")[1] != m.split(".")[1]]
    assert not bad, "targets importing other targets:\n" + "\n".join(bad)


def test_the_checker_sees_cycles_and_late_imports(tmp_path, monkeypatch) -> None:
    """Near-miss guard for the check itself: a planted cycle through a late import is found."""
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "__init__.py").write_text("")
    (tmp_path / "passes" / "a.py").write_text("from .b import x\n")
    (tmp_path / "passes" / "b.py").write_text("def f():\n    from .a import y\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = _graph()
    assert graph["passes.a"] == {"passes.b"} and graph["passes.b"] == {"passes.a"}
