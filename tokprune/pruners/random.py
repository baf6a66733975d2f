"""Seeded uniform random selection before the LLM: the floor every paper compares against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import ModelInfo, Pruner, VisionRequest, VisionSignals
from tokprune.registry import register_method


@register_method("random")
@dataclass
class RandomPrune(Pruner):
    """Keep a uniformly random subset of each image's visual tokens. ``seed`` makes every forward reproducible:
    the generator is re-seeded at each prefill, so the same input always keeps the same tokens."""

    summary = "uniform random subset per image (seeded)"
    paper = "baseline"

    seed: int = 0

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest()

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.rand(f.shape[0], generator=gen).to(f.device) for f in signals.features]
