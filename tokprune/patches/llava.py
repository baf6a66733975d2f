"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT with a [CLS] token, MLP projector, Llama-style LLM."""

from __future__ import annotations

import math

import torch
from torch import nn

from tokprune.patches.base import Adapter
from tokprune.pruners.base import ModelInfo, Signal, UnsupportedError
from tokprune.registry import register_model


def clip_encoder(vision_tower: nn.Module) -> nn.Module:
    """The CLIP encoder (``.layers``) in transformers 5 (flattened) and 4.x (``.vision_model``) layouts."""
    inner = getattr(vision_tower, "vision_model", vision_tower)
    return inner.encoder


def feature_layer_index(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """0-based encoder layer whose output is ``hidden_states[vision_feature_layer]`` (the last one for a list)."""
    f = max(vision_feature_layer, key=lambda x: x % (num_layers + 1)) if isinstance(
        vision_feature_layer, (list, tuple)) else vision_feature_layer
    layer = (f % (num_layers + 1)) - 1
    if layer < 0:
        raise ValueError("the vision feature layer is the embedding output; no encoder attention produces it")
    return layer


@register_model("llava")
class LlavaAdapter(Adapter):
    """Visual tokens are one contiguous run of ``image_seq_length`` placeholders per image."""

    model_classes = ("LlavaForConditionalGeneration",)
    pixel_keys = ("pixel_values", "image_sizes")

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.vision_tower

    def model_info(self) -> ModelInfo:
        cfg = self.model.config
        layers = clip_encoder(self.vision_tower).layers
        embeddings = getattr(getattr(self.vision_tower, "vision_model", self.vision_tower), "embeddings", None)
        return ModelInfo(
            family=self.family,
            vision_layers=len(layers),
            feature_layer=feature_layer_index(cfg.vision_feature_layer, len(layers)),
            has_cls=hasattr(embeddings, "class_embedding"),
            llm_layers=len(self.language_model.layers),
            supports_compact=True,
            encoder_merge=hasattr(embeddings, "class_embedding"),
        )

    def fixed_visual_tokens(self) -> int | None:
        """LLaVA-1.5 gives every image the same number of visual tokens (576 at 336 px)."""
        return getattr(self.model.config, "image_seq_length", None)

    def vision_layer(self, layer: int) -> tuple[nn.Module, nn.Module]:
        block = clip_encoder(self.vision_tower).layers[layer]
        return block, block.self_attn

    def cut_layout(self) -> str:
        return "batch"

    def cut_heads(self) -> tuple[nn.Module | None, list[nn.Module]]:
        """The projector reads the feature layer's (shortened) output; its output goes back to the full layout."""
        return None, [self.base.multi_modal_projector]

    def cut_strip(self) -> int:
        return int(self.model.config.vision_feature_select_strategy == "default")

    def to_tokens(self, calls: list[torch.Tensor], features: list[torch.Tensor],
                  reduce: str = "mean") -> list[torch.Tensor]:
        per_image = self._drop_cls(torch.cat(calls))
        if per_image.shape[0] != len(features):
            raise RuntimeError(
                f"{per_image.shape[0]} images went through the vision tower but {len(features)} reached the LLM "
                "(image features computed outside this call or generate(); pass pixel_values so the encoder runs "
                "under the patch)"
            )
        return [r.to(f.device) for r, f in zip(per_image, features)]

    def pixel_patches(self, pixels: torch.Tensor, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> torch.Tensor:
        """CLIP input (n, C, H, W) -> (n, 1 + patches, C, p * p), row-major patches after a NaN [CLS] slot."""
        p = self.model.config.vision_config.patch_size
        n, c = pixels.shape[:2]
        x = pixels * torch.tensor(std, device=pixels.device).view(1, -1, 1, 1) + torch.tensor(
            mean, device=pixels.device).view(1, -1, 1, 1)
        patches = x.unfold(2, p, p).unfold(3, p, p)  # (n, C, h, w, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, c, p * p)
        return torch.cat([patches.new_full((n, 1, c, p * p), float("nan")), patches], 1)

    def encoder_sequence(self, image: int) -> torch.Tensor:
        """The feature layer's output of image ``image`` ([CLS] first), read by the vision stage's
        ``Signal("hidden_out", feature_layer)`` tap."""
        if isinstance(self.model.config.vision_feature_layer, (list, tuple)):
            raise UnsupportedError("a merge before the projector needs a single vision_feature_layer (this model "
                                   "concatenates several layers)")
        calls = self.vision.raw.get(Signal("hidden_out", self.info.feature_layer)) if self.vision else None
        if not calls:
            raise RuntimeError("a merge before the projector needs Signal('hidden_out', feature_layer) in the "
                               "method's VisionRequest")
        return torch.cat(calls)[image]

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        proj = self.base.multi_modal_projector
        dtype = next(proj.parameters()).dtype
        return proj(tokens[None].to(dtype))[0]

    def _drop_cls(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(n_seq, 1 + patches, ...) -> (n_seq, patches, ...) unless the features keep the [CLS] token ("full")."""
        if self.model.config.vision_feature_select_strategy == "default":
            return per_patch[:, 1:]  # the [CLS] token itself is not a visual token
        return per_patch

    def token_layout(self, features: list[torch.Tensor], kw: dict) -> tuple[list[torch.Tensor] | None,
                                                                            list[torch.Tensor]]:
        """A square patch grid per image, part 0 ("full" strategy: the [CLS] token first, at (-1, -1))."""
        grid = []
        for f in features:
            n = int(f.shape[0])
            has_cls = self.model.config.vision_feature_select_strategy != "default"
            grid.append(square_grid(n - has_cls, f.device, prefix=int(has_cls)))
        return grid, [torch.zeros(f.shape[0], dtype=torch.bool, device=f.device) for f in features]


def square_grid(n: int, device: torch.device, prefix: int = 0) -> torch.Tensor:
    """(prefix + n, 3) (row, col, part 0) of ``n`` tokens in a row-major square grid; ``prefix`` tokens at (-1, -1)."""
    side = math.isqrt(n)
    if side * side != n:
        raise RuntimeError(f"{n} patch tokens do not form a square grid")
    i = torch.arange(n, device=device)
    grid = torch.stack([i // side, i % side, torch.zeros_like(i)], 1)
    return torch.cat([torch.tensor([[-1, -1, 0]] * prefix, device=device, dtype=torch.long).view(-1, 3), grid])
