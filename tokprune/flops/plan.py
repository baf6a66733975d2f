"""Plans from schedules: FLOPs of a budget, given as a method's :class:`~tokprune.schedule.Schedule` (the pure
function every method exposes), as explicit (layer, kept) stages, or as one cut before an LLM layer.

No method is known here: callers that start from a method name ask the method for its schedule
(:func:`tokprune.api.schedule`), so FLOPs are counted for any method, registered or not, by the same rule the
adapters run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from tokprune.config import Budget
from tokprune.flops.arch import DEFAULT_N_TEXT, TokenSchedule, config_of
from tokprune.flops.count import FlopsReport, estimate
from tokprune.schedule import Schedule


def plan_of(schedule: Schedule) -> tuple[list[tuple[int, int]], str]:
    """(LLM layer from which a count applies, visual tokens kept per image) per stage, and a note."""
    return schedule.plan(), f"schedule: {schedule.describe()}"


def for_budget(config: Any, schedule: Schedule | None = None, *, keep: int | None = None,
               keep_ratio: float | None = None, layer: int = 0, stages: Sequence[tuple[int, float | int]] | None = None,
               n_text: int = DEFAULT_N_TEXT, n_images: int = 1, image_size: tuple[int, int] | None = None,
               convention: str = "full", decode_steps: int = 0, logits_to_keep: int = 0) -> FlopsReport:
    """FLOPs at a budget, with the unpruned model attached as ``.baseline``. Pass exactly one of

    * ``schedule``: a method's per-image schedule (``tokprune.api.schedule(config, method, keep=...)``), for an
      image of ``schedule.n_visual`` tokens, i.e. the size ``image_size`` gives;
    * ``stages``: explicit (LLM layer, kept) pairs, a float kept being a fraction of the original tokens (e.g. a
      paper's preset: PyramidDrop's ``[(8, 0.5), (16, 0.25), (24, 0.125)]``);
    * ``keep`` (count) or ``keep_ratio`` (kept fraction) per image: one cut before LLM layer ``layer``.
    """
    config = config_of(config)
    base = TokenSchedule.unpruned(config, n_text=n_text, n_images=n_images, image_size=image_size)
    per_image = base.images[0].llm_tokens
    given = [schedule is not None, stages is not None, keep is not None or keep_ratio is not None]
    if sum(given) != 1:
        raise ValueError("pass exactly one of schedule, stages and keep/keep_ratio (a budget with no method is one "
                         "cut before `layer`)")
    if schedule is not None:
        if schedule.n_visual != per_image:
            raise ValueError(f"the schedule is for images of {schedule.n_visual} visual tokens, but this image size "
                             f"gives {per_image}; build it for the same image size")
        plan, note = plan_of(schedule)
    elif stages is not None:
        plan = [(int(lay), round(k * per_image) if isinstance(k, float) else int(k)) for lay, k in stages]
        note = "explicit stages " + ", ".join(f"{k} before layer {lay}" for lay, k in plan)
    else:
        plan = [(layer, Budget(keep=keep, keep_ratio=keep_ratio).count(per_image))]
        note = f"drops before LLM layer {layer}"
    sched = base
    for lay, count in plan:
        sched = sched.pruned(lay, count * n_images)
    kw = dict(decode_steps=decode_steps, logits_to_keep=logits_to_keep)
    report = estimate(config, sched, convention, **kw)
    return replace(report, notes=(note, *report.notes), baseline=estimate(config, base, convention, **kw))
