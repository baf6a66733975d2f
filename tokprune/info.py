"""What a pruner may know about a model (:class:`~tokprune.pruners.base.ModelInfo`), read without patching it.

The home of :func:`model_info`, shared by ``tokprune.apply``, the budget solver, the FLOPs plans and the CLI; it
imports the family registry, never :mod:`tokprune.api`, so nothing that ``api`` imports has to import ``api``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

import tokprune.patches  # noqa: F401  (registers the built-in model families)
from tokprune.pruners.base import ModelInfo
from tokprune.registry import adapter_for


def model_info(model_or_config: Any) -> ModelInfo:
    """What a pruner may know about a model, read by its family adapter; a transformers config (or a shipped
    config name) is built on the meta device first, so no weights are needed."""
    model = model_or_config
    if not isinstance(model, nn.Module):
        from tokprune.configs import build_model, load

        config = load(model) if isinstance(model, str) else model
        model = build_model(config, device="meta")
    return adapter_for(model).describe(model)
