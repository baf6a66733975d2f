"""Every kept-token picture in the README and docs, regenerated in one go (offline, about a minute on CPU).

    python benchmarks/kept_pictures.py                 # writes docs/img/show_<model>.png and docs/img/kept_<model>.png
    python benchmarks/kept_pictures.py --ratio 0.25 --samples 6 --models llava-shapes

* ``docs/img/show_<model>.png`` (README): the project's own command, ``tokprune show --model <model>``, i.e. every
  method that runs on the model at keep 25% and 12.5% on one Shapes-VQA test image (Qwen with ``--scores``).
* ``docs/img/kept_<model>.png`` (docs/reference.md): the same test images under every method at one keep ratio,
  one row per method; the cells of dropped tokens are dimmed (``tokprune.viz.kept_picture``). The label above
  each row gives the method and its accuracy on those images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import tokprune
from tokprune.data import ShapesVQA
from tokprune.reference import load, read_meta
from tokprune.reference.arch import GRID, image_size
from tokprune.reference.evaluate import family_of, predict
from tokprune.viz import kept_picture, side_by_side

OUT = Path(__file__).parent.parent / "docs" / "img"


def picture(name: str, ratio: float, n: int, size: int) -> Image.Image:
    model, processor = load(name)
    family = family_of(model)
    samples = list(ShapesVQA("test", n=n, types=tuple(read_meta(name)["question_types"])))
    rows = []
    for method in tokprune.methods():
        try:
            tokprune.apply(model, method, keep_ratio=ratio)
        except (tokprune.UnsupportedError, NotImplementedError):
            continue
        try:
            kept: list[torch.Tensor] = []
            answers = predict(model, processor, samples, kept=kept)
        finally:
            tokprune.remove(model)
        right = sum(a == s.answer for a, s in zip(answers, samples))
        tiles = [kept_picture(s.image(image_size(family)), k, GRID, size=size) for s, k in zip(samples, kept)]
        row = side_by_side(tiles)
        labelled = Image.new("RGB", (row.width, row.height + 16), (255, 255, 255))
        labelled.paste(row, (0, 16))
        ImageDraw.Draw(labelled).text((2, 2), f"{method}: keep {ratio:g} ({len(kept[0])} of {GRID * GRID} tokens), "
                                      f"{right}/{n} right", fill=(0, 0, 0))
        rows.append(labelled)
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 6 for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + 6
    return out


#: README pictures: output name -> ``tokprune show`` arguments
SHOW = {
    "show_llava-shapes.png": ["--model", "llava-shapes"],
    "show_qwen2vl-shapes.png": ["--model", "qwen2vl-shapes", "--scores"],
}


def show_pictures(out: Path) -> list[str]:
    """The README pictures, drawn by ``tokprune show`` itself; returns the names of those that failed (its one-line
    error is printed above)."""
    from tokprune.cli import main as cli

    return [name for name, args in SHOW.items() if cli(["show", *args, "--out", str(out / name)]) != 0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llava-shapes,qwen2vl-shapes")
    p.add_argument("--ratio", type=float, default=0.125)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--size", type=int, default=128, help="pixels per image tile")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    failed = show_pictures(a.out)
    for name in filter(None, a.models.split(",")):  # an error here raises: exit code 1 with its traceback
        path = a.out / f"kept_{name}.png"
        picture(name, a.ratio, a.samples, a.size).save(path)
        print(f"wrote {path}")
    if failed:  # a stale picture must never pass for a new one
        raise SystemExit(f"kept_pictures.py: tokprune show failed for {', '.join(failed)}; those pictures were not "
                         "redrawn")


if __name__ == "__main__":
    main()
