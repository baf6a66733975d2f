"""A pruning method of your own, benchmarked without editing tokprune: keep the visual tokens whose projected
features have the largest L2 norm.

    tokprune eval --model llava-shapes --methods examples.norm_prune:FeatureNorm --keep 8 --tasks shapes \\
                  --limit 100 --out runs/mine
    lmms-eval --model tokprune --tasks pope --verbosity DEBUG \\
              --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=examples.norm_prune:FeatureNorm,keep=64

A method is a dataclass subclass of :class:`tokprune.Pruner`; its fields are its options (``largest`` here, set
with ``largest=false`` in lmms-eval's ``model_args`` or ``tokprune.apply(..., largest=False)``). This one scores
tokens before the LLM (``vision_request``), so it runs on every supported family; ``tokprune`` does the selection,
the sequence rewrite, positions, the KV cache and the FLOPs record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune import Pruner
from tokprune.pruners.base import ModelInfo, VisionRequest, VisionSignals


@dataclass
class FeatureNorm(Pruner):
    """Keep the ``keep`` visual tokens of each image with the largest (``largest=False``: smallest) feature norm."""

    summary = "largest L2 norm of the projected visual tokens (an example of a user's method)"
    paper = "none: an example"

    largest: bool = True

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest()  # the projected features alone: no attention signal needed

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        """One score per token of each image: higher is kept first."""
        sign = 1.0 if self.largest else -1.0
        return [sign * f.float().norm(dim=-1) for f in signals.features]
