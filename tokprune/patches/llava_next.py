"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA with "anyres" tiles, unpadding and newline tokens.

An image becomes a base tile (the whole image at the encoder's resolution) plus a grid of high-resolution crops.
Every tile goes through CLIP and the projector; ``pack_image_features`` then stitches the crops into one grid,
removes the rows / columns that only cover padding ("unpad") and appends a learned ``image_newline`` token after
every row of the grid. The packed sequence is ``[base tile tokens] + [grid row 0, newline, grid row 1, newline,
...]``, so the number of visual tokens varies per image.

Tokprune sees the packed tokens. [CLS] rows arrive per tile and are aligned with the packed order by pushing them
through the model's own ``pack_image_features`` (a newline slot carries no score). The same trick labels every
packed token with its tile (base = 0, crops 1..T in row-major order, newline = -1).

**Budgets (vision stages).** ``keep`` / ``keep_ratio`` count the *content* tokens of an image (newlines excluded),
and the family option ``tile_budget`` says how they are spread:

* ``"per_tile"`` (default; FasterVLM / HiPrune): the image's budget is split evenly over its tiles (remainder to
  the first tiles, base tile first; a tile with fewer visible tokens than its share gives the rest to the
  others) and the method selects within each tile, which it sees as a separate image. Tile ``t`` of image ``i``
  is presented with owner index ``i * TILE_STRIDE + t``, so per-image seeded rules (``random``) draw independently
  per tile.
* ``"global"``: one top-k over all content tokens of the image.

**Newline tokens** are not scored. A vision stage keeps them all (on top of the budget), as FasterVLM and HiPrune
do; a method whose paper drops them (VisionZip, FlowCut) declares ``keep_newlines = False`` on its class and then
none are kept. **LLM stages** (FastV) rank the whole packed span, newlines included, with one budget per image
counted over all its packed tokens, as FastV treats every image token alike.

``tokprune.apply(model, "cls", keep=160, tile_budget="global")`` selects the mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokprune.patches.llava import LlavaAdapter
from tokprune.pruners.base import VisionSignals
from tokprune.record import capture_scores
from tokprune.registry import register_model

#: owner index stride of tiles presented to a pruner as separate images (tile t of image i -> i * STRIDE + t)
TILE_STRIDE = 1000


@dataclass
class _Packing:
    """What the last ``pack_image_features`` call saw: enough to rebuild each image's packed layout."""

    image_sizes: torch.Tensor  # (n_images, 2)
    n_tiles: list[int]  # tiles per image that went through the encoder
    per_tile: int  # features per tile before packing
    strategy: str
    outputs: list[torch.Tensor]  # the packed features it returned (to recognise them after generate expands them)


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """Split ``k`` over parts of ``sizes`` tokens: equal shares, the remainder to the first parts, capped by each
    part's size with the excess spread over the parts that still have room. ``sum == min(k, sum(sizes))``."""
    shares = [0] * len(sizes)
    room = [i for i, s in enumerate(sizes) if s > 0]
    left = min(k, sum(sizes))
    while left > 0 and room:
        q, r = divmod(left, len(room))
        for rank, i in enumerate(room):
            shares[i] += min(q + (rank < r), sizes[i] - shares[i])
        left = min(k, sum(sizes)) - sum(shares)
        room = [i for i in room if shares[i] < sizes[i]]
    return shares


