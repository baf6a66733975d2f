"""Accuracy of a reference model on Shapes-VQA: one forward per batch, argmax of the next-token logits.

Pruning is applied outside (``tokprune.apply(model, ...)``) and is transparent here, which is the point: the same
evaluation measures the unpruned model and every method.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokprune.data.shapes import Sample
from tokprune.reference.arch import GRID, image_size
from tokprune.reference.text import prompt


def family_of(model: Any) -> str:
    name = type(model).__name__
    if name.startswith("Llava"):
        return "llava"
    if name.startswith("Qwen2VL"):
        return "qwen2vl"
    raise TypeError(f"not a reference model family: {name}")


def encode(processor: Any, family: str, samples: Sequence[Sample],
           texts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Processor inputs for a batch of samples (left-padded); ``texts`` replaces the default prompts (training
    dialogues). LLaVA also gets ``position_ids`` counted from each row's first real token, the positions
    ``generate()`` uses, so a row's prediction does not depend on the padding its batch needs (Qwen2-VL computes
    its M-RoPE positions from the mask itself)."""
    texts = texts if texts is not None else [prompt(family, s.question) for s in samples]
    enc = processor(images=[s.image(image_size(family)) for s in samples], text=list(texts), return_tensors="pt",
                    padding=True)
    enc = dict(enc)
    if family == "llava":
        enc["position_ids"] = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return enc


def answer_ids(processor: Any, samples: Sequence[Sample]) -> torch.Tensor:
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids([s.answer for s in samples])
    return torch.tensor(ids)


@torch.no_grad()
def predict(model: Any, processor: Any, samples: Sequence[Sample], batch_size: int = 100,
            kept: list[torch.Tensor] | None = None) -> list[str]:
    """The argmax next token after each sample's prompt, as a string. When the model is patched by tokprune and
    ``kept`` is a list, each sample's kept visual-token indices (after the last stage) are appended to it."""
    import tokprune

    family = family_of(model)
    out: list[str] = []
    for i in range(0, len(samples), batch_size):
        enc = encode(processor, family, samples[i:i + batch_size])
        enc = {k: v.to(model.device) for k, v in enc.items()}
        logits = model(**enc, logits_to_keep=1).logits[:, -1]
        out += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        if kept is not None and tokprune.is_patched(model):
            kept += [row[0].cpu() for row in tokprune.last_record(model).kept]
    return out


@dataclass
class Accuracy:
    """Accuracy overall and per question type, with the counts behind them."""

    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, qtype: str, ok: bool) -> None:
        self.correct[qtype] += int(ok)
        self.total[qtype] += 1

    @property
    def overall(self) -> float:
        n = sum(self.total.values())
        return sum(self.correct.values()) / n if n else float("nan")

    def by_type(self) -> dict[str, float]:
        return {t: self.correct[t] / self.total[t] for t in sorted(self.total)}

    def as_dict(self) -> dict[str, float]:
        return {"all": self.overall, **self.by_type()}

    def __str__(self) -> str:
        """Percent, as the README and benchmarks/reference_accuracy.md print accuracy (the fields stay fractions)."""
        parts = ", ".join(f"{t} {100 * a:.1f}%" for t, a in self.by_type().items())
        return f"accuracy {100 * self.overall:.1f}% of {sum(self.total.values())} ({parts})"


def accuracy(model: Any, processor: Any, samples: Sequence[Sample], batch_size: int = 100,
             kept: list[torch.Tensor] | None = None) -> Accuracy:
    """Fraction of samples whose argmax answer token is the right one, overall and per question type
    (``kept``: see :func:`predict`)."""
    acc = Accuracy()
    for s, p in zip(samples, predict(model, processor, samples, batch_size, kept)):
        acc.add(s.qtype, p == s.answer)
    return acc


def target_tokens(sample: Sample, grid: int = GRID) -> torch.Tensor:
    """Indices (row-major, the LLM token order) of the visual tokens whose cells the answer's objects own."""
    owners = torch.from_numpy(sample.scene.owners(grid)).flatten()
    mask = torch.zeros_like(owners, dtype=torch.bool)
    for t in sample.targets:
        mask |= owners == t + 1
    return mask.nonzero().flatten()


def target_recall(samples: Sequence[Sample], kept: Sequence[torch.Tensor]) -> float:
    """Mean over samples with answer objects of the fraction of their tokens that were kept: whether a method
    kept the right tokens, independently of whether the LLM then answered right."""
    fractions = []
    for s, k in zip(samples, kept):
        target = target_tokens(s)
        if target.numel():
            fractions.append(torch.isin(target, k).float().mean().item())
    return sum(fractions) / len(fractions) if fractions else float("nan")
