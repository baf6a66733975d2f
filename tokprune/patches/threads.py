"""Attributes whose value is per thread, for the runtime state one forward builds on a long-lived object.

A patched model may be called from several threads at once (a serving loop, a thread pool): what one encoder call
or one prefill learns (an in-encoder cut's survivors, LLaVA-NeXT's packing, Qwen's grid, the last record) must
not be overwritten by another thread's call in between. Declaring such an attribute ``name = PerThread(list)`` on
the class keeps one value per (object, thread); each thread starts from the factory's value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: the instance attribute holding an object's ``threading.local``
LOCAL_ATTR = "_tokprune_threads"


def thread_local(obj: Any) -> threading.local:
    """``obj``'s per-thread namespace (created on first use; ``dict.setdefault`` is atomic)."""
    local = vars(obj).get(LOCAL_ATTR)
    if local is None:
        local = vars(obj).setdefault(LOCAL_ATTR, threading.local())
    return local


class PerThread:
    """A data descriptor: each thread reads what it wrote, or ``factory()`` before it wrote anything."""

    def __init__(self, factory: Callable[[], Any] = lambda: None) -> None:
        self.factory = factory
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        local = thread_local(obj)
        if not hasattr(local, self.name):
            setattr(local, self.name, self.factory())
        return getattr(local, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(thread_local(obj), self.name, value)
