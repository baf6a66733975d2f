"""What a run records beside its numbers: everything that can change them (template, resolution, attention,
dtype, batch size, seed, library versions, device, tokprune's git revision)."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "tokprune", "datasets", "lmms_eval", "accelerate", "numpy", "pillow")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """``<commit>[+dirty]`` of the tokprune checkout the package runs from, or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def collect(bundle: Any, spec: Any, device_name: str, extra: dict[str, Any]) -> dict[str, Any]:
    import torch

    model = bundle.model
    return {
        "model": spec.model,
        "model_class": type(model).__name__,
        "family": bundle.family,
        "prompt_template": bundle.template,
        "image_resolution": (f"{bundle.image_size}x{bundle.image_size} px (rendered)" if bundle.image_size
                             else "as stored in the data set, then the processor's resizing"),
        "max_new_tokens": bundle.max_new_tokens,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch_size": spec.batch_size,
        "seed": spec.seed,
        "limit": spec.limit,
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "tokprune_git": git_revision(),
        "python": platform.python_version(),
        "date": now(),
        **extra,
    }
