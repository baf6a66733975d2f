"""DivPrune: keep the most diverse visual tokens (greedy max-min cosine distance), text-agnostic, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import ModelInfo, Pruner, VisionRequest, VisionSignals
from tokprune.registry import register_method
from tokprune.rules.divprune import cosine_distance, divprune_select


@register_method("divprune")
@dataclass
class DivPrune(Pruner):
    """DivPrune (CVPR'25, arXiv 2503.02175; reference code vbdi/divprune): a pre-LLM, text-agnostic baseline that
    keeps, per image, the subset of its visual tokens with the largest minimum pairwise distance, found greedily
    (:func:`tokprune.rules.divprune.divprune_select`):

    * tokens: the LLM input embeddings of the image (after the projector / Qwen's merger; on Qwen3-VL the main
      features, DeepStack levels follow the kept set), as the reference takes them from ``inputs_embeds``;
    * distance ``1 - cos``; first pick the token whose nearest other token is farthest; then repeatedly the token
      farthest from the chosen set (its smallest distance to a chosen token), first index on ties; the kept tokens
      stay in their original order (positions: LLaVA re-indexed contiguously, as the reference's
      ``inputs_embeds`` path; Qwen keeps M-RoPE positions).

    Options: ``newlines`` (True; LLaVA-NeXT): the row newlines are never candidates and are kept on top of the
    budget (keep-all equals the model, the trained layout), False keeps none. ``distinct`` (True): a chosen token
    is never picked again, so exactly ``keep`` distinct tokens survive; False is the reference's bare ``argmax``,
    which can re-pick a chosen token (and keep fewer distinct ones) when only exact duplicates are left; both agree
    whenever the reference keeps ``keep`` distinct tokens. There is no numeric option, so nothing for
    ``tokprune tune`` to search.

    Budget: ``keep`` tokens per image, or ``keep_ratio`` (``round(ratio * n)``, the reference's
    ``round(SUBSET_RATIO * n)``). Paper budgets (presets): ``keep_ratio=0.098`` (the reference's default
    ``SUBSET_RATIO``: 56 of LLaVA-1.5's 576 tokens) on LLaVA-1.5 and LLaVA-NeXT; the baselines tables of later
    papers use LLaVA-1.5 ``keep=192 / 128 / 64`` and LLaVA-NeXT ``keep=640 / 320 / 160``.

    Code vs this implementation (docs/methods.md lists them): the reference prunes one image of a batch-1 prompt
    (a fixed 35-token system prefix); here every image of every row is pruned on its own. LLaVA-NeXT: the reference
    selects over the image's whole packed sequence, ``image_newline`` tokens included (all equal, so it keeps at
    most one of them); here newlines are never candidates (kept on top, or none with ``newlines=False``) and, with
    ``tile_budget="global"``, the selection runs over all the image's content tokens at once, the reference's
    layout; the family default ``tile_budget="per_tile"`` splits the budget over the tiles and selects within
    each. Distances in float32 by default; ``score_dtype="model"`` computes them in the model's dtype, as the
    reference (fp16 in its runs).
    """

    summary = "greedy max-min cosine diversity over the projected visual tokens (text-agnostic)"
    paper = "DivPrune, arXiv 2503.02175"

    distinct: bool = True
    newlines: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.distinct, bool):
            raise TypeError(f"divprune: distinct must be True (never re-pick a chosen token) or False (the "
                            f"reference's bare argmax), got {self.distinct!r}")
        if not isinstance(self.newlines, bool):
            raise TypeError(f"divprune: newlines must be True (LLaVA-NeXT's row newlines kept on top of the budget, "
                            f"the model's trained layout) or False (none), got {self.newlines!r}")
        self.keep_newlines = self.newlines

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest()  # the projected features only, which every vision stage receives

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        """Per image, each token's *isolation*: its ``1 - cos`` distance to its nearest other token (the first
        pick's criterion; what ``record_scores`` / ``tokprune show --scores`` draw). The distance matrices are left in
        ``signals.ctx.state`` for :meth:`select_vision`, so they are computed once per prefill."""
        dists = _distances(signals.features, self.score_dtype)
        if signals.ctx is not None:
            signals.ctx.state[_STATE] = (signals.features, dists)
        return [d.topk(2, dim=0, largest=False).values[1] if d.shape[0] > 1 else d[0] for d in dists]

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor]:
        """Per image, the greedy max-min subset of ``ks[i]`` of its projected tokens; images of equal size and
        budget run as one batch."""
        # the isolation scores are not needed to select (divprune_select computes its first pick itself): they are
        # computed only when the record asks for them, and then leave their distance matrices for the selection
        if signals.score_sink is not None:
            self.vision_scores(signals)
        feats, dists = signals.ctx.state.pop(_STATE, (None, None)) if signals.ctx is not None else (None, None)
        if feats is not signals.features:
            dists = _distances(signals.features, self.score_dtype)
        out: list[torch.Tensor | None] = [None] * len(ks)
        groups: dict[tuple[int, int, torch.device], list[int]] = {}
        for j, (f, k) in enumerate(zip(signals.features, ks)):
            groups.setdefault((int(f.shape[0]), k, f.device), []).append(j)
        for (n, k, _), members in groups.items():
            if k >= n:
                for j in members:
                    out[j] = torch.arange(n, device=signals.features[j].device)
                continue
            stack = torch.stack([signals.features[j] for j in members])
            sel = divprune_select(stack, k, self.distinct, distance=torch.stack([dists[j] for j in members]))
            for row, j in enumerate(members):
                out[j] = sel.kept[row]
        return out  # type: ignore[return-value]


#: key of the per-prefill distance matrices in ``PrefillContext.state``
_STATE = "divprune.distance"


def _distances(features: list[torch.Tensor], score_dtype: str = "float32") -> list[torch.Tensor]:
    """``1 - cos`` matrices of each image's tokens, images of equal size in one batched product; in float32, or in
    the features' (the model's) dtype with ``score_dtype="model"``."""
    out: list[torch.Tensor | None] = [None] * len(features)
    groups: dict[tuple[int, torch.device], list[int]] = {}
    for j, f in enumerate(features):
        groups.setdefault((int(f.shape[0]), f.device), []).append(j)
    for members in groups.values():
        stack = torch.stack([features[j] for j in members])
        d = cosine_distance(stack, stack.dtype if score_dtype == "model" else torch.float32)
        for row, j in enumerate(members):
            out[j] = d[row]
    return out  # type: ignore[return-value]
