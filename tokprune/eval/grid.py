"""The grid of an evaluation: which cells (variant x task) a run has, and the settings that define it.

Every grid holds the unpruned model once per task, then each requested method and the baselines (``random``,
``downsample``) at every budget. Budgets are ``keep`` counts, ``keep_ratio`` fractions, or ``flops_ratio``
targets for methods that support one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tokprune.eval.variants import BASELINES, Variant


@dataclass
class GridSpec:
    """Everything a run is asked for (the CLI fills it; the run JSON records it)."""

    model: str
    tasks: list[str]
    methods: list[str] = field(default_factory=list)
    keeps: list[int] = field(default_factory=list)
    keep_ratios: list[float] = field(default_factory=list)
    flops_ratios: list[float] = field(default_factory=list)
    baselines: bool = True
    limit: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    attn: str = "sdpa"
    seed: int = 0
    template: str | None = None
    max_new_tokens: int | None = None
    include_path: str | None = None
    #: keyword options of the listed methods (``tokprune eval --option``), not of the baselines added to them
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that must match for a resumed run to add to the same results (not the grid itself,
        which may grow: new methods or budgets are just new cells)."""
        keys = ("model", "limit", "device", "dtype", "attn", "seed", "template", "max_new_tokens", "batch_size")
        return {k: getattr(self, k) for k in keys}

    def all_methods(self) -> list[str]:
        extra = [b for b in BASELINES if b not in self.methods] if self.baselines else []
        return [*self.methods, *extra]

    def variants(self) -> list[Variant]:
        """The unpruned model, then each method at each budget (``flops_ratio`` as a method option)."""
        from tokprune.eval.validate import supports_flops_ratio

        out = [Variant()]
        for m in self.all_methods():
            own = tuple(sorted(self.options.items())) if m in self.methods else ()
            out += [Variant(m, keep=k, options=own) for k in self.keeps]
            out += [Variant(m, keep_ratio=r, options=own) for r in self.keep_ratios]
            if supports_flops_ratio(m):  # baselines without a flops_ratio budget get no such cells
                out += [Variant(m, options=(*own, ("flops_ratio", r))) for r in self.flops_ratios]
        return out


@dataclass(frozen=True)
class Cell:
    """One (variant, task) pair; ``key`` names it in the results and in resume."""

    variant: Variant
    task: str

    @property
    def key(self) -> str:
        v = self.variant
        opts = ",".join(f"{k}={val}" for k, val in v.options)
        budget = "" if v.method is None else (f"keep={v.keep}" if v.keep is not None else
                                             f"keep_ratio={v.keep_ratio}" if v.keep_ratio is not None else "")
        return "|".join(x for x in (v.name, budget, opts, self.task) if x)


def cells(spec: GridSpec, tasks: Sequence[str] | None = None) -> list[Cell]:
    """Every cell of the grid, variant-major (a model patch serves all tasks before the next one)."""
    return [Cell(v, t) for v in spec.variants() for t in (tasks if tasks is not None else spec.tasks)]
