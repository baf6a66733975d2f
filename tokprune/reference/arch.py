"""Configurations and processors of the two reference models, built in code (no hub access).

* ``llava-shapes``: LLaVA-1.5 layout. CLIP ViT with a [CLS] token (64 px images, 8 px patches: 64 visual tokens),
  features from the penultimate encoder layer with the [CLS] dropped (``vision_feature_layer=-2``,
  ``"default"`` strategy, as LLaVA-1.5), 2-layer GELU projector, Llama decoder.
* ``qwen2vl-shapes``: Qwen2-VL layout. ViT without [CLS] (128 px images, 8 px patches, 2D RoPE, temporal patch 2),
  2x2 patch merger (64 visual tokens), Qwen2 decoder with M-RoPE.

Both see the same 8x8 grid of LLM tokens over the same 64-unit scene, so keep ratios mean the same on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Qwen2VLProcessor

from tokprune.reference.text import make_tokenizer

FAMILIES = ("llava", "qwen2vl")
#: LLM tokens per side of the image grid, both families
GRID = 8


@dataclass(frozen=True)
class Sizes:
    """Widths and depths (kept small so that training fits in an hour on one CPU core)."""

    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    mlp_ratio: int = 4
    #: base of the LLM's rotary frequencies
    rope_theta: int = 10000


def default_sizes(family: str) -> Sizes:
    """The shipped sizes: Qwen2-VL's ViT sees 256 patches per image (4x LLaVA's 64 + [CLS]), so it is half as wide
    to keep its training step affordable on one core."""
    return Sizes(vision_width=64) if family == "qwen2vl" else Sizes()


def image_size(family: str) -> int:
    """Pixels per side of the images a family's reference model takes."""
    return {"llava": 64, "qwen2vl": 128}[family]


def build_config(family: str, sizes: Sizes | None = None) -> Any:
    """The ``transformers`` config of a reference model (``sizes`` default: :func:`default_sizes`)."""
    sizes = sizes or default_sizes(family)
    tok = make_tokenizer(family)
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            hidden_size=sizes.vision_width, intermediate_size=sizes.mlp_ratio * sizes.vision_width,
            num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
            image_size=image_size(family), patch_size=image_size(family) // GRID, projection_dim=sizes.vision_width,
        )
        text = LlamaConfig(
            vocab_size=64, hidden_size=sizes.text_width, intermediate_size=sizes.mlp_ratio * sizes.text_width,
            num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
            num_key_value_heads=sizes.text_kv_heads, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
            rope_parameters=dict(rope_type="default", rope_theta=float(sizes.rope_theta)),
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        return LlavaConfig(vision_config=vision, text_config=text,
                           image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=GRID * GRID,
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           projector_hidden_act="gelu")
    if family == "qwen2vl":
        from transformers import Qwen2VLConfig

        head_dim = sizes.text_width // sizes.text_heads
        half = head_dim // 2  # mrope_section (t, h, w) must sum to head_dim / 2
        section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
        vision = dict(depth=sizes.vision_layers, embed_dim=sizes.vision_width, hidden_size=sizes.text_width,
                      num_heads=sizes.vision_heads, mlp_ratio=sizes.mlp_ratio,
                      patch_size=image_size(family) // (2 * GRID), spatial_merge_size=2, temporal_patch_size=2)
        ids = tok.convert_tokens_to_ids
        text = dict(vocab_size=64, hidden_size=sizes.text_width, intermediate_size=sizes.mlp_ratio * sizes.text_width,
                    num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
                    num_key_value_heads=sizes.text_kv_heads, max_position_embeddings=512, bos_token_id=None,
                    rope_parameters=dict(rope_type="default", rope_theta=float(sizes.rope_theta),
                                         mrope_section=section),
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
                             video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                             vision_end_token_id=ids("<|vision_end|>"))
    raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")


def build_model(family: str, sizes: Sizes | None = None, seed: int = 0) -> Any:
    """A randomly initialised reference model (the starting point of training)."""
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if family == "llava" else Qwen2VLForConditionalGeneration
    model = cls(build_config(family, sizes))
    model.set_attn_implementation("sdpa")
    return model


def qwen_image_processor_settings() -> dict[str, Any]:
    """Keyword arguments of the Qwen2-VL image processor: fixed 128 px input, 8 px patches, 2x2 merge."""
    side = image_size("qwen2vl")
    return dict(patch_size=side // (2 * GRID), merge_size=2, temporal_patch_size=2,
                size={"shortest_edge": side * side, "longest_edge": side * side})


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor: the video class needs torchvision, which is not installed here,
    and the base class check rejects ``None`` (hooks-guide §1.2)."""

    def check_argument_for_proper_class(self, name: str, arg: Any) -> Any:
        return None if arg is None else super().check_argument_for_proper_class(name, arg)


def build_processor(family: str, tokenizer: Any | None = None, image_settings: dict[str, Any] | None = None) -> Any:
    """The offline processor of ``family`` (PIL image processors; Qwen without a video processor).
    ``image_settings``: Qwen image-processor keyword arguments (default :func:`qwen_image_processor_settings`)."""
    tok = tokenizer if tokenizer is not None else make_tokenizer(family)
    side = image_size(family)
    if family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        ip = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=side // GRID,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")
    if family == "qwen2vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ip = Qwen2VLImageProcessorPil(**(image_settings or qwen_image_processor_settings()))
        return ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=None)
    raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
