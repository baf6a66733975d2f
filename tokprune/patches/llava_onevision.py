"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout on a SigLIP encoder.

Only the differences from :mod:`tokprune.patches.llava_next` live here; tiles, packing, newlines, tile budgets
(``tile_budget``) and the LLM stages are LLaVA-NeXT's.

* **SigLIP, no [CLS] token.** Every encoder token is a patch (``vision_feature_select_strategy="full"``,
  ``vision_feature_layer=-1``); methods that rank by [CLS] attention (``cls``, ``vtc_cls``) refuse, and the others
  use what they use on the Qwen families (received attention: ``visionzip``, ``vispruner``; HiPrune's
  no-[CLS] layers). Pixels are normalised with mean = std = 0.5 (SigLIP's processor config).
* **anyres_max.** ``pack_image_features(image_features, image_sizes, image_newline, vision_aspect_ratio)`` has no
  selection strategy, and after unpadding it shrinks a crop grid larger than ``max_num_patches`` tiles (x 1.1^2)
  by bilinear interpolation (``anyres_max_9`` on the 7B model). Vision signals still reach the packed tokens
  through the model's own packing (called by keyword), so an interpolated token's score is the same blend of its
  source patches' scores. A packed crop token's tile (``tile_budget="per_tile"``) is the tile that contributes most
  to it (one-hot tile labels pushed through the packing; a tie goes to the earlier tile).
* **Multi-image prompts.** With ``batch_num_images`` > 1 per sample (a nested image list) each image is its base
  tile only, plus one newline token: a one-tile image for the tile budgets.
* **No cut inside the encoder.** Because interpolated tokens blend neighbouring patches, the tokens the LLM sees
  are not a subset of the encoder's; a method that drops tokens inside the encoder (``flowcut``) is refused
  (``ModelInfo.encoder_cuts`` is False).
* **Video** inputs (``pixel_values_videos``) raise a clear error, as on the Qwen families.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tokprune.patches.llava_next import LlavaNextAdapter
from tokprune.pruners.base import ModelInfo
from tokprune.registry import register_model

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@register_model("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's tiles and packing on SigLIP, with anyres_max interpolation (module doc)."""

    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    #: no ``per_tile_reference``: it reproduces the LLaVA-NeXT references' spatial packing, which no OneVision
    #: pruning reference uses and which the anyres_max resize does not fit
    options = {"tile_budget": ("per_tile", "global")}

    def model_info(self) -> ModelInfo:
        return dataclasses.replace(super().model_info(), encoder_cuts=False)

    def visual_modalities(self, kw: dict) -> set[str]:
        """Images, and video (refused by the orchestrator until video pruning lands)."""
        mm = kw.get("mm_encoder_outputs") or {}
        video = kw.get("pixel_values_videos") is not None or mm.get("video") is not None
        return super().visual_modalities(kw) | ({"video"} if video else set())

    def pixel_normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return SIGLIP_MEAN, SIGLIP_STD

    def pixel_patches(self, pixels: torch.Tensor, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> torch.Tensor:
        """SigLIP input (n, C, H, W) -> (n, patches, C, p * p): row-major patches, no [CLS] slot."""
        return super().pixel_patches(pixels, mean, std)[:, 1:]

    def dummy_pack_options(self) -> dict[str, Any]:
        return {"vision_aspect_ratio": self.model.config.vision_aspect_ratio}

    def tile_layout(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the tile of every packed token: 0 = base tile, 1.. = crops, -1 = newline. A token that the
        anyres_max resize blended from several tiles belongs to the one with the largest weight."""
        pk = self._packing
        out = []
        for f, j in zip(features, self._sources(features)):
            n = pk.n_tiles[j]
            onehot = torch.eye(n, device=f.device)[:, None, :].expand(n, pk.per_tile, n)
            weights = self._pack(onehot, j, float("nan"))  # (n_packed, n_tiles)
            layout = weights.argmax(-1).masked_fill(weights[:, 0].isnan(), -1)
            if layout.numel() != f.shape[0]:
                raise RuntimeError(f"packed layout of image {j} has {layout.numel()} slots, features {f.shape[0]}")
            out.append(layout)
        return out
