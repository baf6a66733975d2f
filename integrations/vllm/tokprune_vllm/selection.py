"""From what vLLM's vision encoder computed to the tokens each image keeps, through tokprune's own selection.

:class:`EncoderTaps` records q / k / v of the encoder layers a method reads (a forward pre-hook on vLLM's
``MMEncoderAttention``, which every supported encoder calls with post-RoPE q / k and, for packed images,
``cu_seqlens``). :func:`signal_values` turns them into tokprune's per-token :class:`~tokprune.pruners.base.Signal`
values with tokprune's own statistics (:mod:`tokprune.attention`), exactly as the Hugging Face taps do:
[CLS] row / received attention / keys per head, [CLS] column dropped on LLaVA, Qwen's 2x2 merge units averaged.
:func:`select` asks the pruner (``Pruner.select_vision``, the same call tokprune's HF adapters make) and places
the result: kept tokens in their original order, a merged token (VisionZip's contextual tokens) in the slot of its
lowest-index source not already taken, as tokprune's adapters place it (``tokprune.patches.vision_stage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokprune.attention import attention_rows, received_attention
from tokprune.kernels import merge_tokens
from tokprune.pruners.base import (
    ModelInfo,
    PrefillContext,
    Pruner,
    Signal,
    VisionDecision,
    VisionRequest,
    VisionSignals,
)

#: signal kinds the plugin computes (others are refused at engine start)
SUPPORTED_KINDS = ("cls", "received", "keys", "values", "pixels")


class EncoderTaps:
    """Per-call q / k / v of chosen encoder layers, captured on vLLM's ``MMEncoderAttention`` modules.

    ``layers[l]``: the attention module of encoder layer ``l``. After an encoder call, ``seen[l]`` holds one
    ``(q, k, v)`` per sequence (image) in the order the encoder holds them, each (1 or B, H, n, d) in float32.
    Tensor parallelism shards heads across ranks: the plugin refuses it at start (a head mean needs every head).
    """

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        self.layers = layers
        self.seen: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._handles = [mod.register_forward_pre_hook(self._hook(layer), with_kwargs=True)
                         for layer, mod in layers.items()]
        self.scale = {layer: float(mod.scale) for layer, mod in layers.items()}

    def clear(self) -> None:
        self.seen = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: int):
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            names = ("query", "key", "value", "cu_seqlens")
            got = dict(zip(names, args))
            got.update({k: v for k, v in kwargs.items() if k in names})
            q, k, v = (got[n].detach() for n in names[:3])
            if q.dim() == 3:  # (B, N, H * d) -> (B, N, H, d)
                q = q.unflatten(-1, (module.num_heads, module.head_size))
                k = k.unflatten(-1, (module.num_kv_heads, module.head_size))
                v = v.unflatten(-1, (module.num_kv_heads, module.head_size))
            q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))  # (B, H, N, d)
            cu = got.get("cu_seqlens")
            if cu is None:
                self.seen.setdefault(layer, []).append((q, k, v))
                return
            if q.shape[0] != 1:
                raise RuntimeError("a packed (cu_seqlens) encoder call must have batch size 1")
            lens = (cu[1:] - cu[:-1]).tolist()
            for qs, ks, vs in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2)):
                self.seen.setdefault(layer, []).append((qs, ks, vs))

        return pre


def _heads(x: torch.Tensor, heads: str) -> torch.Tensor:
    """(B, H, K) -> (B, K) head mean or (B, K, H)."""
    return x.mean(1) if heads == "mean" else x.permute(0, 2, 1)


def _states(x: torch.Tensor, heads: str) -> torch.Tensor:
    """(B, H, K, d) -> (B, K, d) head mean or (B, K, H, d)."""
    return x.mean(1) if heads == "mean" else x.permute(0, 2, 1, 3)


def tap_value(sig: Signal, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The value of ``sig`` over one encoder attention call (bidirectional, unmasked): (B, n_patches, ...)."""
    if sig.kind == "cls":
        rows = torch.zeros(q.shape[0], 1, dtype=torch.long, device=q.device)
        return _heads(attention_rows(q, k, None, scale, rows, causal=False)[:, :, 0], sig.heads)
    if sig.kind == "received":
        return _heads(received_attention(q, k, None, scale), sig.heads)
    if sig.kind == "keys":
        return _states(k, sig.heads)
    if sig.kind == "values":
        return _states(v, sig.heads)
    raise ValueError(f"the vLLM plugin does not compute {sig.kind!r} signals; supported: {SUPPORTED_KINDS}")


