"""The public entry points: apply a method to a model, remove it, scope it, inspect what was pruned."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

import tokprune.patches  # noqa: F401  (registers the built-in model families)
import tokprune.pruners  # noqa: F401  (registers the built-in methods)
from tokprune import budget_solver
from tokprune.config import Budget
from tokprune.info import model_info  # noqa: F401  (re-exported: tokprune.api.model_info)
from tokprune.patches.base import Adapter
from tokprune.patches.compat import check_transformers
from tokprune.pruners.base import Pruner
from tokprune.pruners.compose import JOIN, Compose, from_names
from tokprune.record import PruneRecord
from tokprune.registry import METHODS, MODELS, adapter_for, get_method
from tokprune.schedule import Schedule
from tokprune.tuned import read_config

ATTR = "tokprune"


class Handle:
    """What ``model.tokprune`` holds while a model is patched: the method, the budget and the last record."""

    def __init__(self, adapter: Adapter) -> None:
        self._adapter = adapter

    @property
    def pruner(self) -> Pruner:
        return self._adapter.pruner

    @property
    def budget(self) -> Budget:
        return self._adapter.budget

    @property
    def family(self) -> str:
        return self._adapter.family

    @property
    def last(self) -> PruneRecord | None:
        """The record of the last prefill (None before the first one)."""
        return self._adapter.record

    def __repr__(self) -> str:
        return f"tokprune({self.pruner.name}, {self.budget}, family={self.family})"


def make_pruner(method: str, options: dict[str, Any]) -> Pruner:
    """Build a method's dataclass from keyword options, naming the valid ones when an option is unknown and
    refusing a non-bool value for a flag (``"no"`` is truthy: it would silently switch the flag on);
    ``"<vision method>+<llm method>"`` (or more parts, see :class:`~tokprune.pruners.compose.Compose`) builds a
    composition of them."""
    if JOIN in method:
        cls = Compose
        options = {**from_names([get_method(name)() for name in method.split(JOIN)]), **options}
    else:
        cls = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise TypeError(f"method {method!r} has no option {', '.join(unknown)}; its options: {known}")
    pruner = cls(**options)  # the method's own checks first: their messages say what each value means
    for name, value in options.items():
        flag = str(fields[name].type).replace(" ", "")
        if flag in ("bool", "bool|None", "Optional[bool]") and not isinstance(value, bool) and value is not None:
            raise TypeError(f"{method}: {name} is a flag; pass True or False, got {value!r}")
    return pruner


def unwrap(model: nn.Module) -> nn.Module:
    """The module tokprune patches: a ``torch.compile``d model's original module (``model._orig_mod``, whose
    forward the compiled wrapper calls, so the patch is traced into the compiled graph), else ``model``."""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        return orig
    return model


def apply(model: nn.Module, method: str | Pruner | None = None, keep: int | None = None,
          keep_ratio: float | None = None, record_scores: bool = False, config: str | Path | dict | None = None,
          **options: Any) -> nn.Module:
    """Patch ``model`` in place to prune visual tokens with ``method`` and return it.

    ``method``: a registered name (:func:`methods`), two joined by ``+`` (a vision method then an LLM method:
    ``"visionzip+transprune"``, see :class:`tokprune.Compose`), or a :class:`~tokprune.Pruner` instance (a method
    of your own, unregistered). ``keep``: visual tokens kept per image (a count); ``keep_ratio``: fraction kept; pass
    exactly one, or (progressive methods, ``pdrop`` / ``transprune``) ``schedule={layer: kept fraction of the
    original tokens}`` or ``flops_ratio=`` (fraction of the unpruned LLM FLOPs, see :mod:`tokprune.budget_solver`).
    ``options``: the method's hyper-parameters (e.g. ``layer=2`` for FastV, ``positions="original"``;
    only with a name) and the model family's options (e.g. ``tile_budget="global"`` for LLaVA-NeXT, see
    ``docs/families.md``). ``record_scores``: also store in every stage of the record the score the method gave
    each visual token (``Stage.scores``; for the heat-maps of :mod:`tokprune.viz`), off by default since it copies
    scores to the CPU. Applying to a patched model replaces the previous patch. Refuses a transformers release
    outside the tested window (see ``tokprune.patches.compat``), since a hook on a changed forward can be silently
    wrong. ``config``: a configuration written by ``tokprune tune --out`` (a JSON path, or its dict; validated by
    :func:`tokprune.tuned.read_config`): its method (``method`` may be left out; a different one is an error),
    its options, and its ``keep_ratio`` when no budget is passed; keyword options and a budget passed here
    override the file's.
    """
    if config is not None:
        if isinstance(method, Pruner):
            raise TypeError("config= holds options for a registered method; pass method by name, not an instance")
        method, tuned, tuned_ratio = read_config(config, method)
        options = {**tuned, **options}
        if keep is None and keep_ratio is None and not {"flops_ratio", "schedule"} & set(options):
            keep_ratio = tuned_ratio
    if method is None:
        raise TypeError("pass method= (a name from tokprune.methods() or a Pruner instance), or config= from "
                        "tokprune tune")
    if not isinstance(record_scores, bool):
        raise TypeError(f"record_scores is a flag; pass True or False, got {record_scores!r}")
    check_transformers()
    compiled, model = model, unwrap(model)
    adapter_cls = adapter_for(model)
    family_options = {k: options.pop(k) for k in list(options) if k in adapter_cls.options}
    check_foreign_family_options(adapter_cls, method, options)
    if "schedule" in options:  # {layer: kept fraction of the original tokens}, progressive methods
        options = budget_solver.schedule_options(options.pop("schedule"), options)
    if isinstance(method, Pruner):
        if options:
            raise TypeError(f"pass the options {', '.join(sorted(options))} to the {type(method).__name__} "
                            "instance itself, not to apply")
        pruner = method
    else:
        pruner = make_pruner(method, options)
    keep, keep_ratio = budget_solver.resolve(model, pruner, keep, keep_ratio)
    budget = Budget(keep=keep, keep_ratio=keep_ratio)
    adapter = adapter_cls(model, pruner, budget, **family_options)
    adapter.record_scores = bool(record_scores)
    fixed = adapter.fixed_visual_tokens()
    if fixed:
        budget.count(fixed)  # fail now, not at the first forward
    if is_patched(model):
        remove(model)
    adapter.install()
    setattr(model, ATTR, Handle(adapter))
    return compiled


def check_foreign_family_options(adapter_cls: type, method: str | Pruner, options: dict[str, Any]) -> None:
    """Refuse an option that belongs to another model family (``tile_budget`` on LLaVA-1.5), naming that family,
    instead of calling it an unknown option of the method."""
    cls = method if isinstance(method, Pruner) else Compose if JOIN in method else get_method(method)
    own = {f.name for f in dataclasses.fields(cls)}
    for key in options:
        families = [fam for fam, cls in MODELS.items() if key in cls.options and cls is not adapter_cls]
        if key not in own and families:
            classes = ", ".join(c for fam in families for c in MODELS[fam].model_classes)
            name = method if isinstance(method, str) else method.name
            raise TypeError(f"{key} is a {' / '.join(families)} family option (models {classes}), not an option of "
                            f"this {adapter_cls.family} model or of method {name!r}; drop {key}=")


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: every hook and tap is removed and the model behaves exactly as before."""
    orig = unwrap(model)
    handle = getattr(orig, ATTR, None)
    if isinstance(handle, Handle):
        handle._adapter.remove()
        delattr(orig, ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), ATTR, None), Handle)


