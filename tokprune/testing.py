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
                   eos: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (about 90 entries), left-padding for batched generation."""
    vocab: dict[str, int] = {}
    for t in [*special, *WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789?.,:!"]:
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
def tiny_llava(attn: str = "sdpa", seed: int = 0, image_size: int = 56) -> tuple[Any, Any]:
    """LLaVA-1.5 in miniature: CLIP (3 layers, 14 px patches, [CLS]) + MLP projector + Llama (4 layers, GQA)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_tokenizer(LLAVA_SPECIAL, unk="<unk>", pad="<pad>", bos="<s>", eos="</s>")
    n_patches = (image_size // 14) ** 2
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=14, projection_dim=32)
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
    return "user " + " ".join([tag] * n_images) + f" {question} assistant :"
