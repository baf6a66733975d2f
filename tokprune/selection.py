"""The selection core: budgets, a method's choice, its checks and the placement of new tokens, as plain data.

Pure functions of tensors and the :class:`~tokprune.pruners.base.Pruner` interface (no model, no adapter, no
transformers), used by the vision stage and the LLM stages alike, and importable by a serving engine:

* :class:`Budgets`: per image of one prefill, its content tokens, the user's budget and the method's
  :class:`~tokprune.schedule.Schedule`, computed once per prefill (one schedule per distinct image size);
* :func:`select_vision`: a vision stage's answer for each budget part, checked (counts, order, merges) and turned
  into one :class:`Placement` per image (where surviving and new tokens sit), plus each token's score when asked;
* :func:`select_llm`: an LLM stage's answer per row and image, checked, as kept indices into the current visual
  tokens (special tokens added back when the method keeps them), plus scores when asked;
* ``check_*``: the validation of a method's answer, with errors naming the method and the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tokprune.config import Budget
from tokprune.kernels import merge_tokens
from tokprune.pruners.base import (
    LLMSignals,
    ModelInfo,
    Pruner,
    UnsupportedError,
    VisionDecision,
    VisionSignals,
)
from tokprune.schedule import Schedule

#: one budget part of a vision stage: (image, token indices into it, tokens to keep, owner (row, index))
Part = tuple[int, torch.Tensor, int, tuple[int, int]]


@dataclass(frozen=True)
class ImageBudget:
    """One image's budget: ``n`` content tokens (special tokens are never counted), ``keep`` the user's budget
    resolved for it, ``schedule`` the method's per-stage budgets at that size."""

    n: int
    keep: int
    schedule: Schedule

    def stage_keep(self, stage: int) -> int:
        """Tokens kept after schedule stage ``stage`` (the vision stage, when present, is stage 0)."""
        return self.schedule.stages[stage].keep


def content_label(special: torch.Tensor) -> str:
    """What a budget error says it counted for an image with these special tokens."""
    # sync: only on the error path (an error message)
    return f"image ({int(special.sum())} newline tokens are not counted)" if bool(special.any()) else "image"


def image_budget(pruner: Pruner, info: ModelInfo, budget: Budget, special: torch.Tensor) -> ImageBudget:
    """The :class:`ImageBudget` of an image with this special-token mask: ``keep`` / ``keep_ratio`` count its
    content tokens (an error names both counts when a count budget exceeds them)."""
    n = int((~special).sum())  # sync: once per image per prefill, the content-token count sizes every budget
    rounding = pruner.ratio_rounding
    try:
        keep = budget.count(n, rounding=rounding)
    except ValueError:  # the error names what was counted (reads the mask again, on the error path only)
        keep = budget.count(n, content_label(special), rounding=rounding)
    return ImageBudget(n, keep, pruner.schedule(info, n, keep, keep_ratio=budget.keep_ratio))


@dataclass
class Budgets:
    """The budgets of one prefill: per image (row-major) its :class:`ImageBudget`, each schedule computed once.

    Built from the images' special-token masks; :meth:`of` answers for one of those masks (or any other, computed
    on demand), so a family hook handed a mask (``budget_parts``) reads the prefill's budgets, not new ones."""

    pruner: Pruner
    info: ModelInfo
    budget: Budget
    images: list[ImageBudget] = field(default_factory=list)
    _by_mask: dict[int, tuple[torch.Tensor, ImageBudget]] = field(default_factory=dict, repr=False)
    _by_size: dict[int, ImageBudget] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, pruner: Pruner, info: ModelInfo, budget: Budget, special: Sequence[torch.Tensor]) -> Budgets:
        out = cls(pruner, info, budget)
        out.images = [out.of(sp) for sp in special]
        return out

    def of(self, special: torch.Tensor) -> ImageBudget:
        """The budget of an image with this special-token mask."""
        hit = self._by_mask.get(id(special))
        if hit is not None and hit[0] is special:
            return hit[1]
        n = int((~special).sum())  # sync: once per image per prefill, the content-token count
        got = self._by_size.get(n)
        if got is None:
            got = image_budget(self.pruner, self.info, self.budget, special)
            self._by_size[n] = got
        self._by_mask[id(special)] = (special, got)
        return got

    def rows(self, rows_images: list[list[int]]) -> list[list[ImageBudget]]:
        """The images' budgets per row of the batch (``rows_images``: global image indices of each row)."""
        return [[self.images[j] for j in row] for row in rows_images]

    @property
    def pooled(self) -> bool:
        """Whether the method pools each stage's budget over a row's images (CATP)."""
        return bool(self.images) and self.images[0].schedule.pooled

    def vision_at_most(self) -> bool:
        """Whether the vision stage's budget is an upper bound (survivors decided inside the encoder)."""
        return bool(self.images) and self.images[0].schedule.stages[0].at_most


