"""What one grid cell does to the model: nothing (unpruned), a tokprune method, or the downsample baseline.

A :class:`Variant` is entered as a context manager around the cell's predictions and always restores the model.
``encode_kwargs`` tells the predictor how to build inputs (the downsample baseline shrinks the image before the
LLM: Qwen's dynamic resolution is asked for fewer pixels; LLaVA's fixed grid of projected tokens is average-pooled
to a smaller grid, 2x2 pooling at 25%, with the prompt carrying that many image tokens).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tokprune.config import Budget

UNPRUNED = "unpruned"
DOWNSAMPLE = "downsample"
#: baselines every grid includes besides the unpruned model
BASELINES = ("random", DOWNSAMPLE)


@dataclass(frozen=True)
class Variant:
    """A method at a budget (``method=None``: unpruned). ``options`` are the method's keyword options."""

    method: str | None = None
    keep: int | None = None
    keep_ratio: float | None = None
    options: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def name(self) -> str:
        return self.method or UNPRUNED

    def budget(self) -> Budget:
        return Budget(keep=self.keep, keep_ratio=self.keep_ratio)

    def start(self, bundle: Any, n_visual: int | None) -> tuple[dict[str, Any], Callable[[], None]]:
        """Patch ``bundle.model`` for this variant: ``(the predictor's encode options, undo)``."""
        if self.method is None:
            return {}, lambda: None
        if self.method == DOWNSAMPLE:
            return downsample(bundle, self.budget(), n_visual)
        import tokprune

        tokprune.apply(bundle.model, self.method, keep=self.keep, keep_ratio=self.keep_ratio, **dict(self.options))
        return {}, lambda: tokprune.remove(bundle.model)

    @contextmanager
    def active(self, bundle: Any, n_visual: int | None) -> Iterator[dict[str, Any]]:
        """:meth:`start` as a context manager that always undoes the patch."""
        options, undo = self.start(bundle, n_visual)
        try:
            yield options
        finally:
            undo()


def pooled_grid(keep: int, rows: int, cols: int) -> tuple[int, int]:
    """The pooled grid with at most ``keep`` tokens that is closest to square: 16 of 8x8 -> 4x4 (2x2 pooling)."""
    a = max(1, min(rows, math.isqrt(keep)))
    return a, max(1, min(cols, keep // a))


def downsample(bundle: Any, budget: Budget, n_visual: int | None) -> tuple[dict[str, Any], Callable[[], None]]:
    """The downsample baseline at ``budget`` (see the module docstring): ``(encode options, undo)``."""
    family = bundle.family
    if family in ("qwen2_vl", "qwen2_5_vl"):
        ip = bundle.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        if budget.keep is not None:
            target = budget.keep
        else:
            if n_visual is None:
                raise ValueError("downsample with keep_ratio needs the unpruned visual token count")
            target = budget.count(n_visual)
        size = {"shortest_edge": factor * factor, "longest_edge": max(1, target) * factor * factor}
        return {"processor_kwargs": {"size": size}}, lambda: None
    if family != "llava":
        raise ValueError(f"the downsample baseline is defined for llava and qwen2_vl models, not {family}")
    if n_visual is None:
        raise ValueError("downsample on LLaVA needs the visual token count of one image")
    side = math.isqrt(n_visual)
    if side * side != n_visual:
        raise ValueError(f"downsample on LLaVA needs a square token grid, got {n_visual} tokens")
    rows, cols = pooled_grid(budget.count(n_visual), side, side)

    def pool(module: Any, args: Any, out: Any) -> Any:
        import torch.nn.functional as F

        b, n, d = out.shape
        grid = out.transpose(1, 2).reshape(b, d, side, side)
        return F.adaptive_avg_pool2d(grid, (rows, cols)).reshape(b, d, rows * cols).transpose(1, 2)

    handle = bundle.model.model.multi_modal_projector.register_forward_hook(pool)
    return {"image_tokens": rows * cols}, handle.remove


def supports_flops_ratio(method: str) -> bool:
    """Whether a method takes a ``flops_ratio`` budget (a field of its dataclass)."""
    if method == DOWNSAMPLE or "+" in method:  # a composition's budget is its final count or kept fraction
        return False
    from tokprune.registry import get_method

    return any(f.name == "flops_ratio" for f in dataclasses.fields(get_method(method)))
