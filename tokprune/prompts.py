"""Interleaved few-shot (in-context learning) prompts and the map of which tokens belong to which sample.

Multimodal ICL prompts are n demonstrations (image, question, answer) followed by a query (image, question).
Methods that treat demonstrations and the query differently (CATP) need, per image, its visual-token positions
and the positions of its *paired text*. :func:`icl` builds such a prompt with the processor's own chat template
and :func:`span_map` finds the spans again from token ids alone, never from fixed offsets or a template's length:

* an image's tokens are one run of the model's image token id (Qwen: between vision start/end ids); the runs are
  split per image with the per-image token counts the processor reports when runs touch;
* an image's paired text is every real, non-special text token after its run up to the next image's run (for a
  demonstration: its question, its answer and the template words around them), and for the query image its
  question up to the end of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

#: what a plain prompt writes for one image of a Qwen processor (the processor expands the pad token)
QWEN_IMAGE_TAG = "<|vision_start|><|image_pad|><|vision_end|>"

Shot = tuple[Image.Image, str, str]  # (image, question, answer)
Query = tuple[Image.Image, str]  # (image, question)


@dataclass
class ImageSpan:
    """One image of an interleaved prompt row: its visual-token positions and its paired text's positions."""

    index: int  # image index within the row (prompt order)
    role: str  # "shot" (a demonstration) or "query"
    tokens: torch.Tensor  # positions in the row's input_ids of the image's visual tokens
    text: torch.Tensor  # positions of its paired text tokens

    @property
    def shot(self) -> int | None:
        """The demonstration number (0-based), None for the query."""
        return self.index if self.role == "shot" else None


@dataclass
class ICLPrompt:
    """What :func:`icl` returns: processor inputs (one row per prompt) and per row the image spans."""

    inputs: Any
    spans: list[list[ImageSpan]]
    texts: list[str]


def image_tag(processor: Any) -> str:
    """The text that stands for one image in a prompt of this processor."""
    tag = getattr(processor, "image_token", None) or "<image>"
    return QWEN_IMAGE_TAG if tag == "<|image_pad|>" else tag


def _has_chat_template(processor: Any) -> bool:
    return bool(getattr(processor, "chat_template", None))


def _chat(shots: Sequence[Shot], query: Query | None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for _, question, answer in shots:
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    if query is not None:
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query[1]}]})
    return messages


def render(processor: Any, shots: Sequence[Shot], query: Query | None) -> str:
    """The prompt text: the processor's chat template when it has one (one user turn per image with its question,
    one assistant turn per answer, a generation prompt after the query), else the plain format the tiny and
    reference models use: ``user <image> question assistant : answer`` per demonstration, then the query.
    ``query=None`` renders the demonstrations alone (a prefix of the full prompt)."""
    if _has_chat_template(processor):
        return processor.apply_chat_template(_chat(shots, query), add_generation_prompt=query is not None,
                                             tokenize=False)
    tag = image_tag(processor)
    parts = [f"user {tag} {q} assistant : {a}" for _, q, a in shots]
    if query is not None:
        parts.append(f"user {tag} {query[1]} assistant :")
    return " ".join(parts)


def _text_ends(processor: Any, shots: Sequence[Shot]) -> list[int]:
    """Per demonstration, how many non-image tokens the prompt has up to the end of its answer: the prompt of the
    first i+1 demonstrations is a prefix of the whole prompt, so tokenizing it counts them exactly."""
    tok = getattr(processor, "tokenizer", processor)
    image_id = tok.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    ends = []
    for i in range(len(shots)):
        ids = tok(render(processor, shots[:i + 1], None))["input_ids"]
        ends.append(sum(1 for t in ids if t != image_id))
    return ends


def icl(processor: Any, shots: Sequence[Shot], query: Query) -> ICLPrompt:
    """An n-shot interleaved prompt (one row) with its span map; ``shots`` may be empty (zero-shot)."""
    return icl_batch(processor, [(shots, query)])


