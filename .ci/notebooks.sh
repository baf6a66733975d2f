#!/usr/bin/env bash
# CI: execute every notebook in notebooks/ top to bottom, headless, in the active venv; any cell error fails.
# Installs the notebook extra (matplotlib, nbclient, nbformat, ipykernel) first; torch is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q -e ".[notebook]"
python -m pip uninstall -y -q torchvision 2>/dev/null || true
python - <<'PY'
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

failed = []
for path in sorted(Path("notebooks").glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    except CellExecutionError as err:
        failed.append(path.name)
        print(f"FAILED {path}:\n{err}", file=sys.stderr)
        continue
    print(f"notebook {path.name}: ok in {time.perf_counter() - t0:.1f} s")
sys.exit(f"notebooks failed: {', '.join(failed)}" if failed else 0)
PY
