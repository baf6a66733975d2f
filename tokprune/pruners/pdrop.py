"""PyramidDrop: progressive drops inside the LLM, ranked by the last instruction token's attention with the next
layer's q/k (rules: :mod:`tokprune.rules.pdrop`; code-vs-paper choices: docs/rules.md, docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import LLMRequest, LLMSignals, ModelInfo
from tokprune.pruners.progressive import Progressive
from tokprune.registry import register_method
from tokprune.rules import pdrop as rules


@register_method("pdrop")
@dataclass
class PyramidDrop(Progressive):
    """PyramidDrop (CVPR'25): before 0-based decoder layers ``layers`` (default 8, 16, 24 on a 32-layer LLM, the
    same relative depths elsewhere) keep ``ratios`` of the original image tokens (default 0.5, 0.25, 0.125),
    ranked by the last prompt token's head-mean attention computed with the *next* layer's norm, q/k and RoPE on
    the current hidden states (softmax over the whole causal row). ``keep_ratio=r`` without ratios gives the
    geometric stages ``r^(1/3), r^(2/3), r``; ``keep`` is always the count after the last cut. Survivors are
    re-indexed contiguously by default (the reference; decode positions shift down by the dropped count); M-RoPE
    families keep their original positions.

    ``lam`` (the paper's lambda, the kept fraction from one stage to the next; what ``tokprune tune`` searches, in
    [0.3, 0.95]): stage i keeps ``max(r, lam^i)`` of the original tokens and the last one ``r``, the final
    budget; without a budget ``r = lam^n`` (``lam=0.5``: the paper's 0.5, 0.25, 0.125). Not with ``ratios``. At a
    fixed layer-averaged cost it moves tokens between early and late layers, which ``keep_ratio`` alone cannot
    (its stages are always ``r^(i/n)``)."""

    summary = "progressive: next-layer q/k attention of the last instruction token, cuts before layers 8/16/24"
    paper = "PyramidDrop, arXiv 2410.17247"

    DEFAULT_LAYERS = rules.DEFAULT_LAYERS
    DEFAULT_RATIOS = rules.DEFAULT_RATIOS
    REFERENCE_DEPTH = rules.REFERENCE_DEPTH
    derives_ratios = True
    search_space = {"lam": ("float", 0.3, 0.95)}

    lam: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam is not None:
            if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0 < self.lam <= 1:
                raise ValueError(f"pdrop: lam is the kept fraction from one stage to the next, in (0, 1]; "
                                 f"got {self.lam!r}")
            if self.ratios is not None:
                raise ValueError("pdrop: pass lam or ratios (or schedule=), not both")
            self.lam = float(self.lam)

    def _cuts(self) -> int:
        return len(self.layers) if self.layers is not None else len(self.DEFAULT_LAYERS)

    def shape(self, keep_ratio: float) -> tuple[float, ...]:
        n = self._cuts()
        if self.lam is not None:
            return tuple(max(keep_ratio, self.lam ** (i + 1)) for i in range(n - 1)) + (keep_ratio,)
        return tuple(keep_ratio ** ((i + 1) / n) for i in range(n))

    def default_keep_ratio(self) -> float | None:
        if self.lam is not None and self.ratios is None:
            return self.lam ** self._cuts()
        return super().default_keep_ratio()

    def llm_request(self, info: ModelInfo) -> LLMRequest:
        return LLMRequest(queries="last", source="probe", heads="mean", domain="causal")

    def llm_scores(self, signals: LLMSignals) -> torch.Tensor:
        return signals.attention
