"""Seeded uniform random selection before the LLM: the floor every paper compares against."""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass

import torch

from tokprune.pruners.base import ModelInfo, Pruner, Signal, VisionRequest, VisionSignals
from tokprune.registry import register_method

SEED_BY = ("index", "content")
PIXELS = Signal("pixels")


def content_key(pixels: torch.Tensor) -> int:
    """A 63-bit key of an image's pixels that does not depend on how they are laid out: the histogram of its
    un-normalised values rounded to 8 bits (NaN slots, e.g. a [CLS] slot, ignored). Two runtimes that feed the same
    image through the same processor get the same key even when their float rounding or patch order differ."""
    x = pixels.detach().float().flatten()
    x = x[~torch.isnan(x)]
    q = (x * 255).round().clamp(0, 255).to(torch.long).cpu()
    hist = torch.bincount(q, minlength=256).to(torch.int64).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(hist, digest_size=8).digest(), "little") >> 1


@register_method("random")
@dataclass
class RandomPrune(Pruner):
    """Keep a uniformly random subset of each image's visual tokens. ``seed`` makes every forward reproducible.

    ``seed_by="index"`` (default): each image draws from a generator seeded by ``seed`` and its index within its own
    prompt, so the same prompt keeps the same tokens whatever else is in the batch. ``seed_by="content"``: seeded by
    ``seed`` and the image's pixels (:func:`content_key`), so an image keeps the same tokens wherever it appears;
    this is what a serving engine that caches encoder outputs by image content needs (the vLLM plugin), and it
    gives the same kept sets in both runtimes."""

    summary = "uniform random subset per image (seeded)"
    paper = "baseline"

    seed: int = 0
    seed_by: str = "index"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed_by not in SEED_BY:
            raise ValueError(f"random: seed_by must be one of {SEED_BY}, got {self.seed_by!r}")
        try:
            if isinstance(self.seed, (bool, float, str)):
                raise TypeError
            self.seed = operator.index(self.seed)  # numpy / torch integer scalars too
        except TypeError:
            raise TypeError(f"random: seed must be an int (it seeds each image's generator), "
                            f"got {self.seed!r}") from None

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest((PIXELS,) if self.seed_by == "content" else ())

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        if self.seed_by == "content":
            keys = [content_key(px) for px in signals[PIXELS]]
        else:
            owners = signals.owners or [(0, i) for i in range(len(signals.features))]
            keys = [j for _, j in owners]
        seeds = [(self.seed * 1_000_003 + key) % (1 << 63) for key in keys]
        return [torch.rand(f.shape[0], generator=torch.Generator().manual_seed(s)).to(f.device)
                for f, s in zip(signals.features, seeds)]
