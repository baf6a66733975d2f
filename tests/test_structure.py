"""The import structure: ``tokprune.flops`` and ``tokprune.registry`` are leaves, so no import circle runs through
them (read from the source with ``ast``; imports under ``if TYPE_CHECKING:`` are type hints, not imports)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tokprune"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """tokprune modules a file imports anywhere (function-local imports included)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tokprune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokprune"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files} for m, p in files.items()}


def reach(g: dict[str, set[str]], start: str) -> set[str]:
    """Modules imported, directly or not, by ``start`` or any module of the package ``start``."""
    todo = [m for m in g if m == start or m.startswith(start + ".")]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        for n in g[m]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_flops_imports_neither_api_registry_nor_patches():
    bad = {m for m in reach(graph(), "tokprune.flops")
           if m in ("tokprune.api", "tokprune.registry") or m.startswith("tokprune.patches")}
    assert not bad


def test_registry_and_schedule_are_leaves():
    g = graph()
    assert g["tokprune.registry"] == set()
    assert g["tokprune.schedule"] == set()


def test_no_import_circle_runs_through_flops_or_registry():
    g = graph()
    for leaf in ("tokprune.flops", "tokprune.registry"):
        members = [m for m in g if m == leaf or m.startswith(leaf + ".")]
        for m in members:
            assert m not in {x for x in reach(g, m) if x not in members}, m
            # nothing it reaches comes back to it
            assert not any(m in reach(g, x) for x in reach(g, m) if not x.startswith(leaf)), m