def select_vision(pruner: Pruner, signals: VisionSignals, parts: list[Part], pooled: bool = False,
                  at_most: bool = False, record_scores: bool = False
                  ) -> tuple[list[Placement], list[torch.Tensor] | None]:
    """Per image, where its surviving tokens sit: the pruner's choice within each budget part (kept indices, or a
    :class:`VisionDecision` with new tokens), plus the special tokens when the method keeps them; and, with
    ``record_scores``, the score it gave each original token (NaN where it scored none, None when it selects
    without scoring). Raises when the pruner returns the wrong count (per part, or per row when ``pooled``; at
    most the budget when ``at_most``), unsorted indices or an inconsistent merge."""
    ordinal = _part_ordinals(parts)  # an encoder-space decision of part q of an image reads its q-th [CLS]
    parts = [p for p in parts if p[2] > 0 or pooled]
    sub = signals.subset([(j, idx) for j, idx, _, _ in parts], [owner for *_, owner in parts])
    ks = [k for _, _, k, _ in parts]
    picks, part_scores = pruner.vision_stage(sub, ks, record_scores) if parts else ([], None)
    scores = None
    if part_scores is not None:
        scores = [torch.full((f.shape[0],), float("nan")) for f in signals.features]
        for (j, idx, _, _), sc in zip(parts, part_scores):
            scores[j][idx.cpu()] = sc.detach().float().cpu()
    if len(picks) != len(parts):
        raise RuntimeError(f"{pruner.name}.select_vision returned {len(picks)} index sets for {len(parts)} images")
    images = [_ImageChoice(int(f.shape[0]), f.device) for f in signals.features]
    rows: dict[int, list[int]] = {}
    for (j, idx, k, owner), pick in zip(parts, picks):
        got = images[j].add(pick, idx, None if pooled or at_most else k, pruner.name, ordinal[id(idx)])
        if at_most and got > k:
            raise RuntimeError(f"{pruner.name}.select_vision returned {got} kept tokens where the bound is {k}")
        rows.setdefault(owner[0], [0, 0])
        rows[owner[0]][0] += got
        rows[owner[0]][1] += got if at_most else k
    check_pooled(rows, f"{pruner.name}.select_vision")
    special = signals.special or [torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
                                  for f in signals.features]
    placements = [img.place(sp if pruner.keep_newlines else None, sp) for img, sp in zip(images, special)]
    return placements, scores


def _part_ordinals(parts: list[Part]) -> dict[int, tuple[int, int]]:
    """Per part (by its index tensor's id): (its ordinal among its image's parts, the image's part count)."""
    count: dict[int, int] = {}
    for j, *_ in parts:
        count[j] = count.get(j, 0) + 1
    seen: dict[int, int] = {}
    out = {}
    for j, idx, *_ in parts:
        out[id(idx)] = (seen.get(j, 0), count[j])
        seen[j] = seen.get(j, 0) + 1
    return out


