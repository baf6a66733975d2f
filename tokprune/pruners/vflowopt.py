"""VFlowOpt: an importance map from hub-token attention (+ patch entropy), pre-LLM pruning with grid-cell recycling,
and two LLM cuts that reuse the vision importance of the survivors (rules: :mod:`tokprune.rules.vflowopt`;
code-vs-paper choices: docs/rules.md, docs/methods.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokprune.pruners.base import (
    LLMSignals,
    ModelInfo,
    Pruner,
    Signal,
    VisionDecision,
    VisionRequest,
    VisionSignals,
)
from tokprune.registry import register_method
from tokprune.rules import vflowopt as rules
from tokprune.schedule import Schedule, StageBudget

#: the released 25% configuration (LLaVA-OneVision-7B), sihany077/VFlowOpt
#: ``src/lmms_eval-0.2.4/lmms_eval/models/llava_onevision_training_free.py`` (the ``# 25%`` block of
#: ``illava_config``): t, alpha, a, R1, (R2, R3); cuts before LLM layers 9 and 18 of 28
RELEASED = rules.RELEASED_25
#: the state key of the vision importance, per image owner, read by the LLM stages
STATE = "vflowopt_importance"


def _number(name: str, value: object, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or math.isnan(value):
        raise ValueError(f"vflowopt: {name} must be a number in [{low}, {high}] ({what}), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Hubs:
    """The hub query set of one encoder attention call: tokens whose received attention exceeds ``t`` times its
    mean (a bool mask, a different number per sequence; none -> the adapter gives NaN rows)."""

    t: float

    def __call__(self, received: torch.Tensor) -> torch.Tensor:
        return received > self.t * received.mean(dim=-1, keepdim=True)


@register_method("vflowopt")
@dataclass
class VFlowOpt(Pruner):
    """VFlowOpt (ICCV'25, reference code sihany077/VFlowOpt): three stages.

    **Positions** (default ``positions="compact_pre_llm"``, the reference's): the pre-LLM stage shortens the
    sequence before the LLM, which numbers it ``0..L1-1`` (the reference passes no position ids, so ``generate``
    derives them from the shortened mask); the two LLM cuts keep those ids (``position_ids[:, kept]``) and decode
    goes on at ``L1 + t``. ``positions="original"`` keeps every token's unpruned id (decode at ``n0 + t``),
    ``"compact"`` re-indexes at every cut too. M-RoPE families (Qwen) keep their original 3-D positions.

    **Importance map** at encoder layer ``vision_layer`` (default: the feature layer, the reference's last SigLIP
    layer): received attention ``r`` (head mean, mean over all queries, from q/k in the attention tap); hubs =
    tokens with ``r > t * mean(r)`` in their attention call; context relevance ``c_j`` = the mean attention of
    the hub rows to j; ``I = c + alpha * softmax(H)`` with ``H`` the Shannon entropy (bits, 256 bins) of each
    token's grey levels on raw 0-255 pixels: ``255 * (x * std + mean)`` un-normalised from ``pixel_values`` with
    the processor's mean/std and rounded per channel to its integer level (the reference casts each channel to
    uint8, but of the *normalised* tensor x 255, wrapping negatives); softmax over each encoder tile's tokens
    (the reference: over each crop's patches; LLaVA-NeXT: the base tile and every high-res tile on its own,
    after the model's unpadding). A call without hubs (large ``t``) falls back to the received attention (the
    reference gives NaN). Pixels are read only when ``alpha != 0`` (the released configurations have alpha = 0).

    **Stage 1** (before the LLM): drop the lowest-importance tokens, group them by grid cell
    ``(floor(row / cell), floor(col / cell))`` (the base image and LLaVA-NeXT's stitched crops on their own grids);
    in each cell the dropped token of highest importance comes back carrying the importance-weighted mean of the
    cell's dropped tokens, at its own sequence slot and position (``record.merged``); weights the importance
    clamped at 0 (``merge_weights="clamped"``) or, as the reference, signed (``"signed"``: differs only where
    ``alpha < 0`` makes an importance negative). The reference drops
    ``round(N (1 - R1)) + int(N / a^2)`` so its count varies per image; here exactly the stage budget remains
    (:func:`tokprune.rules.vflowopt.recycle_to`): the schedule fixes every stage's count before the encoder runs
    (cache sizes, batch padding, FLOPs), so a count set by how many cells the dropped tokens cover cannot be
    served as an option. **Stages 2, 3** (before ``layers``, default ``floor(L/3)``
    and twice that: 9 / 18 on 28 layers as the reference, 10 / 20 on 32 as the paper's LLaVA-NeXT): keep the
    survivors of highest *vision* importance (a recycled token keeps its representative's), no recycling.

    **Budget**: ``keep`` / ``keep_ratio`` is the paper's layer-averaged count ``(k1 L1 + k2 L2 + k3 L3) / L``.
    The LLM stages keep ``r2`` / ``r3`` of their current tokens (default the released 0.9833 / 0.8773) and the
    pre-LLM count is solved so the average is the closest to the budget (within half a token; earlier stages
    saturate at all tokens when the budget needs it). ``ratios=(R1, R2, R3)`` sets the stages directly (the
    reference's counts ``n - round(n (1 - R))`` per stage); a ``keep`` / ``keep_ratio`` given with it must
    match its layer average. ``flops_ratio`` solves the budget from the fraction of LLM FLOPs instead.

    On Qwen2/2.5/3-VL the grid is the merged (LLM-token) grid and each signal is the mean over the 2x2 merge
    unit (the entropy: over the unit's pixels); hubs are patches of the block's attention call. The CLIP
    encoders of LLaVA / LLaVA-NeXT carry a [CLS] token the reference's SigLIP has not: it takes part in the
    attention (as a query it can be a hub), but only patch tokens are scored. Qwen's ViTs have no [CLS] and use
    the reference's map unchanged.
    """

    summary = "hub-attention + entropy importance, pre-LLM cut with grid-cell recycling, 2 LLM cuts (layer average)"
    paper = "VFlowOpt, arXiv 2508.05211"
    budget_meaning: ClassVar[str] = "layer_average"
    #: the tuner's search space (``tokprune tune``): the reference optimiser's ranges
    #: (``llava_ov_opt_all.py``: t in [0, 50], a in [3, 24], alpha in [-1, 1], R2 in [0.2 / 0.375, 1]; its R3
    #: solved from the average constraint spans about [0.067, 1]); R1 is solved from ``keep_ratio`` here
    search_space: ClassVar[dict[str, tuple]] = {
        "t": ("float", 0.0, 50.0),
        "alpha": ("float", -1.0, 1.0),
        "cell": ("float", 3.0, 24.0),
        "r2": ("float", 0.2 / 0.375, 1.0),
        "r3": ("float", 0.05, 1.0),
    }

    t: float = RELEASED["t"]
    alpha: float = RELEASED["alpha"]
    cell: float = RELEASED["cell"]
    r2: float | None = None
    r3: float | None = None
    ratios: tuple[float, float, float] | None = None
    layers: tuple[int, int] | None = None
    vision_layer: int | None = None
    flops_ratio: float | None = None
    merge_weights: str = "clamped"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge_weights not in ("clamped", "signed"):
            raise ValueError(f"vflowopt: merge_weights must be 'clamped' (importance clamped at 0, the default) or "
                             f"'signed' (the reference's signed importance), got {self.merge_weights!r}")
        self.t = _number("t", self.t, 0.0, math.inf, "hubs receive more than t times the mean attention")
        self.alpha = _number("alpha", self.alpha, -math.inf, math.inf, "the entropy term's weight")
        self.cell = _number("cell", self.cell, 1.0, math.inf, "the side a of a recycling grid cell, in tokens")
        for name in ("r2", "r3"):
            if getattr(self, name) is not None:
                setattr(self, name, _number(name, getattr(self, name), 1e-9, 1.0,
                                            "the share of its current tokens an LLM cut keeps"))
        if self.ratios is not None:
            if self.r2 is not None or self.r3 is not None:
                raise ValueError("vflowopt: pass ratios=(R1, R2, R3) or r2/r3 (with keep_ratio), not both")
            if isinstance(self.ratios, (str, bytes)) or len(tuple(self.ratios)) != 3:
                raise ValueError(f"vflowopt: ratios must be (R1, R2, R3), three kept fractions in (0, 1] (pre-LLM, "
                                 f"then each LLM cut's share of its current tokens), got {self.ratios!r}")
            self.ratios = tuple(_number("ratios", r, 1e-9, 1.0, "kept fractions") for r in self.ratios)
            if self.flops_ratio is not None:
                raise ValueError("vflowopt: flops_ratio solves the budget; pass it without ratios= (r2 / r3 shape it)")
        if self.layers is not None:
            lay = tuple(self.layers)
            if len(lay) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in lay):
                raise ValueError(f"vflowopt: layers must be two 0-based decoder layers (before which the LLM cuts "
                                 f"act), e.g. (9, 18); got {self.layers!r}")
            self.layers = lay
        if self.vision_layer is not None and (isinstance(self.vision_layer, bool)
                                              or not isinstance(self.vision_layer, int)):
            raise TypeError(f"vflowopt: vision_layer must be an int (0-based encoder layer), got {self.vision_layer!r}")
        if self.flops_ratio is not None:
            self.flops_ratio = _number("flops_ratio", self.flops_ratio, 1e-9, 1.0, "the fraction of LLM FLOPs")

    # ------------------------------------------------------------------ layers and budgets
    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        first = info.llm_layers // 3
        if first < 1:
            raise ValueError(f"vflowopt: a {info.llm_layers}-layer LLM has no room for two cuts; pass layers=")
        return first, 2 * first

    def encoder_layer(self, info: ModelInfo) -> int:
        """The encoder layer of the importance map (default: the feature layer)."""
        if self.vision_layer is None:
            return info.feature_layer
        v = self.vision_layer + info.vision_layers if self.vision_layer < 0 else self.vision_layer
        if not 0 <= v < info.vision_layers:
            raise ValueError(f"vflowopt: vision_layer={self.vision_layer} is out of range for an encoder with "
                             f"{info.vision_layers} layers; pass one in [0, {info.vision_layers - 1}]")
        return v

    def check(self, info: ModelInfo) -> None:
        super().check(info)
        self.encoder_layer(info)

    def spans(self, info: ModelInfo) -> tuple[int, int, int]:
        """Decoder layers run at each stage's count: (L1, L2, L3)."""
        l1, l2 = self.llm_layers(info)
        return l1, l2 - l1, info.llm_layers - l2

    def stage_ratios(self) -> tuple[float, float]:
        """(R2, R3): the share of its current tokens each LLM cut keeps."""
        if self.ratios is not None:
            return self.ratios[1], self.ratios[2]
        return (self.r2 if self.r2 is not None else RELEASED["ratios"][1],
                self.r3 if self.r3 is not None else RELEASED["ratios"][2])

    def counts(self, info: ModelInfo, n_visual: int, keep: int) -> tuple[int, int, int]:
        """Tokens of an image after each stage for a layer-averaged budget ``keep``."""
        if keep >= n_visual:
            return n_visual, n_visual, n_visual
        r2, r3 = self.stage_ratios()
        if self.ratios is None:
            return rules.solve_stages(n_visual, keep, r2, r3, self.spans(info))
        k1 = max(1, n_visual - round(n_visual * (1 - self.ratios[0])))
        got = rules.stage_counts(k1, r2, r3)
        spans = self.spans(info)
        avg = sum(c * s for c, s in zip(got, spans)) / sum(spans)
        implied = max(1, min(n_visual, round(self.default_keep_ratio() * n_visual)))
        if keep != implied and abs(avg - keep) > 1:
            raise ValueError(f"vflowopt: ratios={self.ratios} keep {avg:.1f} of {n_visual} tokens on layer average, "
                             f"but the budget asks {keep}; pass ratios= without keep / keep_ratio, or keep_ratio "
                             "without ratios (the stages are then solved)")
        return got

    def schedule(self, info: ModelInfo, n_visual: int, keep: int, keep_ratio: float | None = None) -> Schedule:
        l1, l2 = self.llm_layers(info)
        k1, k2, k3 = self.counts(info, n_visual, keep)
        return Schedule(n_visual, (StageBudget("vision", None, k1), StageBudget("llm", l1, k2),
                                   StageBudget("llm", l2, k3)), self.budget_meaning)

    def default_keep_ratio(self) -> float:
        """Without a budget: the released target (25 % on layer average), or with ``ratios`` their product (a
        marker: the schedule then follows the ratios alone)."""
        if self.ratios is not None:
            return self.ratios[0] * self.ratios[1] * self.ratios[2]
        return 0.25

    def default_positions(self, info: ModelInfo) -> str:
        # the reference: the LLM numbers the pre-LLM survivors contiguously, its two cuts keep those ids
        # (sihany077/VFlowOpt llava_qwen_training_free.py passes no position ids; modeling_qwen2.py
        # ``position_ids[:, del_musk]``)
        return "compact_pre_llm" if info.supports_compact else "original"

    # ------------------------------------------------------------------ vision stage
    def vision_request(self, info: ModelInfo) -> VisionRequest:
        layer = self.encoder_layer(info)
        sigs = [Signal("received", layer), Signal("rows", layer, queries=Hubs(self.t))]
        return VisionRequest(tuple(sigs + ([Signal("pixels")] if self.alpha != 0 else [])))

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        """The importance map of every part: hub attention (received attention where a call had no hub) plus
        ``alpha * softmax(entropy)``."""
        layer = self.encoder_layer(signals.ctx.info)
        received = signals[Signal("received", layer)]
        hubs = signals[Signal("rows", layer, queries=Hubs(self.t))]
        out = []
        for i, (r, c) in enumerate(zip(received, hubs)):
            c = torch.where(torch.isnan(c), r, c).float()
            ent = None
            if self.alpha != 0:
                ent = rules.token_entropy(255.0 * signals[Signal("pixels")][i].float())
            tiles = signals.grid[i][:, 2] if signals.grid is not None else None
            out.append(rules.importance_map(c[None], None if ent is None else ent[None], self.alpha, tiles)[0])
        return out

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor | VisionDecision]:
        scores = self.vision_scores(signals)
        store = signals.ctx.state.setdefault(STATE, {})
        out: list[torch.Tensor | VisionDecision] = []
        for i, (imp, k) in enumerate(zip(scores, ks)):
            grid = signals.grid[i]
            if signals.source is not None:
                owner, idx = signals.source[i]
                store.setdefault(owner, []).append((idx, imp))
            res = rules.recycle_to(imp, grid[:, 0], grid[:, 1], k, self.cell, (grid[:, 2] > 0).long(),
                                   self.merge_weights)
            if res.reps.numel():
                out.append(VisionDecision(res.kept, res.assign, res.weights, slots=res.reps))
            else:
                out.append(res.kept)
        return out

    # ------------------------------------------------------------------ LLM stages
    def llm_scores(self, signals: LLMSignals) -> torch.Tensor:
        """The vision importance of every surviving visual token (a recycled token: its representative's)."""
        store = signals.ctx.state.get(STATE)
        if store is None:
            raise RuntimeError("vflowopt: its LLM stages need the vision stage's importance of this prefill")
        b, n = signals.hidden.shape[:2]
        out = torch.zeros(b, n, dtype=torch.float32, device=signals.hidden.device)
        for bi, (row, orow) in enumerate(zip(signals.visual, signals.origin)):
            for i, (pos, org) in enumerate(zip(row, orow)):
                if not pos.numel():
                    continue
                full = store[(bi, i)]
                if isinstance(full, list):  # the first LLM stage joins the image's parts once per prefill
                    parts = [(idx.to(out.device), imp.to(out.device)) for idx, imp in full if idx.numel()]
                    # sync: once per image per prefill, the extent of its scored tokens (a tensor size)
                    size = int(torch.stack([idx.max() for idx, _ in parts]).max()) + 1
                    full = torch.full((size,), float("nan"), device=out.device)
                    for idx, imp in parts:
                        full[idx] = imp.float()
                    store[(bi, i)] = full
                out[bi, pos] = full[org.to(out.device)]
        return out
