"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA with "anyres" tiles, unpadding and newline tokens.

An image becomes a base tile (the whole image at the encoder's resolution) plus a grid of high-resolution crops.
Every tile goes through CLIP and the projector; ``pack_image_features`` then stitches the crops into one grid,
removes the rows / columns that only cover padding ("unpad") and appends a learned ``image_newline`` token after
every row of the grid. The packed sequence is ``[base tile tokens] + [grid row 0, newline, grid row 1, newline,
...]``, so the number of visual tokens varies per image.

Tokprune sees the packed tokens. Vision signals arrive per tile and are aligned with the packed order by pushing
them through the model's own ``pack_image_features`` (a newline slot carries no value: NaN). The same trick labels
every packed token with its tile (base = 0, crops 1..T in row-major order, newline = -1); grid coordinates are the
base tile's square grid for the base tile and the rows of the stitched, unpadded crop grid for the crops.

**Budgets, every stage and every method.** ``keep`` / ``keep_ratio`` count the *content* tokens of an image
(newlines excluded): ``rec.n_visual`` counts every packed token, ``rec.special`` marks the newlines, and a count
budget larger than the content tokens is refused. For vision stages the family option ``tile_budget`` says how the
budget is spread:

* ``"per_tile"`` (default; per tile as FasterVLM / HiPrune select): the image's budget is split evenly over its
  tiles (remainder to
  the first tiles, base tile first; a tile with fewer visible tokens than its share gives the rest to the
  others) and the method selects within each tile, which it sees as a separate image. Tile ``t`` of image ``i``
  is presented with owner index ``i * TILE_STRIDE + t``, so per-image seeded rules (``random``) draw independently
  per tile.
* ``"global"``: one top-k over all content tokens of the image.
* ``"per_tile_reference"``: the count of FasterVLM's live code path (its anyres branch): ``keep`` is the count
  ``T`` *every* tile keeps, the base tile included (``keep_ratio``: that share of a full tile, ``round(ratio *
  576)`` on LLaVA-NeXT-7B), so an image keeps about ``n_tiles * T`` content tokens; the paper's NeXT numbers ("29
  per crop -> 145 total") use this count. The layout stays HF's: the references (FasterVLM and HiPrune both
  hard-code ``mm_patch_merge_type = 'spatial'``) stitch each crop's full 24 x 24 grid with *no unpadding and no
  newline tokens*, so their picks on padding reach the LLM; here a tile picks ``min(T, its visible tokens)``
  among the tokens HF's unpadded layout keeps, and the newlines stay. That layout is not reproduced.
  Vision-only methods only (an LLM stage's per-image budget has no per-tile meaning).

**Newline tokens** are never scored. Every stage, vision or LLM (FastV), keeps them all on top of the budget (the
model's trained layout; FasterVLM's and HiPrune's NeXT code emit none, see above); a method may set
``keep_newlines = False`` (on its class, or per instance as FlowCut's
``newlines=False``, its reference's layout) and then none are kept. By default ``keep_ratio=0.5`` keeps half of the
content tokens plus the newlines with every method.

``tokprune.apply(model, "cls", keep=160, tile_budget="global")`` selects the mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokprune.patches.llava import LlavaAdapter, square_grid
from tokprune.patches.threads import PerThread
from tokprune.pruners.base import VisionSignals
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
    options = {"tile_budget": ("per_tile", "global", "per_tile_reference")}
    #: this thread's last packing and the image sizes of its encoder call in progress (per thread: two threads
    #: encoding through one patched model at once never read each other's)
    _packing = PerThread()
    _sizes = PerThread()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._packing: _Packing | None = None
        if self.opts["tile_budget"] == "per_tile_reference" and self.pruner.llm_layers(self.info):
            raise ValueError(
                f"tile_budget='per_tile_reference' sets a count per tile for a vision stage, but {self.pruner.name} "
                "prunes inside the LLM; use tile_budget='per_tile' or 'global'"
            )

    def fixed_visual_tokens(self) -> int | None:
        return None  # varies with each image's size

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        super().install()
        # always: the packed layout marks newlines (special tokens) for vision and LLM stages alike
        self.base.pack_image_features = self._recording(self.base.pack_image_features)
        if self.encoder_cut is not None:  # per-tile cut budgets need each image's size before the encoder runs
            self._sizes: torch.Tensor | None = None
            self.base.get_image_features = self._sizing(self.base.get_image_features)

    def remove(self) -> None:
        vars(self.base).pop("pack_image_features", None)
        vars(self.base).pop("get_image_features", None)
        self._packing = None
        super().remove()

    def _recording(self, pack: Any) -> Any:
        def pack_image_features(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
            out = pack(image_features, image_sizes, vision_feature_select_strategy, image_newline=image_newline)
            self._packing = _Packing(torch.as_tensor(image_sizes).cpu(), [int(f.shape[0]) for f in image_features],
                                     int(image_features[0].shape[1]), vision_feature_select_strategy, list(out[0]))
            return out

        return pack_image_features

    def _sizing(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def get_image_features(pixel_values, image_sizes, *args, **kwargs):
            self._sizes = torch.as_tensor(image_sizes).cpu()
            try:
                return fn(pixel_values, image_sizes, *args, **kwargs)
            finally:
                self._sizes = None

        return get_image_features

    def cut_budgets(self, n_tokens: list[int]) -> list[int]:
        """Per encoder sequence (a tile), the user's budget of the tile's *image*: ``keep``, or ``keep_ratio`` of
        the image's content tokens in HF's unpadded layout (counted by the model's own packing of a dummy). A
        budget that keeps all of an image's content tokens is passed as twice each tile's tokens, so a per-tile
        target such as FlowCut's ``ceil(keep / 2)`` cuts nothing and keep-all is the unpatched model."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if self._sizes is None:
            raise RuntimeError(f"{self.pruner.name} on llava_next: the vision tower ran outside get_image_features, "
                               "so the tiles' images are unknown; call the model (or get_image_features) with "
                               "pixel_values and image_sizes")
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        out: list[int] = []
        for j, size in enumerate(self._sizes):
            tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            ones = torch.ones(tiles, side * side, 1)
            packed, _ = type(self.base).pack_image_features(self.base, [ones], self._sizes[j:j + 1], "default",
                                                            image_newline=torch.zeros(1))
            content = int(packed[0].sum())
            out += [self.budget.count(content, rounding=self.pruner.ratio_rounding)] * tiles
            if out[-1] >= content:  # the budget keeps every content token: no tile is cut (keep-all is the model)
                out[-tiles:] = [2 * n for n in n_tokens[len(out) - tiles:len(out)]]
        if len(out) != len(n_tokens):
            raise RuntimeError(f"{len(n_tokens)} tiles reached the vision tower but image_sizes describe {len(out)}")
        return out

    # ------------------------------------------------------------------ packed layout
    def _pack(self, per_tile: torch.Tensor, j: int, newline: float) -> torch.Tensor:
        """Push per-tile values (n_tiles, per_tile, ...) of encoded image ``j`` through the model's own packing;
        newline slots get ``newline``. Returns (n_packed, ...)."""
        pk = self._packing
        rest = per_tile.shape[2:]
        flat = per_tile.reshape(*per_tile.shape[:2], -1).float()
        packed, _ = type(self.base).pack_image_features(
            self.base, [flat], pk.image_sizes[j:j + 1], pk.strategy,
            image_newline=torch.full((flat.shape[-1],), newline, device=per_tile.device))
        return packed[0].reshape(-1, *rest)

    def _sources(self, features: list[torch.Tensor]) -> list[int]:
        """For each image reaching the LLM, the encoded image it is: ``generate`` repeats the encoder's output
        tensors for beams / ``num_return_sequences``, so they are recognised by identity (never by position)."""
        pk = self._packing
        if pk is None:
            raise RuntimeError(
                "the LLaVA-NeXT image features were computed without tokprune's patch (before tokprune.apply?); "
                "pass pixel_values and image_sizes so the encoder runs under the patch"
            )
        ids = {id(t): j for j, t in enumerate(pk.outputs)}
        src = [ids.get(id(f)) for f in features]
        if None in src:
            raise RuntimeError(
                "the LLaVA-NeXT image features reaching the LLM are not the ones the last encoder call packed "
                "(computed, copied or moved outside the patched forward); pass pixel_values and image_sizes so the "
                "encoder runs under the patch"
            )
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

    def token_layout(self, features: list[torch.Tensor], kw: dict) -> tuple[list[torch.Tensor] | None,
                                                                            list[torch.Tensor]]:
        """Newlines are the special tokens. Coordinates: the base tile's square grid (part 0); the crops' stitched,
        unpadded grid (part = crop tile), whose rows end at the newlines (a newline sits one past its row's end)."""
        grids, special = [], []
        for layout in self.tile_layout(features):
            newline = layout < 0
            base = (layout == 0).nonzero()[:, 0]
            grid = torch.empty(layout.numel(), 3, dtype=torch.long, device=layout.device)
            grid[base] = square_grid(int(base.numel()), layout.device)
            rest = torch.arange(int(base.numel()), layout.numel(), device=layout.device)
            nl = newline[rest].long()
            row = nl.cumsum(0) - nl  # newlines before each token of the crop part
            starts = torch.cat([rest.new_zeros(1), (nl.nonzero()[:, 0] + 1)])
            col = torch.arange(rest.numel(), device=layout.device) - starts[row]
            grid[rest] = torch.stack([row, col, layout[rest]], 1)
            grids.append(grid)
            special.append(newline)
        return grids, special

    def to_tokens(self, calls: list[torch.Tensor], features: list[torch.Tensor],
                  reduce: str = "mean") -> list[torch.Tensor]:
        src = self._sources(features)
        pk = self._packing
        per_tile = self._drop_cls(torch.cat(calls))
        if per_tile.shape[0] != sum(pk.n_tiles):
            raise RuntimeError(f"{per_tile.shape[0]} tiles have vision signals but the last packing saw "
                               f"{sum(pk.n_tiles)}")
        per_image = [self._pack(r, j, float("nan")) for j, r in enumerate(torch.split(per_tile, pk.n_tiles))]
        return [per_image[j].to(f.device) for f, j in zip(features, src)]

    # ------------------------------------------------------------------ budgets
    def budget_parts(self, signals: VisionSignals, image_budget: Callable[[torch.Tensor], int]
                     ) -> list[tuple[int, torch.Tensor, int, tuple[int, int]]]:
        if self.opts["tile_budget"] == "global":
            return super().budget_parts(signals, image_budget)
        reference = self.opts["tile_budget"] == "per_tile_reference"
        parts = []
        for j, (grid, sp, owner) in enumerate(zip(signals.grid, signals.special, signals.owners)):
            k = image_budget(sp)  # validates the budget against the image's content tokens
            tile = grid[:, 2].masked_fill(sp, -1)
            tiles = [(tile == t).nonzero()[:, 0] for t in range(int(tile.max()) + 1)]
            sizes = [int(p.numel()) for p in tiles]
            if reference:  # T in every tile, base included (FasterVLM's count)
                per = self.budget.keep if self.budget.keep is not None else round(
                    self.budget.keep_ratio * self._packing.per_tile)
                shares = [min(per, n) if k < sum(sizes) else n for n in sizes]
            else:
                shares = split_budget(k, sizes)
            for t, (idx, kt) in enumerate(zip(tiles, shares)):
                parts.append((j, idx, kt, (owner[0], owner[1] * TILE_STRIDE + t)))
        return parts