def check_request(request: VisionRequest | None, name: str) -> None:
    """Raise at engine start when the method asks for a signal the plugin does not compute."""
    for sig in request.signals if request is not None else ():
        if sig.kind not in SUPPORTED_KINDS:
            raise ValueError(f"{name} needs {sig.kind!r} signals of the vision encoder, which the vLLM plugin does "
                             f"not compute (it computes {', '.join(SUPPORTED_KINDS)})")


@dataclass
class Placement:
    """Where one image's surviving tokens sit: ``slots`` (sorted original indices whose places stay), of which
    ``new_at`` carry a merged token (sources ``assign``, weights ``weights``) instead of the original."""

    slots: torch.Tensor
    new_at: torch.Tensor
    assign: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def build(self, f: torch.Tensor) -> torch.Tensor:
        out = f[self.slots.to(f.device)]
        m = int(self.new_at.numel())
        if not m:
            return out
        w = None if self.weights is None else self.weights.to(f.device)
        new = merge_tokens(f, self.assign.to(f.device), w, num_targets=m)
        out = out.clone()
        out[self.new_at.to(f.device)] = new.to(dtype=f.dtype)
        return out


def place(pick: torch.Tensor | VisionDecision, n: int, k: int, who: str) -> Placement:
    """One image's answer as a :class:`Placement`, checked: ``k`` tokens, sorted unique indices in ``[0, n)``."""
    if not isinstance(pick, VisionDecision):
        _check(pick, n, k, who)
        return Placement(pick, pick.new_zeros(0))
    if pick.features is not None:
        raise ValueError(f"{who}: explicit new token features are not supported by the vLLM plugin")
    m = pick.n_new
    _check(pick.kept, n, k - m, who)
    kept = pick.kept.long()
    assign = pick.assign.long()
    if not m:
        return Placement(kept, kept.new_zeros(0))
    free = torch.ones(n, dtype=torch.bool, device=kept.device)
    free[kept] = False
    slots_new = []
    chosen = pick.slots
    for j in range(m):
        if chosen is not None:
            slot = chosen[j]
        else:
            src = (assign == j).nonzero()[:, 0]
            cand = src[free[src]]
            slot = cand[0] if cand.numel() else free.nonzero()[0, 0]
        free[slot] = False
        slots_new.append(slot)
    new_slots = torch.stack(slots_new)
    slots = torch.cat([kept, new_slots]).sort().values
    return Placement(slots, torch.searchsorted(slots, new_slots), assign, pick.weights)


def _check(idx: torch.Tensor, n: int, k: int, who: str) -> None:
    if idx.numel() != k:
        raise RuntimeError(f"{who} returned {idx.numel()} kept tokens where the budget is {k}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n or
                        (idx.numel() > 1 and bool((idx[1:] <= idx[:-1]).any()))):
        raise RuntimeError(f"{who} returned kept indices that are not sorted, unique and in [0, {n})")


def vision_budget(pruner: Pruner, info: ModelInfo, n: int, keep: int) -> int:
    """Tokens an image of ``n`` keeps after the method's vision stage at the user's budget ``keep``."""
    return pruner.schedule(info, n, keep).stages[0].keep


def select(pruner: Pruner, info: ModelInfo, request: VisionRequest, features: list[torch.Tensor],
           values: dict[Signal, list[torch.Tensor]], grid: list[torch.Tensor], keeps: list[int],
           positions: str) -> list[Placement]:
    """Each image's placement: one budget part per image, each image its own prompt row (an encoder batch mixes
    requests; a servable rule never looks across images)."""
    n = [int(f.shape[0]) for f in features]
    special = [torch.zeros(c, dtype=torch.bool, device=f.device) for c, f in zip(n, features)]
    owners = [(j, 0) for j in range(len(features))]
    ctx = PrefillContext(info, request, positions)
    full = VisionSignals(features=features, values=values, owners=owners, grid=grid, special=special, ctx=ctx)
    parts = [(j, torch.arange(c, device=features[j].device)) for j, c in enumerate(n)]
    sub = full.subset(parts, owners)
    picks: list[Any] = pruner.select_vision(sub, keeps)
    if len(picks) != len(features):
        raise RuntimeError(f"{pruner.name}.select_vision returned {len(picks)} answers for {len(features)} images")
    return [place(p, c, k, pruner.name) for p, c, k in zip(picks, n, keeps)]
