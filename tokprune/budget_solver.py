"""Budgets beyond ``keep`` / ``keep_ratio`` for the progressive methods: an explicit ``schedule={layer: kept
fraction of the original tokens}`` and ``flops_ratio=`` (the fraction of the unpruned LLM FLOPs).

``flops_ratio`` is solved once, at ``apply``, for an image of the family's default size: the final count ``keep``
whose schedule (:meth:`tokprune.Pruner.schedule`, the one the adapter runs) costs the fraction closest to the
target under the papers' convention (``tokprune.flops``, ``"3ndm"``: LLM prefill of the visual tokens), which
must be within 1% of the target; the budget then becomes ``keep_ratio = keep / n_visual``, so other image sizes
scale with it. Works for any method whose schedule grows with ``keep``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokprune.config import Budget
from tokprune.schedule import Schedule

#: the FLOPs convention ``flops_ratio`` is solved in (see :mod:`tokprune.flops`)
CONVENTION = "3ndm"
#: the largest relative miss of the requested fraction
TOLERANCE = 0.01


def schedule_options(schedule: dict[int, float], options: dict[str, Any]) -> dict[str, Any]:
    """``schedule={layer: kept fraction}`` as the method options ``layers`` and ``ratios``."""
    if "layers" in options or "ratios" in options:
        raise TypeError("pass schedule= or layers=/ratios=, not both")
    if not isinstance(schedule, dict) or not schedule:
        raise TypeError(f"schedule must be a non-empty dict {{layer: kept fraction of the original tokens}}, "
                        f"got {schedule!r}")
    layers = sorted(schedule)
    return {**options, "layers": tuple(int(x) for x in layers), "ratios": tuple(float(schedule[x]) for x in layers)}


def image_schedule(pruner: Any, info: Any, n_visual: int, keep: int | None, keep_ratio: float | None,
                   newlines: int = 0) -> Schedule:
    """The schedule of one image of ``n_visual`` LLM tokens, ``newlines`` of them LLaVA-NeXT row newlines, as the
    adapters run it: the budget counts the *content* tokens only (once), then the newlines ride on top at every
    stage when the method keeps them (``Schedule.special``) or leave at its first stage when it does not."""
    content = n_visual - newlines
    count = Budget(keep=keep, keep_ratio=keep_ratio).count(content, rounding=pruner.ratio_rounding)
    sched = pruner.schedule(info, content, count, keep_ratio=keep_ratio)
    if not newlines:
        return sched
    return dataclasses.replace(sched, n_visual=n_visual, special=newlines if pruner.keep_newlines else 0)


def flops_of(config: Any, pruner: Any, info: Any, n_visual: int, keep: int, convention: str = CONVENTION,
             newlines: int = 0) -> float:
    """The fraction of the unpruned LLM prefill FLOPs that ``pruner`` costs at ``keep`` (content tokens) on one
    image of ``n_visual`` LLM tokens, ``newlines`` of them newlines."""
    from tokprune.flops import for_budget

    sched = image_schedule(pruner, info, n_visual, keep, None, newlines)
    return for_budget(config, schedule=sched, convention=convention).ratio(part="llm_prefill")


def solve_keep(config: Any, pruner: Any, info: Any, n_visual: int, target: float,
               convention: str = CONVENTION, newlines: int = 0) -> tuple[int, float]:
    """The final count of content tokens (and its FLOPs fraction) whose schedule costs the fraction closest to
    ``target``; raises when no count comes within :data:`TOLERANCE` (relative)."""
    lo, hi = 1, n_visual - newlines

    def frac(k: int) -> float:
        return flops_of(config, pruner, info, n_visual, k, convention, newlines)

    while lo < hi:  # smallest keep whose fraction >= target (the fraction never falls as keep grows)
        mid = (lo + hi) // 2
        if frac(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    cands = {k: frac(k) for k in {max(1, lo - 1), lo}}
    keep = min(cands, key=lambda k: (abs(cands[k] - target), k))
    got = cands[keep]
    if abs(got / target - 1) > TOLERANCE:
        lowest = frac(1)
        raise ValueError(f"{pruner.name}: flops_ratio={target} cannot be met within 1% ({got:.4f} is the closest; "
                         f"this schedule spans {lowest:.4f}..1 of the LLM FLOPs); give explicit ratios or a "
                         "schedule= whose earlier cuts keep fewer tokens")
    return keep, got


def resolve(model_or_config: Any, pruner: Any, keep: int | None, keep_ratio: float | None
            ) -> tuple[int | None, float | None]:
    """The ``(keep, keep_ratio)`` budget of ``pruner``: a ``flops_ratio`` option solved into a ``keep_ratio``;
    without any budget, a method's :meth:`default_keep_ratio` (explicit ratios / schedule: their last fraction)."""
    target = getattr(pruner, "flops_ratio", None)
    if target is not None:
        if keep is not None or keep_ratio is not None:
            raise ValueError("pass flops_ratio or keep/keep_ratio, not both")
        from torch import nn

        from tokprune.api import model_info
        from tokprune.configs import load
        from tokprune.flops import image_work

        config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
        config = load(config) if isinstance(config, str) else config
        info = model_info(model_or_config)
        pruner.check(info)
        work = image_work(config)
        k, _ = solve_keep(config, pruner, info, work.llm_tokens, float(target), newlines=work.newlines)
        return None, k / (work.llm_tokens - work.newlines)  # budgets count content tokens
    if getattr(pruner, "prune_ratio", None) is not None and (keep is not None or keep_ratio is not None):
        raise ValueError(f"{pruner.name}: pass prune_ratio (the fraction of image tokens removed, the paper's R) or "
                         "keep / keep_ratio (what is kept), not both")
    if getattr(pruner, "reduction_ratio", None) is not None and (keep is not None or keep_ratio is not None):
        raise ValueError(f"{pruner.name}: pass reduction_ratio (the reference's pruned fraction, counted by its own "
                         "rule) or keep / keep_ratio (what is kept), not both")
    if keep is None and keep_ratio is None:
        default = getattr(pruner, "default_keep_ratio", lambda: None)()
        if default is not None:
            return None, default
    return keep, keep_ratio
