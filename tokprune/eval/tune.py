"""The visual-information-flow optimiser (VFlowOpt, ICCV'25, Alg. 1), for any method with numeric options.

It searches a method's :attr:`~tokprune.Pruner.search_space` for the point that keeps the pruned model closest to
the unpruned one under a budget:

* **objective**: the mean, over unlabeled samples, of the cosine similarity between the final hidden state (after
  the LLM's last norm, ``hidden_states[-1]``) of the last prompt token with and without pruning, at prefill. The
  unpruned states are computed once; each trial is one pruned forward over the same batches. Higher is better
  (1 = the pruned model's last state is unchanged).
* **budget**: ``target_ratio``, a *layer-averaged* kept fraction of each image's visual tokens (VFlowOpt's budget
  definition, the one progressive methods are compared on): the content tokens each LLM layer sees, averaged over
  the layers, divided by the image's content tokens (LLaVA-NeXT newlines are not counted, as in every budget).
* **trials**: each trial calls ``tokprune.apply(model, method=M, keep_ratio=TARGET, **point)``. Where the method's
  ``keep`` is the count after its last stage and its schedule averages above the target by more than one token of
  rounding (FastV, PyramidDrop, TransPrune: full early layers), ``keep_ratio`` is instead the largest final
  fraction whose schedule
  (:func:`tokprune.api.schedule`, the one the adapters run) meets the target for every image size of the data:
  points are compared at equal layer-averaged cost, so a later FastV layer pays for itself with fewer final tokens.
  The record of the forward is then checked: a trial whose layer-averaged ratio exceeds the target by more than
  one token of rounding per image (``1 / content tokens``) is infeasible.
* **infeasible trials** (the record above the target; no final count meets it, e.g. FastV's layer 3 of a 4-layer
  LLM at 25%; a point the method itself refuses on this model, e.g. a layer beyond the LLM): the trial is kept with
  objective -1 (the cosine's floor) and a positive constraint violation (Optuna's ``Trial.set_constraint``, which
  both samplers read), so the sampler learns the feasible region and the best trial is always a feasible one.
  When no trial is feasible, :func:`tune` raises, naming the target to raise.

Why Optuna: it has both the paper's kind of optimiser (``GPSampler``: Gaussian-process Bayesian optimisation; the
paper uses scikit-optimize's GP, which would bring scikit-learn and SciPy) and TPE, both seeded, both with
constraints, and int / float / log dimensions. The default is **TPE** (``sampler="tpe"``): it needs nothing beyond
Optuna (the GP sampler needs SciPy, about 140 MB installed), stays cheap per trial (the GP is refitted on the whole
history every trial) and handles integer options (FastV's layer) natively; ``sampler="gp"`` is the paper's kind
(``pip install scipy``). Both samplers start with ``min(10, max(2, trials // 4))`` random trials (the paper's
code: 27 of 300). With the method's defaults inside the search space, the first trial is the default
configuration, so the best is never worse than the default.

Reproducible: the same seed, samples and model on the same machine give the same trials and the same best point.
The tuned configuration is written as JSON (:meth:`TuneResult.save`) that ``tokprune.apply(model, config=path)``
loads (:func:`read_config` validates it). Optuna is an optional extra: ``pip install 'tokprune[tune]'``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from tokprune.eval.progress import Progress
from tokprune.tuned import (  # noqa: F401  (re-exported: a tuned config is read by the core)
    CONFIG_KEYS,
    FORMAT,
    INFEASIBLE,
    KINDS,
    read_config,
    search_space,
)
from tokprune.tuned import in_space as _in_space  # noqa: F401

SAMPLERS = ("tpe", "gp")


# ------------------------------------------------------------------------------------------------ objective
@torch.no_grad()
def last_states(model: torch.nn.Module, batches: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, list[Any]]:
    """(N, D) float32: the final hidden state of each row's last prompt token over all batches (left-padded), and
    the record of each batch's forward (None when the model is not patched)."""
    import tokprune

    states, records = [], []
    for batch in batches:
        mask = batch.get("attention_mask")
        if mask is not None and bool((mask[:, -1] == 0).any()):
            raise ValueError("the batches must be left-padded (the last prompt token is the last column); set "
                             "processor.tokenizer.padding_side = 'left'")
        out = model(**batch, output_hidden_states=True, logits_to_keep=1)
        states.append(out.hidden_states[-1][:, -1].float().cpu())
        records.append(tokprune.last_record(model) if tokprune.is_patched(model) else None)
    return torch.cat(states), records


def content_ratios(record: Any, llm_layers: int) -> list[tuple[float, int]]:
    """Per image of a record: (layer-averaged kept fraction of its content tokens, its content tokens). Special
    tokens (LLaVA-NeXT newlines) are left out of both counts; without them this is
    ``record.layer_average()[b][i] / n_visual``."""
    out = []
    for b, row in enumerate(record.n_visual):
        for i, n in enumerate(row):
            special = record.special[b][i].cpu() if record.special else torch.zeros(n, dtype=torch.bool)
            content = n - int(special.sum())
            counts = [content] * llm_layers
            for st in record.stages:
                start = 0 if st.kind == "vision" else int(st.layer)
                kept = int((~special[st.kept[b][i].cpu()]).sum())
                counts[start:] = [kept] * (llm_layers - start)
            out.append((sum(counts) / llm_layers / content, content))
    return out


