"""``copy.deepcopy`` of a patched model: a copy that carries its own patch, not the original's.

A plain deep copy of a patched model copies the hooks and the adapter behind them consistently (the copy module's
memo maps the model to its copy), but not the rest of what a patch is: functions installed on modules (LLaVA-NeXT's
``pack_image_features`` wrapper) are shared with the original, the attention-tap registry does not know the copy's
modules, and per-thread state cannot be copied at all. :class:`PatchedCopy` sits on a patched model as its
``__deepcopy__`` (the copy module looks it up on the instance) and makes the copy by the default reduction, with
every ``threading.local`` of tokprune's objects replaced by a fresh one; ``finish`` then re-installs the copied patch
on the copy (see ``tokprune.api``), so the copy's hooks, taps and wrappers are its own.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

#: the instance attribute ``copy.deepcopy`` looks up
HOOK = "__deepcopy__"


class PatchedCopy:
    """``model.__deepcopy__`` while ``model`` is patched: ``copy.deepcopy(model)`` returns ``finish(copy, memo)``.
    Holds the model weakly (a patched model dropped without ``tokprune.remove`` is still collected)."""

    def __init__(self, model: nn.Module, root: Any, finish: Callable[[nn.Module], None]) -> None:
        self._model = weakref.ref(model)
        self._root = root  # tokprune's object for this patch (its Handle): its thread-locals are copied fresh
        self._finish = finish

    def __call__(self, memo: dict) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the patched model this copy hook belongs to no longer exists")
        fresh_thread_locals(self._root, memo)
        func, args, state, *rest = model.__reduce_ex__(4)
        state = dict(state)
        state.pop(HOOK, None)  # the copy gets its own hook from finish
        clone = copy._reconstruct(model, memo, func, args, state, *rest)
        self._finish(clone)
        return clone

    def __deepcopy__(self, memo: dict) -> None:
        return None  # never copied along: the copy gets a hook of its own from ``finish``


def fresh_thread_locals(root: Any, memo: dict) -> None:
    """Seed the deep-copy ``memo`` so that every ``threading.local`` held by tokprune's objects reachable from
    ``root`` (attributes of objects defined in tokprune) copies as a new, empty one: per-thread state is per call,
    never part of what a copy inherits, and ``threading.local`` itself cannot be copied."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for value in vars(obj).values():
            if isinstance(value, threading.local):
                memo[id(value)] = type(value)()
            elif hasattr(value, "__dict__") and type(value).__module__.startswith("tokprune."):
                todo.append(value)
