"""Built-in pruning methods, one per file; importing this package registers them."""

from tokprune.pruners import (  # noqa: F401
    catp,
    cdpruner,
    cls_attention,
    dart,
    divprune,
    fastv,
    flowcut,
    hiprune,
    pdrop,
    random,
    sparsevlm,
    transprune,
    vflowopt,
    visionzip,
    vispruner,
)
from tokprune.pruners.base import (
    LLMDecision,
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

__all__ = ["LLMDecision", "LLMSignals", "ModelInfo", "PrefillContext", "Pruner", "Signal", "UnsupportedError",
           "VisionDecision", "VisionRequest", "VisionSignals"]
