"""Tiny random models with working offline processors, for tests, the demo and notebooks.

Everything is built in memory from configs: no hub access, no weights. A forward takes a few milliseconds on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "what is in the image describe it a cat dog red blue green left right top bottom user assistant system "
    "yes no how many one two three and of on picture photo color compare first second"
).split()
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

_FACTORIES: dict[str, Callable[..., tuple[Any, Any]]] = {}


def _factory(family: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        _FACTORIES[family] = fn
        return fn

    return deco


def make_tokenizer(special: list[str], unk: str, pad: str, bos: str | None = None,
                   eos: str | None = None, words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory, left-padding for batched generation. ``words``: the vocabulary after
    the special tokens (default: about 90 prompt words and characters for the tiny models)."""
    if words is None:
        words = [*WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789?.,:!"]
    vocab: dict[str, int] = {}
    for t in [*special, *words]:
        vocab.setdefault(t, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token=unk, pad_token=pad, bos_token=bos, eos_token=eos,
        additional_special_tokens=[t for t in special if t not in (unk, pad, bos, eos)],
    )
    tok.padding_side = "left"
    return tok


@_factory("llava")
def tiny_llava(attn: str = "sdpa", seed: int = 0, image_size: int = 56,
               vision_layers: int = 3) -> tuple[Any, Any]:
    """LLaVA-1.5 in miniature: CLIP (``vision_layers`` = 3 layers, 14 px patches, [CLS]) + MLP projector + Llama
    (4 layers, GQA)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_tokenizer(LLAVA_SPECIAL, unk="<unk>", pad="<pad>", bos="<s>", eos="</s>")
    n_patches = (image_size // 14) ** 2
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=n_patches, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    crop = {"height": image_size, "width": image_size}
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=crop)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    return model, proc


def families() -> list[str]:
    """Families :func:`tiny_model` can build."""
    return sorted(_FACTORIES)


def tiny_model(family: str = "llava", **kwargs: Any) -> tuple[Any, Any]:
    """A tiny random model of ``family`` and a processor that works offline: ``(model, processor)``."""
    if family not in _FACTORIES:
        raise ValueError(f"no tiny model for {family!r}; available: {', '.join(families())}")
    return _FACTORIES[family](**kwargs)


def make_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A random RGB image (deterministic by seed)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def image_prompt(processor: Any, n_images: int = 1, question: str = "what is in the image ?") -> str:
    """A chat-style prompt with ``n_images`` image placeholders for the tiny processors."""
    tag = getattr(processor, "image_token", "<image>")
    if tag == "<|image_pad|>":  # Qwen: the pad token must sit between vision start/end tokens (M-RoPE finds images so)
        tag = QWEN_IMAGE_TAG
    return "user " + " ".join([tag] * n_images) + f" {question} assistant :"


# ---------------------------------------------------------------------------------------------- other families
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
#: what a prompt writes for one image in the tiny Qwen processors (the processor expands ``<|image_pad|>``)
QWEN_IMAGE_TAG = "<|vision_start|><|image_pad|><|vision_end|>"


def _llama_text(tok: PreTrainedTokenizerFast) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


@_factory("llava_next")
def tiny_llava_next(attn: str = "sdpa", seed: int = 0, tile: int = 28) -> tuple[Any, Any]:
    """LLaVA-NeXT in miniature: anyres tiles of ``tile`` px (2x2 CLIP patches each with the default 28), grid
    pinpoints 1x2 / 2x1 / 2x2 tiles, unpad + ``image_newline``; same CLIP / Llama sizes as :func:`tiny_llava`."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = make_tokenizer(LLAVA_SPECIAL, unk="<unk>", pad="<pad>", bos="<s>", eos="</s>")
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=tile, patch_size=14, projection_dim=32)
    cfg = LlavaNextConfig(vision_config=vision, text_config=_llama_text(tok),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")
    return model, proc


#: LLaVA-OneVision's tokenizer also names a video placeholder (its config has a video token id)
ONEVISION_SPECIAL = [*LLAVA_SPECIAL, "<video>"]


@_factory("llava_onevision")
def tiny_llava_onevision(attn: str = "sdpa", seed: int = 0, tile: int = 28,
                         aspect_ratio: str = "anyres_max_2") -> tuple[Any, Any]:
    """LLaVA-OneVision in miniature: SigLIP (no [CLS], 3 layers, 14 px patches, tiles of ``tile`` px = 2x2
    patches), anyres grid pinpoints 1x2 / 2x1 / 2x2 tiles, unpad + ``image_newline``, and ``aspect_ratio``
    ``"anyres_max_2"``: a crop grid larger than about 2 tiles' patches (x 1.1^2) is shrunk by bilinear
    interpolation, as ``anyres_max_9`` does on the 7B model (a 2x2-tile image is; a 1x2 one is not). Llama LLM
    of the other tiny LLaVAs (the 7B model's is Qwen2; the LLM is not what the family patches)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = make_tokenizer(ONEVISION_SPECIAL, unk="<unk>", pad="<pad>", bos="<s>", eos="</s>")
    ids = tok.convert_tokens_to_ids
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=tile, patch_size=14, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=_llama_text(tok), image_token_index=ids("<image>"),
                               video_token_index=ids("<video>"), image_grid_pinpoints=pinpoints,
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               vision_aspect_ratio=aspect_ratio)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    half = [0.5, 0.5, 0.5]  # SigLIP's normalisation, as the 7B checkpoint's processor config
    ip = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
                                         image_mean=half, image_std=half)
    cls = _image_only(LlavaOnevisionProcessor)
    proc = cls(image_processor=ip, tokenizer=tok, video_processor=None, num_image_tokens=(tile // 14) ** 2,
               vision_feature_select_strategy="full", image_token="<image>", video_token="<video>",
               vision_aspect_ratio=aspect_ratio)
    return model, proc


def _image_only(processor_cls: type) -> type:
    """``processor_cls`` without a video processor (the video classes need torchvision, absent here)."""

    class ImageOnly(processor_cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, name: str, arg: Any) -> Any:
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"Tiny{processor_cls.__name__}"
    return ImageOnly


def _qwen_processor(processor_cls: type, tok: PreTrainedTokenizerFast, patch: int) -> Any:
    """A Qwen processor without a video processor (the video class needs torchvision, absent here)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = 2 * patch  # one merged (LLM) token covers 2x2 patches
    ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 4 * unit**2, "longest_edge": 64 * unit**2})
    return _image_only(processor_cls)(image_processor=ip, tokenizer=tok, video_processor=None)