def icl_batch(processor: Any, prompts: Sequence[tuple[Sequence[Shot], Query]]) -> ICLPrompt:
    """Several interleaved prompts in one left-padded batch (rows may have different numbers of shots)."""
    texts = [render(processor, shots, query) for shots, query in prompts]
    images = [img for shots, query in prompts for img in [*(s[0] for s in shots), query[0]]]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    counts = image_token_counts(processor, inputs)
    mask = inputs.get("attention_mask", None)
    spans, j = [], 0
    for b, (shots, _) in enumerate(prompts):
        n = len(shots) + 1
        spans.append(span_map(processor, inputs["input_ids"][b], None if mask is None else mask[b],
                              n_shots=len(shots), counts=None if counts is None else counts[j:j + n],
                              text_ends=_text_ends(processor, shots)))
        j += n
    return ICLPrompt(inputs=inputs, spans=spans, texts=texts)


def image_token_counts(processor: Any, inputs: Any) -> list[int] | None:
    """Visual tokens per image as the processor laid them out, when it says (Qwen: from ``image_grid_thw``)."""
    grid = inputs.get("image_grid_thw", None) if hasattr(inputs, "get") else None
    if grid is None:
        return None
    merge = getattr(getattr(processor, "image_processor", None), "merge_size", 2)
    return [int(t * h * w) // (merge * merge) for t, h, w in grid.tolist()]


def _special_ids(processor: Any) -> set[int]:
    tok = getattr(processor, "tokenizer", processor)
    return {int(i) for i in getattr(tok, "all_special_ids", [])}


def span_map(processor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             n_shots: int | None = None, counts: Sequence[int] | None = None,
             text_ends: Sequence[int] | None = None) -> list[ImageSpan]:
    """The image spans of one prompt row, found from token ids.

    ``n_shots``: how many images are demonstrations (default: all but the last, the query). ``counts``: tokens
    per image, needed only when two images' runs touch. ``text_ends``: per demonstration, the number of the row's
    non-image tokens up to the end of its answer (:func:`icl` passes them); without them a demonstration's paired
    text runs up to the next image (the next turn's template words included). Raises when the row's images
    cannot be told apart.
    """
    tok = getattr(processor, "tokenizer", processor)
    image_id = getattr(processor, "image_token_id", None)
    if image_id is None:
        image_id = tok.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    ids = input_ids.reshape(-1)
    real = attention_mask.reshape(-1).bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    is_img = (ids == image_id) & real
    pos = is_img.nonzero()[:, 0]
    if pos.numel() == 0:
        raise ValueError("the prompt has no image tokens; build it with tokprune.prompts.icl or the processor")
    breaks = (pos[1:] != pos[:-1] + 1).nonzero()[:, 0] + 1
    runs = list(torch.tensor_split(pos, breaks.tolist()))
    if counts is not None:
        if sum(counts) != pos.numel():
            raise ValueError(f"the row has {pos.numel()} image tokens but the images need {sum(counts)}")
        runs = list(torch.split(pos, list(counts)))
    n_images = len(runs)
    if n_shots is None:
        n_shots = n_images - 1
    if n_shots != n_images - 1:
        raise ValueError(
            f"the row has {n_images} separate image runs but {n_shots} demonstrations + 1 query were expected; "
            "pass counts= (tokens per image) when images are adjacent"
        )
    special = _special_ids(processor) | {int(image_id)}
    text_ok = real & ~torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype))
    end = int(real.nonzero()[-1, 0]) + 1
    text_rank = torch.cumsum((real & ~is_img).long(), 0) - 1  # index of each position among the non-image tokens
    spans = []
    for i, run in enumerate(runs):
        stop = int(runs[i + 1][0]) if i + 1 < n_images else end
        between = torch.arange(int(run[-1]) + 1, stop)
        ok = text_ok[between]
        if text_ends is not None and i < n_shots:
            ok &= text_rank[between] < text_ends[i]
        spans.append(ImageSpan(index=i, role="shot" if i < n_shots else "query", tokens=run, text=between[ok]))
    return spans
