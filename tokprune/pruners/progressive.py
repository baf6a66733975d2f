"""Shared budgets of the progressive in-LLM methods (PyramidDrop, TransPrune): several cuts inside the decoder,
each keeping a fraction of the image's *original* visual tokens.

A method here has ``layers`` (0-based decoder layers before which tokens are dropped; None: the paper's, scaled to
the model's depth), ``ratios`` (the kept fraction of the original tokens after each cut; None: the method's shape
for the budget) and ``flops_ratio`` (a budget given as the fraction of the unpruned LLM FLOPs, solved at ``apply``
by :mod:`tokprune.budget_solver`). The user's ``keep`` is always the count after the *last* cut; an earlier cut
keeps ``floor(n * ratio)`` (the reference's ``int()``), never fewer than ``keep``.

Counts as the references compute them: every stage keeps ``int(N * r_s)`` of the image's *original* N. A
``keep_ratio`` r becomes the final count ``floor(N r)`` (not the nearest count, :attr:`ratio_rounding`), and the
earlier stages derive from r itself, not from the rounded final count (N = 300: PyramidDrop 150 / 75 / 37,
TransPrune 262 / 187 / 37; N = 604: TransPrune 528 / 377 / 75). A ``keep`` count derives them from ``keep / N``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tokprune.pruners.base import ModelInfo, Pruner
from tokprune.schedule import Schedule

#: float noise guard for ratios computed here (``0.125 ** (2/3)`` is not exactly 0.25 on every platform)
TOLERANCE = 1e-9


@dataclass
class Progressive(Pruner):
    """Base of progressive methods; subclasses set the class defaults below and :meth:`shape`."""

    #: the paper's cut layers on a ``REFERENCE_DEPTH``-layer LLM, and its kept fractions
    DEFAULT_LAYERS = ()
    DEFAULT_RATIOS = ()
    REFERENCE_DEPTH = 32

    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    flops_ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            if any(isinstance(x, bool) or not isinstance(x, int) for x in self.layers):
                raise TypeError(f"{self.name}: layers must be ints, got {self.layers!r}")
            self.layers = tuple(self.layers)
        if self.ratios is not None:
            r = tuple(float(x) for x in self.ratios)
            if not r or any(not 0 < x <= 1 for x in r) or any(b > a for a, b in zip(r, r[1:])):
                raise ValueError(f"{self.name}: ratios must be non-increasing fractions in (0, 1], got {self.ratios}")
            self.ratios = r
            n_layers = len(self.layers) if self.layers is not None else len(self.DEFAULT_LAYERS)
            if len(r) != n_layers:
                raise ValueError(f"{self.name}: {len(r)} ratios for {n_layers} cut layers; give one ratio per layer")
        elif self.layers is not None and len(self.layers) != len(self.DEFAULT_LAYERS) and not self.derives_ratios:
            raise ValueError(f"{self.name}: {len(self.layers)} cut layers need their ratios (one per layer)")
        if self.flops_ratio is not None:
            f = self.flops_ratio
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise ValueError(f"{self.name}: flops_ratio is the fraction of the unpruned LLM FLOPs, in (0, 1]; "
                                 f"got {f!r}")

    #: whether :meth:`shape` derives ratios for any number of cuts from the budget (PyramidDrop's geometric rule)
    derives_ratios = False

    # ------------------------------------------------------------------ layers
    def scaled_layers(self, depth: int) -> tuple[int, ...]:
        """The paper's layers at the same relative depth: ``round(l * depth / REFERENCE_DEPTH)``, pushed up by one
        where two would collide (a 4-layer LLM: 1, 2, 3)."""
        out: list[int] = []
        for x in self.DEFAULT_LAYERS:
            v = round(x * depth / self.REFERENCE_DEPTH)
            out.append(max(v, out[-1] + 1) if out else max(v, 1))
        if out[-1] >= depth:
            raise ValueError(f"{self.name}: the default layers {self.DEFAULT_LAYERS} do not fit a {depth}-layer LLM; "
                             "pass layers= explicitly")
        return tuple(out)

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return self.layers if self.layers is not None else self.scaled_layers(info.llm_layers)

    # ------------------------------------------------------------------ budgets
    def shape(self, keep_ratio: float) -> tuple[float, ...]:
        """Kept fractions per cut for a final kept fraction ``keep_ratio`` when no ``ratios`` are given."""
        raise NotImplementedError

    def stage_ratios(self, keep_ratio: float) -> tuple[float, ...]:
        return self.ratios if self.ratios is not None else self.shape(keep_ratio)

    #: a ``keep_ratio`` r keeps ``int(N * r)`` (the references' count), not the nearest count
    ratio_rounding = "floor"

    def stage_budget(self, stage: int, n_visual: int, keep: int, keep_ratio: float | None = None) -> int:
        """Tokens after cut ``stage``: ``floor(N * r_s)`` of the original N with the ratios of the budget
        (``keep_ratio`` when the budget was a ratio, else ``keep / N``), never fewer than ``keep``; the last: keep."""
        if keep >= n_visual:
            return n_visual
        ratios = self.stage_ratios(keep / n_visual if keep_ratio is None else keep_ratio)
        if stage >= len(ratios) - 1:
            return keep
        tol = 0.0 if self.ratios is not None else TOLERANCE
        return max(keep, math.floor(n_visual * ratios[stage] + tol))

    def schedule(self, info: ModelInfo, n_visual: int, keep: int, keep_ratio: float | None = None) -> Schedule:
        base = super().schedule(info, n_visual, keep)
        if keep_ratio is None or keep >= n_visual:
            return base
        stages, current = [], n_visual
        for s, st in enumerate(base.stages):
            current = min(current, self.stage_budget(s, n_visual, keep, keep_ratio))
            stages.append(dataclasses.replace(st, keep=current))
        return dataclasses.replace(base, stages=tuple(stages))

    def default_keep_ratio(self) -> float | None:
        """The final kept fraction when no budget is given: the last explicit ratio, else the paper's."""
        if self.ratios is not None:
            return self.ratios[-1]
        return self.DEFAULT_RATIOS[-1] if self.DEFAULT_RATIOS else None
