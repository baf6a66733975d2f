"""Shared pieces of the tokprune.eval tests: small local data sets written from Shapes-VQA."""

from __future__ import annotations

import json
from pathlib import Path

from tokprune.data.shapes import ANSWERS, ShapesVQA


def write_jsonl_folder(root: Path, n: int, image_size: int = 64, choices: bool = False) -> Path:
    """The first ``n`` Shapes-VQA test samples as a folder with data.jsonl and PNG files."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in ShapesVQA("test", n=n):
        name = f"img{s.index}.png"
        s.image(image_size).save(root / name)
        row = {"id": f"shapes-test-{s.index}", "image": name, "question": s.question, "answer": s.answer,
               "qtype": s.qtype}
        if choices:
            row["choices"] = list(ANSWERS[s.qtype])
        rows.append(row)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_parquet(path: Path, n: int, image_size: int = 64, choices: bool = False) -> Path:
    """The same samples as a self-contained parquet file (needs datasets)."""
    from tokprune.data.hf import to_dataset

    ds = to_dataset("test", n=n, image_size=image_size).remove_columns(["scene"])
    if choices:
        ds = ds.map(lambda r: {"choices": list(ANSWERS[r["qtype"]])})
    ds.to_parquet(str(path))
    return path
