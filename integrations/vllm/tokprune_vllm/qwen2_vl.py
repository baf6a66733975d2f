"""Qwen2-VL and Qwen2.5-VL in vLLM, pruned before the LLM, with M-RoPE positions as Hugging Face keeps them.

* **Placeholders.** vLLM's Qwen processor computes an image's token count from its grid (``t * h * w / 4``) in
  ``_get_prompt_updates``; the subclassed processor writes the kept count instead (and ``get_num_image_tokens``
  answers the same for profiling). Video inputs are refused while pruning is on (``limit_mm_per_prompt`` video 0).
* **Encoder.** ``embed_multimodal`` runs vLLM's own ViT with taps on the attention of the layers the method
  reads (post-RoPE q / k, split per image or window by ``cu_seqlens``), averages each 2x2 merge unit, undoes
  Qwen2.5-VL's window order, and keeps (or merges) tokens per image with tokprune's selection.
* **Positions.** A kept token keeps its original (t, h, w) M-RoPE position, and text after an image continues at
  ``base + max(t, h, w)`` of the *unpruned* grid, as tokprune's HF adapter keeps them. Positions cannot be known
  before the encoder runs, so the plugin uses vLLM's video-pruning machinery (``SupportsMultiModalPruning``): each
  image's embeddings carry 4 extra channels (t, h, w of the kept slots, and ``max(t, h, w)`` as the text offset;
  vLLM's EVS default there is the grid width, which differs for portrait images), and
  ``recompute_mrope_positions`` rewrites the prompt's positions from them. :mod:`tokprune_vllm.runner` turns the
  runners' recompute path on.
* **Prefix caching** would skip the recompute for a cached image prefix, so the engine refuses it with pruning
  on (pass ``enable_prefix_caching=False`` / ``--no-enable-prefix-caching``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from tokprune.encoder_taps import merge_units, received_over_windows
from tokprune.pruners.base import ModelInfo
from tokprune_vllm import config as cfg
from tokprune_vllm.engine import Pruning, check_engine, from_config
from tokprune_vllm.llava import CLIP_MEAN, CLIP_STD
from tokprune_vllm.methods import DOWNSAMPLE, make_pruner
from tokprune_vllm.selection import vision_budget


def model_info(hf_config: Any, family: str) -> ModelInfo:
    depth = hf_config.vision_config.depth
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return ModelInfo(family=family, vision_layers=depth, feature_layer=depth - 1, has_cls=False,
                     llm_layers=text.num_hidden_layers, supports_compact=False)


def _family(hf_config: Any) -> str:
    return "qwen2_5_vl" if hf_config.model_type == "qwen2_5_vl" else "qwen2_vl"


def kept_count(hf_config: Any, n: int) -> int:
    """Tokens an image of ``n`` merged tokens keeps under the config's settings (``n`` without settings)."""
    settings = cfg.read(hf_config)
    if settings is None:
        return n
    if settings.method == DOWNSAMPLE:
        raise cfg.ConfigError(
            "downsample on Qwen is a smaller image, not a pruning method: serve without tokprune settings and pass "
            'mm_processor_kwargs={"max_pixels": KEEP * 28 * 28} (per request, or --mm-processor-kwargs; the '
            "plugin's own override of the pixel bounds did not reach vLLM 0.32's Qwen processor call)")
    info = model_info(hf_config, _family(hf_config))
    pruner = make_pruner(settings.method, settings.options, info)
    return vision_budget(pruner, info, n, settings.budget)


