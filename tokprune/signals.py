"""Cheap attention rows computed from q/k inside any attention backend (no eager attention needed).

Every attention module in transformers 5.x looks its kernel up by name in ``ALL_ATTENTION_FUNCTIONS`` at each
call. :class:`AttentionTaps` wraps those entries while any tap exists; a tap registered on a module receives the
post-RoPE query and key (cache included), the mask and the scaling after the real attention has run, so a method
can compute only the rows it needs (CLS->patches, last token->image) at O(rows x keys) cost while SDPA or
FlashAttention do the actual work.

A tap receives ``(module, query, key, value, mask, scaling, kwargs)``: the value states and the backend's keyword
arguments too, so that a FlashAttention varlen call (``cu_seq_lens_q``: several images or windows packed in one
sequence) can be split per sequence with :func:`varlen_chunks` before any statistic is computed.
"""

from __future__ import annotations

import importlib
import weakref
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
    sdpa_with_lse,
    varlen_chunks,
)
from tokprune.eager import eager

TapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, dict], None]

#: key of a tap's kwargs holding the call's row log-sum-exps (B, H, Q), when the tap asked for them and the wrapper
#: could run the call as SDPA's own kernel with them returned (see :func:`_lse_call`)
LSE_KWARG = "_tokprune_lse"

#: attribute of a tapped attention module holding its (tap, skip, lse) triple: the tap lives on the module, so the model
#: owns it and nothing global keeps a patched model alive
TAP_ATTR = "_tokprune_tap"


class AttentionTaps:
    """Per-module attention taps, and the wrapper of the attention functions installed while any tap exists.

    A tap is stored on the module it taps (attribute :data:`TAP_ATTR`); the process-wide object holds the tapped
    modules only weakly, so a patched model dropped without ``tokprune.remove`` is still garbage-collected.
    """

    def __init__(self) -> None:
        self._modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._saved: dict[str, tuple[bool, Callable | None]] = {}

    def add(self, module: nn.Module, fn: TapFn, skip: Callable[[], bool] | None = None, lse: bool = False) -> None:
        """Tap ``module``'s attention calls with ``fn``; while ``skip()`` is true the kernel itself is not run
        (the module gets zeros): a probe that wants only q/k. ``lse``: the tap reads received attention, which the
        softmax's row log-sum-exps make cheaper; where a call allows it (:func:`_lse_call`) they come in its kwargs
        under :data:`LSE_KWARG`."""
        if TAP_ATTR in vars(module):
            raise RuntimeError(f"{type(module).__name__} already has an attention tap")
        if not self._saved:
            self._install()
        object.__setattr__(module, TAP_ATTR, (eager(fn), eager(skip) if skip is not None else None, lse))
        self._modules.add(module)

    def discard(self, module: nn.Module) -> None:
        vars(module).pop(TAP_ATTR, None)
        self._modules.discard(module)
        if not len(self._modules) and self._saved:
            self._uninstall()

    def items(self) -> list[tuple[nn.Module, TapFn]]:
        """The live taps, (module, tap) each."""
        return [(m, vars(m)[TAP_ATTR][0]) for m in list(self._modules) if TAP_ATTR in vars(m)]

    def replace(self, module: nn.Module, fn: TapFn) -> None:
        """Swap the tap function of an already tapped ``module`` (its skip and lse wish are kept)."""
        if TAP_ATTR in vars(module):
            object.__setattr__(module, TAP_ATTR, (eager(fn), *vars(module)[TAP_ATTR][1:]))

    def _install(self) -> None:
        keys = set(ALL_ATTENTION_FUNCTIONS.keys()) | {"eager"}
        for name in keys:
            had_local = name in ALL_ATTENTION_FUNCTIONS._local_mapping
            orig = ALL_ATTENTION_FUNCTIONS[name] if name != "eager" or had_local else None
            self._saved[name] = (had_local, ALL_ATTENTION_FUNCTIONS._local_mapping.get(name))
            ALL_ATTENTION_FUNCTIONS[name] = _wrap(orig)

    def _uninstall(self) -> None:
        for name, (had_local, fn) in self._saved.items():
            if had_local:
                ALL_ATTENTION_FUNCTIONS._local_mapping[name] = fn
            else:
                ALL_ATTENTION_FUNCTIONS._local_mapping.pop(name, None)
        self._saved.clear()


def _lse_call(orig: Callable | None, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, args: tuple, kwargs: dict) -> bool:
    """Whether this attention call is one transformers' ``sdpa_attention_forward`` would run as exactly
    ``F.scaled_dot_product_attention(q, k, v, scale=kwargs["scaling"])`` and SDPA would run as its CPU flash kernel:
    then :func:`~tokprune.attention.sdpa_with_lse` gives the same output and the row log-sum-exps too. Every other
    call (a mask, dropout, causal, GQA, a position bias or softcap, autograd, CUDA, another backend) runs as before."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if orig is not _sdpa_forward() or args or query.device.type != "cpu" or attention_mask is not None:
        return False
    if kwargs.get("scaling") is None or kwargs.get("dropout", 0.0) != 0.0 or kwargs.get("position_bias") is not None:
        return False
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions", False):
        return False
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if (causal and query.shape[2] > 1) or getattr(module, "num_key_value_groups", 1) > 1:
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    choice = torch._fused_sdp_choice(query, key, value, None, 0.0, False, scale=kwargs["scaling"])
    return choice == int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)


def _sdpa_forward() -> Callable:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _wrap(orig: Callable | None) -> Callable:
    """``orig`` (None: the module's own eager function) followed by the module's tap, if it has one. A tap that
    asked for row log-sum-exps gets them when :func:`_lse_call` allows: the call then runs SDPA's CPU flash kernel
    directly (the same output, laid out as ``sdpa_attention_forward`` returns it)."""

    def attention_with_taps(module, query, key, value, attention_mask, *args, **kwargs):
        tap, skip, wants_lse = getattr(module, "__dict__", {}).get(TAP_ATTR, (None, None, False))
        lse = None
        if skip is not None and skip():
            b, h, q_len, _ = query.shape
            out = (query.new_zeros(b, q_len, h, value.shape[-1]), None)
        elif tap is not None and wants_lse and _lse_call(orig, module, query, key, value, attention_mask, args,
                                                          kwargs):
            o, lse = sdpa_with_lse(query, key, value, kwargs["scaling"])
            out = (o.transpose(1, 2).contiguous(), None)
        else:
            fn = orig or importlib.import_module(type(module).__module__).eager_attention_forward
            out = fn(module, query, key, value, attention_mask, *args, **kwargs)
        if tap is not None:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", getattr(module, "scale", query.shape[-1] ** -0.5))
            with torch.no_grad():
                tap(module, query, key, value, attention_mask, float(scaling),
                    kwargs if lse is None else {**kwargs, LSE_KWARG: lse})
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