def schedule_ratio(model: torch.nn.Module, method: str, point: dict[str, Any], keep: int, n: int) -> float:
    """The layer-averaged kept fraction of ``method``'s schedule for an image of ``n`` content tokens at ``keep``."""
    from tokprune.api import model_info, schedule

    layers = model_info(model).llm_layers
    counts = [n] * layers
    for start, kept in schedule(model, method, keep=keep, n_visual=n, **point).plan():
        counts[start:] = [kept] * (layers - start)
    return sum(counts) / layers / n


def solve_keep_ratio(model: torch.nn.Module, method: str, point: dict[str, Any], target: float,
                     sizes: Sequence[int]) -> float | None:
    """The ``keep_ratio`` a trial runs at: ``target`` (the contract's call) where the schedule averages within it,
    up to one token of rounding, for every image size (``sizes``: content tokens; a method whose ``keep`` is the
    layer average, or a pre-LLM one), else the largest final fraction ``k / n`` that meets it for all sizes; None
    when even one token per image cannot (an infeasible point)."""
    from tokprune.config import Budget

    tol = 1e-9
    if all(schedule_ratio(model, method, point, Budget(keep_ratio=target).count(n), n) <= target + 1 / n + tol
           for n in sizes):
        return target
    best: float | None = None
    for n in sizes:
        lo, hi = 0, Budget(keep_ratio=target).count(n)  # largest k in [1, hi] with ratio <= target; 0: none
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if schedule_ratio(model, method, point, mid, n) <= target + tol:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            return None
        ratio = lo / n
        best = ratio if best is None else min(best, ratio)
    # the fraction must give every size a count that meets the target (round(ratio * n) may exceed k elsewhere)
    if best is not None and not all(
            schedule_ratio(model, method, point, Budget(keep_ratio=best).count(n), n) <= target + tol for n in sizes):
        return None
    return best


@dataclass
class Trial:
    """One evaluated point: its options, the keep_ratio it ran at, its objective and feasibility."""

    number: int
    options: dict[str, Any]
    keep_ratio: float | None
    objective: float
    feasible: bool
    layer_average_ratio: float | None = None
    reason: str = ""


class Evaluator:
    """Scores points of one method on fixed batches against the unpruned model's last-token states."""

    def __init__(self, model: torch.nn.Module, batches: Sequence[dict[str, Any]], method: str,
                 target_ratio: float) -> None:
        import tokprune
        from tokprune.api import model_info

        if not 0 < target_ratio <= 1:
            raise ValueError(f"target_ratio is the layer-averaged fraction of visual tokens kept, in (0, 1]; got "
                             f"{target_ratio!r}")
        if not batches:
            raise ValueError("tune needs at least one batch of samples")
        self.model, self.batches, self.method, self.target = model, list(batches), method, float(target_ratio)
        tokprune.remove(model)
        self.layers = model_info(model).llm_layers
        self.reference, _ = last_states(model, self.batches)
        # the images' sizes (content tokens), read from a keep-all pass of the random baseline
        tokprune.apply(model, "random", keep_ratio=1.0)
        try:
            _, records = last_states(model, self.batches)
        finally:
            tokprune.remove(model)
        if any(r is None for r in records):
            raise ValueError("a batch has no image: every sample needs one (the budget counts visual tokens)")
        self.sizes = sorted({n for r in records for _, n in content_ratios(r, self.layers)})

    def __call__(self, point: dict[str, Any], number: int = 0) -> Trial:
        import tokprune

        try:
            keep_ratio = solve_keep_ratio(self.model, self.method, point, self.target, self.sizes)
        except (ValueError, TypeError) as e:  # the method refuses the point on this model
            return Trial(number, point, None, INFEASIBLE, False, reason=str(e))
        if keep_ratio is None:
            low = min(schedule_ratio(self.model, self.method, point, 1, n) for n in self.sizes)
            return Trial(number, point, None, INFEASIBLE, False, low,
                         f"even 1 token per image averages {low:.4f} of the visual tokens over the layers")
        try:
            tokprune.apply(self.model, self.method, keep_ratio=keep_ratio, **point)
        except (ValueError, TypeError) as e:
            return Trial(number, point, keep_ratio, INFEASIBLE, False, reason=str(e))
        try:
            states, records = last_states(self.model, self.batches)
        finally:
            tokprune.remove(self.model)
        per_image = [x for r in records for x in content_ratios(r, self.layers)]
        ratio = sum(r for r, _ in per_image) / len(per_image)
        value = float(torch.nn.functional.cosine_similarity(states, self.reference, dim=-1).mean())
        over = [r - self.target - 1 / n for r, n in per_image if r > self.target + 1 / n + 1e-9]
        if over:
            return Trial(number, point, keep_ratio, value, False, ratio,
                         f"the record averages {ratio:.4f} of the visual tokens, above the target {self.target}")
        return Trial(number, point, keep_ratio, value, True, ratio)


