"""Loading from the Hugging Face hub without minutes of retries when there is no network.

``from_pretrained`` on a hub id retries its requests with back-off before it falls back to the local cache or
fails: minutes on a machine with no network whose ``HF_HUB_OFFLINE`` is unset. :func:`load` first opens one TCP
connection to the hub's endpoint (``HF_ENDPOINT``, a few seconds at most); when it fails, the files are read from
the local cache only (``local_files_only=True``), and a model that is not cached fails at once with one line that
says what to do. Local directories and ``HF_HUB_OFFLINE=1`` skip the probe.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
#: seconds the one connection to the hub may take before the hub counts as unreachable
PROBE_TIMEOUT_S = 3.0


def endpoint() -> str:
    """The hub endpoint ``from_pretrained`` would use (``HF_ENDPOINT``, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


@functools.lru_cache(maxsize=8)
def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``url``'s host cannot be reached (one TCP connection), or None when it can. Cached per process."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except OSError as e:
        if isinstance(e, TimeoutError):
            return f"no answer in {timeout:g} s"
        return f"{type(e).__name__}: {e.strerror or e}"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load(loader: Callable[..., T], name: str, **kwargs: Any) -> T:
    """``loader(name, **kwargs)`` (a ``from_pretrained``), reading only the local cache when ``name`` is a hub id
    and the hub cannot be reached; an uncached model then raises :class:`OSError` with one line naming the fix."""
    if Path(name).expanduser().exists() or is_offline() or kwargs.get("local_files_only"):
        return loader(name, **kwargs)
    url = endpoint()
    why = unreachable(url)
    if why is None:
        return loader(name, **kwargs)
    try:
        return loader(name, local_files_only=True, **kwargs)
    except OSError:
        raise OSError(f"the hub ({url}) cannot be reached ({why}) and the model is not in the local cache; "
                      "connect to the network, download it first, or pass a local directory (HF_HUB_OFFLINE=1 "
                      "reads the cache without trying the network)") from None
