"""The notebooks' figures: the checker CI runs (tests/notebook_checks.py) catches undrawn, blank and empty figures
and inconsistent colours, and notebook 03 passes it (one colour per method across panels, a legend per figure)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

import notebook_checks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _notebook(tmp_path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    return path


def test_the_checker_finds_each_kind_of_bad_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # what CI used to run under: the checker must override it
    path = _notebook(
        tmp_path,
        "import matplotlib.pyplot as plt",
        "fig, ax = plt.subplots(); ax.plot([1, 2], [3, 4], label='a'); ax.plot([1, 2], [4, 3], label='b'); "
        "ax.legend()",  # good
        "fig, axes = plt.subplots(1, 2); axes[0].plot([1, 2], label='a')",  # an empty panel
        "fig, axes = plt.subplots(1, 2)\nfor ax in axes:\n    ax.plot([1, 2], label='a')\n"
        "    ax.plot([2, 1], label='b')\naxes[1].plot([0, 1], label='c')\nfig.legend()",  # good: one colour each
        "fig, axes = plt.subplots(1, 2); axes[0].plot([1, 2], label='x'); axes[1].plot([1, 3], label='y'); "
        "axes[1].plot([3, 1], label='x'); fig.legend()",  # x is C0 on the left and C1 on the right; y is C0
        "fig, ax = plt.subplots(); ax.plot([1, 2], label='p'); ax.plot([2, 1], label='q')",  # no legend
    )
    _, problems = notebook_checks.execute(path)
    text = "\n".join(problems)
    assert "panel 1 ('') is empty" in text
    assert "'x' is drawn in 2 colours" in text and "share the colour" in text
    assert "2 labelled series and no legend" in text
    assert not any("figure 1:" in p for p in problems) and not any("figure 3:" in p for p in problems)
    assert len(problems) == 4, text


def test_a_cell_that_makes_a_figure_and_draws_none_fails(tmp_path):
    path = _notebook(tmp_path, "import matplotlib\nmatplotlib.use('Agg', force=True)\nimport matplotlib.pyplot as plt",
                     "fig, ax = plt.subplots(); ax.plot([1, 2])")
    _, problems = notebook_checks.execute(path)
    assert any("makes figure(s) [1] but draws none" in p for p in problems), problems


def test_notebook_03_figures_pass(monkeypatch):
    """Notebook 03's two figures: every method one colour in both panels, a legend per figure (once the legend
    was on the right panel only and the colours shifted between panels, so the curve it called transprune was
    random), and under Agg both are drawn."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's tokprune
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb, problems = notebook_checks.execute(ROOT / "notebooks" / "03_tradeoff.ipynb", timeout=600)
    assert problems == []
    drawn = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert drawn == 2