def _qwen(config_cls: type, model_cls: type, processor_cls: type, vision: dict, text: dict, patch: int,
          attn: str, seed: int) -> tuple[Any, Any]:
    tok = make_tokenizer(QWEN_SPECIAL, unk="<|endoftext|>", pad="<|endoftext|>", eos="<|im_end|>")
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, **text)
    cfg = config_cls(vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
                     video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                     vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.set_attn_implementation(attn)
    return model, _qwen_processor(processor_cls, tok, patch)


_QWEN2_ROPE = dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])


@_factory("qwen2_vl")
def tiny_qwen2_vl(attn: str = "sdpa", seed: int = 0) -> tuple[Any, Any]:
    """Qwen2-VL in miniature: 2 full-attention ViT blocks (14 px patches, 2x2 merger), 4-layer M-RoPE LLM."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return _qwen(Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision,
                 dict(bos_token_id=None, rope_parameters=_QWEN2_ROPE), 14, attn, seed)


@_factory("qwen2_5_vl")
def tiny_qwen2_5_vl(attn: str = "sdpa", seed: int = 0) -> tuple[Any, Any]:
    """Qwen2.5-VL in miniature: 4 ViT blocks, windowed (56 px windows = 2x2 merged tokens) except blocks 1 and 3."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3])
    return _qwen(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision,
                 dict(bos_token_id=None, rope_parameters=_QWEN2_ROPE), 14, attn, seed)


@_factory("qwen3_vl")
def tiny_qwen3_vl(attn: str = "sdpa", seed: int = 0) -> tuple[Any, Any]:
    """Qwen3-VL in miniature: 3 ViT blocks (16 px patches, learned position grid), DeepStack features from blocks
    0 and 1 added after LLM layers 0 and 1, interleaved M-RoPE."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    rope = dict(rope_type="default", rope_theta=1e4, mrope_section=[6, 5, 5], mrope_interleaved=True)
    return _qwen(Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, vision,
                 dict(head_dim=32, rope_parameters=rope), 16, attn, seed)
