"""From a pruning record to pictures: every image of a sample, every view of an image, every stage of a method.

``picture(images, record)`` draws what survived the last stage; ``stages_picture`` draws one panel group per stage
(after the vision stage, after each LLM cut) so progressive methods show how the set shrinks. Images are the PIL
images the record was made from, in prompt order (one per ``<image>`` of the sample).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokprune.viz.compose import hstack, titled
from tokprune.viz.draw import merged_owner, normalise, render_view
from tokprune.viz.layout import Layout, layout_of


def _images(images: Image.Image | Sequence[Image.Image], record: Any, sample: int) -> list[Image.Image]:
    imgs = [images] if isinstance(images, Image.Image) else list(images)
    n = len(record.n_visual[sample])
    if len(imgs) != n:
        raise ValueError(f"sample {sample} of the record has {n} image(s) but {len(imgs)} were passed; pass the "
                         "images of that sample's prompt, in order")
    return imgs


def stage_name(record: Any, stage: int) -> str:
    """"vision" / "LLM layer K" for a stage index (negative counts from the end), "unpruned" without stages."""
    if not record.stages:
        return "unpruned"
    st = record.stages[stage]
    return "vision" if st.kind == "vision" else f"LLM layer {st.layer}"


def stage_kept(record: Any, stage: int, sample: int, image: int) -> np.ndarray:
    """Sorted kept indices of one image after ``stage`` (all tokens when the record has no stage)."""
    if not record.stages:
        return np.arange(record.n_visual[sample][image])
    if not -len(record.stages) <= stage < len(record.stages):
        raise IndexError(f"stage {stage} out of range: the record has {len(record.stages)} stage(s)")
    return np.asarray(record.stages[stage].kept[sample][image].cpu(), dtype=int)


def stage_scores(record: Any, stage: int, sample: int, image: int) -> np.ndarray:
    """The scores the method gave the image's tokens at ``stage`` (NaN = not scored), normalised to [0, 1]."""
    scores = getattr(record.stages[stage], "scores", None) if record.stages else None
    if scores is None:
        raise ValueError(f"stage {stage_name(record, stage)!r} of this {record.method} record holds no scores; "
                         "apply the method with tokprune.apply(..., record_scores=True) (methods that score tokens "
                         "fill them)")
    return normalise(np.asarray(scores[sample][image].float().cpu()))


def scored_stage(record: Any, stage: int = -1) -> int | None:
    """Index of the last stage at or before ``stage`` whose scores the record holds (None if none does): a stage
    that selects without a per-token score (CATP's LLM cuts) shows the scores of the last stage that had them."""
    if not record.stages:
        return None
    last = stage % len(record.stages)
    return next((s for s in range(last, -1, -1) if getattr(record.stages[s], "scores", None) is not None), None)


def merged_sources(record: Any, sample: int, image: int) -> Mapping[int, Sequence[int]] | None:
    """``{merged token j: [original indices it absorbed]}`` of one image, from ``record.merged`` (None if none).

    Accepted per-image entries: a :class:`~tokprune.record.Merged` (``sources[j]``), or that same structure as a
    plain mapping ``{j: indices}``, so methods that merge can fill either."""
    merged = getattr(record, "merged", None)
    if not merged or merged[sample][image] is None:
        return None
    entry = merged[sample][image]
    if isinstance(entry, Mapping):
        return {int(j): _ints(s) for j, s in entry.items()}
    if hasattr(entry, "sources"):
        return {j: _ints(s) for j, s in enumerate(entry.sources)}
    raise TypeError(f"record.merged[{sample}][{image}] must be a Merged or a {{merged token: sources}} mapping, "
                    f"got {type(entry).__name__}")


def _ints(v: Any) -> list[int]:
    return [int(x) for x in (v.tolist() if isinstance(v, torch.Tensor) else v)]


def image_panels(image: Image.Image, layout: Layout, kept: np.ndarray, *, size: int = 256, dim: float = 0.25,
                 scores: np.ndarray | None = None, merged: Mapping[int, Sequence[int]] | None = None,
                 title: str | None = None) -> Image.Image:
    """All views of one image side by side, each titled with its name and how many of its tokens survive."""
    if kept.size and (kept.min() < 0 or kept.max() >= layout.n_tokens):
        raise ValueError(f"kept indices must lie in [0, {layout.n_tokens}) for this image's layout")
    mask = np.zeros(layout.n_tokens, dtype=bool)
    mask[kept] = True
    owner = merged_owner(merged, layout.n_tokens) if merged else None
    panels = []
    for view in layout.views:
        ids = view.tokens.reshape(-1) if view.newlines is None else np.concatenate([view.tokens.reshape(-1),
                                                                                     view.newlines])
        note = f"{view.name}: {int(mask[ids].sum())}/{ids.size} kept"
        panel = render_view(image, view, mask, size=size, dim=dim, scores=scores, owner=owner)
        panels.append(titled(panel, note))
    row = hstack(panels, gap=6)
    return titled(row, title) if title else row


def picture(images: Image.Image | Sequence[Image.Image], record: Any, sample: int = 0, stage: int = -1, *,
            size: int = 256, dim: float = 0.25, scores: bool = False, merged: bool = True,
            config: Any = None) -> Image.Image:
    """The kept tokens of every image of ``sample`` after ``stage`` (default: the last), as one PIL image.

    ``scores``: overlay the method's scores (needs ``apply(..., record_scores=True)``); when ``stage`` has none (it
    selects without a per-token score, as CATP's LLM cuts), those of the last earlier stage that has them, and the
    picture says which. ``merged``: tint the sources of merged tokens (drawn on the last stage, where merging
    happens). ``config``: the model config when the record has none."""
    imgs = _images(images, record, sample)
    last = not record.stages or stage in (-1, len(record.stages) - 1)
    stage_of_scores, note = stage, None
    scored = scored_stage(record, stage) if scores else None
    if scored is not None and scored != stage % len(record.stages):
        stage_of_scores = scored
        note = f"scores of the {stage_name(record, scored)} stage ({stage_name(record, stage)} scores none)"
    rows = []
    for i, img in enumerate(imgs):
        layout = layout_of(record, img.size, sample, i, config=config)
        kept = stage_kept(record, stage, sample, i)
        sc = stage_scores(record, stage_of_scores, sample, i) if scores else None
        mg = merged_sources(record, sample, i) if merged and last else None
        title = f"image {i}" if len(imgs) > 1 else None
        rows.append(image_panels(img, layout, kept, size=size, dim=dim, scores=sc, merged=mg, title=title))
    row = hstack(rows, gap=12)
    return titled(row, note) if note else row


def stages_picture(images: Image.Image | Sequence[Image.Image], record: Any, sample: int = 0, **kw: Any) -> Image.Image:
    """One titled panel group per stage, left to right ("vision", "LLM layer 2", ...); keyword arguments as
    :func:`picture`."""
    n = max(1, len(record.stages))
    groups = [titled(picture(images, record, sample, s, **kw), stage_name(record, s)) for s in range(n)]
    return hstack(groups, gap=16)
