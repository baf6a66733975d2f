"""tokprune: training-free visual-token pruning for multimodal LLMs, one line on a Hugging Face model.

    model = tokprune.apply(model, method="cls", keep=64)
"""

from tokprune.api import apply, is_patched, last_record, methods, models, pruned, remove
from tokprune.config import Budget
from tokprune.pruners.base import Pruner, UnsupportedError
from tokprune.record import PruneRecord, Stage

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "PruneRecord",
    "Pruner",
    "Stage",
    "UnsupportedError",
    "apply",
    "is_patched",
    "last_record",
    "methods",
    "models",
    "pruned",
    "remove",
]
