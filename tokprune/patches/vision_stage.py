"""The vision stage: taps on the encoder for the signals a method requests, and the pre-LLM selection.

A method names what it needs as :class:`~tokprune.pruners.base.Signal` s (kind + encoder layer). This module
answers every request through two generic family hooks, never one hook per signal kind:

* ``adapter.vision_layer(layer)`` -> (block, attention module) of encoder layer ``layer``: attention kinds,
  keys and values come from an attention tap on the module (post-RoPE q/k/v, mask, scaling and the backend's kwargs;
  a FlashAttention varlen call is split per sequence), hidden states from hooks on the block;
* ``adapter.to_tokens(calls, features, reduce)`` turns what the taps saw, per attention call
  (n_seq, n_patches, ...), into per-LLM-token values (LLaVA drops [CLS], LLaVA-NeXT packs tiles and unpads,
  Qwen joins windows per image, averages each 2x2 merge unit and undoes the window order).

Every value is (n_seq, n_patches, ...) when it leaves a tap: head mean or a trailing head axis for attention kinds
(``cls`` row 0 over keys; ``received`` column means computed in query chunks, never an N x N matrix; ``rows`` the
mean row of the chosen query patches), (..., d) or (..., heads, d) for keys / values, (..., D) for hidden states;
raw pixels are read at the encoder's input (``adapter.pixel_patches``), un-normalised, (..., channels, values),
and a Qwen merge unit concatenates its patches' pixels instead of averaging them.

:class:`VisionStage` then builds :class:`~tokprune.pruners.base.VisionSignals` (with each token's grid
coordinates and special-token mask from ``adapter.token_layout``), splits the budget into the parts the family
defines (``adapter.budget_parts``: one per image, or LLaVA-NeXT tiles) and hands them to the selection core
(:mod:`tokprune.selection`), which asks the pruner, checks its answer and places new tokens.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokprune.encoder_taps import (  # noqa: F401  (chosen_rows: its old home)
    RECEIVED_KINDS,
    TAPPED_KINDS,
    chosen_rows,
    reads_received,
    tap_values,
)
from tokprune.patches.prefill import distinct, expand
from tokprune.pruners.base import (
    PrefillContext,
    Signal,
    UnsupportedError,
    VisionRequest,
    VisionSignals,
)
from tokprune.selection import (  # noqa: F401  (check_*, content_label, _ImageChoice re-exported from their old home)
    Budgets,
    Placement,
    _ImageChoice,
    check_indices,
    check_pooled,
    content_label,
    select_vision,
)
from tokprune.signals import LSE_KWARG, TAPS, remove_installed, varlen_chunks

if TYPE_CHECKING:
    from tokprune.patches.base import Adapter


class VisionStage:
    """Runs a pruner's vision stage on one model; owned by an :class:`~tokprune.patches.base.Adapter`."""

    def __init__(self, adapter: Adapter, request: VisionRequest) -> None:
        self.adapter, self.request = adapter, request
        info = adapter.info
        for sig in request.signals:
            if sig.layer is not None and sig.layer >= info.vision_layers:
                raise ValueError(f"{sig}: the {info.family} vision encoder has {info.vision_layers} layers")
            if sig.kind == "cls" and not info.has_cls:
                raise UnsupportedError(f"the {info.family} vision encoder has no [CLS] token, so no {sig}")
            if sig.kind == "rows" and adapter.windowed_layer(sig.layer):
                raise UnsupportedError(f"{sig}: encoder layer {sig.layer} of {info.family} attends within windows, "
                                       "where rows of chosen queries are not defined over the image; choose a "
                                       "full-attention layer (fullatt_block_indexes)")
        self._handles: list[Any] = []
        self._tapped: list[nn.Module] = []
        self._local = threading.local()  # .raw: per thread, so two threads encoding at once never mix signals

    @property
    def raw(self) -> dict[Signal, list[torch.Tensor]]:
        """What the taps saw in this thread's last encoder call, per signal and attention call (read by the
        prefill that follows it)."""
        if not hasattr(self._local, "raw"):
            self._local.raw = {}
        return self._local.raw

    @raw.setter
    def raw(self, value: dict[Signal, list[torch.Tensor]]) -> None:
        self._local.raw = value

    def received_layers(self) -> list[int]:
        """The encoder layers whose received attention the request reads (the record's ``encoder_reads``: each is
        a recomputed q k^T over all query rows, counted by the analytic FLOPs)."""
        return sorted({s.layer for s in self.request.signals if s.kind in RECEIVED_KINDS})

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        self._handles.append(self.adapter.vision_tower.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        for layer in self.request.layers():
            sigs = [s for s in self.request.signals if s.layer == layer]
            block, attention = self.adapter.vision_layer(layer)
            tapped = [s for s in sigs if s.kind in TAPPED_KINDS]
            if tapped:
                TAPS.add(attention, partial(self._tap, tapped), lse=reads_received(tapped))
                self._tapped.append(attention)
            for s in sigs:
                if s.kind == "hidden_in":
                    self._handles.append(block.register_forward_pre_hook(partial(self._hidden_in, s),
                                                                         with_kwargs=True))
                elif s.kind == "hidden_out":
                    self._handles.append(block.register_forward_hook(partial(self._hidden_out, s)))

    def remove(self) -> None:
        remove_installed(self._handles, self._tapped)
        self._handles, self._tapped = [], []
        self.raw = {}

    def clear(self, *_: Any) -> None:
        """Forget the signals of the last encoder call (a new call is starting)."""
        self.raw = {}

    def _begin_call(self, module: nn.Module, args: tuple, kw: dict) -> None:
        self.clear()
        pixels = [s for s in self.request.signals if s.kind == "pixels"]
        if pixels:
            x = args[0] if args else kw.get("pixel_values", kw.get("hidden_states"))
            for sig in pixels:
                mean, std = self.adapter.pixel_normalisation()
                mean, std = sig.mean or mean, sig.std or std
                self.raw[sig] = [self.adapter.pixel_patches(x.detach().float(), mean, std)]

    # ------------------------------------------------------------------ taps
    def _tap(self, signals: list[Signal], module, query, key, value, mask, scaling, kwargs) -> None:
        chunks = varlen_chunks(query, key, value, kwargs)
        lse = kwargs.get(LSE_KWARG) if len(chunks) == 1 else None  # only an unsplit SDPA call brings one
        for q, k, v in chunks:
            model_dtype = getattr(self.adapter.pruner, "score_dtype", "float32") == "model"
            for sig, x in tap_values(signals, q, k, v, mask if len(chunks) == 1 else None, scaling,
                                     model_dtype, lse).items():
                self.raw.setdefault(sig, []).append(x)

    def _hidden_in(self, sig: Signal, module, args: tuple, kw: dict) -> None:
        x = args[0] if args else kw["hidden_states"]
        self.raw.setdefault(sig, []).append(x.detach().float() if x.dim() == 3 else x.detach().float()[None])

    def _hidden_out(self, sig: Signal, module, args: tuple, out: Any) -> None:
        x = out[0] if isinstance(out, tuple) else out
        self.raw.setdefault(sig, []).append(x.detach().float() if x.dim() == 3 else x.detach().float()[None])

    # ------------------------------------------------------------------ signals and selection
    def signals(self, features: list[torch.Tensor], owners: list[tuple[int, int]], ctx: PrefillContext,
                grid: list[torch.Tensor] | None, special: list[torch.Tensor],
                source: list[int] | None = None) -> VisionSignals:
        """Every requested signal per item. ``source`` (per item, the encoded image it is a copy of, when
        ``generate`` expanded the rows for beams): the taps saw each encoded image once, so the values are computed
        per encoded image and handed to its copies."""
        encoded = distinct(features, source)
        values = {}
        for sig in self.request.signals:
            calls = self.raw.get(sig)
            if not calls:
                raise RuntimeError(
                    "the vision encoder ran without tokprune's taps (were the image features computed before "
                    "tokprune.apply?); pass pixel_values so the encoder runs under the patch"
                )
            if sig.kind == "received":  # windowed blocks: a column mean over all the image's queries
                calls = self.adapter.received_per_image(calls)
            per_image = self.adapter.to_tokens(calls, encoded, "concat" if sig.kind == "pixels" else "mean")
            values[sig] = expand(per_image, source)
        return VisionSignals(features=features, values=values, owners=owners, grid=grid, special=special, ctx=ctx)

    def select(self, signals: VisionSignals, budgets: Budgets | None = None, record_scores: bool = False
               ) -> tuple[list[Placement], list[torch.Tensor] | None]:
        """Per image, where its surviving tokens sit, and with ``record_scores`` each original token's score: the
        budget split into the family's parts (``adapter.budget_parts``), then :func:`tokprune.selection.select_vision`
        (the method's choice, checked and placed). ``budgets``: the prefill's (built here when not given)."""
        a = self.adapter
        if budgets is None:
            budgets = Budgets.build(a.pruner, a.info, a.budget, signals.special or [])
        parts = a.budget_parts(signals, lambda sp: budgets.of(sp).schedule.keep_of("vision"))
        return select_vision(a.pruner, signals, parts, budgets.pooled, budgets.vision_at_most(), record_scores)
