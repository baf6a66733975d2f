"""Methods x budgets on one image: run each (method, budget) once and draw what it kept, one row per method.

This is what ``tokprune show`` prints to a PNG. Each cell runs one prefill of the patched model (the model is
unpatched again afterwards) and is titled with the kept-token count and the model's next-token answer, so a
picture that looks right can be checked against what the model then said.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

import tokprune
from tokprune.viz.compose import hstack, text_width, titled, vstack
from tokprune.viz.panels import picture, scored_stage


def budget_of(value: int | float | str) -> dict[str, Any]:
    """``{"keep": n}`` for a count (64, "64"), ``{"keep_ratio": r}`` for a fraction in (0, 1] (0.25, "0.25")."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"budget {text!r} is neither a token count (64) nor a kept fraction (0.25)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a budget is a token count or a kept fraction, got {value!r}")
    if isinstance(value, int):
        return {"keep": value}
    if not 0 < value <= 1:
        raise ValueError(f"a kept fraction must be in (0, 1], got {value}; pass an int for a token count")
    return {"keep_ratio": float(value)}


def budget_label(budget: dict[str, Any]) -> str:
    return f"keep {budget['keep']}" if "keep" in budget else f"keep {budget['keep_ratio']:g}"


def prompt_for(processor: Any, question: str, n_images: int = 1) -> str:
    """A prompt with ``n_images`` image placeholders and ``question``: the processor's chat template when it has
    one, else ``user <image> ... question assistant :`` with the processor's image token (Qwen: wrapped in
    vision start / end)."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    token = getattr(processor, "image_token", None)
    if token is None:
        raise ValueError(f"{type(processor).__name__} names no image token and has no chat template; pass the "
                         "full prompt (text=...) with the model's image placeholder")
    start, end = getattr(processor, "vision_start_token", None), getattr(processor, "vision_end_token", None)
    tag = f"{start}{token}{end}" if start and end else token
    return "user " + " ".join([tag] * n_images) + f" {question} assistant :"


@dataclass
class Run:
    """One prefill: the record (None when unpatched) and the argmax next token."""

    record: Any
    answer: str


@torch.no_grad()
def run_once(model: Any, processor: Any, images: Sequence[Image.Image], text: str, method: str | None = None,
             budget: dict[str, Any] | None = None, record_scores: bool = False, **options: Any) -> Run:
    """One prefill with ``method`` at ``budget`` (unpruned when ``method`` is None); the model is left as it was."""
    enc = processor(images=list(images), text=[text], return_tensors="pt")
    enc = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in dict(enc).items()}
    if method is None:
        logits = model(**enc, logits_to_keep=1).logits
        record = None
    else:
        with tokprune.pruned(model, method, record_scores=record_scores, **(budget or {}), **options):
            logits = model(**enc, logits_to_keep=1).logits
            record = tokprune.last_record(model)
    answer = processor.tokenizer.decode(logits[0, -1].argmax(-1)).strip()
    return Run(record, answer)


def compare(model: Any, processor: Any, images: Image.Image | Sequence[Image.Image], methods: Sequence[str],
            budgets: Sequence[int | float | str], question: str = "what is in the image ?", text: str | None = None,
            size: int = 160, scores: bool = False, **options: Any) -> Image.Image:
    """The comparison grid (PIL): one row per method, one column per budget, titled with the question and the
    unpruned answer. ``images``: one image or the prompt's images; ``text`` replaces the default prompt
    (:func:`prompt_for`); ``scores`` overlays each method's scores (those of its last stage that has them, labelled
    so; a method that records none is drawn without, and says so); ``options`` go to ``tokprune.apply``."""
    imgs = [images] if isinstance(images, Image.Image) else list(images)
    if not methods or not budgets:
        raise ValueError("pass at least one method and one budget")
    text = text if text is not None else prompt_for(processor, question, len(imgs))
    base = run_once(model, processor, imgs, text)
    rows, over_rows = [], []
    for method in methods:
        cells, over = [], False
        for b in budgets:
            budget = budget_of(b)
            r = run_once(model, processor, imgs, text, method, budget, record_scores=scores, **options)
            kept = sum(r.record.n_kept[0])
            total = sum(r.record.n_visual[0])
            scored = scores and scored_stage(r.record) is not None
            pic = picture(imgs, r.record, size=size, scores=scored)
            if scores and not scored:  # the method ranks by no per-token score (e.g. flowcut's in-encoder cut)
                pic = titled(pic, f"{method} records no per-token scores")
            more = keeps_more(r.record, budget)
            over = over or more
            title = (f"{budget_label(budget)}: {kept}/{total} tokens, answer {r.answer!r}" if not more else
                     f"keeps {kept}/{total} tokens, more than {budget_label(budget)}, answer {r.answer!r}")
            cells.append(titled(pic, title))
        row = titled(hstack(cells, gap=10), method, side="left", label_width=max(map(text_width, methods)))
        (over_rows if over else rows).append(row)
    if over_rows:  # not beside the methods that keep the column's budget: a group of their own, below
        note = "these keep more than their column's budget (each title says what they keep)"
        rows.append(titled(vstack(over_rows, gap=10), note))
    grid = vstack(rows, gap=10)
    return titled(grid, f"{type(model).__name__}: {question!r} (unpruned answer {base.answer!r})")


def keeps_more(record: Any, budget: dict[str, Any]) -> bool:
    """Whether the first prompt's kept tokens (special tokens such as LLaVA-NeXT's newlines aside) exceed what
    ``budget`` asks of its images (CATP on one image runs its stage 1 only and keeps ``1 - R/2`` of them)."""
    special = record.special[0] if record.special else [None] * len(record.kept[0])
    asked = 0
    kept = 0
    for n, k, mask in zip(record.n_visual[0], record.kept[0], special):
        content = n - (0 if mask is None else int(mask.sum()))
        asked += tokprune.Budget(keep=budget.get("keep"), keep_ratio=budget.get("keep_ratio")).count(content)
        kept += int(k.numel()) - (0 if mask is None else int(mask.cpu()[k.cpu()].sum()))
    return kept > asked
