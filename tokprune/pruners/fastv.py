"""FastV: drop visual tokens before LLM layer K by the last prompt token's attention in layer K-1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import LLMRequest, LLMSignals, ModelInfo, Pruner
from tokprune.registry import register_method


@register_method("fastv")
@dataclass
class FastV(Pruner):
    """FastV (ECCV'24): at the entry of decoder layer ``layer`` (K, default 2) keep the visual tokens that the
    last prompt token attends to most in layer K-1 (head mean, softmax over the whole causal row).
    Survivors keep their original positions by default, as in the paper's code."""

    summary = "last prompt token's head-mean attention in LLM layer K-1; drop before layer K"
    paper = "FastV, arXiv 2403.06764"

    #: ``tokprune tune``: the cut layer K (the paper ablates K = 2, 3; later layers cost more at a layer-averaged
    #: budget, which the tuner pays for with fewer final tokens)
    search_space = {"layer": ("int", 1, 3)}

    layer: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"fastv: layer must be an int, got {self.layer!r}")

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return (self.layer,)

    def llm_request(self, info: ModelInfo) -> LLMRequest:
        return LLMRequest(queries="last", source="previous", heads="mean", domain="causal")

    def default_positions(self, info: ModelInfo) -> str:
        return "original"

    def llm_scores(self, signals: LLMSignals) -> torch.Tensor:
        return signals.attention
