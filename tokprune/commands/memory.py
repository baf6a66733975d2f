"""Memory a benchmark model needs against what the device has, checked before any weight is allocated.

Building a 7B model in float32 on a 24 GB CPU machine dies in the allocator after minutes; counting its parameters
on the meta device takes a fraction of a second and lets ``tokprune bench`` say what to do instead.
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: weights x this covers the activations, KV cache and allocator slack of a benchmark prompt (a rough margin)
OVERHEAD = 1.2


def weight_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of the weights of ``config``'s model in ``dtype`` (built on the meta device: nothing is allocated)."""
    from tokprune import configs

    model = configs.build_model(config, "meta", dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CPU: the kernel's MemAvailable), None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config: Any, name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise a :class:`ValueError` that says what to do when the model will not fit in ``device``'s free memory
    (no check where the free memory cannot be read)."""
    need = weight_bytes(config, dtype) * OVERHEAD
    free = available_bytes(device)
    if free is None or need <= free:
        return
    gb = 1e9
    advice = []
    if dtype == torch.float32:
        advice.append(f"--dtype bfloat16 (about {weight_bytes(config, torch.bfloat16) * OVERHEAD / gb:.1f} GB)")
    advice += ["a config with fewer layers (a copy of its JSON with a smaller num_hidden_layers, passed as a path)",
               "a tiny config such as tiny-llava"]
    if device.type == "cpu" and torch.cuda.is_available():
        advice.insert(0, "--device cuda")
    raise ValueError(
        f"--config {name} in {str(dtype).replace('torch.', '')} needs about {need / gb:.1f} GB on {device} "
        f"(weights + {OVERHEAD - 1:.0%}) but {free / gb:.1f} GB are free; use " + ", or ".join(advice))
