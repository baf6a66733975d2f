"""HiPrune: anchors, their spatial buffers and registers from the attention vision-encoder tokens receive."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import ModelInfo, Pruner, Signal, UnsupportedError, VisionRequest, VisionSignals
from tokprune.registry import register_method
from tokprune.rules.hiprune import anchor_count, hiprune_select

#: the reference's object layer: 0-based layer 8 of CLIP's 24 (``HIPRUNE_OBJECT_LAYER=9``), block 15 of Qwen's 32
CLIP_OBJECT, QWEN_OBJECT = (8, 24), (15, 32)


def _layer(name: str, value: int, info: ModelInfo) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"hiprune: {name} must be an int (0-based encoder layer), got {value!r}")
    resolved = value + info.vision_layers if value < 0 else value
    if not 0 <= resolved < info.vision_layers:
        raise ValueError(f"hiprune: {name}={value} is out of range for an encoder with {info.vision_layers} layers; "
                         f"pass a layer in [0, {info.vision_layers - 1}] (or a negative one counting from the last)")
    return resolved


@register_method("hiprune")
@dataclass
class HiPrune(Pruner):
    """HiPrune (arXiv 2508.00553, reference code Danielement321/HiPrune): text-agnostic, before the LLM.

    Statistic: the attention each token *receives* (softmax over keys, mean over heads and over all query rows,
    the [CLS] query included and the [CLS] column dropped on CLIP), computed block-wise from q/k in the attention
    tap (never an N x N map). ``round(alpha * keep / 5)`` anchors = top tokens at ``object_layer``; their
    4-neighbour buffers (``-1, +1, -W, +W``); registers = the best remaining tokens at ``deep_layer``; exactly
    ``keep`` tokens, original order (:func:`tokprune.rules.hiprune.hiprune_select`).

    Options: ``alpha`` (0.1); ``object_layer`` (0-based; None = 8 on a 24-layer CLIP, block 15 on a 32-block Qwen
    ViT, the same relative depth on other encoders: ``round(8 L / 24)`` / ``round(15 L / 32)``); ``deep_layer``
    (None = the feature layer on CLIP, the last block on Qwen); ``wrap_rows`` (True: the reference's clamped flat
    offsets, a ``±1`` at a row edge lands on the next row; False: true 2-D neighbours only).

    Families: LLaVA-1.5 (24-wide grid); LLaVA-NeXT with ``tile_budget="per_tile"`` (default): the budget is split
    over the tiles (the reference's ``keep / n_tiles``; a remainder goes to the first tiles), each tile selects on
    its own grid (the base tile's square grid, a crop's unpadded sub-grid), newlines kept on top;
    ``tile_budget="global"`` is refused (anchor buffers need one grid). Qwen2/2.5/3-VL: one score per merged LLM
    token (the 2x2 merge unit's patch scores averaged, un-permuted from Qwen2.5-VL's window order by the seam),
    grid width = the merged grid width; survivors keep their M-RoPE positions.

    Code vs paper (code is the default): received attention is a mean over queries (paper: sum, same ranking);
    ``±1`` buffers wrap across rows (``wrap_rows=True``; the paper's "neighbours" is ``wrap_rows=False``); chosen
    tokens are always excluded from the registers (the reference's ``-1`` trick can re-pick one on Qwen2.5-VL,
    where it sums over queries), so exactly ``keep`` survive. On Qwen2.5-VL a windowed block's statistic is the
    reference's (Danielement321/HiPrune ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``: one masked attention over the image,
    head mean, summed over all queries): a key's column sum over its window's queries divided by the image's
    patch count (queries of other windows pay it 0), not a mean over its own window; the default blocks 15 and 31
    of the 7B/3B models are full-attention blocks.

    Paper budgets (presets): LLaVA-1.5 ``keep=192 / 128 / 64``; LLaVA-NeXT ``keep=640 / 320 / 160`` (per image,
    128 / 64 / 32 per tile over 5 tiles); Qwen2.5-VL ``keep_ratio=0.334 / 0.223 / 0.112``.
    """

    summary = "anchors (object-layer received attention) + 4-neighbour buffers + registers (deep layer)"
    paper = "HiPrune, arXiv 2508.00553"

    #: ``tokprune tune``: the anchors' share (the paper's 0.1 gives no anchor below keep=25; 1 = all anchors)
    search_space = {"alpha": ("float", 0.0, 1.0)}

    alpha: float = 0.1
    object_layer: int | None = None
    deep_layer: int | None = None
    wrap_rows: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 5:
            raise ValueError(f"hiprune: alpha must be a number in [0, 5] (the anchors' share of keep, x 5 with their "
                             f"buffers; the paper uses 0.1), got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not isinstance(self.wrap_rows, bool):
            raise TypeError(f"hiprune: wrap_rows must be True (reference) or False (true 2-D neighbours), "
                            f"got {self.wrap_rows!r}")

    def layers(self, info: ModelInfo) -> tuple[int, int]:
        """(object layer, deep layer), 0-based, resolved for this model."""
        n = info.vision_layers
        if self.deep_layer is None:
            deep = info.feature_layer if info.has_cls else n - 1
        else:
            deep = _layer("deep_layer", self.deep_layer, info)
        if self.object_layer is None:
            num, den = CLIP_OBJECT if info.has_cls else QWEN_OBJECT
            obj = min(round(num * n / den), deep)
        else:
            obj = _layer("object_layer", self.object_layer, info)
        return obj, deep

    def check(self, info: ModelInfo) -> None:
        super().check(info)
        self.layers(info)

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        obj, deep = self.layers(info)
        return VisionRequest((Signal("received", obj), Signal("received", deep)))

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        """The deep layer's received attention (what registers are ranked by; ``record_scores`` stores it)."""
        return [s.float() for s in signals[Signal("received", self.layers(signals.ctx.info)[1])]]

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor]:
        obj, deep = self.layers(signals.ctx.info)
        deep_scores = self.vision_scores(signals)
        out = []
        for i, k in enumerate(ks):
            grid = signals.grid[i]
            n = int(grid.shape[0])
            # sync: once per image, the extent of its grid (width of the buffers' +-W)
            r0, r1, c0, c1, p0, p1 = torch.stack([*grid.aminmax(dim=0)], 1).flatten().tolist()
            if p0 != p1:
                raise UnsupportedError(
                    "hiprune selects within one token grid, but this budget part spans several tiles; use "
                    "tile_budget='per_tile' (the default) on LLaVA-NeXT"
                )
            width = c1 - c0 + 1
            if (r1 - r0 + 1) * width != n:
                raise RuntimeError(f"hiprune: the {n} tokens of image {i} do not form a rectangular grid")
            if k >= n:
                out.append(torch.arange(n, device=grid.device))
                continue
            sel = hiprune_select(signals[Signal("received", obj)][i].float(), deep_scores[i], width, k, self.alpha,
                                 self.wrap_rows)
            out.append(sel.kept.to(grid.device))
        return out

    def anchors(self, keep: int) -> int:
        """The number of anchors at a budget of ``keep`` tokens (per image, or per tile on LLaVA-NeXT)."""
        return anchor_count(keep, self.alpha)
