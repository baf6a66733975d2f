"""Where each visual token of an image sits in that image, for every supported family.

A pruning record reports kept tokens as indices into an image's visual tokens (``record.kept[b][i]``), in the order
the LLM receives them. This module turns that order back into image regions:

* **LLaVA-1.5** (CLIP grid): one ``g x g`` grid of patches, row-major, over the square the CLIP processor crops from
  the image (shortest edge resized, centre crop); with the ``"full"`` feature strategy token 0 is [CLS] (no region).
* **LLaVA-NeXT** (anyres tiles): the base tile (the whole image squashed to the encoder's square, ``g x g``
  tokens) comes first, then the high-resolution grid of all crops stitched together, *unpadded* (rows or columns
  that only covered the processor's padding are gone), each grid row followed by one ``image_newline`` token.
* **Qwen2-VL / Qwen2.5-VL / Qwen3-VL** (dynamic resolution): one token per 2x2 merge unit of ViT patches, raster
  order over the resized image (``image_grid_thw`` counts patches). Qwen2.5-VL's window order is already undone in
  the kept indices by the adapter (``pooler_output`` is in raster order), so all three read the same way.

A layout is a list of :class:`View` s, each a grid of tokens over a rectangle of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILIES = ("llava", "llava_next", "llava_onevision", *QWEN_FAMILIES)


@dataclass(frozen=True)
class View:
    """A grid of visual tokens laid over a rectangle of the image.

    ``box``: (x0, y0, x1, y1) in image pixels, the region the grid covers. ``tokens[r, c]``: the index of the
    token of cell (r, c) among the image's visual tokens. ``newlines[r]``: the index of the newline token that
    ends grid row ``r`` (LLaVA-NeXT), or None. ``unit``: what one cell is, for titles ("patch", "2x2 merge unit").
    """

    name: str
    box: tuple[float, float, float, float]
    tokens: np.ndarray
    newlines: np.ndarray | None = None
    unit: str = "patch"

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])


@dataclass(frozen=True)
class Layout:
    """Every visual token of one image: ``views`` cover the image; ``n_tokens`` counts all of them (including
    tokens with no region, such as [CLS] or newlines). ``size`` is the image's (width, height)."""

    family: str
    size: tuple[int, int]
    views: tuple[View, ...]
    n_tokens: int

    def regions(self) -> dict[int, list[tuple[int, int, int]]]:
        """token index -> [(view, row, col), ...]: every cell a token covers."""
        out: dict[int, list[tuple[int, int, int]]] = {}
        for v, view in enumerate(self.views):
            for (r, c), t in np.ndenumerate(view.tokens):
                out.setdefault(int(t), []).append((v, r, c))
        return out


def _check_count(layout: Layout, n_visual: int | None) -> Layout:
    if n_visual is not None and n_visual != layout.n_tokens:
        raise ValueError(
            f"the {layout.family} layout of a {layout.size[0]}x{layout.size[1]} image has {layout.n_tokens} visual "
            f"tokens but the record has {n_visual}; pass the image the record was made from (same size) and the "
            "model's config"
        )
    return layout


