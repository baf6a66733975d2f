"""Matplotlib and file output: a picture as a figure (for Jupyter and further styling), saved as PNG or SVG.

The pictures themselves are PIL images (they display inline in Jupyter as they are); matplotlib is only needed for
figures and SVG, and comes with the ``notebook`` extra (``pip install "tokprune[notebook]"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError('tokprune.viz figures need matplotlib: pip install "tokprune[notebook]"') from err
    return plt


def figure(picture: Image.Image, title: str | None = None, dpi: int = 100) -> Any:
    """A matplotlib ``Figure`` showing ``picture`` at its pixel size (no axes), with an optional title."""
    plt = _pyplot()
    w, h = picture.size
    fig = plt.figure(figsize=(w / dpi, (h + (24 if title else 0)) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h / (h + (24 if title else 0))))
    ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, y=1.0, va="top", fontsize=10)
    return fig


def save(picture: Image.Image | Any, path: str | Path) -> Path:
    """Write a picture (PIL image) or a matplotlib figure to ``path``; the suffix picks the format (.png, .svg, or
    anything PIL / matplotlib writes). SVG of a PIL picture goes through :func:`figure`."""
    path = Path(path)
    if not path.suffix:
        raise ValueError(f"{path} has no suffix; name the format, e.g. kept.png or kept.svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(picture, Image.Image):
        if path.suffix.lower() == ".svg":
            fig = figure(picture)
            fig.savefig(path)
            _pyplot().close(fig)
        else:
            picture.save(path)
    elif hasattr(picture, "savefig"):
        picture.savefig(path)
    else:
        raise TypeError(f"save() takes a PIL image or a matplotlib figure, got {type(picture).__name__}")
    return path
