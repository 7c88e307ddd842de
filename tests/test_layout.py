"""The package layout: no import cycles between modules, no imports of another module's private
names. The import graph is built with ``ast`` from every module of ``musicfm/`` and ``pipeline/``
(imports inside functions and ``TYPE_CHECKING`` blocks count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("musicfm", "pipeline")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> project modules it imports, private-name imports found)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private: list[str] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, node, path.name == "__init__.py")
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:
                        targets.append(sub)  # a submodule imported from its package
                    else:
                        targets.append(src)
                        if a.name.startswith("_") and src in mods and src != mod:
                            private.append(f"{mod} imports {src}.{a.name}")
            for t in targets:
                # the deepest project module named by the import
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if (
                    t and t != mod and not mod.startswith(t + ".")
                ):  # a module's own package is not a dependency
                    graph[mod].add(t)
    return graph, private


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph, _ = import_graph()
    assert len(graph) > 30  # the walk found the packages
    assert find_cycles(graph) == []


def test_no_private_imports_across_modules() -> None:
    _, private = import_graph()
    assert private == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    "package", ["pipeline.io", "pipeline.flow", "pipeline.store", "pipeline.runs", "pipeline.search"]
)
def test_layers_only_import_downwards(package: str) -> None:
    """io <- store <- flow <- runs, and search beside runs: nothing below runs imports runs or search."""
    order = ["pipeline.io", "pipeline.flow", "pipeline.store", "pipeline.runs"]
    graph, _ = import_graph()
    forbidden = {"pipeline.runs", "pipeline.search"} if package in order[:3] else set()
    if package == "pipeline.search":
        forbidden = {"pipeline.runs"}
    bad = sorted(
        f"{m} -> {t}"
        for m, deps in graph.items()
        if m.startswith(package + ".")
        for t in deps
        if any(t == f or t.startswith(f + ".") for f in forbidden)
    )
    assert bad == []


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "jobs").glob("*.py")))
def test_job_scripts_are_thin(script: str) -> None:
    """jobs/*.py only wire a command from the package: no classes, at most a one-line ``main``,
    and the logic (parsers, flags, errors) lives in pipeline/ where it is imported and tested."""
    tree = ast.parse((REPO / "jobs" / script).read_text())
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert all(isinstance(d, ast.FunctionDef) and d.name == "main" and len(d.body) == 1 for d in defs), [
        d.name for d in defs
    ]
    code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(code) <= 12, f"jobs/{script}: {len(code)} top-level statements"
