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


# ------------------------------------------------------------------------------ no file shadows an installed module
ROOT = PKG.parent
#: folders whose files become top-level modules: the repo root (``python -m`` from a checkout), benchmarks/
#: (``python benchmarks/X.py`` puts it first on sys.path), tests/ (pytest's pythonpath), notebooks/ (their cwd)
SCRIPT_FOLDERS = ("", "benchmarks", "tests", "notebooks")
#: modules a dependency imports when it finds them, installed or not (transformers 5.25 imports ``kernels``):
#: a repository file of that name would be imported in their place even where the package is absent
DEPENDENCY_IMPORTS = frozenset({"kernels"})


def top_level_modules(folder: Path) -> set[str]:
    """Names ``import <name>`` resolves to a file of ``folder`` when it is on sys.path (a plain directory without
    ``__init__.py`` is only a namespace portion, which an installed module of the same name still wins over)."""
    names = {p.name.split(".")[0] for p in folder.iterdir() if p.suffix in (".py", ".pyc", ".so", ".pyd")}
    return names | {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def importable_elsewhere() -> set[str]:
    """Top-level module names of every installed distribution (except tokprune itself), the standard library's,
    and :data:`DEPENDENCY_IMPORTS`."""
    import importlib.metadata
    import sys

    installed = {name for name, dists in importlib.metadata.packages_distributions().items() if "tokprune" not in dists}
    return installed | set(sys.stdlib_module_names) | DEPENDENCY_IMPORTS


def shadowing(root: Path) -> dict[str, set[str]]:
    known = importable_elsewhere()
    found = {folder or ".": top_level_modules(root / folder) & known for folder in SCRIPT_FOLDERS
             if (root / folder).is_dir()}
    return {folder: names for folder, names in found.items() if names}


def test_no_repository_file_shadows_an_installed_or_stdlib_module():
    """benchmarks/kernels.py once shadowed the ``kernels`` package transformers 5.25 imports, and every benchmark
    script crashed on import (issue #22)."""
    assert shadowing(ROOT) == {}, "rename these files: each hides an installed or standard-library module"


def test_the_shadowing_check_catches_the_old_benchmark_name(tmp_path):
    for folder in SCRIPT_FOLDERS[1:]:
        (tmp_path / folder).mkdir()
    (tmp_path / "benchmarks" / "kernels.py").write_text("")
    (tmp_path / "tests" / "json.py").write_text("")
    (tmp_path / "benchmarks" / "kernel_speed.py").write_text("")
    assert shadowing(tmp_path) == {"benchmarks": {"kernels"}, "tests": {"json"}}
