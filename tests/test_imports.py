"""Imports point down the pipeline: the package's folders are stages in the order data flows
(:data:`STAGES`), and no module imports one of a higher stage, nor, within a stage, a module that
imports it back. Function-level imports count, and so do import strings (``"perturb_lens.x.y"`` or
``"perturb_lens.x.y:name"``, as registries and lazy loaders write them); ``TYPE_CHECKING`` blocks
do not (they never run). See docs/ARCHITECTURE.md for the stages."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

STAGES = (
    "common",
    "metrics",
    "config",
    "data",
    "models",
    "statistics",
    "saes",
    "directions",
    "engine",
    "executors",
    "results",
    "analysis",
    "experiments",
    "replication",
    "plots",
    "workflows",
    "cli",
    "",  # the package's top: __init__ (the public API) and builtins (the built-in modules)
)
"""The package's folders in the order data flows; a module may import its own stage and those
before it. (docs/ARCHITECTURE.md draws them.)"""

_IMPORT_STRING = re.compile(r"(perturb_lens(?:\.\w+)+)(?::\w+)?")


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``root``: the folder holding the packages)."""
    files = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        tree = ast.parse(f.read_text())
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and _is_type_checking(node)
            for b in node.body
            for n in ast.walk(b)
        }
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found = _IMPORT_STRING.fullmatch(node.value)
                if found is None:
                    continue
                targets = [found.group(1)]
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r is not None and r != mod:
                    graph[mod].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def test_finder_sees_a_function_level_cycle_and_ignores_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n"
    )
    (pkg / "e.py").write_text("import pkg.d\n")
    assert cycles(import_graph(tmp_path)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_import_cycles_in_the_package() -> None:
    graph = import_graph(SRC)
    assert "perturb_lens.engine.shard" in graph  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles (imports must point down the pipeline):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def stage(module: str) -> str:
    """The stage of ``perturb_lens.<stage>...`` (``""`` for the package's top-level modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (SRC / "perturb_lens" / parts[-1]).is_dir() else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for each import of a module of a later stage than the importer's."""
    rank = {s: i for i, s in enumerate(STAGES)}
    return sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if rank[stage(b)] > rank[stage(a)]
    )


def test_every_folder_is_a_stage() -> None:
    folders = {p.name for p in (SRC / "perturb_lens").iterdir() if (p / "__init__.py").exists()}
    assert folders == set(STAGES) - {""}


def test_string_and_function_level_imports_count(tmp_path: Path) -> None:
    pkg = tmp_path / "perturb_lens"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text('REF = "perturb_lens.b:thing"\n')
    (pkg / "b.py").write_text("def f():\n    import perturb_lens.a\n")
    assert cycles(import_graph(tmp_path)) == [["perturb_lens.a", "perturb_lens.b"]]


def test_no_import_runs_back_up() -> None:
    found = upward_imports(import_graph(SRC))
    assert not found, "imports of a later stage (see STAGES):\n" + "\n".join(found)


def test_architecture_doc_names_every_stage() -> None:
    doc = (SRC.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = [s for s in STAGES if s and f"| `{s}/` |" not in doc]
    assert not missing, f"docs/ARCHITECTURE.md has no row for the stages {missing}"
