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

TapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, dict], None]

#: query rows per block when received attention is accumulated (memory O(heads x chunk x keys))
RECEIVED_CHUNK = 256


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor,
    causal: bool,
    keys: torch.Tensor | None = None,
    model_dtype: bool = False,
) -> torch.Tensor:
    """Softmax attention probabilities of selected query rows over all keys, in float32.

    ``model_dtype`` (``score_dtype="model"``): the logits are computed in q/k's dtype and the probabilities
    rounded to it after a float32 softmax, as an eager kernel in fp16 / bf16 (the references') does; the result is
    still returned as float32 values.

    ``query`` (B, H, Q, d) and ``key`` (B, Hkv, K, d) as the attention function receives them; ``rows`` (B, R)
    long: per batch row, the query positions wanted. The mask may be a 4D bool (SDPA) or additive float (eager)
    mask, a 2D key-padding mask (FlashAttention) or None (then causality is rebuilt when ``causal``). ``keys``
    (B, K) bool, optional: the softmax domain is restricted to those keys (e.g. visual tokens only).
    Returns (B, H, R, K).
    """
    b, h, q_len, d = query.shape
    kv = key.shape[2]
    r = rows.shape[1]
    q = torch.gather(query, 2, rows[:, None, :, None].expand(b, h, r, d))
    k = _repeat_kv(key, h // key.shape[1])
    if model_dtype:
        s = (torch.matmul(q, k.transpose(-1, -2)) * scaling).float()
    else:
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask[..., :kv].expand(b, -1, -1, -1)
        m = torch.gather(m, 2, rows[:, None, :, None].expand(b, m.shape[1], r, kv))
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    else:
        if attention_mask is not None:  # 2D key padding mask
            s = s.masked_fill(~attention_mask[:, None, None, -kv:].bool(), float("-inf"))
        if causal and q_len > 1:
            qpos = (rows + (kv - q_len))[:, None, :, None]
            s = s.masked_fill(torch.arange(kv, device=s.device) > qpos, float("-inf"))
    if keys is not None:
        s = s.masked_fill(~keys[:, None, None, :kv].to(s.device), float("-inf"))
    p = s.softmax(-1).nan_to_num(0.0)  # a row with no allowed key is all zero
    return p.to(query.dtype).float() if model_dtype else p


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    chunk: int = RECEIVED_CHUNK,
    model_dtype: bool = False,
) -> torch.Tensor:
    """Attention each key *receives*: the column mean of softmax(q k^T) over all queries, per head, in float32
    (``model_dtype``: logits and probabilities rounded to q/k's dtype, as in :func:`attention_rows`).

    Bidirectional (encoder) attention only. ``query`` (B, H, Q, d), ``key`` (B, Hkv, K, d); a 4D bool / additive
    mask is honoured, and queries that see no key at all (padding) do not count. The softmax is computed for
    ``chunk`` query rows at a time, so memory stays O(B x H x chunk x K): never a Q x K matrix per head.
    Returns (B, H, K).
    """
    b, h, q_len, _ = query.shape
    kv = key.shape[2]
    k = _repeat_kv(key, h // key.shape[1])
    k = k if model_dtype else k.float()
    total = torch.zeros(b, h, kv, dtype=torch.float32, device=query.device)
    counted = torch.zeros(b, h, 1, dtype=torch.float32, device=query.device)
    for start in range(0, q_len, chunk):
        q = query[:, :, start:start + chunk]
        s = (torch.matmul(q if model_dtype else q.float(), k.transpose(-1, -2)) * scaling).float()
        if attention_mask is not None and attention_mask.dim() == 4:
            m = attention_mask[:, :, start:start + chunk, :kv]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        elif attention_mask is not None:  # 2D key padding mask
            s = s.masked_fill(~attention_mask[:, None, None, -kv:].bool(), float("-inf"))
        live = torch.isfinite(s).any(-1, keepdim=True)
        p = s.softmax(-1).masked_fill(~live, 0.0)
        if model_dtype:
            p = p.to(query.dtype).float()
        total += p.sum(2)
        counted += live.sum(2).float()
    return total / counted.clamp_min(1.0)


def varlen_chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  kwargs: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The separate sequences of one attention call: a FlashAttention varlen call packs several (``cu_seq_lens_q``
    / ``cu_seq_lens_k`` in its kwargs, batch 1) and is split along the sequence axis; any other call is one."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:
        return [(query, key, value)]
    if query.shape[0] != 1:
        raise RuntimeError("a varlen attention call must have batch size 1")
    cu_k = cu_q if cu_k is None else cu_k
    lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    return list(zip(torch.split(query, lq, 2), torch.split(key, lk, 2), torch.split(value, lk, 2)))


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
