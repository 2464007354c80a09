"""The import rules of docs/architecture.md, checked over every import (function-local and type-checking ones
included) of store/, replicator/ and davserver/: which package may import which, which replicator room may
import which (the ROOMS table), which store floor may import which (the FLOORS table), and no circles among
modules. The tables are read from the page itself, so the page and this test cannot drift apart."""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("store", "replicator", "davserver")
MAY_IMPORT = {"store": set(), "davserver": {"store"}, "replicator": {"store"}}


def page_tables() -> dict:
    """The Python blocks of docs/architecture.md, evaluated as literals: ROOMS, REPLICATOR_BASE, FLOORS..."""
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        text = f.read()
    out = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        for node in ast.parse(block).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def all_modules() -> dict[str, str]:
    mods = {}
    for pkg in PACKAGES:
        for d, dirs, files in os.walk(os.path.join(ROOT, pkg)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    mods[module_name(os.path.join(d, f))] = os.path.join(d, f)
    return mods


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its file (resolved to the longest known module name)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    out = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from . import packs` names a module; `from .x import y` a name in x
                full = f"{mod}.{a.name}"
                add(full if full in known else mod)
    return {m for m in out if m.split(".")[0] in PACKAGES}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = all_modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_packages_import_only_downwards(graph):
    bad = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
           if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in MAY_IMPORT[m.split(".")[0]]]
    assert not bad, "imports across packages against docs/architecture.md:\n" + "\n".join(sorted(bad))


def room_of(mod: str, base: set[str]) -> str:
    parts = mod.split(".")
    if len(parts) == 1 or parts[1] in base:
        return "base"
    return parts[1]


def test_replicator_rooms_import_only_the_rooms_below(graph):
    t = page_tables()
    rooms, base = t["ROOMS"], set(t["REPLICATOR_BASE"])
    bad = []
    for m, ts in graph.items():
        if not m.startswith("replicator"):
            continue
        r = room_of(m, base)
        assert r in rooms, f"{m}: room {r!r} is not in docs/architecture.md's ROOMS"
        for x in ts:
            if x.startswith("replicator"):
                rx = room_of(x, base)
                if rx != r and rx not in rooms[r]:
                    bad.append(f"{m} ({r}) -> {x} ({rx})")
    assert not bad, "room rules broken:\n" + "\n".join(sorted(bad))


def test_store_floors_import_only_the_floors_below(graph):
    t = page_tables()
    floors, order = t["STORE_FLOORS"], t["FLOOR_ORDER"]
    rank = {f: i for i, f in enumerate(order)}
    missing = sorted(m for m in graph if m.startswith("store.") and m.split(".", 1)[1] not in floors)
    assert not missing, f"store modules without a floor in docs/architecture.md: {missing}"
    bad = []
    for m, ts in graph.items():
        if not m.startswith("store."):
            continue
        fm = floors[m.split(".", 1)[1]]
        for x in ts:
            if x.startswith("store.") and rank[floors[x.split(".", 1)[1]]] > rank[fm]:
                bad.append(f"{m} ({fm}) -> {x} ({floors[x.split('.', 1)[1]]})")
    assert not bad, "a store module imports a floor above its own:\n" + "\n".join(sorted(bad))


def test_the_previous_versions_index_is_kept_below_the_views(graph):
    """Every commit and drop keeps the index from the snapshots floor: no caller needs the views for it."""
    assert "store.history" in graph["store.snapshots"] and "store.history" in graph["store.prune"]
    assert "store.versions" not in graph["store.snapshots"] and "store.versions" not in graph["store.prune"]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_no_import_circles(graph):
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_a_circle_and_a_local_import(tmp_path):
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(g) == [["a", "b", "c"]]
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from .snapshots import resolve\n")
    assert imports_of("store.x", str(p), {"store.x", "store.snapshots"}) == {"store.snapshots"}
