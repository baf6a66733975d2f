"""Compose: a vision method, then one or more LLM methods, each on the previous one's survivors, as one Pruner
(TransPrune's paper stacks VisionZip before TransPrune; FlowCut and VisionZip are often stacked with FastV).

``tokprune.Compose(vision="visionzip", llm="transprune", vision_keep=192)`` (names or instances) runs the vision
method's stage with a budget of ``vision_keep`` tokens per image, then the LLM method's stages on the survivors,
each with its own options; ``keep`` / ``keep_ratio`` given to ``apply`` is the final budget, which the last LLM
method reaches from its input by its own schedule. ``llm=("fastv", "dart")`` stacks two LLM methods (with or
without a vision method: ``vision=None``): each LLM stage asks for its own decoder signals at its own layer
(:meth:`~tokprune.pruners.base.Pruner.llm_stage_request`), so methods with different signal sources (FastV's
last-token row, DART's keys and final-norm states, PyramidDrop's probe) stack.

Semantics of a chain ``vision -> llm[0] -> ... -> llm[-1]``:

* the methods run in the order given, and every stage of a method comes before every stage of the next one
  (strictly increasing decoder layers along the chain); two methods whose stages collide on one layer, or come out
  of order, are refused at ``apply`` with the layers named (move one method's layer, or list them in layer order);
* budgets per image: the last method reaches ``keep``; each earlier part keeps twice what the part after it keeps
  (capped at the tokens it receives) unless told otherwise (``vision_keep``; ``llm_keep``: one count per LLM
  method but the last); a part never keeps fewer than the final budget;
* each LLM method sees its own part of the chain only: its schedule is built from (tokens it receives, its own
  budget), ``LLMSignals.budgets`` says the same, and its ``ctx.state`` is its own dict (two methods never read each
  other's accumulated scores);
* one position mode runs a prefill: the vision method's (else the first LLM method's); one ``score_dtype`` (the
  composition's own) for the taps of every stage.

``apply(model, "visionzip+transprune", keep=64)`` builds one with every method's defaults; a name of three parts
(``"visionzip+fastv+dart"``) or of two LLM methods (``"fastv+pdrop"``) stacks them the same way (the first part is
the vision method when its class declares a vision stage).
"""

from __future__ import annotations

import dataclasses
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
    """Whether ``name`` is two or more ``known`` method names joined by ``+`` (``"visionzip+transprune"``,
    ``"fastv+dart"``, ``"visionzip+fastv+dart"``)."""
    parts = name.split(JOIN)
    return len(parts) >= 2 and all(p in known for p in parts)


def declares_vision_stage(p: Pruner) -> bool:
    """Whether a method's class declares a vision stage or an in-encoder cut (how a composed name's first part is
    told to be the vision method before any model is known; ``check`` verifies it on the model)."""
    cls = type(p)
    return cls.vision_request is not Pruner.vision_request or cls.encoder_cut is not Pruner.encoder_cut


def from_names(parts: list[Pruner]) -> dict[str, object]:
    """``Compose`` keyword arguments for methods named in chain order (see :func:`declares_vision_stage`)."""
    if declares_vision_stage(parts[0]):
        return {"vision": parts[0], "llm": tuple(parts[1:]) if len(parts) > 2 else parts[1]}
    return {"vision": None, "llm": tuple(parts)}


def _method(spec: str | Pruner, role: str) -> Pruner:
    if isinstance(spec, Pruner):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"Compose {role}= takes a method name or a Pruner instance, got {type(spec).__name__}")
    from tokprune.registry import get_method  # the built-ins are registered: this module's package imported them

    return get_method(spec)()


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int (tokens per image after that part), got {value!r}")
    return value


