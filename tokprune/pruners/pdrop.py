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
    families keep their original positions."""

    summary = "progressive: next-layer q/k attention of the last instruction token, cuts before layers 8/16/24"
    paper = "PyramidDrop, arXiv 2410.17247"

    DEFAULT_LAYERS = rules.DEFAULT_LAYERS
    DEFAULT_RATIOS = rules.DEFAULT_RATIOS
    REFERENCE_DEPTH = rules.REFERENCE_DEPTH
    derives_ratios = True

    def shape(self, keep_ratio: float) -> tuple[float, ...]:
        n = len(self.layers) if self.layers is not None else len(self.DEFAULT_LAYERS)
        return tuple(keep_ratio ** ((i + 1) / n) for i in range(n))

    def llm_request(self, info: ModelInfo) -> LLMRequest:
        return LLMRequest(queries="last", source="probe", heads="mean", domain="causal")

    def llm_scores(self, signals: LLMSignals) -> torch.Tensor:
        return signals.attention
