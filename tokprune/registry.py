"""Registries of pruning methods and model families.

Adding a method touches only its file in ``pruners/`` (decorated with :func:`register_method`);
adding a model family touches only its file in ``patches/`` (decorated with :func:`register_model`).
A leaf: it imports no other tokprune module; ``tokprune.api`` imports the built-in methods and families, whose
decorators fill the registries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from torch import nn

    from tokprune.patches.base import Adapter
    from tokprune.pruners.base import Pruner

T = TypeVar("T")

METHODS: dict[str, type[Pruner]] = {}
MODELS: dict[str, type[Adapter]] = {}


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`~tokprune.pruners.base.Pruner` reachable as ``method=name``."""

    def deco(cls: T) -> T:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__name__}")
        cls.name = name  # type: ignore[attr-defined]
        METHODS[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def register_model(name: str) -> Callable[[T], T]:
    """Class decorator: make an :class:`~tokprune.patches.base.Adapter` handle the model classes it lists."""

    def deco(cls: T) -> T:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model family {name!r} is already registered by {MODELS[name].__name__}")
        cls.family = name  # type: ignore[attr-defined]
        MODELS[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def get_method(name: str) -> type[Pruner]:
    """The class registered as ``name`` (built-ins are registered by ``import tokprune.api``)."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def adapter_for(model: nn.Module) -> type[Adapter]:
    """The adapter class whose ``model_classes`` names the model's class (or one of its bases)."""
    names = [c.__name__ for c in type(model).__mro__]
    # most specific class first, so that a subclass adapter (e.g. Qwen2.5-VL) wins over its base family
    for cls_name in names:
        for adapter in MODELS.values():
            if cls_name in adapter.model_classes:
                return adapter
    supported = ", ".join(sorted(c for a in MODELS.values() for c in a.model_classes))
    raise TypeError(
        f"tokprune has no support for {type(model).__name__}; supported model classes: {supported}"
    )