@dataclass
class Compose(Pruner):
    """A vision method, then one or more LLM methods, each on the previous survivors (see the module doc).

    ``vision``: a method with a vision stage and no LLM stage (cls, visionzip, hiprune, flowcut on LLaVA-1.5, ...),
    or None; ``llm``: a method with LLM stages only (fastv, pdrop, transprune, dart, sparsevlm, ...), or a tuple of
    them run in that order. ``vision_keep``: tokens per image the vision stage keeps (default: twice what the
    first LLM method keeps, at most the image's tokens); ``llm_keep``: per LLM method but the last, the tokens it
    keeps (an int when there are two). No part keeps fewer than the final budget. Records, FLOPs and ``show`` list
    every stage of every part; ``record_scores`` records each stage's scores.
    """

    summary = "a vision method followed by one or more LLM methods, each on the previous survivors"

    vision: str | Pruner | None = "cls"
    llm: str | Pruner | tuple[str | Pruner, ...] = "fastv"
    vision_keep: int | None = None
    llm_keep: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        v = None if self.vision is None else _method(self.vision, "vision")
        specs = self.llm if isinstance(self.llm, (tuple, list)) else (self.llm,)
        if not specs:
            raise ValueError("Compose llm= needs at least one LLM method")
        ms = tuple(_method(s, "llm") for s in specs)
        if v is None and len(ms) < 2:
            raise ValueError("Compose without a vision method needs two or more LLM methods, e.g. "
                             "llm=('fastv', 'dart'); for one method alone apply it directly")
        if self.vision_keep is not None:
            _count(self.vision_keep, "vision_keep")
            if v is None:
                raise ValueError("vision_keep is the vision method's budget; Compose(vision=None) has none")
        lk = () if self.llm_keep is None else (
            self.llm_keep if isinstance(self.llm_keep, (tuple, list)) else (self.llm_keep,))
        if self.llm_keep is not None and len(lk) != len(ms) - 1:
            raise ValueError(f"llm_keep gives the budget of every LLM method but the last: {len(ms) - 1} count(s) "
                             f"for {len(ms)} LLM methods, got {self.llm_keep!r}")
        self._llm_keep = tuple(_count(k, "llm_keep") for k in lk)
        for p, role in [(v, "vision"), *((m, "llm") for m in ms)]:
            if p is None:
                continue
            if isinstance(p, Compose):
                raise ValueError(f"Compose {role}= must be a single method, not another Compose")
            if p.pooled_budget:
                raise ValueError(f"{p.name} pools its budget over a prompt's images; it cannot be composed")
        self._parts = (v, ms)
        self.name = JOIN.join(p.name for p in (v, *ms) if p is not None)  # what the record and reports call it
        # newlines dropped by the vision stage never come back; without one, the first LLM method's policy
        self.keep_newlines = (v or ms[0]).keep_newlines

    @property
    def vision_method(self) -> Pruner | None:
        return self._parts[0]

    @property
    def llm_methods(self) -> tuple[Pruner, ...]:
        return self._parts[1]

    @property
    def llm_method(self) -> Pruner:
        """The last LLM method (the one that reaches the final budget)."""
        return self._parts[1][-1]

    def options(self) -> dict[str, object]:
        v, ms = self._parts
        return {"vision": v.name if v else None, "llm": [m.name for m in ms], "vision_keep": self.vision_keep,
                "llm_keep": self.llm_keep, "vision_options": v.options() if v else None,
                "llm_options": [m.options() for m in ms]}

    # ------------------------------------------------------------------ what each part runs
    def check(self, info: ModelInfo) -> None:
        v, ms = self._parts
        if v is not None:
            v.check(info)
            if v.vision_request(info) is None or v.llm_layers(info):
                raise ValueError(f"Compose vision={v.name!r} must be a method with a vision stage and no LLM stage")
        previous: tuple[str, int] | None = None
        for m in ms:
            m.check(info)
            if m.vision_request(info) is not None or m.encoder_cut(info) is not None or not m.llm_layers(info):
                raise ValueError(f"Compose llm={m.name!r} must be a method with LLM stages only")
            layers = m.llm_layers(info)
            if previous is not None and layers[0] == previous[1]:
                raise ValueError(
                    f"Compose: {previous[0]} and {m.name} both cut before decoder layer {layers[0]}; two stages cannot "
                    f"share a layer: move one of them (e.g. {m.name}'s layer option, if it has one) to a later layer")
            if previous is not None and layers[0] < previous[1]:
                raise ValueError(
                    f"Compose: {m.name} cuts before decoder layer {layers[0]}, but {previous[0]} (listed before it) "
                    f"already cuts before layer {previous[1]}; each LLM method's stages must come after the previous "
                    "method's (strictly later layers): list the methods in layer order or move one method's layer")
            previous = (m.name, layers[-1])
        super().check(info)

    def _owner(self, info: ModelInfo, layer: int) -> tuple[int, Pruner]:
        """(index in the chain, LLM method) of the stage cutting before ``layer``."""
        for i, m in enumerate(self.llm_methods):
            if layer in m.llm_layers(info):
                return i, m
        raise ValueError(f"Compose: no LLM method of {self.name} cuts before layer {layer}")

    def default_positions(self, info: ModelInfo) -> str:
        return (self.vision_method or self.llm_methods[0]).resolved_positions(info)

    def vision_request(self, info: ModelInfo) -> VisionRequest | None:
        return None if self.vision_method is None else self.vision_method.vision_request(info)

    def encoder_cut(self, info: ModelInfo) -> EncoderCut | None:
        return None if self.vision_method is None else self.vision_method.encoder_cut(info)

    def cut_encoder(self, step: EncoderStep) -> list[torch.Tensor | None]:
        return self.vision_method.cut_encoder(step)

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor | VisionDecision]:
        return self.vision_method.select_vision(signals, ks)

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return tuple(k for m in self.llm_methods for k in m.llm_layers(info))

    def llm_request(self, info: ModelInfo) -> LLMRequest | None:
        """The first stage's request; the runtime asks per stage (:meth:`llm_stage_request`)."""
        return self.llm_methods[0].llm_request(info)

    def llm_stage_request(self, info: ModelInfo, layer: int) -> LLMRequest | None:
        return self._owner(info, layer)[1].llm_stage_request(info, layer)

    def select_llm(self, signals: LLMSignals, ks: list[list[int]]) -> list:
        """The owning method's ``select_llm``, with the budgets of its part of the chain and its own ``ctx.state``."""
        i, m = self._owner(signals.ctx.info, signals.layer)
        at = i + (self.vision_method is not None)  # the method's input count in the chain
        budgets = [[tuple(self.chain(n, keep)[at: at + 2]) for n, keep in row] for row in signals.budgets]
        ctx = signals.ctx
        own = dataclasses.replace(ctx, state=ctx.state.setdefault(("compose", i), {}))
        return m.select_llm(dataclasses.replace(signals, ctx=own, budgets=budgets), ks)

    # ------------------------------------------------------------------ budgets
    def chain(self, n_visual: int, keep: int) -> list[int]:
        """Tokens per image along the chain: ``[n_visual, after the vision stage (if any), after each LLM method]``;
        the last is ``min(keep, n_visual)``."""
        v, ms = self._parts
        final = min(keep, n_visual)
        given = [self.vision_keep] if v is not None else []
        given += list(self._llm_keep) if self._llm_keep else [None] * (len(ms) - 1)
        out = [final]  # defaults from the end: twice what the next part keeps
        for want in reversed(given):
            out.insert(0, want if want is not None else 2 * out[0])
        counts, current = [n_visual], n_visual
        for k in out:
            current = min(current, max(k, final))
            counts.append(current)
        return counts

    def vision_budget(self, n_visual: int, keep: int) -> int:
        """Tokens of an image of ``n_visual`` the vision stage keeps at a final budget of ``keep``."""
        return self.chain(n_visual, keep)[1]

    def schedule(self, info: ModelInfo, n_visual: int, keep: int, keep_ratio: float | None = None) -> Schedule:
        """Each part's own schedule along :meth:`chain`: the vision method's at its budget, then each LLM method's
        from the tokens it receives to its budget (counts only: ``keep_ratio`` of the original image has no
        meaning for the survivors)."""
        v, ms = self._parts
        counts = self.chain(n_visual, keep)
        stages = []
        if v is not None:
            stages += v.schedule(info, n_visual, counts[1]).stages
        off = 1 if v is not None else 0
        for i, m in enumerate(ms):
            stages += m.schedule(info, counts[off + i], counts[off + i + 1]).stages
        return Schedule(n_visual, tuple(stages), self.budget_meaning, False)
