"""The values of a method's tapped encoder signals for one bidirectional attention call, from its q / k / v.

Attention kinds (``cls``: row 0 over keys; ``received``: column means in query chunks; ``rows``: the mean row of the
chosen query patches), keys and values, each (n_seq, n_patches, ...). Pure PyTorch on tokprune's transformers-free
core (:mod:`tokprune.attention`, :mod:`tokprune.pruners.base`): the Hugging Face taps
(:mod:`tokprune.patches.vision_stage`) and a serving engine's plugin (integrations/vllm) call the same functions on
the q / k / v their attention modules receive, so the two compute the same values.
"""

from __future__ import annotations

import torch

from tokprune.attention import attention_rows, received_attention
from tokprune.pruners.base import ATTENTION_KINDS, Signal

#: the signal kinds read off an attention call (hidden states and pixels are read elsewhere)
TAPPED_KINDS = (*ATTENTION_KINDS, "keys", "values")

#: the kinds computed from the call's received attention (``rows`` picks its query patches by it)
RECEIVED_KINDS = ("received", "rows")


def reads_received(signals: list[Signal]) -> bool:
    """Whether any of ``signals`` is computed from received attention (then its tap wants the row log-sum-exps)."""
    return any(sig.kind in RECEIVED_KINDS for sig in signals)


def _heads(x: torch.Tensor, heads: str) -> torch.Tensor:
    """(B, H, K) -> (B, K) head mean or (B, K, H)."""
    return x.mean(1) if heads == "mean" else x.permute(0, 2, 1)


def _states(x: torch.Tensor, heads: str) -> torch.Tensor:
    """(B, H, K, d) key / value states -> (B, K, d) head mean or (B, K, H, d)."""
    return x.float().mean(1) if heads == "mean" else x.float().permute(0, 2, 1, 3)


def tap_values(signals: list[Signal], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scaling: float, model_dtype: bool = False,
               lse: torch.Tensor | None = None) -> dict[Signal, torch.Tensor]:
    """What the tapped kinds of ``signals`` are for one bidirectional attention call, each (B, n_patches, ...).
    ``model_dtype``: attention kinds rounded as the model's dtype rounds them (``score_dtype="model"``); ``lse``:
    the call's row log-sum-exps, when its kernel returned them (received attention then needs no softmax pass)."""
    received = None
    if reads_received(signals):
        received = received_attention(query, key, mask, scaling, model_dtype=model_dtype, lse=lse)  # (B, H, K)
    out: dict[Signal, torch.Tensor] = {}
    for sig in signals:
        x = _tap_value(sig, query, key, value, mask, scaling, received, model_dtype)
        if model_dtype and sig.kind in ATTENTION_KINDS:  # the score itself in the model's dtype
            x = x.to(query.dtype).float()
        out[sig] = x
    return out


def _tap_value(sig: Signal, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scaling: float, received: torch.Tensor | None, model_dtype: bool) -> torch.Tensor:
    """One tapped signal of one attention call (``received``: the call's received attention, when needed)."""
    if sig.kind == "cls":
        rows = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)
        return _heads(attention_rows(query, key, mask, scaling, rows, causal=False,
                                     model_dtype=model_dtype)[:, :, 0], sig.heads)
    if sig.kind == "received":
        return _heads(received, sig.heads)
    if sig.kind == "rows":
        return _heads(chosen_rows(sig.queries(received.mean(1)), query, key, mask, scaling), sig.heads)
    return _states(key if sig.kind == "keys" else value, sig.heads)


def chosen_rows(chosen: torch.Tensor, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                scaling: float) -> torch.Tensor:
    """(B, H, K): the mean attention row of the chosen query patches, ``chosen`` (B, R) long indices or a (B, Q)
    bool mask (a different number per sequence; a sequence choosing none gets NaN)."""
    chosen = chosen.to(query.device)
    if chosen.dtype != torch.bool:
        return attention_rows(query, key, mask, scaling, chosen.long(), causal=False).mean(2)
    cnt = chosen.sum(-1)  # (B,)
    # sync: once per attention call, the most queries any sequence chose (a shape)
    r = max(int(cnt.max()), 1)
    rows = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[:, :r]  # chosen first, in order
    live = torch.arange(r, device=query.device)[None] < cnt[:, None]  # (B, R)
    a = attention_rows(query, key, mask, scaling, rows, causal=False)  # (B, H, R, K)
    mean = (a * live[:, None, :, None]).sum(2) / cnt.clamp(min=1)[:, None, None]
    return mean.masked_fill((cnt == 0)[:, None, None], float("nan"))


def received_over_windows(calls: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """``received`` of a windowed encoder block (Qwen2.5-VL) as the column mean over all queries of the key's image:
    each call's column means (over its ``w`` queries) times ``w / n_image``, since the queries of other windows pay
    the key 0; a call that is a whole image (a full-attention block) keeps factor 1. ``calls``: (1, w, ...) per
    attention call in the encoder's order (the windows of image 0, then image 1, ...); ``sizes``: patches per
    image."""
    out, img, used = [], 0, 0
    for c in calls:
        w = int(c.shape[0] * c.shape[1])
        if img >= len(sizes) or used + w > sizes[img]:
            raise RuntimeError("the ViT's attention calls do not tile its images (an unsupported window layout)")
        out.append(c * (w / sizes[img]))
        used += w
        if used == sizes[img]:
            img, used = img + 1, 0
    return out


def merge_units(scores: torch.Tensor, unit: int, dim: int = -1) -> torch.Tensor:
    """Mean of each run of ``unit`` consecutive patch scores along ``dim`` (P there -> P / unit): one score per LLM
    token.

    The Qwen processors lay patches out block-major, so each 2x2 merge unit is ``unit = 4`` consecutive patches.
    Pass the patch axis as ``dim`` rather than moving it last: per-patch hidden states (P, D) reduce over ``dim=0``
    with D contiguous (vectorised, ~10x faster on CPU than the strided reduction after ``movedim``; the same sums).
    """
    dim = dim % scores.dim()
    if scores.shape[dim] % unit:
        raise ValueError(f"{scores.shape[dim]} patch scores do not split into merge units of {unit} patches")
    return scores.unflatten(dim, (-1, unit)).mean(dim + 1)
