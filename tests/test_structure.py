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


def _all_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """tokprune modules ``module`` (at ``path``) imports anywhere, relative imports resolved; ``from pkg import
    name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg`` (type-only imports skipped)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in known else mod)
    return {m for m in out if m in known and m != module}


def test_no_import_cycle_among_tokprune_modules():
    """No circle of imports among tokprune's modules, function-level imports included (a lazy import that closes
    a circle is a layering fault hidden until run time)."""
    files = {_module(p): p for p in PKG.rglob("*.py")}
    g = {m: _all_imports(p, m, set(files)) for m, p in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_sees_a_function_level_cycle(tmp_path):
    """The walker above reads imports inside functions and relative ones (a check that could not fail is none)."""
    known = {"tokprune.a", "tokprune.b"}
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from tokprune.b import g\n")
    b.write_text("from . import a\n")
    assert _all_imports(a, "tokprune.a", known) == {"tokprune.b"}
    assert _all_imports(b, "tokprune.b", known) == {"tokprune.a"}


#: modules a serving engine may import without transformers
NO_TRANSFORMERS = ("tokprune.pruners", "tokprune.rules", "tokprune.kernels", "tokprune.schedule",
                   "tokprune.selection", "tokprune.attention", "tokprune.encoder_taps", "tokprune.config",
                   "tokprune.tuned", "tokprune.record", "tokprune.eval.variants")


def test_core_modules_import_without_transformers():
    """With ``import transformers`` made to fail, the method side of tokprune (pruners, rules, kernels, schedule,
    the selection core) still imports: the seam a serving-engine plugin uses."""
    import subprocess
    import sys

    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("transformers is blocked in this test")
sys.meta_path.insert(0, Block())
import importlib
for name in {NO_TRANSFORMERS!r}:
    importlib.import_module(name)
try:
    import transformers  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the block did not work")
assert not any(m == "transformers" or m.startswith("transformers.") for m in sys.modules)
import tokprune.pruners
assert len(tokprune.pruners.__all__ if hasattr(tokprune.pruners, "__all__") else [1]) > 0
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_no_function_in_patches_is_complex():
    """Every function of ``tokprune/patches`` stays at radon rank A/B (cyclomatic complexity <= 10): the
    orchestration is split into steps, none a monolith (``radon cc -s -n C tokprune/patches`` prints nothing)."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("radon")
    res = subprocess.run([sys.executable, "-m", "radon", "cc", "-s", "-n", "C", str(PKG / "patches")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", res.stdout


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
