"""The store's floors (docs/store.md, "Floors"): every module of `store` sits on
one floor, imports only modules on its own floor or below, and no import
circle joins two modules. Every import counts, function-local ones too."""
from __future__ import annotations

import ast
from pathlib import Path

STORE = Path(__file__).resolve().parent.parent / "store"

FLOORS = ["base", "packs", "index", "content", "objects/trees", "snapshots", "views", "cli"]  # bottom up
FLOOR = {
    "errors": "base", "cache": "base", "logsetup": "base", "workers": "base",
    "packs": "packs", "backend": "packs",
    "index": "index", "refcounts": "index",
    "chunker": "content", "repository": "content", "files": "content", "segments": "content",
    "trees": "objects/trees", "objects": "objects/trees", "diff": "objects/trees",
    "catalogue": "snapshots", "history": "snapshots", "snapshots": "snapshots", "snapmeta": "snapshots",
    "prune": "snapshots", "retention": "snapshots", "compact": "snapshots", "ingest": "snapshots",
    "apply": "snapshots", "restore": "snapshots", "verify": "snapshots", "repair": "snapshots",
    "repository_stats": "snapshots",
    "versions": "views", "view": "views",
    "cli_support": "cli", "cli_maintenance": "cli", "demo": "cli", "cli": "cli",
}


def store_imports() -> dict[str, dict[str, int]]:
    """module -> {store module it imports: line}, from every Import/ImportFrom in its source."""
    modules = {p.stem for p in STORE.glob("*.py")} - {"__init__"}
    graph = {}
    for path in sorted(STORE.glob("*.py")):
        deps: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 1:
                    names = [mod.split(".")[0]] if mod else [a.name for a in node.names]
                elif node.level == 0 and (mod == "store" or mod.startswith("store.")):
                    names = [mod.split(".")[1]] if "." in mod else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("store.")]
            for n in names:
                if n in modules and n != path.stem:
                    deps.setdefault(n, node.lineno)
        graph[path.stem] = deps
    return graph


def test_every_store_module_has_a_floor():
    modules = {p.stem for p in STORE.glob("*.py")} - {"__init__"}
    assert modules - FLOOR.keys() == set(), "place the new module on a floor (here and in docs/store.md)"
    assert FLOOR.keys() - modules == set()
    assert set(FLOOR.values()) <= set(FLOORS)


def test_no_store_module_imports_a_higher_floor():
    graph = store_imports()
    up = [f"{m} ({FLOOR[m]}) imports {d} ({FLOOR[d]}) at line {line}"
          for m, deps in graph.items() if m != "__init__" for d, line in deps.items()
          if FLOORS.index(FLOOR[d]) > FLOORS.index(FLOOR[m])]
    assert up == []
    assert graph["__init__"] == {}, "store/__init__.py stays light: it imports no module"


def test_no_import_circle_in_store():
    graph = store_imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_previous_versions_index_is_kept_below_the_views():
    """A snapshot's commit and drop keep the index from the snapshots floor, so
    every caller (the CLI, the replicator, a test) keeps it without importing
    the views."""
    graph = store_imports()
    assert "history" in graph["snapshots"] and "history" in graph["prune"]
    assert "versions" not in graph["snapshots"] and "versions" not in graph["prune"]