class _PrunedInfoMixin:
    """Processing info: the kept count per image, and no video while pruning is on."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        limits = dict(super().get_supported_mm_limits())
        if cfg.read(self.get_hf_config()) is not None:
            limits["video"] = 0
        return limits

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        return kept_count(self.get_hf_config(), super().get_num_image_tokens(**kwargs))


class _PrunedProcessorMixin:
    """Processor: the image placeholders an image keeps instead of ``t * h * w / merge**2``."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs: Any) -> Sequence[Any]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        hf_config = self.info.get_hf_config()
        if cfg.read(hf_config) is None:
            return updates
        merge = hf_config.vision_config.spatial_merge_size ** 2

        def image_replacement(item_idx: int, token: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [token] * kept_count(hf_config, int(grid.prod()) // merge)

        out = []
        for u in updates:
            if u.modality == "image":
                token = u.target[0] if isinstance(u.target, list) else u.target
                u = PromptReplacement(modality="image", target=u.target,
                                      replacement=functools.partial(image_replacement, token=token))
            out.append(u)
        return out


class TokpruneQwen2VLProcessingInfo(_PrunedInfoMixin, Qwen2VLProcessingInfo):
    pass


class TokpruneQwen2VLMultiModalProcessor(_PrunedProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class TokpruneQwen2_5_VLProcessingInfo(_PrunedInfoMixin, Qwen2_5_VLProcessingInfo):  # noqa: N801
    pass


class TokpruneQwen2_5_VLMultiModalProcessor(_PrunedProcessorMixin, Qwen2_5_VLMultiModalProcessor):  # noqa: N801
    pass


class _PruningQwenMixin:
    """The model side shared by Qwen2-VL and Qwen2.5-VL (vLLM's own behaviour without settings)."""

    tokprune: Pruning | None = None

    def _setup_tokprune(self, vllm_config: Any) -> None:
        self.tokprune = from_config(self.config, lambda: model_info(self.config, _family(self.config)),
                                    self._layer_of)
        if self.tokprune is None:
            return
        check_engine(vllm_config)
        if self.tokprune.downsample:
            kept_count(self.config, 1)  # raises: downsample on Qwen is vLLM's own max_pixels
        if vllm_config.cache_config.enable_prefix_caching:
            raise cfg.ConfigError(
                "tokprune on Qwen: prefix caching would skip the M-RoPE recompute of a cached image prefix; start "
                "the engine with enable_prefix_caching=False (vllm serve: --no-enable-prefix-caching)")
        self.tokprune_recompute_mrope = True
        self.supports_multimodal_pruning = True

    def _layer_of(self, layer: int) -> tuple[nn.Module, nn.Module] | None:
        """(ViT block, its attention module)."""
        blocks = self.visual.blocks
        return (blocks[layer], blocks[layer].attn.attn) if layer < len(blocks) else None

    # ---------------------------------------------------------------- encoder
    def embed_multimodal(self, **kwargs: object) -> Any:
        pr = self.tokprune
        if pr is None:
            return super().embed_multimodal(**kwargs)
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: list[torch.Tensor] = []
        for modality, image_input in modalities.items():
            if modality not in ("images", "image"):
                raise ValueError("tokprune does not prune Qwen video inputs; serve videos without tokprune settings")
            if image_input["type"] != "pixel_values":
                raise ValueError("tokprune prunes Qwen images from their pixels; precomputed image embeddings "
                                 "cannot be pruned")
            out += self._prune_images(pr, image_input)
        return tuple(out)

    def _prune_images(self, pr: Pruning, image_input: Any) -> list[torch.Tensor]:
        grid_thw = image_input["image_grid_thw"]
        grid_list = [[int(v) for v in r] for r in grid_thw.tolist()]
        merge = self.visual.spatial_merge_size
        counts = [t * (h // merge) * (w // merge) for t, h, w in grid_list]
        pr.begin()
        wants_pixels = any(s.kind == "pixels" for s in pr.request.signals)
        seen: list[torch.Tensor] = []
        # the ViT's input after its input norm: normalised pixels whether vLLM normalised them in the processor or
        # on the device (mm_device_do_normalize)
        hook = self.visual.input_norm.register_forward_hook(
            lambda mod, args, out: seen.append(out.detach())) if wants_pixels else None
        try:
            embeds = self.visual(image_input["pixel_values"], grid_thw=grid_list)
        finally:
            if hook is not None:
                hook.remove()
        feats = list(embeds.split(counts))
        unit = merge * merge

        def per_call(calls: list[torch.Tensor], kind: str) -> list[torch.Tensor]:
            if kind == "received":  # a window's column mean -> the column mean over all its image's queries
                calls = received_over_windows(calls, [t * h * w for t, h, w in grid_list])
            # every call: one image or window (attention), or all images (a block's output), in ViT order
            per_patch = torch.cat([c.flatten(0, 1) for c in calls])
            units = merge_units(per_patch.movedim(0, -1), unit).movedim(-1, 0)  # as tokprune's Qwen adapter
            return list(self._to_token_order(units, grid_list).split(counts))

        pixels = self._pixels(seen[0], grid_list, unit) if wants_pixels else None
        grids = [_token_grid(t, h // merge, w // merge, f.device) for (t, h, w), f in zip(grid_list, feats)]
        placements = pr.prune(feats, per_call, pixels, grids)
        out = []
        for p, f, g, (t, h, w) in zip(placements, feats, grids, grid_list):
            pos = torch.stack([g[:, 2], g[:, 0], g[:, 1]], 1)[p.slots.to(f.device)]  # (k, 3): t, h, w
            offset = max(t - 1, h // merge - 1, w // merge - 1) + 1  # HF: text resumes at max + 1
            extra = torch.cat([pos, torch.full_like(pos[:, :1], offset)], 1).to(f.dtype)
            out.append(torch.cat([p.build(f), extra], 1))
        return out

    def _to_token_order(self, units: torch.Tensor, grid_list: list[list[int]]) -> torch.Tensor:
        """Per-merge-unit values read inside the ViT -> LLM token order (Qwen2-VL: already raster order)."""
        return units

    @staticmethod
    def _pixels(pixel_values: torch.Tensor, grid_list: list[list[int]], unit: int) -> list[torch.Tensor]:
        """Per image, per LLM token, un-normalised pixels (C, unit * T * p * p): tokprune's "pixels" layout."""
        c = len(CLIP_MEAN)
        x = pixel_values.float().reshape(pixel_values.shape[0], c, -1)
        x = x * torch.tensor(CLIP_STD, device=x.device).view(1, c, 1) + torch.tensor(
            CLIP_MEAN, device=x.device).view(1, c, 1)
        per_image = x.split([t * h * w for t, h, w in grid_list])
        return [p.unflatten(0, (-1, unit)).movedim(1, -2).flatten(-2) for p in per_image]

    # ---------------------------------------------------------------- positions
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """With pruning, placeholder positions are not known before the encoder runs: 1-D positions for the whole
        prompt (exact up to the first image), rewritten by :meth:`recompute_mrope_positions` from the encoder's
        kept slots."""
        if self.tokprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        n = len(input_tokens)
        return torch.arange(n).expand(3, n).clone(), 0

    def recompute_mrope_positions(self, input_ids: Any, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.LongTensor,
                                  num_computed_tokens: int) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        from vllm.multimodal.video_prune.evs import recompute_mrope_positions

        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = input_ids.to(device=device, dtype=torch.long) if isinstance(input_ids, torch.Tensor) else torch.tensor(
            input_ids, dtype=torch.long, device=device)
        embeds = [mm[:, :-4] for mm in multimodal_embeddings]
        positions = [mm[:, -4:].round().long().permute(1, 0) for mm in multimodal_embeddings]
        new, delta = recompute_mrope_positions(ids, positions, mrope_positions, num_computed_tokens,
                                               self.config.vision_start_token_id, self.config.image_token_id,
                                               self.config.video_token_id)
        return embeds, new, delta

    def get_encoder_cudagraph_config(self) -> Any:
        """Encoder CUDA graphs bypass ``embed_multimodal`` (and its taps): off while pruning."""
        conf = super().get_encoder_cudagraph_config()
        if self.tokprune is not None:
            conf.modalities = []
        return conf


def _token_grid(t: int, hm: int, wm: int, device: torch.device) -> torch.Tensor:
    """(t * hm * wm, 3) (row, col, frame) of each merged token in raster order (tokprune's Qwen layout)."""
    i = torch.arange(t * hm * wm, device=device)
    return torch.stack([(i // wm) % hm, i % wm, i // (hm * wm)], 1)


@MULTIMODAL_REGISTRY.register_processor(TokpruneQwen2VLMultiModalProcessor, info=TokpruneQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class TokpruneQwen2VLForConditionalGeneration(_PruningQwenMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL plus tokprune's pre-LLM pruning."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._setup_tokprune(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(TokpruneQwen2_5_VLMultiModalProcessor,
                                        info=TokpruneQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TokpruneQwen2_5_VLForConditionalGeneration(_PruningQwenMixin,  # noqa: N801
                                                 Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL plus tokprune's pre-LLM pruning; signals read in window order are put back in raster
    order with the ViT's own window index."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._setup_tokprune(vllm_config)
        if self.tokprune is not None:
            self.is_multimodal_pruning_enabled = True

    def _to_token_order(self, units: torch.Tensor, grid_list: list[list[int]]) -> torch.Tensor:
        meta = self.visual.prepare_encoder_metadata(grid_list, device=units.device)
        return units[torch.argsort(meta["window_index"].to(units.device))]