@register_model("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: LLaVA's CLIP taps and sequence handling, plus tile-aware vision budgets (see the module doc)."""

    model_classes = ("LlavaNextForConditionalGeneration",)
    options = {"tile_budget": ("per_tile", "global")}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._packing: _Packing | None = None

    def fixed_visual_tokens(self) -> int | None:
        return None  # varies with each image's size

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        super().install()
        if self.vision_request is not None:
            self.base.pack_image_features = self._recording(self.base.pack_image_features)

    def remove(self) -> None:
        vars(self.base).pop("pack_image_features", None)
        self._packing = None
        super().remove()

    def _recording(self, pack: Any) -> Any:
        def pack_image_features(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
            out = pack(image_features, image_sizes, vision_feature_select_strategy, image_newline=image_newline)
            self._packing = _Packing(torch.as_tensor(image_sizes).cpu(), [int(f.shape[0]) for f in image_features],
                                     int(image_features[0].shape[1]), vision_feature_select_strategy, list(out[0]))
            return out

        return pack_image_features

    # ------------------------------------------------------------------ packed layout
    def _pack(self, per_tile: torch.Tensor, j: int, newline: float) -> torch.Tensor:
        """Push per-tile values (n_tiles, per_tile) of encoded image ``j`` through the model's own packing; newline
        slots get ``newline``. Returns (n_packed,)."""
        pk = self._packing
        packed, _ = type(self.base).pack_image_features(
            self.base, [per_tile[..., None].float()], pk.image_sizes[j:j + 1], pk.strategy,
            image_newline=torch.tensor([newline], device=per_tile.device))
        return packed[0][:, 0]

    def _sources(self, features: list[torch.Tensor]) -> list[int]:
        """For each image reaching the LLM, the encoded image it is: ``generate`` repeats the encoder's output
        tensors for beams / ``num_return_sequences``, so they are recognised by identity."""
        pk = self._packing
        if pk is None:
            raise RuntimeError(
                "the LLaVA-NeXT image features were computed without tokprune's patch (before tokprune.apply?); "
                "pass pixel_values and image_sizes so the encoder runs under the patch"
            )
        ids = {id(t): j for j, t in enumerate(pk.outputs)}
        src = [ids.get(id(f)) for f in features]
        if None in src:
            if len(features) != len(pk.outputs):
                raise RuntimeError(
                    f"{len(pk.outputs)} images went through the vision tower but {len(features)} different ones "
                    "reached the LLM; compute the image features under the patch (pass pixel_values)"
                )
            src = list(range(len(features)))  # e.g. moved to another device: same images, same order
        return src

    def tile_layout(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the tile of every packed token: 0 = base tile, 1.. = crops, -1 = newline."""
        pk = self._packing
        out = []
        for f, j in zip(features, self._sources(features)):
            tiles = torch.arange(pk.n_tiles[j], device=f.device)[:, None].expand(pk.n_tiles[j], pk.per_tile)
            layout = self._pack(tiles, j, -1.0).round().long()
            if layout.numel() != f.shape[0]:
                raise RuntimeError(f"packed layout of image {j} has {layout.numel()} slots, features {f.shape[0]}")
            out.append(layout)
        return out

    def cls_rows_to_tokens(self, rows: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        src = self._sources(features)
        pk = self._packing
        if rows.shape[0] != sum(pk.n_tiles):
            raise RuntimeError(f"{rows.shape[0]} tiles have [CLS] rows but the last packing saw {sum(pk.n_tiles)}")
        if pk.strategy == "default":
            rows = rows[:, 1:]  # the [CLS] token itself is not a visual token
        per_image = [self._pack(r, j, float("nan")) for j, r in enumerate(torch.split(rows, pk.n_tiles))]
        return [per_image[j].to(f.device) for f, j in zip(features, src)]

    # ------------------------------------------------------------------ selection
    def select_vision(self, features: list[torch.Tensor], counts: list[int],
                      owners: list[tuple[int, int]]) -> list[torch.Tensor]:
        signals = self._vision_signals(features)
        layouts = self.tile_layout(features)
        per_tile = self.opts["tile_budget"] == "per_tile"
        units: list[tuple[int, int, torch.Tensor, int]] = []  # (image, tile, packed indices, budget)
        for j, layout in enumerate(layouts):
            content = (layout >= 0).nonzero()[:, 0]
            k = self.budget.count(int(content.numel()))
            if per_tile:
                parts = [(layout == t).nonzero()[:, 0] for t in range(int(layout.max()) + 1)]
            else:
                parts = [content]
            for t, (part, kt) in enumerate(zip(parts, split_budget(k, [int(p.numel()) for p in parts]))):
                if kt:
                    units.append((j, t, part, kt))
        sub = VisionSignals(
            features=[features[j][p] for j, _, p, _ in units],
            cls_attention={layer: [rows[j][p] for j, _, p, _ in units]
                           for layer, rows in signals.cls_attention.items()},
            owners=[(owners[j][0], owners[j][1] * TILE_STRIDE + t) for j, t, _, _ in units],
        )
        with capture_scores(self.pruner, self.record_scores) as seen:
            picks = self.pruner.select_vision(sub, [k for *_, k in units]) if units else []
        self._vision_scores = None
        if seen:
            self._vision_scores = [torch.full((f.shape[0],), float("nan")) for f in features]
            for (j, _, p, _), s in zip(units, seen[0]):
                self._vision_scores[j][p.cpu()] = s.detach().float().cpu()
        keep_newlines = self.pruner.keep_newlines
        keeps = []
        for j, layout in enumerate(layouts):
            kept = [p[s.to(p.device)] for (jj, _, p, _), s in zip(units, picks) if jj == j]
            if keep_newlines:
                kept.append((layout < 0).nonzero()[:, 0])
            keeps.append(torch.cat(kept).sort().values if kept else layout.new_zeros(0))
        return keeps
