"""Plain square grids: a keep mask, a picture or a text grid from kept indices and a grid shape, no model config.

The kept indices are the ones :func:`tokprune.last_record` reports (``record.kept[b][i]``): row-major positions in
the image's grid of LLM tokens (LLaVA-1.5: 24x24 patches; Qwen2-VL: the grid after the 2x2 merger), so a keep
mask is a reshape away from the picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["kept_mask", "kept_picture", "kept_text", "side_by_side"]


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def kept_mask(kept: Any, grid: int | tuple[int, int]) -> np.ndarray:
    """(rows, cols) bool array, True where the token of that cell was kept (``kept``: indices, row-major)."""
    rows, cols = _grid(grid)
    idx = np.asarray(kept.tolist() if hasattr(kept, "tolist") else kept, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= rows * cols):
        raise ValueError(f"kept indices must lie in [0, {rows * cols}) for a {rows}x{cols} grid")
    mask = np.zeros(rows * cols, dtype=bool)
    mask[idx] = True
    return mask.reshape(rows, cols)


def kept_picture(image: Any, kept: Any, grid: int | tuple[int, int], dim: float = 0.2, size: int | None = 256,
                 lines: bool = True) -> Any:
    """The image (PIL) with the cells of dropped tokens darkened to ``dim`` of their brightness, upscaled to
    ``size`` pixels on its long side (nearest neighbour, so cells stay sharp), with a faint cell grid."""
    from PIL import Image

    rows, cols = _grid(grid)
    img = image.convert("RGB")
    if size is not None:
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
    px = np.asarray(img).astype(np.float32)
    h, w = px.shape[:2]
    ys = np.minimum(np.arange(h) * rows // h, rows - 1)
    xs = np.minimum(np.arange(w) * cols // w, cols - 1)
    keep = kept_mask(kept, (rows, cols))[ys[:, None], xs[None, :]]
    px = np.where(keep[..., None], px, px * dim)
    if lines:
        edge = np.zeros((h, w), dtype=bool)
        edge[np.flatnonzero(np.diff(ys)) + 1, :] = True
        edge[:, np.flatnonzero(np.diff(xs)) + 1] = True
        px[edge] = px[edge] * 0.5 + 64
    return Image.fromarray(px.clip(0, 255).astype(np.uint8))


def kept_text(kept: Any, grid: int | tuple[int, int], objects: np.ndarray | None = None) -> str:
    """The keep mask as text, one character per token: ``#`` kept, ``.`` dropped; with ``objects`` (a bool
    (rows, cols) array of the cells that matter, e.g. the answer's objects) ``#`` / ``+`` for kept object /
    background and ``o`` / ``.`` for dropped object / background."""
    mask = kept_mask(kept, grid)
    if objects is None:
        return "\n".join("".join("#" if k else "." for k in row) for row in mask)
    if objects.shape != mask.shape:
        raise ValueError(f"objects has shape {objects.shape}, the grid is {mask.shape}")
    table = {(True, True): "#", (True, False): "+", (False, True): "o", (False, False): "."}
    return "\n".join("".join(table[bool(k), bool(o)] for k, o in zip(rk, ro)) for rk, ro in zip(mask, objects))


def side_by_side(pictures: Sequence[Any], gap: int = 4) -> Any:
    """One PIL image with ``pictures`` in a row (e.g. the same image under several methods)."""
    from tokprune.viz.compose import hstack

    return hstack(pictures, gap=gap)
