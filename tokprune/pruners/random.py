"""Seeded uniform random selection before the LLM: the floor every paper compares against."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from tokprune.pruners.base import ModelInfo, Pruner, VisionRequest, VisionSignals
from tokprune.registry import register_method


@register_method("random")
@dataclass
class RandomPrune(Pruner):
    """Keep a uniformly random subset of each image's visual tokens. ``seed`` makes every forward reproducible:
    each image draws from a generator seeded by ``seed`` and its index within its own prompt, so the same prompt
    keeps the same tokens whatever else is in the batch."""

    summary = "uniform random subset per image (seeded)"
    paper = "baseline"

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            if isinstance(self.seed, (bool, float, str)):
                raise TypeError
            self.seed = operator.index(self.seed)  # numpy / torch integer scalars too
        except TypeError:
            raise TypeError(f"random: seed must be an int (it seeds each image's generator), "
                            f"got {self.seed!r}") from None

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest()

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        owners = signals.owners or [(0, i) for i in range(len(signals.features))]
        return [
            torch.rand(f.shape[0], generator=torch.Generator().manual_seed(self.seed * 1_000_003 + j)).to(f.device)
            for f, (_, j) in zip(signals.features, owners)
        ]