def clip_layout(size: tuple[int, int], grid: int | tuple[int, int], crop: bool = True, cls: bool = False,
                n_visual: int | None = None) -> Layout:
    """LLaVA-1.5: a ``grid`` of patches (row-major) over the image, or over its centre square when ``crop`` (what
    the CLIP processor feeds the encoder: shortest edge resized, centre crop). ``cls``: token 0 is [CLS]."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    w, h = size
    if crop:
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    else:
        box = (0.0, 0.0, float(w), float(h))
    tokens = np.arange(rows * cols).reshape(rows, cols) + int(cls)
    view = View("image", box, tokens)
    return _check_count(Layout("llava", size, (view,), rows * cols + int(cls)), n_visual)


def unpadded_shape(rows: int, cols: int, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """LLaVA-NeXT unpadding of a (rows, cols) token grid for an image of (height, width) pixels: returns the kept
    (row0, row1, col0, col1) range. The processor resized the image into the grid's canvas keeping its aspect
    ratio and padded the rest evenly on both sides; the model drops the token rows / columns that only cover that
    padding (the same arithmetic as ``transformers``' ``unpad_image``)."""
    height, width = image_hw
    if width / height > cols / rows:  # wider than the canvas: padding above and below
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return pad, rows - pad, 0, cols
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return 0, rows, pad, cols - pad


def next_layout(size: tuple[int, int], image_hw: tuple[int, int], config: Any, n_visual: int | None = None,
                newlines: bool = True, spatial: bool = False) -> Layout:
    """LLaVA-NeXT: base tile, then the unpadded high-resolution grid with a newline token after every row
    (``spatial``: the references' layout of ``tile_budget="per_tile_reference"``, the whole canvas grid, padding
    included, no newline).

    ``image_hw``: the (height, width) the processor reported in ``image_sizes`` (the record's ``image_sizes``);
    ``config``: the model's ``LlavaNextConfig`` (tile size, patch size, grid pinpoints). The base tile is the whole
    image squashed to the encoder's square. The high-resolution canvas holds the image resized to fit (aspect
    kept, ``ceil`` on the short side) and centred, as the processor does; the box of the unpadded grid is that
    canvas region mapped back onto the image, so a cell is drawn where its pixels came from."""
    from transformers.image_processing_utils import select_best_resolution

    vc = config.vision_config
    family = "llava_onevision" if getattr(config, "model_type", None) == "llava_onevision" else "llava_next"
    if family == "llava_next" and getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise NotImplementedError("tokprune.viz draws LLaVA-NeXT with vision_feature_select_strategy='default' only")
    g, p = vc.image_size // vc.patch_size, vc.patch_size
    w, h = size
    base = View("base tile", (0.0, 0.0, float(w), float(h)), np.arange(g * g).reshape(g, g))
    ih, iw = (int(v) for v in image_hw)
    canvas_h, canvas_w = select_best_resolution((ih, iw), config.image_grid_pinpoints)
    r0, r1, c0, c1 = unpadded_shape(canvas_h // p, canvas_w // p, (ih, iw))
    if spatial:
        r0, r1, c0, c1, newlines = 0, canvas_h // p, 0, canvas_w // p, False
    if canvas_w / iw < canvas_h / ih:
        new_w, new_h = canvas_w, min(math.ceil(ih * canvas_w / iw), canvas_h)
    else:
        new_w, new_h = min(math.ceil(iw * canvas_h / ih), canvas_w), canvas_h
    off_x, off_y = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
    sx, sy = w / new_w, h / new_h  # canvas pixels -> displayed image pixels
    box = ((c0 * p - off_x) * sx, (r0 * p - off_y) * sy, (c1 * p - off_x) * sx, (r1 * p - off_y) * sy)
    rows, cols = r1 - r0, c1 - c0
    if family == "llava_onevision":  # SigLIP (no [CLS]); anyres_max resizes a large grid over the same box
        rows, cols = anyres_max_shape(rows, cols, g, config.vision_aspect_ratio)
    stride = cols + int(newlines)
    tokens = g * g + np.arange(rows)[:, None] * stride + np.arange(cols)[None, :]
    nl = g * g + np.arange(rows) * stride + cols if newlines else None
    tiles = f"{canvas_h // vc.image_size}x{canvas_w // vc.image_size}"
    hi = View(f"high-res {tiles} tiles", box, tokens, nl)
    return _check_count(Layout(family, size, (base, hi), g * g + rows * stride), n_visual)


def anyres_max_shape(rows: int, cols: int, side: int, aspect_ratio: str) -> tuple[int, int]:
    """LLaVA-OneVision's ``anyres_max_<n>``: an unpadded (rows, cols) grid larger than n tiles of ``side`` x ``side``
    patches (by more than 1.1^2) is resized to ``(rows // r, cols // r)``, ``r = sqrt(rows * cols / (n side^2))``."""
    ratio = math.sqrt(rows * cols / (int(aspect_ratio.removeprefix("anyres_max_")) * side**2))
    return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)


def qwen_layout(size: tuple[int, int], grid_thw: tuple[int, int, int], merge: int = 2, family: str = "qwen2_vl",
                n_visual: int | None = None) -> Layout:
    """Qwen-VL: ``grid_thw`` = (t, h, w) ViT patches of the resized image (the record's ``image_grid_thw``); one
    token per ``merge x merge`` unit, raster order, over the whole image."""
    t, gh, gw = (int(v) for v in grid_thw)
    if t != 1:
        raise NotImplementedError(f"image_grid_thw {tuple(grid_thw)} has t={t}: video frames are not drawn")
    if gh % merge or gw % merge:
        raise ValueError(f"a {gh}x{gw} patch grid does not split into {merge}x{merge} merge units")
    rows, cols = gh // merge, gw // merge
    w, h = size
    view = View("image", (0.0, 0.0, float(w), float(h)), np.arange(rows * cols).reshape(rows, cols),
                unit=f"{merge}x{merge} merge unit")
    return _check_count(Layout(family, size, (view,), rows * cols), n_visual)


def family_of_config(config: Any) -> str:
    """The tokprune family of a model config (``model_type``), or a clear error for an unsupported one."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ValueError(f"tokprune.viz has no layout for model_type {kind!r}; supported: {', '.join(FAMILIES)}")
    return kind


def layout_of(record: Any, image_size: tuple[int, int], sample: int = 0, image: int = 0,
              config: Any = None) -> Layout:
    """The layout of image ``image`` of sample ``sample`` of a :class:`~tokprune.PruneRecord`, for an image of
    ``image_size`` (width, height) pixels. ``config`` defaults to the record's model config."""
    config = config if config is not None else record.config
    if config is None:
        raise ValueError("the record carries no model config; pass config=model.config")
    family = family_of_config(config)
    n = record.n_visual[sample][image]
    if family == "llava":
        vc = config.vision_config
        g = vc.image_size // vc.patch_size
        return clip_layout(image_size, g, cls=config.vision_feature_select_strategy == "full", n_visual=n)
    if family in ("llava_next", "llava_onevision"):
        if record.image_sizes is None:
            raise ValueError("the LLaVA-NeXT record has no image_sizes; pass image_sizes to the forward")
        hw = record.image_sizes[sample][image]
        spatial = next_layout(image_size, hw, config, spatial=True)  # tile_budget="per_tile_reference"
        return spatial if n == spatial.n_tokens else next_layout(image_size, hw, config, n_visual=n)
    if record.image_grid_thw is None:
        raise ValueError("the Qwen record has no image_grid_thw; pass image_grid_thw to the forward")
    merge = config.vision_config.spatial_merge_size
    return qwen_layout(image_size, record.image_grid_thw[sample][image], merge, family, n_visual=n)
