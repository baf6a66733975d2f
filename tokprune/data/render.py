"""Drawing a scene: the RGB image a model sees and the per-pixel object map used for patch labels.

Scenes are described on a fixed 64-unit canvas (:data:`CANVAS`) and rendered at any pixel size, so the LLaVA and
Qwen2-VL reference models can see the same scene at the resolution their patch grid needs. Drawing is plain PIL
without anti-aliasing, so a scene renders to the same pixels on every platform. Digits are drawn as seven-segment
glyphs rather than with a font, for the same reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from tokprune.data.shapes import Obj, Scene

#: side of the canvas that scene coordinates are given in
CANVAS = 64

#: seven-segment encoding: which of the segments a..g (top, top-right, bottom-right, bottom, bottom-left,
#: top-left, middle) are lit for each digit
SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


def _segment_boxes(x0: float, y0: float, w: float, h: float, t: float) -> dict[str, tuple[float, float, float, float]]:
    """Rectangles (x0, y0, x1, y1) of the seven segments of a glyph whose box is (x0, y0, w, h), stroke ``t``."""
    xm, ym, x1, y1 = x0 + w, y0 + h / 2, x0 + w, y0 + h
    return {
        "a": (x0, y0, x1, y0 + t),
        "b": (xm - t, y0, x1, ym),
        "c": (xm - t, ym, x1, y1),
        "d": (x0, y1 - t, x1, y1),
        "e": (x0, ym, x0 + t, y1),
        "f": (x0, y0, x0 + t, ym),
        "g": (x0, ym - t / 2, x1, ym + t / 2),
    }


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill: int | tuple[int, int, int], scale: float) -> None:
    x, y, r = obj.x * scale, obj.y * scale, obj.size * scale / 2
    if obj.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.kind == "square":
        s = r * 0.85  # a square of the same side looks bigger than a circle: match areas roughly
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif obj.kind == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    elif obj.kind == "digit":
        w, h = obj.size * scale * 0.6, obj.size * scale
        t = max(1.0, 2.0 * scale)
        boxes = _segment_boxes(x - w / 2, y - h / 2, w, h, t)
        for seg in SEGMENTS[int(obj.value)]:
            x0, y0, x1, y1 = boxes[seg]
            draw.rectangle((round(x0), round(y0), round(x1) - 1, round(y1) - 1), fill=fill)
    else:
        raise ValueError(f"unknown object kind {obj.kind!r}")


def render(scene: Scene, size: int = CANVAS) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image (objects drawn in order, later ones on top)."""
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, obj.rgb, size / CANVAS)
    return img


def object_map(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """(size, size) uint8 map: 0 = background, ``i + 1`` = pixel covered by ``scene.objects[i]``."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(scene.objects):
        _draw(draw, obj, i + 1, size / CANVAS)
    return np.asarray(img)


def patch_owners(scene: Scene, grid: int, min_cover: float = 0.15, size: int = CANVAS) -> np.ndarray:
    """(grid, grid) int map: for each of ``grid`` x ``grid`` equal cells, ``i + 1`` for the object covering the
    largest part of it (when that is at least ``min_cover`` of the cell), else 0 (background).

    This is what "the answer depends on a few patches" means concretely: the cells a question's objects own.
    """
    m = object_map(scene, size)
    cell = size // grid
    cells = m[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3)
    cells = cells.reshape(grid, grid, cell * cell)
    n_obj = len(scene.objects)
    counts = np.stack([(cells == i + 1).sum(-1) for i in range(n_obj)], -1) if n_obj else np.zeros((grid, grid, 0))
    out = np.zeros((grid, grid), dtype=np.int64)
    if n_obj:
        best = counts.argmax(-1)
        frac = counts.max(-1) / (cell * cell)
        out = np.where(frac >= min_cover, best + 1, 0)
    return out
