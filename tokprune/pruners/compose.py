"""Compose: a vision method followed by an LLM method, as one Pruner (TransPrune's paper stacks VisionZip before
TransPrune; FlowCut and VisionZip are often stacked with FastV).

``tokprune.Compose(vision="visionzip", llm="transprune", vision_keep=192)`` (names or instances) runs the vision
method's stage with a budget of ``vision_keep`` tokens per image, then the LLM method's stages on the survivors,
each with its own options; ``keep`` / ``keep_ratio`` given to ``apply`` is the final budget, which the LLM method
reaches from the survivors by its own schedule. ``apply(model, "visionzip+transprune", keep=64)`` builds one with
both methods' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import (
    EncoderCut,
    EncoderStep,
    LLMRequest,
    LLMSignals,
    ModelInfo,
    Pruner,
    VisionDecision,
    VisionRequest,
    VisionSignals,
)
from tokprune.schedule import Schedule

#: how a composition is named on the command line and in ``apply``: ``"visionzip+transprune"``
JOIN = "+"


def composed_names(name: str, known: list[str] | tuple[str, ...]) -> bool:
    """Whether ``name`` is ``"<vision method>+<llm method>"`` of two ``known`` method names."""
    parts = name.split(JOIN)
    return len(parts) == 2 and all(p in known for p in parts)


def _method(spec: str | Pruner, role: str) -> Pruner:
    if isinstance(spec, Pruner):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"Compose {role}= takes a method name or a Pruner instance, got {type(spec).__name__}")
    from tokprune.registry import get_method  # the built-ins are registered: this module's package imported them

    return get_method(spec)()


@dataclass
class Compose(Pruner):
    """A vision method, then an LLM method on its survivors (see the module doc).

    ``vision``: a method with a vision stage and no LLM stage (cls, visionzip, hiprune, flowcut on LLaVA-1.5, ...);
    ``llm``: a method with LLM stages only (fastv, pdrop, transprune, ...). ``vision_keep``: tokens per image the
    vision stage keeps (default: twice the final budget, at most the image's tokens); it is never below the final
    budget. Records, FLOPs and ``show`` list every stage of both; ``record_scores`` records each stage's scores.
    One prefill runs one position mode (the vision method's) and one ``score_dtype`` (the composition's own,
    for the taps of both stages).
    """

    summary = "a vision method followed by an LLM method on its survivors"

    vision: str | Pruner = "cls"
    llm: str | Pruner = "fastv"
    vision_keep: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        v, m = _method(self.vision, "vision"), _method(self.llm, "llm")
        if self.vision_keep is not None and (isinstance(self.vision_keep, bool) or not isinstance(
                self.vision_keep, int) or self.vision_keep < 1):
            raise ValueError(f"vision_keep must be a positive int (tokens per image after the vision stage), got "
                             f"{self.vision_keep!r}")
        for p, role in ((v, "vision"), (m, "llm")):
            if isinstance(p, Compose):
                raise ValueError(f"Compose {role}= must be a single method, not another Compose")
            if p.pooled_budget:
                raise ValueError(f"{p.name} pools its budget over a prompt's images; it cannot be composed")
        self._parts = (v, m)
        self.name = f"{v.name}+{m.name}"  # what the record and reports call it
        self.keep_newlines = v.keep_newlines  # newlines dropped by the vision stage never come back

    @property
    def vision_method(self) -> Pruner:
        return self._parts[0]

    @property
    def llm_method(self) -> Pruner:
        return self._parts[1]

    def options(self) -> dict[str, object]:
        return {"vision": self.vision_method.name, "llm": self.llm_method.name, "vision_keep": self.vision_keep,
                "vision_options": self.vision_method.options(), "llm_options": self.llm_method.options()}

    # ------------------------------------------------------------------ what each part runs
    def check(self, info: ModelInfo) -> None:
        v, m = self._parts
        v.check(info)
        m.check(info)
        if v.vision_request(info) is None or v.llm_layers(info):
            raise ValueError(f"Compose vision={v.name!r} must be a method with a vision stage and no LLM stage")
        if m.vision_request(info) is not None or m.encoder_cut(info) is not None or not m.llm_layers(info):
            raise ValueError(f"Compose llm={m.name!r} must be a method with LLM stages only")
        super().check(info)

    def default_positions(self, info: ModelInfo) -> str:
        return self.vision_method.resolved_positions(info)

    def vision_request(self, info: ModelInfo) -> VisionRequest | None:
        return self.vision_method.vision_request(info)

    def encoder_cut(self, info: ModelInfo) -> EncoderCut | None:
        return self.vision_method.encoder_cut(info)

    def cut_encoder(self, step: EncoderStep) -> list[torch.Tensor | None]:
        return self.vision_method.cut_encoder(step)

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor | VisionDecision]:
        return self.vision_method.select_vision(signals, ks)

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return self.llm_method.llm_layers(info)

    def llm_request(self, info: ModelInfo) -> LLMRequest | None:
        return self.llm_method.llm_request(info)

    def select_llm(self, signals: LLMSignals, ks: list[list[int]]) -> list[list[torch.Tensor]]:
        return self.llm_method.select_llm(signals, ks)

    # ------------------------------------------------------------------ budgets
    def vision_budget(self, n_visual: int, keep: int) -> int:
        """Tokens of an image of ``n_visual`` the vision stage keeps at a final budget of ``keep``."""
        want = self.vision_keep if self.vision_keep is not None else 2 * keep
        return min(n_visual, max(want, keep))

    def schedule(self, info: ModelInfo, n_visual: int, keep: int, keep_ratio: float | None = None) -> Schedule:
        """The vision method's schedule at :meth:`vision_budget`, then the LLM method's on the survivors (counts
        only: ``keep_ratio`` of the original image has no meaning for the survivors)."""
        k0 = self.vision_budget(n_visual, keep)
        first = self.vision_method.schedule(info, n_visual, k0)
        then = self.llm_method.schedule(info, k0, min(keep, k0))
        return Schedule(n_visual, (*first.stages, *then.stages), self.budget_meaning, False)
