"""Which tokens each method keeps on the trained reference models: one PNG per model, a row per method.

    python benchmarks/kept_pictures.py                 # writes docs/img/kept_<model>.png
    python benchmarks/kept_pictures.py --ratio 0.25 --samples 6 --models llava-shapes

Each picture shows the same Shapes-VQA test images under every method at one keep ratio; the cells of dropped
tokens are dimmed (``tokprune.viz.kept_picture``). The label above each row gives the method and its accuracy
on those images.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llava-shapes,qwen2vl-shapes")
    p.add_argument("--ratio", type=float, default=0.125)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--size", type=int, default=128, help="pixels per image tile")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.models.split(","):
        path = a.out / f"kept_{name}.png"
        picture(name, a.ratio, a.samples, a.size).save(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
