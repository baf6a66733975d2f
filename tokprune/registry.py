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
#: the base class of every method, named, not imported (this module is a leaf)
PRUNER = "tokprune.pruners.base.Pruner"

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
    """The class registered as ``name`` (built-ins are registered by ``import tokprune.api``), or, for
    ``"package.module:ClassName"``, a user's :class:`~tokprune.Pruner` subclass imported from there
    (:func:`import_method`)."""
    if isinstance(name, str) and name not in METHODS and is_import_path(name):
        return import_method(name)
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}, or "
                         "package.module:ClassName for a Pruner class of your own")
    return METHODS[name]


def is_import_path(name: str) -> bool:
    """Whether ``name`` reads ``package.module:ClassName`` (a user's method, not a registered name)."""
    module, sep, attr = name.partition(":")
    return bool(sep and attr.isidentifier() and all(p.isidentifier() for p in module.split(".")))


def import_method(path: str) -> type[Pruner]:
    """Import the Pruner class at ``package.module:ClassName`` and register it under that path, so every entry
    point that takes a method name (``tokprune.apply``, ``tokprune eval --methods``, lmms-eval's ``method=``)
    runs a researcher's method without editing tokprune. The module is looked up on ``sys.path`` and, as
    ``python -m`` would, in the current directory. Its dataclass fields are the method's options."""
    import importlib
    import os
    import sys

    module_name, _, attr = path.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ValueError(f"method {path!r}: no module {e.name!r} on the Python path or in {cwd}") from None
        raise
    finally:
        if added:
            sys.path.remove(cwd)
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and any(f"{c.__module__}.{c.__qualname__}" == PRUNER for c in cls.__mro__)):
        what = "has no attribute" if cls is None else "is not a tokprune.Pruner subclass:"
        raise ValueError(f"method {path!r}: {module_name} {what} {attr}" + ("" if cls is None else f" ({cls!r})"))
    known = next((n for n, c in METHODS.items() if c is cls), None)
    if known is not None:  # the module registered it itself (@register_method): it keeps that name
        return cls
    cls.name = path  # type: ignore[attr-defined]
    METHODS[path] = cls
    return cls


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
