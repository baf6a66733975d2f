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
defines (``adapter.budget_parts``: one per image, or LLaVA-NeXT tiles), asks the pruner and checks its answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokprune.kernels import merge_tokens
from tokprune.pruners.base import (
    ATTENTION_KINDS,
    PrefillContext,
    Signal,
    UnsupportedError,
    VisionDecision,
    VisionRequest,
    VisionSignals,
)
from tokprune.record import capture_scores
from tokprune.signals import TAPS, attention_rows, received_attention, remove_installed, varlen_chunks

if TYPE_CHECKING:
    from tokprune.patches.base import Adapter

TAPPED_KINDS = (*ATTENTION_KINDS, "keys", "values")


def _heads(x: torch.Tensor, heads: str) -> torch.Tensor:
    """(B, H, K) -> (B, K) head mean or (B, K, H)."""
    return x.mean(1) if heads == "mean" else x.permute(0, 2, 1)


def _states(x: torch.Tensor, heads: str) -> torch.Tensor:
    """(B, H, K, d) key / value states -> (B, K, d) head mean or (B, K, H, d)."""
    return x.float().mean(1) if heads == "mean" else x.float().permute(0, 2, 1, 3)


def tap_values(signals: list[Signal], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scaling: float, model_dtype: bool = False) -> dict[Signal, torch.Tensor]:
    """What the tapped kinds of ``signals`` are for one bidirectional attention call, each (B, n_patches, ...).
    ``model_dtype``: attention kinds rounded as the model's dtype rounds them (``score_dtype="model"``)."""
    out: dict[Signal, torch.Tensor] = {}
    received: torch.Tensor | None = None
    for sig in signals:
        if sig.kind in ("received", "rows") and received is None:
            received = received_attention(query, key, mask, scaling, model_dtype=model_dtype)  # (B, H, K)
        if sig.kind == "cls":
            rows = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)
            out[sig] = _heads(attention_rows(query, key, mask, scaling, rows, causal=False,
                                             model_dtype=model_dtype)[:, :, 0], sig.heads)
        elif sig.kind == "received":
            out[sig] = _heads(received, sig.heads)
        elif sig.kind == "rows":
            out[sig] = _heads(chosen_rows(sig.queries(received.mean(1)), query, key, mask, scaling), sig.heads)
        elif sig.kind == "keys":
            out[sig] = _states(key, sig.heads)
        elif sig.kind == "values":
            out[sig] = _states(value, sig.heads)
        if model_dtype and sig.kind in ATTENTION_KINDS:  # the score itself in the model's dtype
            out[sig] = out[sig].to(query.dtype).float()
    return out


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
        self.raw: dict[Signal, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        self._handles.append(self.adapter.vision_tower.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        for layer in self.request.layers():
            sigs = [s for s in self.request.signals if s.layer == layer]
            block, attention = self.adapter.vision_layer(layer)
            tapped = [s for s in sigs if s.kind in TAPPED_KINDS]
            if tapped:
                TAPS.add(attention, partial(self._tap, tapped))
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
        for q, k, v in chunks:
            model_dtype = getattr(self.adapter.pruner, "score_dtype", "float32") == "model"
            for sig, x in tap_values(signals, q, k, v, mask if len(chunks) == 1 else None, scaling,
                                     model_dtype).items():
                self.raw.setdefault(sig, []).append(x)

    def _hidden_in(self, sig: Signal, module, args: tuple, kw: dict) -> None:
        x = args[0] if args else kw["hidden_states"]
        self.raw.setdefault(sig, []).append(x.detach().float() if x.dim() == 3 else x.detach().float()[None])

    def _hidden_out(self, sig: Signal, module, args: tuple, out: Any) -> None:
        x = out[0] if isinstance(out, tuple) else out
        self.raw.setdefault(sig, []).append(x.detach().float() if x.dim() == 3 else x.detach().float()[None])

    # ------------------------------------------------------------------ signals and selection
    def signals(self, features: list[torch.Tensor], owners: list[tuple[int, int]], ctx: PrefillContext,
                grid: list[torch.Tensor] | None, special: list[torch.Tensor]) -> VisionSignals:
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
            values[sig] = self.adapter.to_tokens(calls, features, "concat" if sig.kind == "pixels" else "mean")
        return VisionSignals(features=features, values=values, owners=owners, grid=grid, special=special, ctx=ctx)

    def select(self, signals: VisionSignals, record_scores: bool = False
               ) -> tuple[list[Placement], list[torch.Tensor] | None]:
        """Per image, where its surviving tokens sit: the pruner's choice within each budget part (kept indices,
        or a :class:`VisionDecision` with new tokens), plus the special tokens when the method keeps them; and,
        with ``record_scores``, the score it gave each original token (NaN where it scored none). Raises when the
        pruner returns the wrong count (per image, or per row when the schedule pools its budget), unsorted
        indices or an inconsistent merge."""
        pruner = self.adapter.pruner
        budget = self.adapter.schedule
        pooled = bool(signals.special) and budget(signals.special[0]).pooled
        at_most = bool(signals.special) and budget(signals.special[0]).stages[0].at_most  # a bound, not a count
        parts = [p for p in self.adapter.budget_parts(signals, lambda sp: budget(sp).keep_of("vision"))
                 if p[2] > 0 or pooled]
        sub = signals.subset([(j, idx) for j, idx, _, _ in parts], [owner for *_, owner in parts])
        with capture_scores(pruner, record_scores) as seen:
            picks = pruner.select_vision(sub, [k for _, _, k, _ in parts]) if parts else []
        scores = None
        if seen:
            scores = [torch.full((f.shape[0],), float("nan")) for f in signals.features]
            for (j, idx, _, _), sc in zip(parts, seen[0]):
                scores[j][idx.cpu()] = sc.detach().float().cpu()
        if len(picks) != len(parts):
            raise RuntimeError(f"{pruner.name}.select_vision returned {len(picks)} index sets for {len(parts)} images")
        images = [_ImageChoice(int(f.shape[0]), f.device) for f in signals.features]
        rows: dict[int, list[int]] = {}
        for (j, idx, k, owner), pick in zip(parts, picks):
            got = images[j].add(pick, idx, None if pooled or at_most else k, pruner.name)
            if at_most and got > k:
                raise RuntimeError(f"{pruner.name}.select_vision returned {got} kept tokens where the bound is {k}")
            rows.setdefault(owner[0], [0, 0])
            rows[owner[0]][0] += got
            rows[owner[0]][1] += got if at_most else k
        check_pooled(rows, f"{pruner.name}.select_vision")
        return [img.place(sp if pruner.keep_newlines else None, sp) for img, sp in zip(images, signals.special)], scores


@dataclass
class Placement:
    """Where one image's surviving tokens sit in the LLM sequence.

    ``slots``: sorted original indices whose places stay in the sequence; ``new_at`` (m,): positions within
    ``slots`` that carry a new token instead of the original one, built from ``assign`` / ``weights`` (a weighted
    mean of the original tokens assigned to it) or taken from ``features``.
    """

    slots: torch.Tensor
    new_at: torch.Tensor
    assign: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    features: torch.Tensor | None = None
    #: (m, n_enc) an encoder-space decision's rows (see VisionDecision): every token is built before the projector,
    #: in row order, by the adapter (:meth:`~tokprune.patches.base.Adapter.build_encoder_rows`), not by build()
    encoder_rows: torch.Tensor | None = None

    @property
    def n_new(self) -> int:
        return int(self.new_at.numel())

    def sources(self) -> list[torch.Tensor]:
        """Original indices each new token absorbed."""
        # sync: per new token, the sources the record lists (variable-size)
        return [(self.assign == m).nonzero()[:, 0] for m in range(self.n_new)]

    def build(self, f: torch.Tensor, level: str = "features") -> torch.Tensor:
        """The image's tokens after the stage: ``f[slots]`` with the new tokens in their slots. ``f`` is the
        image's (n, D) features or any per-token encoder output merged the same way (a DeepStack level)."""
        if self.encoder_rows is not None:
            raise UnsupportedError(f"tokens merged before the projector cannot be rebuilt from the {level}; the "
                                   "adapter projects them (a family with per-token outputs beside the features "
                                   "refuses encoder-space decisions)")
        out = f[self.slots.to(f.device)]
        if not self.n_new:
            return out
        if self.features is not None:
            if level != "features":
                raise UnsupportedError(
                    f"explicit new token features cannot be merged into the {level} of this model; return a "
                    "VisionDecision with assign / weights (a weighted mean of original tokens) instead"
                )
            new = self.features
        else:
            w = None if self.weights is None else self.weights.to(f.device)
            new = merge_tokens(f, self.assign.to(f.device), w, num_targets=self.n_new)
        out = out.clone()
        out[self.new_at.to(f.device)] = new.to(device=f.device, dtype=f.dtype)
        return out


class _ImageChoice:
    """Collects the pruner's answers for the budget parts of one image and places its new tokens."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        self.kept: list[torch.Tensor] = []
        self.assign = torch.full((n,), -1, dtype=torch.long, device=device)
        self.weights: torch.Tensor | None = None
        self.features: list[torch.Tensor] = []
        self.slots: list[torch.Tensor] = []  # per part: the new tokens' chosen slots (-1: the position policy)
        self.m = 0
        self.encoder: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, slots, assign)

    def add(self, pick: torch.Tensor | VisionDecision, idx: torch.Tensor, k: int | None, who: str) -> int:
        """Take one part's answer (``k``: its budget, None when pooled); returns the tokens it keeps or adds."""
        n_part = int(idx.numel())
        if not isinstance(pick, VisionDecision):
            check_indices(pick, n_part, k, who)
            self.kept.append(idx[pick.to(idx.device)])
            return int(pick.numel())
        if pick.encoder_rows is not None:
            return self._add_encoder(pick, idx, k, who)
        m = pick.n_new
        check_indices(pick.kept, n_part, None if k is None else k - m,
                      f"{who} (kept tokens of a decision with {m} new tokens)")
        if pick.kept.numel() + m > n_part:
            raise RuntimeError(f"{who}: {pick.kept.numel()} kept + {m} new tokens exceed the part's {n_part}")
        a = pick.assign.to(idx.device).long()
        # sync: once per image part: validating the pruner's decision (a clear error)
        if a.shape != (n_part,) or bool((a < -1).any()) or bool((a >= m).any()):
            raise RuntimeError(f"{who}: assign must be ({n_part},) long with values in [-1, {m})")
        # sync: once per image part: validating the pruner's decision
        if pick.kept.numel() and bool((a[pick.kept.to(idx.device)] >= 0).any()):
            raise RuntimeError(f"{who}: a kept token cannot also be merged into a new token")
        # sync: once per image part: validating the pruner's decision
        if pick.features is None and m and bool((torch.bincount(a[a >= 0], minlength=m) == 0).any()):
            raise RuntimeError(f"{who}: every new token needs at least one source (or pass features)")
        if (pick.features is None) != (not self.features) and self.m:
            raise RuntimeError(f"{who}: give explicit features for the new tokens of every part or of none")
        self.kept.append(idx[pick.kept.to(idx.device)])
        # sync: once per image part, the new tokens' sources (variable-size)
        self.assign[idx[a >= 0]] = a[a >= 0] + self.m
        if pick.weights is not None:
            if self.weights is None:
                self.weights = torch.ones(self.n, dtype=torch.float32, device=idx.device)
            self.weights[idx] = pick.weights.to(idx.device).float()
        if pick.features is not None:
            self.features.append(pick.features)
        if pick.slots is not None:
            sl = pick.slots.to(idx.device).long()
            own = a[sl.clamp(0, n_part - 1)] == torch.arange(m, device=a.device)
            # sync: once per image part: validating the pruner's decision (a clear error)
            if sl.shape != (m,) or bool(((sl < 0) | (sl >= n_part) | ~own).any()):
                raise RuntimeError(f"{who}: slots must be ({m},) long, each new token's slot one of its own sources")
            self.slots.append(idx[sl])
        elif m:
            self.slots.append(torch.full((m,), -1, dtype=torch.long, device=idx.device))
        self.m += m
        return int(pick.kept.numel()) + m

    def _add_encoder(self, pick: VisionDecision, idx: torch.Tensor, k: int | None, who: str) -> int:
        """An encoder-space decision: the image's only part (one encoder sequence), every token a row."""
        rows, m = pick.encoder_rows, pick.n_new
        if self.kept or self.m or self.encoder is not None or int(idx.numel()) != self.n:
            raise RuntimeError(f"{who}: an encoder-space decision must cover its whole image in one part")
        if pick.kept.numel() or pick.slots is None or rows.dim() != 2 or (k is not None and m != k):
            raise RuntimeError(f"{who}: an encoder-space decision has no kept tokens, {k} rows (the budget) and "
                               "one slot per row")
        sl = pick.slots.to(idx.device).long()
        # sync: once per image: validating the pruner's decision (a clear error)
        if sl.shape != (m,) or bool(((sl < 0) | (sl >= self.n)).any()) or sl.unique().numel() != m:
            raise RuntimeError(f"{who}: slots must be ({m},) distinct indices into the image's {self.n} tokens")
        self.encoder = (rows, idx[sl], pick.assign.to(idx.device).long())
        return m

    def place(self, keep_special: torch.Tensor | None, special: torch.Tensor) -> Placement:
        if self.encoder is not None:  # every token of the image is a row (special tokens have no encoder row)
            rows, sl, assign = self.encoder
            # sync: once per image: an encoder-space decision cannot keep special tokens (a clear error)
            if keep_special is not None and bool(keep_special.any()):
                raise UnsupportedError("an encoder-space decision cannot keep special tokens (LLaVA-NeXT newlines)")
            slots = sl.sort().values
            return Placement(slots, torch.searchsorted(slots, sl), assign, encoder_rows=rows)
        # sync: once per image, the kept special tokens' indices (a variable-size output)
        kept = list(self.kept) + ([keep_special.nonzero()[:, 0]] if keep_special is not None else [])
        kept_all = torch.cat(kept).sort().values if kept else self.assign.new_zeros(0)
        if not self.m:
            return Placement(kept_all, kept_all.new_zeros(0))
        free = ~special.to(kept_all.device).clone()
        free[kept_all] = False
        chosen = torch.cat(self.slots).to(kept_all.device)
        # sync: once per image with new tokens, the slots the pruner chose (taken first)
        free[chosen[chosen >= 0]] = False
        new_slots = []
        for m in range(self.m):
            if chosen[m] >= 0:  # sync: per new token, whether the pruner chose its slot
                new_slots.append(chosen[m])
                continue
            # sync: per new token, its slot: a dropped slot of its own image (variable)
            src = (self.assign == m).nonzero()[:, 0]
            # sync: per new token, its slot (variable)
            cand = src[free[src]]
            slot = cand[0] if cand.numel() else free.nonzero()[0, 0]
            free[slot] = False
            new_slots.append(slot)
        new_slots_t = torch.stack(new_slots)
        slots = torch.cat([kept_all, new_slots_t]).sort().values
        return Placement(slots, torch.searchsorted(slots, new_slots_t), self.assign, self.weights,
                         torch.cat(self.features) if self.features else None)


def check_pooled(rows: dict[int, list[int]], who: str) -> None:
    """Each row's total (tokens returned, budget) must match: the check of a pooled budget (and a sum check of a
    per-image one)."""
    for row, (got, k) in rows.items():
        if got != k:
            raise RuntimeError(f"{who} returned {got} tokens for row {row} where its budget is {k}")


def check_indices(idx: torch.Tensor, n: int, k: int | None, who: str, check: bool | None = None) -> None:
    """A pruner's kept indices must be ``k`` (any count when None) sorted, unique indices into ``n`` tokens.

    The count is host metadata and always checked; the values are read back only when ``check`` (default: on
    CPU, where reading costs nothing; on CUDA the read would be a host sync per image, as in tokprune.kernels)."""
    if k is not None and idx.numel() != k:
        raise RuntimeError(f"{who} returned {idx.numel()} kept tokens where the budget is {k}")
    if check is None:
        check = idx.device.type == "cpu"
    # sync: only when checking (default: on CPU only)
    bad = check and idx.numel() and (idx.min() < 0 or idx.max() >= n or
                                     (idx.numel() > 1 and bool((idx[1:] <= idx[:-1]).any())))  # sync: if check
    if bad:
        raise RuntimeError(f"{who} returned kept indices that are not sorted, unique and in [0, {n})")


def content_label(special: torch.Tensor) -> str:
    """What a budget error says it counted for an image with these special tokens."""
    # sync: only on the error path (an error message)
    return f"image ({int(special.sum())} newline tokens are not counted)" if bool(special.any()) else "image"
