"""Budgets as a schedule: how many visual tokens of an image survive each stage of a method.

A method's schedule is one pure function of the method (:meth:`tokprune.Pruner.schedule`) of the model's
:class:`~tokprune.pruners.base.ModelInfo`, an image's token count and the user's per-image ``keep`` (the count a
``keep`` / ``keep_ratio`` budget resolves to). The adapters run it (and raise when a stage returns another count),
``tokprune.flops`` counts it, and the docs print it: one definition for all three. Plain data, no torch, so any
layer of the package may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: what ``keep`` means for a method: the count after its last stage ("final"), the average over the LLM layers
#: ("layer_average", PyramidDrop-style budgets) or a FLOPs-matched count ("flops")
MEANINGS = ("final", "layer_average", "flops")
KINDS = ("vision", "llm")


@dataclass(frozen=True)
class StageBudget:
    """One stage: ``kind`` "vision" (before the LLM, ``layer`` None) or "llm" (before decoder layer ``layer``);
    ``keep``: the image's visual tokens that survive it (content tokens; special tokens ride on top).
    ``at_most``: ``keep`` is an upper bound, not the exact count (a vision stage whose survivors are decided inside
    the encoder and depend on the image, FlowCut on LLaVA-NeXT: per-tile cuts, then the unpadding); the adapter
    then checks ``<= keep`` and a later LLM stage keeps ``min(its keep, the tokens alive)``. FLOPs plans use the
    bound."""

    kind: str
    layer: int | None
    keep: int
    at_most: bool = False


@dataclass(frozen=True)
class Schedule:
    """The per-stage budgets of one image of ``n_visual`` tokens; ``meaning``: one of :data:`MEANINGS`.

    ``pooled``: each stage's budgets are pooled over the images of a prompt (CATP): the method may move tokens
    between a row's images, and the adapter checks the row's total instead of each image's count.
    ``special``: special tokens of the image (LLaVA-NeXT's row newlines, part of ``n_visual``) that the method keeps
    on top of every stage's content budget, so the LLM sees ``min(keep, n_visual - special) + special`` tokens.
    ``note``: what ``keep`` means for this schedule when :attr:`meaning` alone would mislead (CATP on one image
    keeps its stage-1 count, not ``keep``); :meth:`describe` prints it instead.
    """

    n_visual: int
    stages: tuple[StageBudget, ...]
    meaning: str = "final"
    pooled: bool = False
    special: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        if self.meaning not in MEANINGS:
            raise ValueError(f"budget meaning must be one of {MEANINGS}, got {self.meaning!r}")
        prev = self.n_visual
        for st in self.stages:
            if st.kind not in KINDS:
                raise ValueError(f"stage kind must be one of {KINDS}, got {st.kind!r}")
            if not 0 <= st.keep <= prev:
                raise ValueError(f"a stage keeps {st.keep} tokens after {prev}: budgets never grow along a schedule")
            prev = st.keep
        if [st.kind for st in self.stages].count("vision") > 1 or (
                self.stages and "vision" in [st.kind for st in self.stages[1:]]):
            raise ValueError("a schedule has at most one vision stage, and it comes first")

    def keep_of(self, kind: str, index: int = 0) -> int:
        """Budget of the ``index``-th stage of ``kind``."""
        return [st.keep for st in self.stages if st.kind == kind][index]

    def plan(self) -> list[tuple[int, int]]:
        """(LLM layer from which the count applies, visual tokens the LLM sees) per stage, kept special tokens
        included; a vision stage applies from 0."""
        content = self.n_visual - self.special
        return [(0 if st.kind == "vision" else int(st.layer), min(st.keep, content) + self.special)
                for st in self.stages]

    def describe(self) -> str:
        parts = [f"{'at most ' if st.at_most else ''}{st.keep} "
                 f"{'before the LLM' if st.kind == 'vision' else f'before LLM layer {st.layer}'}"
                 for st in self.stages]
        extra = f", plus {self.special} newlines kept at every stage" if self.special else ""
        meaning = self.note or f"keep means the {self.meaning.replace('_', ' ')} count"
        return f"{self.n_visual} -> " + ", ".join(parts) + f" ({meaning}{extra})"
