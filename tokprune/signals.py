"""Cheap attention rows computed from q/k inside any attention backend (no eager attention needed).

Every attention module in transformers 5.x looks its kernel up by name in ``ALL_ATTENTION_FUNCTIONS`` at each
call. :class:`AttentionTaps` wraps those entries once per process; a tap registered on a module receives the
post-RoPE query and key (cache included), the mask and the scaling after the real attention has run, so a method
can compute only the rows it needs (CLS->patches, last token->image) at O(rows x keys) cost while SDPA or
FlashAttention do the actual work.

A tap receives ``(module, query, key, value, mask, scaling, kwargs)``: the value states and the backend's keyword
arguments too, so that a FlashAttention varlen call (``cu_seq_lens_q``: several images or windows packed in one
sequence) can be split per sequence with :func:`varlen_chunks` before any statistic is computed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tokprune.attention import (  # noqa: F401  (re-exported: the taps' statistics live there)
    RECEIVED_CHUNK,
    _repeat_kv,
    attention_rows,
    received_attention,
    varlen_chunks,
)

TapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, dict], None]


class AttentionTaps:
    """Process-wide registry of per-module attention taps; wraps the attention functions while any tap exists."""

    def __init__(self) -> None:
        self._taps: dict[nn.Module, TapFn] = {}
        self._skips: dict[nn.Module, Callable[[], bool]] = {}
        self._saved: dict[str, tuple[bool, Callable | None]] = {}

    def add(self, module: nn.Module, fn: TapFn, skip: Callable[[], bool] | None = None) -> None:
        """Tap ``module``'s attention calls with ``fn``; while ``skip()`` is true the kernel itself is not run
        (the module gets zeros): a probe that wants only q/k."""
        if module in self._taps:
            raise RuntimeError(f"{type(module).__name__} already has an attention tap")
        if not self._taps:
            self._install()
        self._taps[module] = fn
        if skip is not None:
            self._skips[module] = skip

    def discard(self, module: nn.Module) -> None:
        self._taps.pop(module, None)
        self._skips.pop(module, None)
        if not self._taps and self._saved:
            self._uninstall()

    def _install(self) -> None:
        keys = set(ALL_ATTENTION_FUNCTIONS.keys()) | {"eager"}
        for name in keys:
            had_local = name in ALL_ATTENTION_FUNCTIONS._local_mapping
            orig = ALL_ATTENTION_FUNCTIONS[name] if name != "eager" or had_local else None
            self._saved[name] = (had_local, ALL_ATTENTION_FUNCTIONS._local_mapping.get(name))
            ALL_ATTENTION_FUNCTIONS[name] = self._wrap(orig)

    def _uninstall(self) -> None:
        for name, (had_local, fn) in self._saved.items():
            if had_local:
                ALL_ATTENTION_FUNCTIONS._local_mapping[name] = fn
            else:
                ALL_ATTENTION_FUNCTIONS._local_mapping.pop(name, None)
        self._saved.clear()

    def _wrap(self, orig: Callable | None) -> Callable:
        taps, skips = self._taps, self._skips

        def attention_with_taps(module, query, key, value, attention_mask, *args, **kwargs):
            skip = skips.get(module)
            if skip is not None and skip():
                b, h, q_len, _ = query.shape
                out = (query.new_zeros(b, q_len, h, value.shape[-1]), None)
            else:
                fn = orig or importlib.import_module(type(module).__module__).eager_attention_forward
                out = fn(module, query, key, value, attention_mask, *args, **kwargs)
            tap = taps.get(module)
            if tap is not None:
                scaling = kwargs.get("scaling")
                if scaling is None:
                    scaling = getattr(module, "scaling", getattr(module, "scale", query.shape[-1] ** -0.5))
                with torch.no_grad():
                    tap(module, query, key, value, attention_mask, float(scaling), kwargs)
            return out

        return attention_with_taps


TAPS = AttentionTaps()


def remove_installed(handles: list[Any], tapped: list[nn.Module]) -> None:
    """Undo what one seam installed on a model: its hook handles and its attention taps (the caller then drops
    the lists; they may be shared with the adapter, so they are not emptied here)."""
    for h in handles:
        h.remove()
    for mod in tapped:
        TAPS.discard(mod)