@contextmanager
def pruned(model: nn.Module, method: str | Pruner, keep: int | None = None, keep_ratio: float | None = None,
           **options: Any) -> Iterator[nn.Module]:
    """``with tokprune.pruned(model, "fastv", keep_ratio=0.25): ...`` applies ``method`` on entry and, on exit (also
    on an error), puts back what was there before: no patch, or the previous patch exactly (the same method
    instance with its options, budget, family options and last record), so blocks nest and a model patched with
    :func:`apply` stays patched after a scoped trial of another method. ``options`` are :func:`apply`'s."""
    previous = getattr(model, ATTR, None)
    previous = previous if isinstance(previous, Handle) else None
    apply(model, method, keep=keep, keep_ratio=keep_ratio, **options)
    try:
        yield model
    finally:
        remove(model)
        if previous is not None:
            _reinstall(model, previous)


def _reinstall(model: nn.Module, handle: Handle) -> None:
    """Put a removed patch back as it was: its adapter (pruner, budget, family options, record) hooks in again."""
    adapter = handle._adapter
    record = adapter.record
    adapter.install()
    adapter.record = record
    setattr(model, ATTR, handle)


def last_record(model: nn.Module) -> PruneRecord | None:
    """What the last forward / generate of a patched model pruned.

    None before the first prefill with images, and again after a text-only prefill (a prompt without images:
    nothing was pruned, and the record of an earlier image prompt is forgotten so it cannot be mistaken for this
    one's). Decode steps of the same sequence keep their prefill's record.
    """
    handle = getattr(unwrap(model), ATTR, None)
    if not isinstance(handle, Handle):
        raise ValueError("this model is not patched; call tokprune.apply(model, method=..., keep=...) first")
    return handle.last


def methods() -> list[str]:
    """Names of the registered pruning methods."""
    return sorted(METHODS)


def models() -> list[str]:
    """Names of the supported model families."""
    return sorted(MODELS)


def schedule(model_or_config: Any, method: str | Pruner, keep: int | None = None, keep_ratio: float | None = None,
             *, n_visual: int | None = None, image_size: tuple[int, int] | None = None, newlines: int = 0,
             **options: Any) -> Schedule:
    """The per-stage budgets ``method`` runs for one image at ``keep`` / ``keep_ratio`` (what the adapter checks
    and ``tokprune.flops.for_budget(config, schedule)`` counts). ``n_visual``: the image's visual tokens; by
    default those of an image of ``image_size`` (the family default) for that config, whose LLaVA-NeXT row newlines
    the budget does not count (as at run time: it counts content tokens) and the schedule keeps on top when the
    method keeps them; with an explicit ``n_visual``, ``newlines`` says how many of them are newlines (default 0).
    ``options``: the method's hyper-parameters. Raises :class:`~tokprune.UnsupportedError` where the method cannot
    run."""
    info = model_info(model_or_config)
    if "schedule" in options:
        options = budget_solver.schedule_options(options.pop("schedule"), options)
    pruner = method if isinstance(method, Pruner) else make_pruner(method, options)
    pruner.check(info)
    keep, keep_ratio = budget_solver.resolve(model_or_config, pruner, keep, keep_ratio)
    if n_visual is None:
        from tokprune.configs import load
        from tokprune.flops import image_work

        config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
        config = load(config) if isinstance(config, str) else config
        work = image_work(config, image_size=image_size)
        n_visual, newlines = work.llm_tokens, work.newlines
    return budget_solver.image_schedule(pruner, info, n_visual, keep, keep_ratio, newlines)
