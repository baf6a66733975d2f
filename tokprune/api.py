"""The public entry points: apply a method to a model, remove it, scope it, inspect what was pruned."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from tokprune.config import Budget
from tokprune.patches.base import Adapter
from tokprune.patches.compat import check_transformers
from tokprune.pruners.base import Pruner
from tokprune.record import PruneRecord
from tokprune.registry import METHODS, MODELS, _load_builtins, adapter_for, get_method

ATTR = "tokprune"


class Handle:
    """What ``model.tokprune`` holds while a model is patched: the method, the budget and the last record."""

    def __init__(self, adapter: Adapter) -> None:
        self._adapter = adapter

    @property
    def pruner(self) -> Pruner:
        return self._adapter.pruner

    @property
    def budget(self) -> Budget:
        return self._adapter.budget

    @property
    def family(self) -> str:
        return self._adapter.family

    @property
    def last(self) -> PruneRecord | None:
        """The record of the last prefill (None before the first one)."""
        return self._adapter.record

    def __repr__(self) -> str:
        return f"tokprune({self.pruner.name}, {self.budget}, family={self.family})"


def make_pruner(method: str, options: dict[str, Any]) -> Pruner:
    """Build a method's dataclass from keyword options, naming the valid ones when an option is unknown."""
    cls = get_method(method)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise TypeError(f"method {method!r} has no option {', '.join(unknown)}; its options: {known}")
    return cls(**options)


def apply(model: nn.Module, method: str, keep: int | None = None, keep_ratio: float | None = None,
          **options: Any) -> nn.Module:
    """Patch ``model`` in place to prune visual tokens with ``method`` and return it.

    ``keep``: visual tokens kept per image (a count); ``keep_ratio``: fraction kept; pass exactly one.
    ``options``: the method's hyper-parameters (e.g. ``layer=2`` for FastV, ``positions="original"``) and the
    model family's options (e.g. ``tile_budget="global"`` for LLaVA-NeXT, see ``docs/families.md``).
    Applying to a patched model replaces the previous patch. Refuses a transformers release outside the tested
    window (see ``tokprune.patches.compat``), since a hook on a changed forward can be silently wrong.
    """
    check_transformers()
    budget = Budget(keep=keep, keep_ratio=keep_ratio)
    adapter_cls = adapter_for(model)
    family_options = {k: options.pop(k) for k in list(options) if k in adapter_cls.options}
    pruner = make_pruner(method, options)
    adapter = adapter_cls(model, pruner, budget, **family_options)
    fixed = getattr(adapter, "fixed_visual_tokens", lambda: None)()
    if fixed:
        budget.count(fixed)  # fail now, not at the first forward
    if is_patched(model):
        remove(model)
    adapter.install()
    setattr(model, ATTR, Handle(adapter))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: every hook and tap is removed and the model behaves exactly as before."""
    handle = getattr(model, ATTR, None)
    if isinstance(handle, Handle):
        handle._adapter.remove()
        delattr(model, ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, ATTR, None), Handle)


@contextmanager
def pruned(model: nn.Module, method: str, keep: int | None = None, keep_ratio: float | None = None,
           **options: Any) -> Iterator[nn.Module]:
    """``with tokprune.pruned(model, "fastv", keep_ratio=0.25): ...`` applies on entry and always removes on exit."""
    apply(model, method, keep=keep, keep_ratio=keep_ratio, **options)
    try:
        yield model
    finally:
        remove(model)


def last_record(model: nn.Module) -> PruneRecord | None:
    """What the last forward / generate of a patched model pruned (None before its first prefill)."""
    handle = getattr(model, ATTR, None)
    if not isinstance(handle, Handle):
        raise ValueError("this model is not patched; call tokprune.apply(model, method=..., keep=...) first")
    return handle.last


def methods() -> list[str]:
    """Names of the registered pruning methods."""
    _load_builtins()
    return sorted(METHODS)


def models() -> list[str]:
    """Names of the supported model families."""
    _load_builtins()
    return sorted(MODELS)
