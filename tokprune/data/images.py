"""Reading an image file so that a broken one (truncated, not an image) fails with its name, not PIL's bare error."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from PIL import Image


def open_rgb(source: str | Path | IO[bytes], name: str | Path | None = None) -> Image.Image:
    """The image at ``source`` (a path or a binary file), fully decoded and in RGB. ``name``: how the error calls
    it (default: the path). Raises :class:`OSError` naming the file when it cannot be decoded."""
    label = str(name if name is not None else source)
    try:
        with Image.open(source) as img:
            img.load()  # PIL decodes lazily: a truncated file fails here, not later inside a model call
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: no such image file") from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError and "image file is truncated" are OSErrors
        raise OSError(f"{label}: cannot read the image ({e}); re-save it or leave it out") from None
