"""Backend choice for the kernels: Triton for CUDA tensors when it is importable, PyTorch otherwise.

The env var ``TOKPRUNE_KERNELS`` (``auto`` | ``torch`` | ``triton``) is read at every call so tests and users can
force a backend. Triton is optional: nothing here imports it unless a Triton backend is actually needed.
"""

from __future__ import annotations

import importlib
import os

import torch

ENV_BACKEND = "TOKPRUNE_KERNELS"
ENV_INTERPRET = "TRITON_INTERPRET"
BACKENDS = ("auto", "torch", "triton")

_triton_import_error: str | None = None
_triton_checked = False


def triton_available() -> bool:
    """True when ``import triton`` works (checked once, lazily, so a missing extra costs nothing)."""
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        _triton_checked = True
        try:
            importlib.import_module("triton")
            importlib.import_module("triton.language")
        except (ImportError, OSError, RuntimeError, AttributeError) as exc:  # missing extra or a broken install
            _triton_import_error = f"{type(exc).__name__}: {exc}"
    return _triton_import_error is None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value, i.e. Triton kernels run on CPU tensors."""
    return os.environ.get(ENV_INTERPRET, "").strip().lower() in ("1", "true", "yes", "on")


def requested_backend() -> str:
    """The backend requested through ``TOKPRUNE_KERNELS`` (default ``auto``); raises on an unknown value."""
    value = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def resolve_backend(device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for tensors on ``device``, honouring ``TOKPRUNE_KERNELS``.

    auto: Triton for CUDA tensors when triton imports, else torch. Forcing ``triton`` raises a RuntimeError that
    says what is missing when triton is not installed, or when the tensors are not on CUDA and the Triton CPU
    interpreter (``TRITON_INTERPRET=1``) is not enabled.
    """
    wanted = requested_backend()
    if wanted == "torch":
        return "torch"
    if wanted == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            f"{ENV_BACKEND}=triton but triton cannot be imported ({_triton_import_error}); "
            "install the extra: pip install 'triton==3.7.1' numpy"
        )
    if device.type == "cuda":
        return "triton"
    if interpreter_enabled():
        return "triton"
    raise RuntimeError(
        f"{ENV_BACKEND}=triton needs CUDA tensors, got tensors on {device}; to run the Triton kernels on CPU "
        f"tensors set {ENV_INTERPRET}=1 (the Triton interpreter, for testing only)"
    )
