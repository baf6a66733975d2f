"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL plus window attention in the ViT.

Only the differences from :mod:`tokprune.patches.qwen2_vl` live here. The ViT permutes its patch sequence into
window order (merge-unit granularity) before the blocks; windowed blocks attend within 112-px windows and the
blocks in ``fullatt_block_indexes`` attend per image. ``pooler_output`` is already back in raster order, but
anything read *inside* the ViT (hidden states, attention maps) is in window order and must be un-permuted with
``argsort(window_index)`` before it is aligned with LLM tokens (:meth:`Qwen2_5_VLAdapter.to_token_order`).

Received attention in a windowed block follows the full-attention definition (and HiPrune's reference, which masks
one attention over the image and sums over all its queries): a key's column sum over its window's queries divided
by the image's patch count, since the queries of other windows pay it 0 (:meth:`received_per_image`); a column mean
over the window alone would favour keys of small edge windows. Hub rows (``Signal("rows")``) are refused there.
"""

from __future__ import annotations

import torch

from tokprune.encoder_taps import received_over_windows
from tokprune.patches.qwen2_vl import Qwen2VLAdapter
from tokprune.registry import register_model


@register_model("qwen2_5_vl")
class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801 (named after the transformers class)
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The ViT's merge-unit permutation into window order (as its forward computes it)."""
        from transformers.vision_utils import get_vision_window_index

        vt = self.vision_tower
        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=vt.spatial_merge_size,
                                           window_size=vt.window_size, patch_size=vt.patch_size)
        return index

    def windowed_layer(self, layer: int) -> bool:
        return layer not in self.vision_tower.fullatt_block_indexes

    def received_per_image(self, calls: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each call's column means (over its ``w`` queries) times ``w / n_image``: the column sum over the window's
        queries over all the image's queries (a full-attention block's call is the whole image: factor 1)."""
        grid = getattr(self, "_vit_grid", None)
        if grid is None:
            raise RuntimeError("the Qwen ViT ran without tokprune's hooks; pass pixel_values and image_grid_thw")
        sizes = grid.prod(-1).tolist()  # sync: once per prefill, the patches of every image (host metadata)
        return received_over_windows(calls, sizes)

    def to_token_order(self, units: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Per-merge-unit values (U, ...) of all images of one ViT call: window order -> raster (LLM token) order
        (``index_select``: the same rows as ``units[perm]``, several times faster on CPU for (U, D) states)."""
        return units.index_select(0, torch.argsort(self.window_index(grid_thw).to(units.device)))
