"""Offline evaluation tasks: the built-in Shapes-VQA split and local data sets, as lists of :class:`Example`.

A task spec is one of

* ``shapes`` (the Shapes-VQA test split, :class:`tokprune.data.ShapesVQA`) or ``shapes_<type>`` (its questions of
  one type: ``shapes_color``, ``shapes_exist``, ``shapes_count``, ``shapes_position``, ``shapes_digit``);
* a path to local data with columns ``image``, ``question``, ``answer`` and optionally ``choices``:
  a ``datasets`` ``save_to_disk`` directory, a ``.parquet`` file (or a directory of them), or a folder holding
  ``data.jsonl`` whose ``image`` fields are file paths relative to the folder.

Anything else is taken for an lmms-eval task name by the runner (:mod:`tokprune.eval.lmms_tasks`). Everything
here validates eagerly, so a bad spec fails before any model is loaded.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tokprune.data.shapes import QUESTION_TYPES, ShapesVQA
from tokprune.eval.scoring import SCORINGS, pick_scoring

#: samples of the built-in ``shapes`` task (the first 1000 of the Shapes-VQA test split)
SHAPES_SIZE = 1000
BUILTIN = ("shapes", *(f"shapes_{t}" for t in QUESTION_TYPES))
REQUIRED = ("image", "question", "answer")


@dataclass(frozen=True)
class Example:
    """One question. ``image(size)`` returns the PIL image (``size``: side in pixels for generated data, which
    renders at the model's native size; stored images ignore it)."""

    id: str
    question: str
    answer: str
    load_image: Callable[[int | None], Image.Image]
    choices: tuple[str, ...] | None = None
    qtype: str | None = None

    def image(self, size: int | None = None) -> Image.Image:
        return self.load_image(size)


@dataclass
class OfflineTask:
    """A named list of examples with the scoring they use; ``source`` says where they came from."""

    name: str
    source: str
    scoring: str
    examples: Sequence[Example]

    def __len__(self) -> int:
        return len(self.examples)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "offline", "source": self.source, "scoring": self.scoring,
                "examples": len(self.examples)}


def is_builtin(spec: str) -> bool:
    return spec in BUILTIN


def looks_like_path(spec: str) -> bool:
    """Specs with a path separator or a data-file suffix are paths, so a typo in one is reported as a missing path
    rather than as an unknown lmms-eval task."""
    return "/" in spec or "\\" in spec or spec.startswith(".") or spec.endswith((".parquet", ".jsonl", ".arrow"))


def load_task(spec: str, limit: int | None = None, scoring: str | None = None) -> OfflineTask:
    """The offline task named by ``spec`` (see the module docstring), its first ``limit`` examples."""
    if scoring is not None and scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; scorings: {', '.join(SCORINGS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if is_builtin(spec):
        examples = _shapes(spec, limit)
        return OfflineTask(spec, "tokprune.data.ShapesVQA('test')", scoring or "exact_match", examples)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset path {spec!r} does not exist")
    rows, source = _read_rows(path)
    examples = _to_examples(rows, path, limit)
    if not examples:
        raise ValueError(f"dataset {spec!r} has no examples")
    chosen = scoring or pick_scoring([e.answer for e in examples], examples[0].choices is not None)
    return OfflineTask(path.name.removesuffix(".parquet"), source, chosen, examples)


# ----------------------------------------------------------------------------------------------- built-in
def _shapes(spec: str, limit: int | None) -> list[Example]:
    qtype = spec.removeprefix("shapes_") if spec != "shapes" else None
    data = ShapesVQA("test", n=SHAPES_SIZE)
    # subsets are the questions of one type among the same test samples, so subset and whole task agree
    indices = [i for i in range(SHAPES_SIZE) if qtype is None or QUESTION_TYPES[i % len(QUESTION_TYPES)] == qtype]
    if limit is not None:
        indices = indices[:limit]
    out = []
    for i in indices:
        sample = data[i]
        assert qtype is None or sample.qtype == qtype
        out.append(Example(f"shapes-test-{i}", sample.question, sample.answer, _shapes_image(data, i),
                           qtype=sample.qtype))
    return out


def _shapes_image(data: ShapesVQA, index: int) -> Callable[[int | None], Image.Image]:
    def load(size: int | None) -> Image.Image:
        sample = data[index]
        return sample.image(size) if size else sample.image()

    return load


# ----------------------------------------------------------------------------------------------- local data
def _read_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    """Rows (dicts) of a local data set and a description of its format."""
    if path.is_file() and path.suffix == ".parquet":
        return _parquet([path]), f"parquet {path}"
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _from_disk(path), f"datasets save_to_disk {path}"
        if (path / "data.jsonl").exists():
            return _jsonl(path / "data.jsonl"), f"jsonl folder {path}"
        parquets = sorted(path.glob("*.parquet"))
        if parquets:
            return _parquet(parquets), f"parquet {path} ({len(parquets)} files)"
    raise ValueError(f"{path} is not a data set: expected a datasets save_to_disk directory, a .parquet file or "
                     "directory of them, or a folder with data.jsonl (columns image, question, answer[, choices])")


def _parquet(files: list[Path]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    return rows


def _from_disk(path: Path) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading a save_to_disk data set needs the 'datasets' package: "
                          "pip install 'tokprune[eval]'") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = next((s for s in ("test", "validation", "val") if s in ds), None)
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{path} has splits {list(ds)}; expected a 'test' or 'validation' split")
            split = next(iter(ds))
        ds = ds[split]
    ds = ds.cast_column("image", datasets.Image(decode=False)) if "image" in ds.column_names else ds
    return list(ds)


def _jsonl(file: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{n}: not JSON: {e}") from e
    return rows


def _to_examples(rows: list[dict[str, Any]], root: Path, limit: int | None) -> list[Example]:
    if rows:
        missing = [c for c in REQUIRED if c not in rows[0]]
        if missing:
            raise ValueError(f"dataset {root} lacks the column(s) {', '.join(missing)}; it has {', '.join(rows[0])}")
    base = root if root.is_dir() else root.parent
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        choices = row.get("choices")
        out.append(Example(str(row.get("id", i)), str(row["question"]), str(row["answer"]),
                           _stored_image(row["image"], base), tuple(str(c) for c in choices) if choices else None,
                           row.get("qtype")))
    return out


def _stored_image(value: Any, base: Path) -> Callable[[int | None], Image.Image]:
    """A loader for an image stored as bytes (parquet / arrow ``{"bytes", "path"}``), a path, or a PIL image."""

    def load(size: int | None) -> Image.Image:
        from tokprune.data.images import open_rgb

        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict) and value.get("bytes"):
            name = f"{base} (stored image{' ' + value['path'] if value.get('path') else ''})"
            return open_rgb(io.BytesIO(value["bytes"]), name)
        p = value.get("path") if isinstance(value, dict) else value
        if not p:
            raise ValueError(f"image {value!r} has neither bytes nor a path")
        return open_rgb(Path(p) if Path(p).is_absolute() else base / p)

    return load
