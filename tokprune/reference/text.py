"""The reference models' text side: a word-level tokenizer over the Shapes-VQA vocabulary and the prompt format.

The vocabulary is every word the task can ask or answer, plus each family's special tokens, so a tokenizer
built here and one loaded from ``weights/<name>/tokenizer.json`` agree token for token.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from tokprune.data.shapes import ANSWERS, COLORS, PLURAL, SHAPES
from tokprune.testing import make_tokenizer as make_word_tokenizer

LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
#: what a prompt writes for one image, per family (the processor expands it to the visual tokens)
IMAGE_TAG = {"llava": "<image>", "qwen2vl": "<|vision_start|><|image_pad|><|vision_end|>"}

QUESTION_WORDS = ("user assistant : ? what color is the there a how many are left or right of digit shown "
                  "yes no").split()
#: words added later go last, so that existing token ids (and trained embeddings) keep their meaning
ADDED_WORDS = ("on",)


def vocabulary() -> list[str]:
    """All non-special words, in a fixed order (the token ids of a tokenizer depend on it)."""
    words = [*QUESTION_WORDS, *SHAPES, *PLURAL.values(), *COLORS]
    for answers in ANSWERS.values():
        words += answers
    return list(dict.fromkeys([*words, *ADDED_WORDS]))


def make_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of ``family`` ("llava" or "qwen2vl"), left-padding for batched inference."""
    if family == "llava":
        special, unk, pad, bos, eos = LLAVA_SPECIAL, "<unk>", "<pad>", "<s>", "</s>"
    elif family == "qwen2vl":
        special, unk, pad, bos, eos = QWEN_SPECIAL, "<|endoftext|>", "<|endoftext|>", None, "<|im_end|>"
    else:
        raise ValueError(f"unknown family {family!r}; families: llava, qwen2vl")
    return make_word_tokenizer(special, unk=unk, pad=pad, bos=bos, eos=eos, words=vocabulary())


def prompt(family: str, question: str) -> str:
    """The prompt for one image and one question; the answer is the next token."""
    return f"user {IMAGE_TAG[family]} {question} assistant :"
