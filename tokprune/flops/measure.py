"""Measuring with torch's FlopCounterMode, for cross-checks of the analytic counts."""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Measuring with torch, for cross-checks.
# ---------------------------------------------------------------------------------------------------------------

_CPU_SDPA_REGISTERED = False


def register_cpu_sdpa_formula() -> None:
    """Teach FlopCounterMode the CPU SDPA kernel (torch leaves it uncounted); safe to call repeatedly."""
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    import torch
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            b, h, sq, d = query_shape
            sk, dv = key_shape[-2], value_shape[-1]
            return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv

    _CPU_SDPA_REGISTERED = True


def counted_flops(fn: Any, *args: Any, **kwargs: Any) -> int:
    """Total FLOPs torch's FlopCounterMode counts while ``fn(*args, **kwargs)`` runs (CPU SDPA included)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_sdpa_formula()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())

