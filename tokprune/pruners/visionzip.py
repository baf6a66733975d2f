"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged from the rest by key similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import (
    ModelInfo,
    Pruner,
    Signal,
    UnsupportedError,
    VisionDecision,
    VisionRequest,
    VisionSignals,
)
from tokprune.registry import register_method
from tokprune.rules.visionzip import PAPER_SPLIT, visionzip_select, visionzip_split

#: where contextual tokens are merged: before the projector, in the encoder's feature space (the reference), or
#: after it, on the LLM-ready tokens (every family; Qwen3-VL's DeepStack levels merge alike)
MERGES = ("encoder", "llm")


def _count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"visionzip: {name} must be a non-negative int or None (None: the paper's "
                         f"{PAPER_SPLIT[0]}:{PAPER_SPLIT[1]} split scaled to keep), got {value!r}")


@register_method("visionzip")
@dataclass
class VisionZip(Pruner):
    """VisionZip (CVPR'25, reference code dvlab-research/VisionZip), a pre-LLM baseline, text-agnostic.

    Per image (per tile on LLaVA-NeXT), ``keep = dominant + contextual`` tokens:

    * **dominant**: the patches with the most [CLS] attention at the feature layer, summed over heads, plus the
      [CLS] token itself (``dominant`` counts it, as the reference's ``visionzip(model, dominant=54)``);
    * **contextual**: the remaining patches' head-mean keys of the feature layer, L2-normalised; ``contextual``
      targets uniform over them (``step = max(1, M // C)``); every other remaining patch joins its most similar
      target (:func:`tokprune.rules.visionzip.visionzip_select`).

    ``dominant`` / ``contextual``: None (both) = the paper's 54:10 split scaled to each part's budget
    (``dominant = round(keep * 54 / 64)``: 108+20 at 128, 162+30 at 192); give one to fix it (the other is the
    rest) or both (they must sum to the budget of each image, or of each tile on LLaVA-NeXT).
    ``dominant_share`` (not in the paper; what ``tokprune tune`` searches, in [0.5, 1]): the split as a fraction of
    each part's budget, ``dominant = round(keep * dominant_share)``, the rest contextual (None: 54/64 = 0.84375,
    the paper's); exclusive with ``dominant`` / ``contextual``.

    ``merge="encoder"`` (the default on LLaVA-1.5 and per tile on LLaVA-NeXT, the reference dvlab-research/VisionZip
    ``visionzip/clip_encoder.py``): inside the vision path, from the feature
    layer's hidden states, the tokens ``[CLS] + dominant + contextual`` in that order (dominant in raster order, a
    contextual token = its target ``+`` the mean of its members, weights summing to 2; a target nobody joined stays
    itself), mapped by the projector (a :class:`~tokprune.pruners.base.VisionDecision` with ``encoder_rows``); the
    LLM sees them in that order at contiguous positions (LLaVA's default ``positions="compact"``). ``dominant``
    counts the [CLS] token (``dominant - 1`` patches), under either ``vision_feature_select_strategy``. The record's
    slots: each dominant patch its own, a contextual token its target's, [CLS] its own ("full") or the lowest free
    one ("default").

    LLaVA-NeXT with ``tile_budget="per_tile_reference"`` (the reference's NeXT path, ``visionzip/llava_arch.py``):
    every tile builds ``[CLS] + dominant + contextual`` (``keep`` per tile) and the LLM sees the base tile's tokens
    in that order, then the crops' dominant patches in the raster order of the stitched full crops, then every
    crop's [CLS], then every crop's contextual tokens, no newline (``row_kinds`` tell the adapter which row is
    which). With the default ``tile_budget="per_tile"`` (HF's layout, which the reference never uses) each tile
    builds the same tokens, each at its slot (a contextual token at its target's, the [CLS] at the tile's lowest
    free one), in slot order, newlines kept; ``dominant`` counts each tile's [CLS].

    ``merge="llm"`` (the default on Qwen, where Qwen3-VL's DeepStack levels must merge alike, and on LLaVA-NeXT
    with ``tile_budget="global"``): where the tokens sit (the seam's position policy, docs/design.md): dominant
    patches keep their slots (raster order); each contextual token takes the slot (and position id) of the
    lowest-index patch it absorbed, so it sits among the dominant patches in raster order. ``record.merged`` lists
    each contextual token's sources. Deviations from the reference there:

    * the tokens the LLM receives (after the projector / Qwen's merger) are merged, as a weighted mean. The
      contextual token keeps the reference's relative weights (target 1, each of its n members 1/n) normalised:
      ``(target + mean(members)) / 2`` (about half the reference's norm); contextual tokens sit at their first
      source's slot, not after the dominant ones;
    * the [CLS] token reaches the LLM only where the model's features carry it (LLaVA's
      ``vision_feature_select_strategy="full"``: it is kept first, at its own slot). With HF's default ``"default"``
      strategy the projector never sees [CLS], so its slot goes to one more dominant patch (``dominant`` patches);
    * LLaVA-NeXT with ``merge="llm"``: each tile (base included) selects its own ``dominant + contextual`` in
      HF's unpadded layout (the model's trained layout) and the newlines are kept on top, as for ``cls`` /
      ``hiprune``; the reference's NeXT path (above) emits no newline and reads the crops in the "spatial"
      layout: ``tile_budget="per_tile_reference"``;
    * CLS-free encoders (Qwen2/2.5/3-VL): dominant tokens by the attention each merged token receives at the
      feature layer (the last block; mean over heads and all queries, 2x2 merge unit averaged), the variant
      HiPrune and VFlowOpt report as VisionZip on Qwen; keys are the block's post-RoPE keys, merge-unit mean.

    Paper budgets (presets): LLaVA-1.5 ``keep=192 / 128 / 64`` (162+30, 108+20, 54+10); LLaVA-NeXT 5 tiles x
    (``keep=640 / 320 / 160`` per image).
    """

    summary = "dominant tokens by [CLS] attention (+[CLS]) and contextual tokens merged by key similarity"
    paper = "VisionZip, arXiv 2412.04467"

    search_space = {"dominant_share": ("float", 0.5, 1.0)}

    dominant: int | None = None
    contextual: int | None = None
    dominant_share: float | None = None
    merge: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _count("dominant", self.dominant)
        _count("contextual", self.contextual)
        if self.dominant_share is not None:
            s = self.dominant_share
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1:
                raise ValueError(f"visionzip: dominant_share is the dominant tokens' fraction of keep, in [0, 1]; "
                                 f"got {s!r}")
            if self.dominant is not None or self.contextual is not None:
                raise ValueError("visionzip: pass dominant_share or dominant/contextual, not both")
            self.dominant_share = float(s)
        if self.merge is not None and self.merge not in MERGES:
            raise ValueError(f"visionzip: merge must be 'encoder' (before the projector, the reference; LLaVA-1.5) "
                             f"or 'llm' (the LLM-ready tokens, every family), got {self.merge!r}")

    def merge_space(self, info: ModelInfo) -> str:
        """Where contextual tokens merge on this model: ``merge``, or by default "encoder" where the adapter builds
        tokens before its projector (``info.encoder_merge``: LLaVA-1.5; LLaVA-NeXT per tile) and "llm" elsewhere."""
        if self.merge is not None:
            return self.merge
        return "encoder" if info.encoder_merge and info.has_cls else "llm"

    def check(self, info: ModelInfo) -> None:
        super().check(info)
        if self.merge_space(info) == "encoder" and not (info.encoder_merge and info.has_cls):
            where = ("LLaVA-NeXT merges before the projector per tile: pass tile_budget='per_tile' or "
                     "'per_tile_reference', or " if info.family == "llava_next" else "")
            raise UnsupportedError(f"visionzip: merge='encoder' (before the projector) is implemented on LLaVA-1.5 "
                                   f"and per tile on LLaVA-NeXT, not {info.family} here; {where}use merge='llm'")

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        f = info.feature_layer
        score = Signal("cls", f, heads="all") if info.has_cls else Signal("received", f)
        extra = (Signal("hidden_out", f),) if self.merge_space(info) == "encoder" else ()
        return VisionRequest((score, Signal("keys", f), *extra))

    def split(self, keep: int) -> tuple[int, int]:
        """(dominant, contextual) for a budget of ``keep`` tokens; the error names the fix."""
        if self.dominant_share is not None:
            return visionzip_split(keep, round(keep * self.dominant_share), None)
        try:
            return visionzip_split(keep, self.dominant, self.contextual)
        except ValueError:
            total = (self.dominant or 0) + (self.contextual or 0)
            raise ValueError(
                f"visionzip: dominant={self.dominant} + contextual={self.contextual} must sum to the budget of each "
                f"image (each tile on LLaVA-NeXT), here {keep}; pass keep={total}, or give only one of "
                "dominant / contextual, or neither for the paper's 54:10 split"
            ) from None

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        """The dominance score per token: head-summed [CLS] attention (received attention without [CLS])."""
        info = signals.ctx.info
        f = info.feature_layer
        score_sig = Signal("cls", f, heads="all") if info.has_cls else Signal("received", f)
        return [s.float().sum(-1) if s.dim() == 2 else s.float() for s in signals[score_sig]]

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor | VisionDecision]:
        if self.merge_space(signals.ctx.info) == "encoder":
            return self.select_encoder(signals, ks)
        f = signals.ctx.info.feature_layer
        scores = self.vision_scores(signals)
        out: list[torch.Tensor | VisionDecision] = []
        for i, k in enumerate(ks):
            feats = signals.features[i]
            n, dev = int(feats.shape[0]), feats.device
            if k >= n:
                out.append(torch.arange(n, device=dev))
                continue
            dom, ctx = self.split(k)
            is_cls = signals.grid[i][:, 0] < 0  # LLaVA "full": the [CLS] token, at (-1, -1)
            cls_pos = is_cls.nonzero()[:, 0].to(dev)  # sync: once per image, where the [CLS] token is (if any)
            patches = (~is_cls).nonzero()[:, 0].to(dev)  # sync: once per image, its patches
            if dom < cls_pos.numel():
                raise ValueError(f"visionzip: dominant={dom} must be >= 1 to count the [CLS] token; raise it")
            score = scores[i]
            sel = visionzip_select(score[patches][None].to(dev), signals[Signal("keys", f)][i][patches][None].to(dev),
                                   None, dom - int(cls_pos.numel()), ctx, with_cls=False, sources=False)
            kept = torch.cat([cls_pos, patches[sel.dominant[0]]]).sort().values
            assign = torch.full((n,), -1, dtype=torch.long, device=dev)
            assign[patches] = sel.assignment[0]
            weights = torch.ones(n, dtype=torch.float32, device=dev)
            # sync: once per image, the members per contextual token (merge weights)
            members = torch.bincount(sel.assignment[0][sel.assignment[0] >= 0], minlength=ctx) - 1  # minus target
            weights[patches[sel.targets[0]]] = members.clamp(min=1).float()
            out.append(VisionDecision(kept, assign, weights) if ctx else kept)
        return out

    def select_encoder(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor | VisionDecision]:
        """The reference's tokens, built before the projector: rows over the image's encoder sequence ([CLS] at 0,
        patch p at 1 + p): [CLS], the ``dominant - 1`` patches of most [CLS] attention in raster order, then each
        contextual token ``target + mean(members)`` in target order."""
        f = signals.ctx.info.feature_layer
        scores = self.vision_scores(signals)
        out: list[torch.Tensor | VisionDecision] = []
        for i, k in enumerate(ks):
            feats = signals.features[i]
            n, dev = int(feats.shape[0]), feats.device
            if k >= n:
                out.append(torch.arange(n, device=dev))
                continue
            dom, ctx = self.split(k)
            if dom < 1:
                raise ValueError(f"visionzip: dominant={dom} must be >= 1 to count the [CLS] token; raise it")
            is_cls = signals.grid[i][:, 0] < 0  # LLaVA "full": the [CLS] token, at (-1, -1)
            cls_pos = is_cls.nonzero()[:, 0].to(dev)  # sync: once per image, where the [CLS] token is (if any)
            patches = (~is_cls).nonzero()[:, 0].to(dev)  # sync: once per image, its patches
            n_patch = int(patches.numel())
            sel = visionzip_select(scores[i][patches][None].to(dev),
                                   signals[Signal("keys", f)][i][patches][None].to(dev),
                                   None, dom, ctx, with_cls=True, sources=False)
            dominant, targets, assign = sel.dominant[0], sel.targets[0], sel.assignment[0]
            rows = torch.zeros(k, 1 + n_patch, dtype=torch.float32, device=dev)
            rows[0, 0] = 1.0  # [CLS]
            rows[torch.arange(1, dom, device=dev), 1 + dominant] = 1.0
            if ctx:  # target + mean of its members, every contextual token at once
                rows[dom + torch.arange(ctx, device=dev), 1 + targets] = 1.0
                pos = torch.arange(n_patch, device=dev)
                member = (assign >= 0) & (pos != targets[assign.clamp(min=0)])
                m = member.nonzero()[:, 0]  # sync: once per image, the merged members
                share = 1.0 / torch.bincount(assign[m], minlength=ctx).clamp(min=1).float()
                rows.index_put_((dom + assign[m], 1 + m), share[assign[m]], accumulate=True)
            taken = torch.zeros(n, dtype=torch.bool, device=dev)
            taken[patches[dominant]] = True
            taken[patches[targets]] = True
            cls_slot = cls_pos[:1] if cls_pos.numel() else (~taken).nonzero()[:1, 0]  # sync: once per image
            slots = torch.cat([cls_slot, patches[dominant], patches[targets]])
            owner = torch.full((n,), -1, dtype=torch.long, device=dev)  # each patch's row, for the record
            owner[patches[dominant]] = torch.arange(1, dom, device=dev)
            merged = assign >= 0
            owner[patches[merged]] = dom + assign[merged]
            if cls_pos.numel():
                owner[cls_pos] = 0
            kinds = torch.tensor([0] + [1] * (dom - 1) + [2] * ctx, dtype=torch.long, device=dev)  # ENCODER_ROW_KINDS
            # the dominant rows are patches as they are: the adapter reuses their projected features
            copies = (torch.arange(1, dom, device=dev), patches[dominant])
            out.append(VisionDecision(torch.zeros(0, dtype=torch.long, device=dev), owner, slots=slots,
                                      encoder_rows=rows, row_kinds=kinds, row_copies=copies))
        return out
