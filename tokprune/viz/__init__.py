"""See what a pruner kept: the image with the dropped tokens' regions dimmed, for every supported family.

    rec = tokprune.last_record(model)
    tokprune.viz.picture(image, rec)                 # last stage (PIL image; shows inline in Jupyter)
    tokprune.viz.stages_picture(image, rec)          # one panel per stage of a progressive method
    tokprune.viz.picture(image, rec, scores=True)    # with apply(..., record_scores=True): the method's scores
    tokprune.viz.compare(model, processor, image, ["cls", "random"], [64, 32])   # methods x budgets
    tokprune.viz.save(pic, "kept.svg"); tokprune.viz.figure(pic)                 # file / matplotlib figure

Modules, one job each: :mod:`~tokprune.viz.layout` (token index -> image region per family),
:mod:`~tokprune.viz.draw` (pixels of one view), :mod:`~tokprune.viz.panels` (record -> pictures),
:mod:`~tokprune.viz.compare` (methods x budgets), :mod:`~tokprune.viz.figure` (matplotlib, PNG/SVG),
:mod:`~tokprune.viz.grid` (plain square grids and text masks, no model config needed).
"""

from tokprune.viz.compare import budget_of, compare, prompt_for, run_once
from tokprune.viz.compose import hstack, titled, vstack
from tokprune.viz.draw import PALETTE, render_view
from tokprune.viz.figure import figure, save
from tokprune.viz.grid import kept_mask, kept_picture, kept_text, side_by_side
from tokprune.viz.layout import Layout, View, clip_layout, layout_of, next_layout, qwen_layout
from tokprune.viz.panels import image_panels, merged_sources, picture, stage_name, stages_picture

__all__ = [
    "PALETTE", "Layout", "View", "budget_of", "clip_layout", "compare", "figure", "hstack", "image_panels",
    "kept_mask", "kept_picture", "kept_text", "layout_of", "merged_sources", "next_layout", "picture", "prompt_for",
    "qwen_layout", "render_view", "run_once", "save", "side_by_side", "stage_name", "stages_picture", "titled",
    "vstack",
]
