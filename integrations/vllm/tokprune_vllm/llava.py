"""LLaVA-1.5 in vLLM (``LlavaForConditionalGeneration`` with a CLIP tower), pruned before the LLM.

* **Placeholders.** The processor writes ``get_num_image_tokens`` placeholders per image; the subclassed
  processing info returns the kept count (the budget, or the downsample grid), so the prompt is short from the
  start and its positions are contiguous: tokprune's default "compact" positions on LLaVA.
* **Encoder.** ``_process_image_input`` runs vLLM's own tower and projector, with taps on the CLIP attention
  modules of the layers the method reads, then keeps (and merges) tokens per image.
* **Weights.** Checkpoints written by transformers 5.2x name the CLIP tower ``vision_tower.encoder...``; vLLM 0.32
  expects ``vision_tower.vision_model.encoder...``. The subclass maps those names (other checkpoints unchanged).
* **Not served.** Pixtral-style LLaVA towers and precomputed image embeddings raise at use.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokprune.pruners.base import ModelInfo
from tokprune_vllm import config as cfg
from tokprune_vllm.engine import Pruning, check_engine, from_config

#: the CLIP normalisation tokprune un-normalises pixels with (its adapters' default for every family)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def feature_layer_index(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """0-based encoder layer whose output feeds the projector (tokprune's definition, for the ModelInfo)."""
    f = max(vision_feature_layer, key=lambda x: x % (num_layers + 1)) if isinstance(
        vision_feature_layer, (list, tuple)) else vision_feature_layer
    return (f % (num_layers + 1)) - 1


def model_info(hf_config: Any) -> ModelInfo:
    """tokprune's :class:`ModelInfo` of a LLaVA config (the counts of the full encoder, as on Hugging Face)."""
    vc = hf_config.vision_config
    if getattr(vc, "model_type", "") != "clip_vision_model":
        raise cfg.ConfigError(f"tokprune serves LLaVA with a CLIP vision tower, not {vc.model_type}")
    return ModelInfo(family="llava", vision_layers=vc.num_hidden_layers,
                     feature_layer=feature_layer_index(hf_config.vision_feature_layer, vc.num_hidden_layers),
                     has_cls=True, llm_layers=hf_config.text_config.num_hidden_layers, supports_compact=True)


def pooled_grid(keep: int, rows: int, cols: int) -> tuple[int, int]:
    """The downsample baseline's grid: at most ``keep`` tokens, closest to square (``tokprune.eval.variants``)."""
    from tokprune.eval.variants import pooled_grid as grid

    return grid(keep, rows, cols)


def _downsample_grid(settings: cfg.Settings, n: int) -> tuple[int, int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise cfg.ConfigError(f"downsample on LLaVA needs a square token grid, got {n} tokens")
    rows, cols = pooled_grid(settings.count(n), side, side)
    return side, rows, cols


class TokpruneLlavaProcessingInfo(LlavaProcessingInfo):
    """vLLM's LLaVA processing info, with the kept count as the number of image tokens."""

    def _pruning(self) -> cfg.Settings | None:
        return cfg.read(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        settings = self._pruning()
        if settings is None:
            return n
        if settings.method == "downsample":
            _, rows, cols = _downsample_grid(settings, n)
            return rows * cols
        strategy = self.get_hf_config().vision_feature_select_strategy
        if strategy != "default":
            raise cfg.ConfigError("tokprune serves LLaVA with vision_feature_select_strategy='default' only")
        info = model_info(self.get_hf_config())
        from tokprune_vllm.methods import make_pruner
        from tokprune_vllm.selection import vision_budget

        pruner = make_pruner(settings.method, settings.options, info)
        return vision_budget(pruner, info, n, settings.budget)


def _build_info(ctx: Any) -> TokpruneLlavaProcessingInfo:
    from transformers import LlavaConfig

    hf_config = ctx.get_hf_config(LlavaConfig)
    if cfg.read(hf_config) is not None and getattr(hf_config.vision_config, "model_type", "") != "clip_vision_model":
        raise cfg.ConfigError("tokprune serves LLaVA with a CLIP vision tower (LLaVA-1.5), not "
                              f"{hf_config.vision_config.model_type}")
    return TokpruneLlavaProcessingInfo(ctx)


def _build_processor(info: Any, dummy_inputs: Any) -> LlavaMultiModalProcessor:
    return LlavaMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder)
class TokpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA plus tokprune's pre-LLM pruning (vLLM's own behaviour when the config asks for none)."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_prefix={
            f"vision_tower.{part}.": f"vision_tower.vision_model.{part}."
            for part in ("encoder", "embeddings", "pre_layrnorm", "post_layernorm")
        }
    )

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokprune: Pruning | None = from_config(self.config, lambda: model_info(self.config),
                                                    self._layer_of)
        if self.tokprune is not None:
            check_engine(vllm_config)

    def _layer_of(self, layer: int) -> tuple[nn.Module, nn.Module] | None:
        """(CLIP encoder layer, its attention module): vLLM builds the layers up to the feature layer only."""
        layers = self.vision_tower.vision_model.encoder.layers
        return (layers[layer], layers[layer].self_attn.attn) if layer < len(layers) else None

    def _process_image_input(self, image_input: Any) -> Any:
        pr = self.tokprune
        if pr is None:
            return super()._process_image_input(image_input)
        if image_input["type"] != "pixel_values":
            raise ValueError("tokprune prunes LLaVA images from their pixels; precomputed image embeddings cannot be "
                             "pruned (serve them with an engine without the tokprune settings)")
        pr.begin()
        out = super()._process_image_input(image_input)
        feats = list(out) if not isinstance(out, torch.Tensor) else list(out.unbind(0))
        if pr.downsample:
            return [self._downsample(f, pr.settings) for f in feats]
        pixels = None
        if any(s.kind == "pixels" for s in pr.request.signals):
            pixels = list(self._pixel_patches(image_input["pixel_values"]).unbind(0))
        grid = [_square_grid(int(f.shape[0]), f.device) for f in feats]
        placements = pr.prune(feats, self._per_image, pixels, grid)
        return [p.build(f) for p, f in zip(placements, feats)]

    @staticmethod
    def _per_image(calls: list[torch.Tensor], kind: str = "") -> list[torch.Tensor]:
        """One signal per CLIP call (B images, 1 + patches, ...) -> per image, per patch ([CLS] column dropped)."""
        return list(torch.cat(calls)[:, 1:].unbind(0))

    def _pixel_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised -> (B, patches, C, p * p) un-normalised, row-major (tokprune's layout)."""
        p = self.config.vision_config.patch_size
        x = pixels.float() * torch.tensor(CLIP_STD, device=pixels.device).view(1, -1, 1, 1) + torch.tensor(
            CLIP_MEAN, device=pixels.device).view(1, -1, 1, 1)
        b, c = x.shape[:2]
        return x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c, p * p)

    @staticmethod
    def _downsample(f: torch.Tensor, settings: cfg.Settings) -> torch.Tensor:
        side, rows, cols = _downsample_grid(settings, int(f.shape[0]))
        grid = f.float().T.reshape(1, -1, side, side)
        return torch.nn.functional.adaptive_avg_pool2d(grid, (rows, cols)).reshape(-1, rows * cols).T.to(f.dtype)


def _square_grid(n: int, device: torch.device) -> torch.Tensor:
    side = math.isqrt(n)
    if side * side != n:
        raise RuntimeError(f"{n} LLaVA patch tokens do not form a square grid")
    i = torch.arange(n, device=device)
    return torch.stack([i // side, i % side, torch.zeros_like(i)], 1)