def llm_budgets(pruner: Pruner, info: ModelInfo, stage: int, content: list[list[torch.Tensor]],
                budgets: list[list[ImageBudget]], pooled: bool) -> list[list[int]]:
    """Per row and image, the tokens an LLM stage (schedule stage ``stage``) keeps: the schedule's count, at most
    what is alive; with a pooled budget, the method's :meth:`~tokprune.pruners.base.Pruner.row_budgets`."""
    if pooled:  # the method spreads each row's budget over the row's images; only the row's sum binds
        return [pruner.row_budgets(info, stage, [b.n for b in brow], [b.keep for b in brow]) if brow else []
                for brow in budgets]
    return [[min(int(c.numel()), b.stage_keep(stage)) for c, b in zip(crow, brow)]
            for crow, brow in zip(content, budgets)]


def select_llm(pruner: Pruner, signals: LLMSignals, ks: list[list[int]], content: list[list[torch.Tensor]],
               special: list[list[torch.Tensor]], pooled: bool = False, record_scores: bool = False,
               at_most: list[list[bool]] | None = None, new_tokens: Callable[[list], tuple[list, list]] | None = None,
               ) -> tuple[list[list[torch.Tensor]], torch.Tensor | None, list]:
    """Per row and image, the sorted indices among the image's current visual tokens (special ones included) that
    an LLM stage keeps: the pruner's choice among the ``content`` tokens (``ks`` of them, at most that many where
    ``at_most``; per row when ``pooled``), checked, plus the special tokens when the method keeps them; the (B, n)
    scores it selected by, with ``record_scores`` (None when it selects without scoring); and, per row and image,
    what ``new_tokens`` made of an :class:`~tokprune.pruners.base.LLMDecision` (its new tokens' slots are then
    part of the kept indices), else None."""
    picked, scores = pruner.llm_stage(signals, ks, record_scores)
    at_most = at_most or [[False] * len(krow) for krow in ks]
    news: list = [[None] * len(row) for row in picked]
    if new_tokens is not None:
        picked, news = new_tokens(picked)
    who = f"{pruner.name}.select_llm"
    rel: list[list[torch.Tensor]] = []
    for crow, prow, krow, srow, arow in zip(content, picked, ks, special, at_most):
        rel.append([_llm_kept(c, p, kk, sp, am, pooled, pruner.keep_newlines, who)
                    for c, p, kk, sp, am in zip(crow, prow, krow, srow, arow)])
    check_pooled({bi: [sum(int(p.numel()) for p in prow), sum(krow)] for bi, (prow, krow, arow) in
                  enumerate(zip(picked, ks, at_most)) if not any(arow)}, who)  # an at_most image: checked above
    return rel, scores, news


