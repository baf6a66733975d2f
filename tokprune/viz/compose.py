"""Putting panels together: rows, columns and titles (PIL only)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
LINE = 12  # pixels per line of the default bitmap font


def hstack(pictures: Sequence[Image.Image], gap: int = 4, align: str = "top") -> Image.Image:
    """One image with ``pictures`` side by side, ``gap`` white pixels apart (``align``: "top" or "center")."""
    if not pictures:
        raise ValueError("nothing to lay out: pass at least one picture")
    h = max(p.height for p in pictures)
    out = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1), h), WHITE)
    x = 0
    for p in pictures:
        out.paste(p, (x, 0 if align == "top" else (h - p.height) // 2))
        x += p.width + gap
    return out


def vstack(pictures: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """One image with ``pictures`` stacked top to bottom, left-aligned."""
    if not pictures:
        raise ValueError("nothing to lay out: pass at least one picture")
    h = sum(p.height for p in pictures) + gap * (len(pictures) - 1)
    out = Image.new("RGB", (max(p.width for p in pictures), h), WHITE)
    y = 0
    for p in pictures:
        out.paste(p, (0, y))
        y += p.height + gap
    return out


def text_width(text: str) -> int:
    """Pixels the widest line of ``text`` takes in the default font."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return max(int(draw.textlength(t)) for t in text.split("\n"))


def titled(picture: Image.Image, text: str, side: str = "top", label_width: int | None = None) -> Image.Image:
    """``picture`` with ``text`` (one or more lines) above it, or to its left when ``side="left"`` (in a column of
    ``label_width`` pixels, so that labelled rows line up)."""
    lines = text.split("\n")
    width = max(text_width(text), label_width or 0) + 6
    if side == "left":
        out = Image.new("RGB", (picture.width + width, max(picture.height, LINE * len(lines) + 4)), WHITE)
        out.paste(picture, (width, 0))
        origin = (2, max(0, (picture.height - LINE * len(lines)) // 2))
    else:
        out = Image.new("RGB", (max(picture.width, width), picture.height + LINE * len(lines) + 4), WHITE)
        out.paste(picture, (0, LINE * len(lines) + 4))
        origin = (2, 2)
    ImageDraw.Draw(out).multiline_text(origin, text, fill=BLACK, spacing=2)
    return out
