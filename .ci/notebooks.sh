#!/usr/bin/env bash
# CI: execute every notebook in notebooks/ top to bottom, headless, in the active venv, and check its figures
# (tests/notebook_checks.py): any cell error, a figure that is made but not drawn, a blank image, an empty panel,
# a label in two colours or two labels in one colour, or a multi-series figure without a legend fails the step.
# Figures are rendered by Agg through matplotlib's inline backend, as Jupyter shows them (a bare MPLBACKEND=Agg
# draws nothing into a notebook). Installs the notebook extra (matplotlib, nbclient, nbformat, ipykernel) first.
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q -e ".[notebook]"
python -m pip uninstall -y -q torchvision 2>/dev/null || true
PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" python - <<'PY'
import sys
import time
from pathlib import Path

import notebook_checks

failed = []
for path in sorted(Path("notebooks").glob("*.ipynb")):
    t0 = time.perf_counter()
    nb, problems = notebook_checks.execute(path)
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    if problems:
        failed.append(path.name)
        print(f"FAILED {path}:\n  " + "\n  ".join(problems), file=sys.stderr)
        continue
    print(f"notebook {path.name}: ok in {time.perf_counter() - t0:.1f} s, {figures} figure(s) drawn and checked")
sys.exit(f"notebooks failed: {', '.join(failed)}" if failed else 0)
PY