def _llm_kept(c: torch.Tensor, p: torch.Tensor, k: int, sp: torch.Tensor, at_most: bool, pooled: bool,
              keep_special: bool, who: str) -> torch.Tensor:
    """One image's answer checked, as indices into its current visual tokens (special ones added when kept)."""
    check_indices(p, int(c.numel()), None if pooled or at_most else k, who)
    if at_most and p.numel() > k:
        raise RuntimeError(f"{who} returned {p.numel()} tokens where the budget is at most {k}")
    extra = [sp.nonzero()[:, 0]] if keep_special else []  # sync: per stage, variable-size
    return torch.cat([c[p.to(c.device)], *extra]).sort().values


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
    #: (m,) what each encoder row is (``VisionDecision.row_kinds``), when the pruner said
    row_kinds: torch.Tensor | None = None
    #: (rows, tokens): encoder rows that are the image's LLM token ``tokens[i]`` unchanged
    #: (``VisionDecision.row_copies``), taken from the features instead of projected again
    row_copies: tuple[torch.Tensor, torch.Tensor] | None = None

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
        self.encoder: tuple | None = None  # (rows, slots, assign, row_copies)
        self.encoder_parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, slots, kinds)

    def add(self, pick: torch.Tensor | VisionDecision, idx: torch.Tensor, k: int | None, who: str,
            part: tuple[int, int] = (0, 1)) -> int:
        """Take one part's answer (``k``: its budget, None when pooled; ``part``: its ordinal among the image's
        parts and their count); returns the tokens it keeps or adds."""
        n_part = int(idx.numel())
        if not isinstance(pick, VisionDecision):
            check_indices(pick, n_part, k, who)
            self.kept.append(idx[pick.to(idx.device)])
            return int(pick.numel())
        if pick.encoder_rows is not None:
            if part[1] > 1:
                return self._add_encoder_part(pick, idx, k, who, part)
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
        self.encoder = (rows, idx[sl], pick.assign.to(idx.device).long(), pick.row_copies)
        return m

    def _add_encoder_part(self, pick: VisionDecision, idx: torch.Tensor, k: int | None, who: str,
                          part: tuple[int, int]) -> int:
        """An encoder-space decision for part ``part[0]`` of an image of ``part[1]`` parts (LLaVA-NeXT tiles): its
        rows over (its [CLS], its tokens) become rows over the image's sequence (the image's tokens, then one [CLS]
        per part, part ``q``'s at ``n + q``), appended after the earlier parts' rows."""
        rows, m, n_part = pick.encoder_rows, pick.n_new, int(idx.numel())
        if self.kept or self.m or pick.kept.numel() or pick.slots is None or (k is not None and m != k):
            raise RuntimeError(f"{who}: an encoder-space decision has no kept tokens, {k} rows (the budget) and "
                               "one slot per row, in every part of its image")
        if rows.dim() != 2 or rows.shape[1] != 1 + n_part:
            raise RuntimeError(f"{who}: an encoder-space decision of an image part has rows over 1 + {n_part} columns "
                               "(the part's [CLS], then its tokens)")
        sl = pick.slots.to(idx.device).long()
        # sync: once per part: validating the pruner's decision (a clear error)
        if sl.shape != (m,) or bool(((sl < 0) | (sl >= n_part)).any()) or sl.unique().numel() != m:
            raise RuntimeError(f"{who}: slots must be ({m},) distinct indices into the part's {n_part} tokens")
        full = rows.new_zeros(m, self.n + part[1])
        full[:, self.n + part[0]] = rows[:, 0]
        full[:, idx] = rows[:, 1:]
        kinds = pick.row_kinds if pick.row_kinds is not None else torch.full((m,), -1, dtype=torch.long)
        done = self.encoder_parts or (rows.new_zeros(0, self.n + part[1]), idx.new_zeros(0), kinds.new_zeros(0))
        a = pick.assign.to(idx.device).long()
        self.assign[idx] = torch.where(a >= 0, a + int(done[0].shape[0]), a)
        self.encoder_parts = (torch.cat([done[0], full]), torch.cat([done[1], idx[sl]]),
                              torch.cat([done[2], kinds.to(done[2].device)]))
        return m

    def _place_encoder_parts(self, keep_special: torch.Tensor | None) -> Placement:
        """The rows' slots plus the special tokens the method keeps (LLaVA-NeXT's newlines in HF's layout): the
        family builds the rows and takes the special tokens' features as they are (``slots[new_at]``: the rows')."""
        rows, sl, kinds = self.encoder_parts
        kept = [sl]
        if keep_special is not None:
            kept.append(keep_special.nonzero()[:, 0].to(sl.device))  # sync: once per image, the kept specials
        slots = torch.cat(kept).sort().values
        return Placement(slots, torch.searchsorted(slots, sl), self.assign, encoder_rows=rows, row_kinds=kinds)

    def place(self, keep_special: torch.Tensor | None, special: torch.Tensor) -> Placement:
        if self.encoder_parts is not None:  # rows of several parts, over the image's sequence
            return self._place_encoder_parts(keep_special)
        if self.encoder is not None:  # every token of the image is a row (special tokens have no encoder row)
            rows, sl, assign, copies = self.encoder
            # sync: once per image: an encoder-space decision cannot keep special tokens (a clear error)
            if keep_special is not None and bool(keep_special.any()):
                raise UnsupportedError("an encoder-space decision cannot keep special tokens (LLaVA-NeXT newlines)")
            slots = sl.sort().values
            return Placement(slots, torch.searchsorted(slots, sl), assign, encoder_rows=rows, row_copies=copies)
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
