"""Execute a notebook headless and check that every figure it makes is drawn and not empty (used by
``.ci/notebooks.sh`` and tests/test_notebooks.py).

The kernel runs matplotlib's inline backend (figures rendered by Agg into ``image/png`` outputs, as Jupyter shows
them; a bare ``MPLBACKEND=Agg`` draws nothing into the notebook), with figures kept open so that a last cell can
inspect them. A notebook fails when:

* a cell raises;
* a cell creates a matplotlib figure and has no ``image/png`` output (the figure was never drawn);
* an ``image/png`` output is blank (one colour) or does not decode;
* a visible panel with axes holds no data (no line, marker, bar or image);
* one figure draws the same label in two colours, or two labels in one colour (a method must keep its colour
  across panels, or a legend names the wrong curve);
* a figure with two or more labelled series has no legend.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

#: run first: inline backend, figures kept open, each cell's new figures noted by execution count
SETUP = """\
%matplotlib inline
%config InlineBackend.close_figures = False
import matplotlib.pyplot as _ci_plt
from IPython import get_ipython as _ci_ip
_ci_new = {}
_ci_before = set()
def _ci_pre(info):
    _ci_before.clear(); _ci_before.update(_ci_plt.get_fignums())
def _ci_post(result):
    new = sorted(set(_ci_plt.get_fignums()) - _ci_before)
    if new and result.execution_count is not None:
        _ci_new[result.execution_count] = new
_ci_ip().events.register("pre_run_cell", _ci_pre)
_ci_ip().events.register("post_run_cell", _ci_post)
"""

#: run last: prints one JSON line with the figures each cell made and what is wrong with each figure
REPORT = """\
import json as _ci_json
from matplotlib.colors import to_hex as _ci_hex
_ci_problems = {}
for _n in _ci_plt.get_fignums():
    _fig, _bad = _ci_plt.figure(_n), []
    _colours = {}
    for _i, _ax in enumerate(_fig.axes):
        if _ax.get_visible() and _ax.axison and not _ax.has_data():
            _bad.append(f"panel {_i} ({_ax.get_title()!r}) is empty")
        for _line in _ax.get_lines():
            _label = _line.get_label()
            if _label and not _label.startswith("_"):
                _colours.setdefault(_label, set()).add(_ci_hex(_line.get_color()))
    for _label, _cs in _colours.items():
        if len(_cs) > 1:
            _bad.append(f"{_label!r} is drawn in {len(_cs)} colours: {sorted(_cs)}")
    _owner = {}
    for _label, _cs in _colours.items():
        for _c in _cs:
            _owner.setdefault(_c, []).append(_label)
    _bad += [f"{' and '.join(map(repr, _ls))} share the colour {_c}" for _c, _ls in _owner.items() if len(_ls) > 1]
    _has_legend = bool(_fig.legends) or any(_ax.get_legend() is not None for _ax in _fig.axes)
    if len(_colours) >= 2 and not _has_legend:
        _bad.append(f"{len(_colours)} labelled series and no legend")
    _ci_problems[_n] = _bad
print("CI-FIGURES " + _ci_json.dumps({"made": _ci_new, "problems": _ci_problems}))
"""


def _png_problem(data: str) -> str | None:
    from PIL import Image, ImageStat

    try:
        img = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoding failure is the finding
        return f"does not decode ({e})"
    if img.width == 0 or img.height == 0:
        return "has no pixels"
    if max(ImageStat.Stat(img).extrema[c][1] - ImageStat.Stat(img).extrema[c][0] for c in range(3)) == 0:
        return "is blank (one colour)"
    return None


def execute(path: Path, timeout: int = 180) -> tuple[Any, list[str]]:
    """Execute the notebook at ``path`` with the checks; ``(executed notebook, problems)``. A cell error is a
    problem, not an exception."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(SETUP))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    except CellExecutionError as err:
        return nb, [f"a cell raised:\n{err}"]
    return nb, check(nb)


def check(nb: Any) -> list[str]:
    """The problems of an executed, instrumented notebook (see the module docstring)."""
    problems: list[str] = []
    report = None
    for out in nb.cells[-1].get("outputs", []):
        for line in out.get("text", "").splitlines():
            if line.startswith("CI-FIGURES "):
                report = json.loads(line[len("CI-FIGURES "):])
    if report is None:
        return ["the figure report did not run"]
    made = {int(k): v for k, v in report["made"].items()}
    for index, cell in enumerate(nb.cells[1:-1], start=1):
        if cell.cell_type != "code":
            continue
        pngs = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        where = f"cell {index - 1} (execution {cell.get('execution_count')})"
        if cell.get("execution_count") in made and not pngs:
            problems.append(f"{where} makes figure(s) {made[cell['execution_count']]} but draws none")
        problems += [f"{where}: image {j} {p}" for j, png in enumerate(pngs) if (p := _png_problem(png))]
    for number, bad in report["problems"].items():
        problems += [f"figure {number}: {b}" for b in bad]
    return problems
