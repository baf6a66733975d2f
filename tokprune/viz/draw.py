"""Pixels of one view: the image with pruned cells dimmed, kept cells outlined, merged tokens' sources tinted and an
optional score heat-map (numpy + PIL only, so it runs without matplotlib and can be checked pixel by pixel).

Per cell of a :class:`~tokprune.viz.layout.View`:

* kept token: the image is left as it is, with a 1-pixel outline on the cell border;
* pruned token absorbed by a merged token: tinted with that merged token's colour (:data:`PALETTE`);
* pruned token: brightness multiplied by ``dim``;
* image area no token covers (outside LLaVA's centre crop): also dimmed, since the model never saw it.

With ``scores`` every scored cell is blended with a heat colour (dark = low, yellow = high, min-max over the
scored tokens of the image) *before* the dimming, and pruned cells are dimmed to ``max(dim, SCORE_DIM)`` only, so
pruned and kept cells keep both cues.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from tokprune.viz.layout import View

OUTLINE = (255, 214, 0)
NEWLINE_KEPT = (90, 200, 90)
NEWLINE_DROPPED = (70, 70, 70)
#: colours of merged tokens, cycled (one per merged token)
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))
_HEAT = np.array([[20, 12, 60], [200, 40, 60], [250, 230, 60]], dtype=np.float32)
MERGE_TINT = 0.65  # weight of a merged token's colour over its sources' pixels
HEAT_WEIGHT = 0.55
SCORE_DIM = 0.5  # pruned cells are dimmed at most this much under a heat-map, so their heat stays readable


def heat_colours(values: np.ndarray) -> np.ndarray:
    """(..., 3) RGB of values in [0, 1] on a dark-red-yellow ramp."""
    v = np.clip(values, 0.0, 1.0) * (len(_HEAT) - 1)
    lo = np.minimum(v.astype(int), len(_HEAT) - 2)
    frac = (v - lo)[..., None]
    return _HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac


def normalise(scores: np.ndarray) -> np.ndarray:
    """Min-max over the finite entries (NaN stays NaN: tokens the stage did not score)."""
    out = np.full(scores.shape, np.nan, dtype=np.float32)
    ok = np.isfinite(scores)
    if ok.any():
        lo, hi = scores[ok].min(), scores[ok].max()
        out[ok] = (scores[ok] - lo) / (hi - lo) if hi > lo else 1.0
    return out


def token_map(view: View, size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(h, w) token index of every pixel of a ``size`` = (w, h) panel showing the image; -1 where no cell is."""
    w, h = size
    iw, ih = image_size
    x0, y0, x1, y1 = view.box
    rows, cols = view.shape
    xs = (np.arange(w) + 0.5) * iw / w  # pixel centres in image coordinates
    ys = (np.arange(h) + 0.5) * ih / h
    c = np.floor((xs - x0) / (x1 - x0) * cols).astype(int)
    r = np.floor((ys - y0) / (y1 - y0) * rows).astype(int)
    inside = (r[:, None] >= 0) & (r[:, None] < rows) & (c[None, :] >= 0) & (c[None, :] < cols)
    tok = view.tokens[np.clip(r, 0, rows - 1)[:, None], np.clip(c, 0, cols - 1)[None, :]]
    return np.where(inside, tok, -1)


def merged_owner(merged: Mapping[int, Sequence[int]] | None, n_tokens: int) -> np.ndarray:
    """(n_tokens,) index of the merged token that absorbed each token, -1 for none. Raises when a token is claimed
    twice or an index is out of range (a merged record that cannot be drawn unambiguously)."""
    owner = np.full(n_tokens, -1, dtype=int)
    for j, sources in (merged or {}).items():
        idx = np.asarray([int(s) for s in sources], dtype=int)
        if idx.size and (idx.min() < 0 or idx.max() >= n_tokens):
            raise ValueError(f"merged token {j} lists sources outside [0, {n_tokens})")
        clash = idx[owner[idx] >= 0]
        if clash.size:
            raise ValueError(f"token {int(clash[0])} is listed as a source of two merged tokens")
        owner[idx] = j
    return owner


def render_view(image: Image.Image, view: View, kept: np.ndarray, size: int = 256, dim: float = 0.25,
                scores: np.ndarray | None = None, owner: np.ndarray | None = None,
                outline: bool = True) -> Image.Image:
    """The panel of one view (PIL RGB, ``size`` px on the long side, nearest-neighbour so cells stay sharp).

    ``kept``: (n_tokens,) bool. ``scores``: (n_tokens,) float in [0, 1] or NaN (see :func:`normalise`).
    ``owner``: (n_tokens,) merged-token index per token or -1 (see :func:`merged_owner`). A view with newline
    tokens gets a strip on its right: one segment per grid row, green when that row's newline was kept."""
    img = image.convert("RGB")
    scale = size / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    px = np.asarray(img.resize((w, h), Image.NEAREST)).astype(np.float32)
    tok = token_map(view, (w, h), img.size)
    covered = tok >= 0
    safe = np.where(covered, tok, 0)
    if scores is not None:
        s = scores[safe]
        hot = covered & np.isfinite(s)
        px[hot] = px[hot] * (1 - HEAT_WEIGHT) + heat_colours(s[hot]) * HEAT_WEIGHT
    keep = covered & kept[safe]
    absorbed = covered & ~keep & (owner[safe] >= 0) if owner is not None else np.zeros_like(covered)
    dimmed = ~keep & ~absorbed
    px[dimmed] *= dim if scores is None else max(dim, SCORE_DIM)
    if absorbed.any():
        colours = np.asarray(PALETTE, dtype=np.float32)[owner[safe][absorbed] % len(PALETTE)]
        px[absorbed] = px[absorbed] * (1 - MERGE_TINT) + colours * MERGE_TINT
    if outline:
        edge = np.zeros_like(keep)
        diff_y = tok[1:, :] != tok[:-1, :]
        diff_x = tok[:, 1:] != tok[:, :-1]
        edge[1:, :] |= diff_y
        edge[:-1, :] |= diff_y
        edge[:, 1:] |= diff_x
        edge[:, :-1] |= diff_x
        edge[[0, -1], :] = True
        edge[:, [0, -1]] = True
        px[edge & keep] = OUTLINE
    panel = Image.fromarray(px.clip(0, 255).astype(np.uint8))
    if view.newlines is None:
        return panel
    return _with_newlines(panel, view, kept, img.size)


def _with_newlines(panel: Image.Image, view: View, kept: np.ndarray, image_size: tuple[int, int]) -> Image.Image:
    rows = view.shape[0]
    strip = max(4, panel.width // (4 * max(1, view.shape[1])))
    out = Image.new("RGB", (panel.width + 2 + strip, panel.height), (255, 255, 255))
    out.paste(panel, (0, 0))
    arr = np.asarray(out).copy()
    y0, y1 = view.box[1] * panel.height / image_size[1], view.box[3] * panel.height / image_size[1]
    for r, t in enumerate(view.newlines):
        a = min(max(0, round(y0 + (y1 - y0) * r / rows)), panel.height - 1)  # the grid may overhang the image
        b = min(max(a + 1, round(y0 + (y1 - y0) * (r + 1) / rows) - 1), panel.height)
        arr[a:b, panel.width + 2:] = NEWLINE_KEPT if kept[int(t)] else NEWLINE_DROPPED
    return Image.fromarray(arr)
