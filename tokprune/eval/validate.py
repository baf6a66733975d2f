"""Checks of an evaluation's arguments that need no model weights, so that mistakes fail in a second with one line
(unknown task or method, a missing dataset, a budget larger than the image's visual tokens) instead of after the
model has loaded."""

from __future__ import annotations

from typing import Any

from tokprune.eval import tasks as offline
from tokprune.eval.grid import GridSpec
from tokprune.eval.models import visual_tokens  # noqa: F401  (re-exported)
from tokprune.eval.variants import DOWNSAMPLE, supports_flops_ratio  # noqa: F401  (re-exported)
from tokprune.pruners.compose import composed_names


class EvalArgumentError(ValueError):
    """A bad argument of ``tokprune eval`` (exit code 2)."""


def method_names() -> list[str]:
    import tokprune

    return [*tokprune.methods(), DOWNSAMPLE]


def check(spec: GridSpec) -> dict[str, Any]:
    """Raise :class:`EvalArgumentError` for the first bad argument; returns what was learnt (the per-image visual
    tokens, the kind of each task)."""
    if not spec.tasks:
        raise EvalArgumentError("pass --tasks (e.g. shapes, a dataset path, or lmms-eval task names)")
    known = method_names()
    for m in spec.methods:
        if m not in known and not composed_names(m, known):
            from tokprune.registry import get_method, is_import_path

            if not is_import_path(m):
                raise EvalArgumentError(f"unknown method {m!r}; methods: {', '.join(known)}, or "
                                        "package.module:ClassName for a Pruner class of your own")
            try:
                get_method(m)  # a user's Pruner class: imported now, before the model loads
            except ValueError as e:
                raise EvalArgumentError(str(e)) from None
    if spec.methods and not (spec.keeps or spec.keep_ratios or spec.flops_ratios):
        raise EvalArgumentError("pass budgets: --keep, --keep-ratio and/or --flops-ratio")
    if spec.batch_size < 1:
        raise EvalArgumentError(f"--batch-size must be >= 1, got {spec.batch_size}")
    if spec.limit is not None and spec.limit < 1:
        raise EvalArgumentError(f"--limit must be >= 1, got {spec.limit}")
    if spec.flops_ratios:
        able = [m for m in spec.all_methods() if supports_flops_ratio(m)]
        if not able:
            raise EvalArgumentError("--flops-ratio: no method supports flops_ratio budgets yet (of "
                                    f"{', '.join(spec.all_methods())}); use --keep or --keep-ratio")
        unable = [m for m in spec.methods if m not in able]
        if unable:
            takers = [m for m in method_names() if supports_flops_ratio(m)]
            raise EvalArgumentError(f"--flops-ratio: {', '.join(unable)} take no flops_ratio budget (the methods "
                                    f"that do: {', '.join(takers)}); give them --keep or --keep-ratio in another run")
    for r in spec.keep_ratios:
        if not 0 < r <= 1:
            raise EvalArgumentError(f"--keep-ratio is the fraction of visual tokens KEPT, in (0, 1]; got {r}")
    for k in spec.keeps:
        if k < 1:
            raise EvalArgumentError(f"--keep must be >= 1 visual token per image, got {k}")
    kinds = {t: task_kind(t, spec) for t in spec.tasks}
    try:
        n_visual = visual_tokens(spec.model)
    except (OSError, ValueError) as e:
        raise EvalArgumentError(f"model {spec.model!r}: {e}") from e
    if n_visual is not None:
        too_big = [k for k in spec.keeps if k > n_visual]
        if too_big:
            raise EvalArgumentError(f"--keep {too_big[0]} is larger than the {n_visual} visual tokens per image of "
                                    f"{spec.model}; pass --keep <= {n_visual} or a --keep-ratio")
    from tokprune.eval.models import is_reference

    if spec.template is not None and is_reference(spec.model):
        raise EvalArgumentError(f"{spec.model} is trained on one prompt format; --template does not apply to it")
    return {"visual_tokens_per_image": n_visual, "task_kinds": kinds}


def task_kind(name: str, spec: GridSpec) -> str:
    """``"offline"`` or ``"lmms"``; raises for a missing path or an unknown task."""
    if offline.is_builtin(name):
        return "offline"
    if offline.looks_like_path(name):
        try:
            offline.load_task(name, limit=1)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise EvalArgumentError(str(e)) from e
        return "offline"
    from tokprune.eval import lmms_tasks

    try:
        lmms_tasks.check_task(name, spec.include_path)
    except (ImportError, ValueError) as e:
        raise EvalArgumentError(f"unknown task {name!r} (not built in: {', '.join(offline.BUILTIN)}; not a path; "
                                f"{e})") from e
    return "lmms"
