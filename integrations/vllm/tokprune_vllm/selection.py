"""From what vLLM's vision encoder computed to the tokens each image keeps, through tokprune's own selection.

:class:`EncoderTaps` records what the encoder layers a method reads saw: q / k / v of their attention (a forward
pre-hook on vLLM's ``MMEncoderAttention``, which every supported encoder calls with post-RoPE q / k and, for packed
images, ``cu_seqlens``) and, for ``hidden_out`` signals, the hidden states leaving the layer (a wrapper of
the layer's forward). The values are computed with tokprune's own functions (:func:`tokprune.encoder_taps.tap_values`,
the ones its Hugging Face taps call); the family module turns them into per-token values (LLaVA drops the [CLS]
column, Qwen averages each 2x2 merge unit and undoes Qwen2.5-VL's window order).

:func:`select` then hands them to tokprune's selection core (:func:`tokprune.selection.select_vision`, the call
tokprune's HF vision stage makes): the method's choice, its checks (count, order, merges) and the placement of
merged tokens (VisionZip's contextual tokens) are tokprune's, not a copy. Nothing here imports vLLM or
transformers (the main test suite runs it, ``tests/test_vllm_selection.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tokprune.attention import varlen_chunks
from tokprune.config import Budget
from tokprune.encoder_taps import TAPPED_KINDS, tap_values
from tokprune.pruners.base import (
    ModelInfo,
    PrefillContext,
    Pruner,
    Signal,
    VisionRequest,
    VisionSignals,
)
from tokprune.selection import Placement, image_budget, select_vision

#: signal kinds the plugin computes (others are refused at engine start)
SUPPORTED_KINDS = (*TAPPED_KINDS, "hidden_out", "pixels")

Calls = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class EncoderTaps:
    """Per-call q / k / v of chosen encoder layers' attention, and the hidden states leaving chosen layers.

    ``attention[l]``: the attention module of encoder layer ``l``; after an encoder call, ``seen[l]`` holds one
    ``(q, k, v)`` per sequence (image or window) in the order the encoder holds them, each (1 or B, H, n, d) in
    float32. ``blocks[l]``: the layer itself (its ``forward`` is wrapped until :meth:`remove`); ``hidden[l]``
    holds its output per call, float32, as the layer returns it (LLaVA (B, 1 + patches, D); Qwen (patches, 1, D)).
    Tensor parallelism shards heads across ranks: the plugin refuses it at start (a head mean needs every head).
    """

    def __init__(self, attention: dict[int, nn.Module], blocks: dict[int, nn.Module] | None = None) -> None:
        self.seen: dict[int, Calls] = {}
        self.hidden: dict[int, list[torch.Tensor]] = {}
        self._handles = [mod.register_forward_pre_hook(self._attention(layer), with_kwargs=True)
                         for layer, mod in attention.items()]
        self._wrapped = list((blocks or {}).items())
        for layer, mod in self._wrapped:
            mod.forward = self._block(layer, mod.forward)
        self.scale = {layer: float(mod.scale) for layer, mod in attention.items()}

    def clear(self) -> None:
        self.seen, self.hidden = {}, {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for _, mod in self._wrapped:
            del mod.forward  # the class's forward again
        self._handles, self._wrapped = [], []

    def _attention(self, layer: int):
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
            packed = {} if cu is None else {"cu_seq_lens_q": cu}
            self.seen.setdefault(layer, []).extend(varlen_chunks(q, k, v, packed))

        return pre

    def _block(self, layer: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        """The layer's forward, recording its output. A wrapper on the instance, not a forward hook: vLLM's
        ``@support_torch_compile`` encoder blocks (Qwen2.5-VL) call ``self.forward`` directly, skipping hooks."""
        def recorded(*args: Any, **kwargs: Any) -> Any:
            out = forward(*args, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
            self.hidden.setdefault(layer, []).append(x.detach().float())
            return out

        return recorded

    def values(self, sig: Signal) -> list[torch.Tensor]:
        """What ``sig`` was in each call of the last encoder run: (n_seq, n_patches, ...) per attention call for
        tapped kinds (tokprune's values), the layer's output per call for ``hidden_out``."""
        if sig.kind == "hidden_out":
            calls = self.hidden.get(sig.layer)
        else:
            calls = [tap_values([sig], q, k, v, None, self.scale[sig.layer])[sig]
                     for q, k, v in self.seen.get(sig.layer, [])]
        if not calls:
            raise RuntimeError(f"encoder layer {sig.layer} ran without tokprune's tap (was the vision encoder "
                               "compiled or replaced?)")
        return calls


def check_request(request: VisionRequest | None, name: str) -> None:
    """Raise at engine start when the method asks for a signal the plugin does not compute."""
    for sig in request.signals if request is not None else ():
        if sig.kind not in SUPPORTED_KINDS:
            raise ValueError(f"{name} needs {sig.kind!r} signals of the vision encoder, which the vLLM plugin does "
                             f"not compute (it computes {', '.join(SUPPORTED_KINDS)})")


def vision_budget(pruner: Pruner, info: ModelInfo, n: int, budget: Budget) -> int:
    """Tokens an image of ``n`` keeps after the method's vision stage at the user's budget: tokprune's own
    :func:`~tokprune.selection.image_budget` (the method's ratio rounding, its schedule) for an image without
    special tokens."""
    return image_budget(pruner, info, budget, torch.zeros(n, dtype=torch.bool)).schedule.keep_of("vision")


def select(pruner: Pruner, info: ModelInfo, request: VisionRequest, features: list[torch.Tensor],
           values: dict[Signal, list[torch.Tensor]], grid: list[torch.Tensor], keeps: list[int],
           positions: str) -> list[Placement]:
    """Each image's placement, by :func:`tokprune.selection.select_vision`: one budget part per image, each image
    its own prompt row (an encoder batch mixes requests; a servable rule never looks across images)."""
    special = [torch.zeros(f.shape[0], dtype=torch.bool, device=f.device) for f in features]
    owners = [(j, 0) for j in range(len(features))]
    signals = VisionSignals(features=features, values=values, owners=owners, grid=grid, special=special,
                            ctx=PrefillContext(info, request, positions))
    parts = [(j, torch.arange(f.shape[0], device=f.device), k, owners[j]) for j, (f, k) in
             enumerate(zip(features, keeps))]
    placements, _ = select_vision(pruner, signals, parts)
    return placements
