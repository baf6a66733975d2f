"""tokprune: training-free visual-token pruning for multimodal LLMs, one line on a Hugging Face model.

    model = tokprune.apply(model, method="cls", keep=64)

Names are imported lazily, so ``import tokprune.kernels`` does not load transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply": "tokprune.api",
    "remove": "tokprune.api",
    "pruned": "tokprune.api",
    "is_patched": "tokprune.api",
    "last_record": "tokprune.api",
    "methods": "tokprune.api",
    "models": "tokprune.api",
    "Budget": "tokprune.config",
    "Compose": "tokprune.pruners.compose",
    "Pruner": "tokprune.pruners.base",
    "UnsupportedError": "tokprune.pruners.base",
    "PruneRecord": "tokprune.record",
    "Stage": "tokprune.record",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from tokprune.api import apply, is_patched, last_record, methods, models, pruned, remove  # noqa: F401
    from tokprune.config import Budget  # noqa: F401
    from tokprune.pruners.base import Pruner, UnsupportedError  # noqa: F401
    from tokprune.pruners.compose import Compose  # noqa: F401
    from tokprune.record import PruneRecord, Stage  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
