"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT with a [CLS] token, MLP projector, Llama-style LLM."""

from __future__ import annotations

import torch
from torch import nn

from tokprune.patches.base import Adapter
from tokprune.pruners.base import ModelInfo
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
        )

    def fixed_visual_tokens(self) -> int | None:
        """LLaVA-1.5 gives every image the same number of visual tokens (576 at 336 px)."""
        return getattr(self.model.config, "image_seq_length", None)

    def cls_attention_module(self, layer: int) -> nn.Module:
        return clip_encoder(self.vision_tower).layers[layer].self_attn

    def cls_rows_to_tokens(self, rows: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if rows.shape[0] != len(features):
            raise RuntimeError(
                f"{rows.shape[0]} images went through the vision tower but {len(features)} reached the LLM "
                "(beam search or expanded inputs are not supported with vision signals)"
            )
        if self.model.config.vision_feature_select_strategy == "default":
            rows = rows[:, 1:]  # the [CLS] token itself is not a visual token
        return [r.to(f.device) for r, f in zip(rows, features)]
