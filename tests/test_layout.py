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


#: The layers, bottom first, declared once (the README's Layout states the same order and
#: test_readme_states_the_layers checks it). A module belongs to the longest entry that names it or
#: its package, and may import only from its own entry and the entries before it. The web page is
#: part of ``pipeline.search`` (above the query logic, below the service that serves it).
LAYERS = (
    "musicfm",
    "pipeline.exits",  # the exit-code table
    "pipeline.errors",
    "pipeline.faults",  # fault hooks at named points of a run (tests)
    "pipeline.signals",  # SIGTERM as a graceful stop
    "pipeline.schemas",
    "pipeline.io",
    "pipeline.engine",  # the model engine: flow (data path) and search (query path) both run it
    "pipeline.store",
    "pipeline.cli",
    "pipeline.flow",
    "pipeline.search",  # the query logic: index, reader, synthetic stores
    "pipeline.search.http",
    "pipeline.search.catalog_views",  # the web page: catalog views, the page, its static files
    "pipeline.search.web",
    "pipeline.search.service",
    "pipeline.insights",
    "pipeline.runs",
    "pipeline.evaluate",
    "pipeline.commands",  # every job's flags and main (<job>_main): the thin jobs/*.py call these
)


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the longest entry naming ``module`` or one of its packages."""
    best = None
    for i, entry in enumerate(LAYERS):
        if (module == entry or module.startswith(entry + ".")) and (
            best is None or len(entry) > len(LAYERS[best])
        ):
            best = i
    return best


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up the layers, and every module that no layer names."""
    bad = []
    for mod, deps in graph.items():
        if mod == "pipeline":  # the namespace's empty __init__
            continue
        here = layer_of(mod)
        if here is None:
            bad.append(f"{mod}: in no layer (add its package to LAYERS)")
            continue
        for dep in sorted(deps):
            there = layer_of(dep)
            if there is not None and there > here:
                bad.append(f"{mod} -> {dep} ({LAYERS[here]} imports {LAYERS[there]}, which is above it)")
    return sorted(bad)


def test_every_import_points_down_the_layers() -> None:
    graph, _ = import_graph()
    assert layering_violations(graph) == []


def test_layering_check_finds_an_upward_import_and_an_unplaced_module() -> None:
    graph = {
        "pipeline.io.audio": {"pipeline.errors"},
        "pipeline.store.tables": {"pipeline.runs.plan"},
        "pipeline.search.web": {"pipeline.search.service"},
        "pipeline.gadgets.x": set(),
    }
    assert layering_violations(graph) == [
        "pipeline.gadgets.x: in no layer (add its package to LAYERS)",
        "pipeline.search.web -> pipeline.search.service (pipeline.search.web imports "
        "pipeline.search.service, which is above it)",
        "pipeline.store.tables -> pipeline.runs.plan (pipeline.store imports pipeline.runs, which is above it)",
    ]


def test_readme_states_the_layers() -> None:
    """The README's Layout says the same order, in one line ``Layers, bottom first: a < b < ...``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.startswith("Layers, bottom first")]
    assert len(lines) == 1, "README.md: no (or several) 'Layers, bottom first: ...' line"
    stated = [p.strip(" `.") for p in lines[0].split(":", 1)[1].split("<")]
    assert stated == [e.removeprefix("pipeline.") for e in LAYERS]


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


#: The one package that opens Lance (the store's owner); everything else goes through it.
LANCE_OWNER = "pipeline/store"


def lance_importers(root: Path, dirs: tuple[str, ...] = ("pipeline", "musicfm", "jobs")) -> list[str]:
    """``path:line`` of every ``import lance`` / ``from lance... import`` (at any depth of a module,
    inside functions and ``TYPE_CHECKING`` blocks too) outside :data:`LANCE_OWNER`."""
    bad = []
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(LANCE_OWNER + "/"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                if any(n == "lance" or n.startswith("lance.") for n in names):
                    bad.append(f"{rel}:{node.lineno}")
    return bad


def test_only_the_store_imports_lance() -> None:
    """pipeline/store is the one owner of the store: no other module of pipeline/, musicfm/ or
    jobs/ imports ``lance`` (they open, read and write tables through ``pipeline.store``)."""
    assert lance_importers(REPO) == []


def test_lance_check_finds_an_import_outside_the_store(tmp_path: Path) -> None:
    for rel, text in {
        "pipeline/store/tables.py": "import lance\n",
        "pipeline/search/x.py": "def f():\n    from lance.fragment import FragmentMetadata\n",
        "jobs/y.py": "import lancedb\nimport lance as l\n",
        "musicfm/z.py": "import os\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert lance_importers(tmp_path) == ["pipeline/search/x.py:2", "jobs/y.py:2"]
