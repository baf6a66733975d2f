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
import threading
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


def proxy_for(url: str) -> str | None:
    """The proxy requests would use for ``url`` (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY``, any case)."""
    scheme = urlsplit(url).scheme or "https"
    for key in (f"{scheme}_proxy", "all_proxy"):
        value = os.environ.get(key) or os.environ.get(key.upper())
        if value:
            return value if "://" in value else f"http://{value}"
    return None


@functools.lru_cache(maxsize=8)
def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``url``'s host (or the proxy in front of it) cannot be reached in ``timeout`` seconds, name lookup
    included (one TCP connection, in a daemon thread so a hanging DNS cannot hold the caller), or None when it can.
    Cached per process."""
    target = proxy_for(url) or url
    parts = urlsplit(target)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((parts.hostname or "", port), timeout=timeout):
                outcome.append(None)
        except OSError as e:
            outcome.append(f"no answer in {timeout:g} s" if isinstance(e, TimeoutError)
                           else f"{type(e).__name__}: {e.strerror or e}")

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    why = outcome[0] if outcome else f"no answer in {timeout:g} s (name lookup)"
    return None if why is None else why + (f", through the proxy {parts.hostname}:{port}" if target != url else "")


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
