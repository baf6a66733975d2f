"""VisPruner: important tokens by visual attention, then diverse tokens from the rest after duplicates are removed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import ModelInfo, Pruner, Signal, VisionRequest, VisionSignals
from tokprune.registry import register_method
from tokprune.rules.vispruner import PER_ROUND, vispruner_select

#: the reference's default ``--important_ratio``
IMPORTANT_RATIO = 0.5


@register_method("vispruner")
@dataclass
class VisPruner(Pruner):
    """VisPruner (ICCV'25, arXiv 2412.01818 v2, "Beyond Text-Visual Attention"; reference code Theia-4869/VisPruner):
    a pre-LLM, text-agnostic baseline (:func:`tokprune.rules.vispruner.vispruner_select`). Per image (per tile on
    LLaVA-NeXT), of ``keep`` tokens:

    * ``int(keep * important_ratio)`` **important** tokens: the patches with the most [CLS] attention at the feature
      layer (row 0, mean over heads);
    * the rest **diverse**: the remaining patches, in descending attention order, lose their most duplicated
      members round by round (``min(8, R - diverse)`` per round, each even-position token scored by its best
      cosine with an odd-position one, on the feature layer's hidden states, before the projector) until
      ``keep - important`` remain.

    Kept tokens stay in their original order (LLaVA: positions re-indexed contiguously, as the reference's
    ``inputs_embeds`` path; Qwen: M-RoPE positions kept).

    **CLS-free encoders (Qwen2/2.5/3-VL)**: the important tokens are ranked by the attention each merged token
    *receives* at the feature layer (the last ViT block; mean over heads and all queries, the 2x2 merge unit's
    patches averaged), the variant other papers use for [CLS]-based methods on Qwen (VisionZip there); the
    duplicates are judged on the same block's output hidden states, merge-unit mean (before the merger, as the
    reference judges CLIP's before the projector). The reference code has no Qwen path.

    Options: ``important_ratio`` (0.5, the reference's default; its README runs MME with 0.75): the important
    tokens' share, in [0, 1], what ``tokprune tune`` searches; ``per_round`` (8): duplicates removed per round.

    Paper budgets (presets): LLaVA-1.5 ``keep=192 / 128 / 64`` (the README's examples run 128 and 64, with
    ``important_ratio`` 0.5 and 0.75); LLaVA-NeXT 5 tiles x 32 = 160 tokens
    per image: ``keep=32, tile_budget="per_tile_reference"`` is the reference's count (``T`` in every tile, base
    included, newlines kept on top); the family default ``tile_budget="per_tile"`` splits ``keep`` over the tiles
    instead (``keep=160`` ~ 32 per tile).

    Code vs this implementation (docs/methods.md): stable sorts (ties to the lower index) where the reference's
    ``argsort`` leaves tie order unspecified; an odd remainder count splits ``ceil/floor`` (the reference's
    indexing fails there); cosines from one matrix computed up front, in float32 (``score_dtype="model"``: in the
    model's dtype, as the reference's half-precision run, and the attention scores likewise); LLaVA-NeXT tiles
    select among the tokens HF's unpadded layout keeps (the reference picks among a crop's padded positions, then
    unpads). With
    LLaVA's ``vision_feature_select_strategy="full"`` the [CLS] token is a candidate like any token (scored by the
    [CLS] row's attention to itself); the reference runs with patch features only.
    """

    summary = "important tokens by [CLS] (Qwen: received) attention + diverse tokens left after duplicate removal"
    paper = "VisPruner, arXiv 2412.01818"

    search_space = {"important_ratio": ("float", 0.0, 1.0)}

    important_ratio: float = IMPORTANT_RATIO
    per_round: int = PER_ROUND

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"vispruner: important_ratio is the important tokens' share of keep, a number in "
                             f"[0, 1] (the reference's default is {IMPORTANT_RATIO}); got {r!r}")
        self.important_ratio = float(r)
        p = self.per_round
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"vispruner: per_round is the number of duplicates removed per round, an int >= 1 "
                             f"(the reference's is {PER_ROUND}); got {p!r}")

    def signals_of(self, info: ModelInfo) -> tuple[Signal, Signal]:
        """(importance signal, duplicate-metric signal) at the feature layer: the [CLS] row, or received attention
        where the encoder has no [CLS] token; the layer's output hidden states."""
        f = info.feature_layer
        score = Signal("cls", f) if info.has_cls else Signal("received", f)
        return score, Signal("hidden_out", f)

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest(self.signals_of(info))

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        """Importance per token: head-mean [CLS] attention (received attention without [CLS])."""
        return [s.float() for s in signals[self.signals_of(signals.ctx.info)[0]]]

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor]:
        scores = self.vision_scores(signals)
        hidden = signals[self.signals_of(signals.ctx.info)[1]]
        out: list[torch.Tensor | None] = [None] * len(ks)
        groups: dict[tuple[int, int, torch.device], list[int]] = {}
        for j, (s, k) in enumerate(zip(scores, ks)):
            groups.setdefault((int(s.shape[0]), k, s.device), []).append(j)
        for (n, k, dev), members in groups.items():
            if k >= n:
                for j in members:
                    out[j] = torch.arange(n, device=signals.features[j].device)
                continue
            dtype = signals.features[members[0]].dtype if self.score_dtype == "model" else torch.float32
            # one image of its size: its hidden states as they are (a stack of one tensor would copy them)
            states = hidden[members[0]].to(dev)[None] if len(members) == 1 else torch.stack(
                [hidden[j].to(dev) for j in members])
            sel = vispruner_select(torch.stack([scores[j] for j in members]), states, k, self.important_ratio,
                                   self.per_round, dtype)
            for row, j in enumerate(members):
                out[j] = sel.kept[row].to(signals.features[j].device)
        return out  # type: ignore[return-value]
