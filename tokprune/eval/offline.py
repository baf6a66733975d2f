"""Running one offline task on a (possibly pruned) model: predictions, per-sample correctness and costs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokprune.eval import predict
from tokprune.eval.scoring import is_correct
from tokprune.eval.tasks import Example, OfflineTask


@dataclass
class SampleResult:
    id: str
    prediction: str
    answer: str
    correct: bool
    cost: predict.Cost


@dataclass
class TaskResult:
    """Accuracy (fraction) over the samples, with each sample's result."""

    samples: list[SampleResult] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(s.correct for s in self.samples) / len(self.samples)


def run_task(bundle: Any, task: OfflineTask, options: predict.EncodeOptions, batch_size: int,
             step: Callable[[int], None] = lambda n: None) -> TaskResult:
    """Answer every example of ``task`` in batches; ``step(n)`` is called after each batch of ``n`` examples."""
    result = TaskResult()
    examples = list(task.examples)
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        if task.scoring == "multiple_choice":
            texts, costs = _choose(bundle, batch, options, batch_size)
        else:
            preds = predict.generate(bundle, [bundle.prompt(e.question) for e in batch],
                                     [e.image(bundle.image_size) for e in batch], bundle.max_new_tokens, options)
            texts, costs = [p.text for p in preds], [p.cost for p in preds]
        for e, text, cost in zip(batch, texts, costs):
            ok = is_correct(task.scoring, text, e.answer, e.choices)
            result.samples.append(SampleResult(e.id, text, e.answer, ok, cost))
        step(len(batch))
    return result


def _choose(bundle: Any, batch: list[Example], options: predict.EncodeOptions,
            batch_size: int) -> tuple[list[str], list[predict.Cost]]:
    """The lowest-loss choice of each example (one forward row per choice, ``batch_size`` rows at a time)."""
    rows = [(j, c) for j, e in enumerate(batch) for c in (e.choices or ())]
    losses: list[tuple[float, bool, predict.Cost]] = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        losses += predict.choice_losses(
            bundle, [bundle.prompt(batch[j].question) for j, _ in part], [" " + c for _, c in part],
            [batch[j].image(bundle.image_size) for j, _ in part], options)
    texts, costs = [], []
    for j, e in enumerate(batch):
        mine = [(loss, c, cost) for (jj, c), (loss, _, cost) in zip(rows, losses) if jj == j]
        if not mine:
            raise ValueError(f"example {e.id} has no choices")
        loss, choice, cost = min(mine, key=lambda t: t[0])
        texts.append(choice)
        costs.append(cost)
    return texts, costs
