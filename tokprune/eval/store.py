"""The run directory: ``results.json`` (every cell's row, rewritten atomically after each cell) and
``samples/<cell>.jsonl`` (each sample's prediction and correctness, for the hard-subset view)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

SCHEMA = "tokprune-eval/1"
RESULTS = "results.json"


def results_path(out: str | Path) -> Path:
    return Path(out) / RESULTS


def read(out: str | Path) -> dict[str, Any]:
    """The run JSON of ``out`` (a directory or the JSON file itself)."""
    path = Path(out)
    path = path if path.suffix == ".json" else results_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {RESULTS} in {path.parent}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a tokprune eval result (schema {data.get('schema')!r}, expected {SCHEMA})")
    return data


def write(out: str | Path, data: dict[str, Any]) -> Path:
    """Write the run JSON atomically (a crash mid-write never leaves a truncated file to resume from)."""
    path = results_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def sample_file(out: str | Path, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", key)
    return Path(out) / "samples" / f"{safe}.jsonl"


def write_samples(out: str | Path, key: str, rows: list[dict[str, Any]]) -> Path:
    path = sample_file(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_samples(out: str | Path, key: str) -> list[dict[str, Any]] | None:
    path = sample_file(out, key)
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