# ------------------------------------------------------------------------------------------------ the search
@dataclass
class TuneResult:
    """The outcome of :func:`tune`: the best feasible point and the default configuration's objective."""

    method: str
    options: dict[str, Any]
    keep_ratio: float
    target_ratio: float
    layer_average_ratio: float
    objective: float
    default_objective: float | None
    default_options: dict[str, Any]
    seed: int
    sampler: str
    trials: int
    feasible_trials: int
    samples: int
    seconds: float
    model: str | None = None
    data: str | None = None
    history: list[Trial] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """What :meth:`save` writes (and ``tokprune.apply(config=...)`` reads)."""
        import optuna

        import tokprune

        out = {k: v for k, v in asdict(self).items() if k != "history"}
        return {"format": FORMAT, **out, "tokprune_version": tokprune.__version__,
                "optuna_version": optuna.__version__}

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path


def require_optuna(sampler: str = "tpe") -> None:
    """Raise ImportError naming the install line when Optuna (or SciPy for ``sampler="gp"``) is missing."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ImportError("tokprune tune needs Optuna: pip install 'tokprune[tune]'") from None
    if sampler == "gp":
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise ImportError("sampler 'gp' (Optuna's GPSampler) needs SciPy: pip install scipy, or use the "
                              "default sampler 'tpe'") from None


def _defaults(method: str, space: dict[str, tuple]) -> tuple[dict[str, Any], bool]:
    """The method's default values of the searched options, and whether every one lies in the space (then the
    default configuration can be the first trial)."""
    from tokprune.registry import get_method

    defaults = {f.name: f.default for f in fields(get_method(method)) if f.name in space}
    return defaults, all(_in_space(v, space[k]) for k, v in defaults.items())


def tune(model: torch.nn.Module, batches: Sequence[dict[str, Any]], method: str, target_ratio: float = 0.25,
         trials: int = 50, seed: int = 0, sampler: str = "tpe", progress: bool = False,
         on_trial: Callable[[Trial], None] | None = None) -> TuneResult:
    """Search ``method``'s declared search space for the point that maximises the mean last-token cosine
    similarity with the unpruned model over ``batches`` (model inputs, left-padded, one image or more per row) at a
    layer-averaged kept fraction ``target_ratio``; ``trials`` evaluations, seeded. The model is left unpatched.
    See the module docstring for the budget, infeasible trials and the samplers."""
    require_optuna(sampler)
    import optuna

    space = search_space(method)
    if not space:
        raise ValueError(f"method {method!r} declares no search space (no scalar hyper-parameter to tune); "
                         f"methods with one: {', '.join(tunable_methods())}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    start = time.perf_counter()
    evaluate = Evaluator(model, batches, method, target_ratio)
    default_options, expressible = _defaults(method, space)
    default = evaluate({}, -1)  # the method's own defaults, at the same budget
    history: list[Trial] = []
    bar = Progress(trials, progress, "tune", "trial")

    def objective(trial: optuna.Trial) -> float:
        point: dict[str, Any] = {}
        for key, (kind, lo, hi) in space.items():
            if kind == "int":
                point[key] = trial.suggest_int(key, lo, hi)
            else:
                point[key] = trial.suggest_float(key, float(lo), float(hi), log=kind == "log")
        result = evaluate(point, trial.number)
        trial.set_constraint("budget", 0.0 if result.feasible else 1.0 + max(
            0.0, (result.layer_average_ratio or 0.0) - evaluate.target))
        history.append(result)
        feasible = [t for t in history if t.feasible]
        best = max((t.objective for t in feasible), default=None)
        bar.step(f"best {best:.5f}" if best is not None else "no feasible trial yet")
        if on_trial is not None:
            on_trial(result)
        return result.objective

    startup = min(10, max(2, trials // 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if sampler == "tpe":
            chosen = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        else:
            chosen = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=chosen)
    if expressible:
        study.enqueue_trial(default_options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=trials)
    finally:
        bar.close()
    feasible = [t for t in history if t.feasible]
    if not feasible:
        reasons = sorted({t.reason for t in history if t.reason})[:2]
        raise ValueError(f"no feasible trial for {method} at a layer-averaged target_ratio={target_ratio} in "
                         f"{trials} trial(s) ({'; '.join(reasons)}); raise --target-ratio or use another method")
    best = max(feasible, key=lambda t: (t.objective, -t.number))  # ties: the earliest
    return TuneResult(method, best.options, float(best.keep_ratio), evaluate.target, float(best.layer_average_ratio),
                      best.objective, default.objective if default.feasible else None, default_options,
                      seed, sampler, trials, len(feasible), int(evaluate.reference.shape[0]),
                      round(time.perf_counter() - start, 2), history=history)


def tunable_methods() -> list[str]:
    """Registered methods that declare a search space."""
    import tokprune

    return [m for m in tokprune.methods() if search_space(m)]
