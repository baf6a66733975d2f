"""Built-in pruning methods, one per file; importing this package registers them."""

from tokprune.pruners import cls_attention, fastv, flowcut, hiprune, pdrop, random, transprune, visionzip  # noqa: F401
from tokprune.pruners.base import (
    LLMSignals,
    ModelInfo,
    PrefillContext,
    Pruner,
    Signal,
    UnsupportedError,
    VisionDecision,
    VisionRequest,
    VisionSignals,
)

__all__ = ["LLMSignals", "ModelInfo", "PrefillContext", "Pruner", "Signal", "UnsupportedError", "VisionDecision",
           "VisionRequest",
           "VisionSignals"]
