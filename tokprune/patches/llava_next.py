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
* ``"per_tile_reference"``: the references' count *and layout*. FasterVLM and HiPrune (and VisPruner /
  CDPruner, which strip ``_unpad``) hard-code ``mm_patch_merge_type = 'spatial'``: every tile, the base included,
  keeps ``T`` patches of its full grid, and the LLM gets the base tile's kept tokens in raster order, then the
  crops' kept tokens in the raster order of the stitched grid of *full* crops, *with no unpadding and no newline
  token* (picks on padding reach the LLM). Here ``keep`` is ``T`` (``keep_ratio``: that share of a full tile,
  ``round(ratio * 576)`` on LLaVA-NeXT-7B; HiPrune's ``HIPRUNE_RETENTION=R`` is ``keep=int(R / n_tiles)``), and
  the prefill swaps HF's packed features for that spatial packing (:func:`spatial_pack`, the :meth:`relayout`
  hook; ``generate`` still sees HF's), so ``n_visual`` is ``n_tiles * 576`` and the prompt's placeholder run of
  each image is resized to it before the vision stage. A count that keeps whole tiles leaves HF's layout (keep-all
  is the model).
  VisionZip (which merges before the projector per tile by default) orders its rows there as its reference packs
  a NeXT image (:meth:`encoder_row_order`); in HF's layout every row sits at its slot. Vision-only methods only
  (an LLM stage's per-image budget has no per-tile meaning); HF's ``"default"`` feature strategy only.

**Newline tokens** (HF's layout) are never scored. Every stage, vision or LLM (FastV), keeps them all on top of the
budget (the model's trained layout; the references' spatial layout has none, see above); a method may set
``keep_newlines = False`` (on its class, or per instance as FlowCut's
``newlines=False``, its reference's layout) and then none are kept. By default ``keep_ratio=0.5`` keeps half of the
content tokens plus the newlines with every method.

``tokprune.apply(model, "cls", keep=160, tile_budget="global")`` selects the mode.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokprune.patches.llava import LlavaAdapter, square_grid
from tokprune.patches.threads import PerThread
from tokprune.pruners.base import ModelInfo, Signal, UnsupportedError, VisionSignals
from tokprune.registry import register_model
from tokprune.selection import Placement

#: owner index stride of tiles presented to a pruner as separate images (tile t of image i -> i * STRIDE + t)
TILE_STRIDE = 1000


@dataclass
class _Packing:
    """What the last ``pack_image_features`` call saw: enough to rebuild each image's packed layout."""

    image_sizes: torch.Tensor  # (n_images, 2)
    n_tiles: list[int]  # tiles per image that went through the encoder
    per_tile: int  # features per tile before packing
    options: dict[str, Any]  # the call's other arguments by name (strategy on NeXT, aspect ratio on OneVision)
    outputs: list[torch.Tensor]  # the packed features it returned (to recognise them after generate expands them)
    spatial: bool = False  # packed as the references do (``per_tile_reference`` with a cut): see spatial_pack
    laid: list[torch.Tensor] | None = None  # then, per image, its features in that layout (:meth:`relayout`)


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


def spatial_pack(per_tile: torch.Tensor, grid_hw: tuple[int, int], side: int) -> torch.Tensor:
    """The references' "spatial" packing of one image's per-tile values (n_tiles, side * side, ...): the base tile
    in raster order, then the crops' full grids stitched into one (rows of crops, each crop ``side`` x ``side``,
    padding patches included) in raster order; no unpadding, no newline. ``grid_hw``: the crops' (rows, cols)."""
    if per_tile.shape[0] == 1:
        return per_tile[0]
    rows, cols = grid_hw
    rest = per_tile.shape[2:]
    crops = per_tile[1:].reshape(rows, cols, side, side, *rest).transpose(1, 2).reshape(-1, *rest)
    return torch.cat([per_tile[0], crops])


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

    def model_info(self) -> ModelInfo:
        """LLaVA's, except that tokens are built before the projector (``encoder_merge``) per tile only (one
        decision per tile, over its own [CLS] and patches), not with ``tile_budget="global"``."""
        info = super().model_info()
        per_tile = (getattr(self, "opts", None) or {}).get("tile_budget", "per_tile") != "global"
        return dataclasses.replace(info, encoder_merge=info.encoder_merge and per_tile)

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
        """Wrap the model's ``pack_image_features``: whatever way HF calls it, the call is bound to the method's
        public parameter names (``image_features``, ``image_sizes``, ``image_newline``; a renamed one fails here,
        loudly), and its other arguments are kept by name to replay it (:meth:`pack_values`)."""
        signature = inspect.signature(pack)
        missing = {"image_features", "image_sizes", "image_newline"} - set(signature.parameters)
        if missing:
            import transformers

            raise RuntimeError(f"{type(self.base).__name__}.pack_image_features has no parameter "
                               f"{', '.join(sorted(missing))} in transformers {transformers.__version__}; tokprune "
                               "calls it by these names (see python -m tokprune.compat --check)")

        @functools.wraps(pack)
        def pack_image_features(*args: Any, **kwargs: Any) -> Any:
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            out = pack(*args, **kwargs)
            options = dict(call.arguments)
            for name, param in signature.parameters.items():  # **kwargs of the signature: replayed as given
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    options.update(options.pop(name, {}))
            features, sizes = options.pop("image_features"), options.pop("image_sizes")
            options.pop("image_newline")
            self._packing = _Packing(torch.as_tensor(sizes).cpu(), [int(f.shape[0]) for f in features],
                                     int(features[0].shape[1]), options, list(out[0]))
            if self._spatial(int(features[0].shape[1])):  # HF's output stays what generate() sees; the prefill
                self._packing.laid = self._spatial_packing(features, self._packing.image_sizes, options)
                self._packing.spatial = True  # swaps it in
            return out

        return pack_image_features

    def pack_values(self, values: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor,
                    **options: Any) -> list[torch.Tensor]:
        """The model's own ``pack_image_features`` (unwrapped) on per-tile values (n_tiles, per_tile, C) of each
        image, called by keyword only; ``options``: its family-specific arguments by name (LLaVA-NeXT's
        ``vision_feature_select_strategy``, LLaVA-OneVision's ``vision_aspect_ratio``). The one place tokprune
        calls it."""
        packed, _ = type(self.base).pack_image_features(self.base, image_features=values, image_sizes=image_sizes,
                                                        image_newline=newline, **options)
        return list(packed)

    def dummy_pack_options(self) -> dict[str, Any]:
        """The packing arguments, by name, of a dummy packing of content-only tiles (``side * side`` tokens each)
        before the model's own call was seen (per-tile cut budgets). Family hook."""
        return {"vision_feature_select_strategy": "default"}

    # ------------------------------------------------------------------ the references' spatial layout
    def reference_count(self, per_tile: int) -> int:
        """``per_tile_reference``: the count ``T`` every tile keeps (``keep``, or ``round(keep_ratio * per_tile)``)."""
        if self.budget.keep is not None:
            return self.budget.keep
        return round(self.budget.keep_ratio * per_tile)

    def _spatial(self, per_tile: int) -> bool:
        """Whether images are packed in the references' spatial layout: ``per_tile_reference`` with a vision stage
        that cuts (a count that keeps whole tiles leaves HF's layout, so keep-all is the unpatched model)."""
        return (self.opts["tile_budget"] == "per_tile_reference" and self.vision is not None
                and self.reference_count(per_tile) < per_tile)

    def _grid_hw(self, size: torch.Tensor) -> tuple[int, int]:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        cfg = self.model.config
        rows, cols = get_anyres_image_grid_shape(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                                 patch_size=cfg.vision_config.image_size)
        return int(rows), int(cols)

    def _side(self) -> int:
        cfg = self.model.config.vision_config
        return cfg.image_size // cfg.patch_size

    def _spatial_packing(self, image_features: list[torch.Tensor], sizes: torch.Tensor,
                         options: dict[str, Any]) -> list[torch.Tensor]:
        """Each image's per-tile features packed by :func:`spatial_pack` (``per_tile_reference``); ``options``: the
        packing call's other arguments by name."""
        side = self._side()
        if options.get("vision_feature_select_strategy") != "default" or int(image_features[0].shape[1]) != side * side:
            raise UnsupportedError("tile_budget='per_tile_reference' packs each tile's patch grid as the references "
                                   "do; it needs vision_feature_select_strategy='default' (no [CLS] in the features)")
        return [spatial_pack(f, self._grid_hw(sizes[j]), side) for j, f in enumerate(image_features)]

    def relayout(self, encoded: Any) -> Any | None:
        """In the spatial layout, the encoder outputs with every image's features in that layout (a copy of an
        image, as ``generate`` repeats them for beams, gets the same tensor); None in HF's layout. ``generate`` and
        the processor's placeholders only ever see HF's layout; the prefill resizes the runs."""
        pk = self._packing
        if pk is None or not pk.spatial:
            return None
        new = encoded.__class__(**dict(encoded.items()))
        new.pooler_output = [pk.laid[j] for j in self._sources(list(encoded.pooler_output))]
        return new

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
            tiles = image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                              patch_size=cfg.vision_config.image_size)
            ones = torch.ones(tiles, side * side, 1)
            packed = self.pack_values([ones], self._sizes[j:j + 1], torch.zeros(1), **self.dummy_pack_options())
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
        if pk.spatial:
            return spatial_pack(per_tile, self._grid_hw(pk.image_sizes[j]), self._side())
        rest = per_tile.shape[2:]
        flat = per_tile.reshape(*per_tile.shape[:2], -1).float()
        packed = self.pack_values([flat], pk.image_sizes[j:j + 1],
                                  torch.full((flat.shape[-1],), newline, device=per_tile.device), **pk.options)
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
        ids.update({id(t): j for j, t in enumerate(pk.laid or [])})  # the spatial layout's tensors
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
        if self._packing is not None and self._packing.spatial:
            return self._spatial_layout(features)
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

    def _spatial_layout(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Spatial layout coordinates: the base tile's square grid (part 0); a crop's patches at their place in
        the stitched grid of full crops (part = crop tile). No special token."""
        pk, side = self._packing, self._side()
        p = torch.arange(side * side)
        grids = []
        for f, j in zip(features, self._sources(features)):
            rows, cols = self._grid_hw(pk.image_sizes[j])
            t = torch.arange(pk.n_tiles[j])[:, None].expand(-1, side * side)
            ti, tj = (t - 1).clamp(min=0) // max(cols, 1), (t - 1).clamp(min=0) % max(cols, 1)
            crop = torch.stack([ti * side + p // side, tj * side + p % side, t], -1)  # (n_tiles, P, 3)
            crop[0] = torch.stack([p // side, p % side, torch.zeros_like(p)], -1)
            grids.append(self._pack(crop, j, -1.0).to(f.device))
        return grids, [torch.zeros(f.shape[0], dtype=torch.bool, device=f.device) for f in features]

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

    # ------------------------------------------------------------------ merges before the projector
    def build_encoder_rows(self, image: int, placement: Placement, features: torch.Tensor) -> torch.Tensor:
        """The LLM tokens of per-tile encoder-space decisions (VisionZip's reference): ``project(rows @ E)`` with
        ``E`` the image's feature-layer tokens in its packed order, then one [CLS] per tile. In the references'
        spatial layout in the order of :meth:`encoder_row_order`; in HF's layout every row at its slot, in slot
        order, with the kept newlines at theirs (the model's trained layout; the reference has no such layout)."""
        if isinstance(self.model.config.vision_feature_layer, (list, tuple)):
            raise UnsupportedError("a merge before the projector needs a single vision_feature_layer")
        j = self._sources([features])[0]
        pk = self._packing
        calls = self.vision.raw.get(Signal("hidden_out", self.info.feature_layer)) if self.vision else None
        if not calls:
            raise RuntimeError("a merge before the projector needs Signal('hidden_out', feature_layer) in the "
                               "method's VisionRequest")
        tiles = torch.split(torch.cat(calls), pk.n_tiles)[j].float()  # (n_tiles, 1 + P, D_enc)
        enc = torch.cat([self._pack(tiles[:, 1:], j, 0.0), tiles[:, 0]])
        rows = placement.encoder_rows.to(device=enc.device, dtype=torch.float32)
        if rows.shape[1] != enc.shape[0]:
            raise RuntimeError(f"encoder_rows have {rows.shape[1]} columns; image {j} has {features.shape[0]} tokens "
                               f"and {pk.n_tiles[j]} tiles (a decision per tile: rows over its tokens, then [CLS])")
        built = self.project(rows @ enc).to(device=features.device, dtype=features.dtype)
        if pk.spatial:  # the references' layout: VisionZip's order
            return built[self.encoder_row_order(placement, features)]
        out = features[placement.slots.to(features.device)].clone()  # HF's layout: every token at its slot,
        out[placement.new_at.to(features.device)] = built  # the newlines as they are
        return out

    def encoder_row_order(self, placement: Placement, features: torch.Tensor) -> torch.Tensor:
        """The order of an image's encoder rows in the LLM sequence, as VisionZip's reference packs a LLaVA-NeXT
        image (``restore_image_features_sorted``): the base tile's rows as built ([CLS], dominant, contextual);
        then the crops' patch rows at their places in the spatial layout (raster order over the stitched full
        crops), then the crops' [CLS] rows, then their merged rows, tile by tile. Without ``row_kinds``: as built."""
        kinds = placement.row_kinds
        m = int(placement.encoder_rows.shape[0])
        order = torch.arange(m, device=placement.slots.device)
        if kinds is None:
            return order
        slot = placement.slots[placement.new_at]
        tile = self.tile_layout([features])[0].to(slot.device)[slot]
        kinds = kinds.to(slot.device)
        group = torch.where(tile == 0, 0, torch.where(kinds == 1, 1, torch.where(kinds == 0, 2, 3)))
        key = group * (m + int(features.shape[0])) + torch.where(group == 1, slot, order)
        return key.argsort(stable=True)

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
                per = self.reference_count(self._packing.per_tile)
                shares = [min(per, n) if k < sum(sizes) else n for n in sizes]
            else:
                shares = split_budget(k, sizes)
            for t, (idx, kt) in enumerate(zip(tiles, shares)):
                parts.append((j, idx, kt, (owner[0], owner[1] * TILE_STRIDE + t)))
        return parts
