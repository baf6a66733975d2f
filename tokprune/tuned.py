"""Tuned configurations: a method's declared search space and the JSON files ``tokprune tune`` writes, validated
with errors that name the fix. Part of the core (``tokprune.apply(config=...)`` reads a tuned file) and free of the
tuner: no optuna, no evaluation code; :mod:`tokprune.eval.tune` writes what this module reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

#: search-space dimension kinds (see :attr:`tokprune.Pruner.search_space`)
KINDS = ("float", "int", "log")
#: the version of the JSON written by :meth:`TuneResult.save`
FORMAT = 1
#: keys of a tuned configuration file; ``method`` and ``options`` are required
CONFIG_KEYS = ("format", "method", "options", "keep_ratio", "target_ratio", "layer_average_ratio", "objective",
               "default_objective", "default_options", "seed", "sampler", "trials", "feasible_trials", "samples",
               "model", "data", "tokprune_version", "optuna_version", "seconds")
#: objective of an infeasible trial: the floor of a cosine similarity
INFEASIBLE = -1.0


def search_space(method: str | type) -> dict[str, tuple]:
    """The validated search space of a registered method (or Pruner class): ``{option: (kind, low, high)}``."""
    import tokprune.pruners  # noqa: F401  (registers the built-in methods)
    from tokprune.registry import get_method

    cls = get_method(method) if isinstance(method, str) else method
    space = dict(getattr(cls, "search_space", {}) or {})
    names = {f.name for f in fields(cls) if f.init}
    for key, dim in space.items():
        where = f"{cls.__name__}.search_space[{key!r}]"
        if key not in names:
            raise ValueError(f"{where}: {key!r} is not an option of the method; options: {', '.join(sorted(names))}")
        if not (isinstance(dim, tuple) and len(dim) == 3 and dim[0] in KINDS):
            raise ValueError(f"{where} must be (kind, low, high) with kind in {KINDS}, got {dim!r}")
        kind, lo, hi = dim
        if kind == "int" and not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
            raise ValueError(f"{where}: int bounds must be ints, got {dim!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
            raise ValueError(f"{where}: bounds must be finite numbers, got {dim!r}")
        if not lo < hi or (kind == "log" and lo <= 0):
            raise ValueError(f"{where}: need low < high (and low > 0 for 'log'), got {dim!r}")
        valid = getattr(cls, "numbers", {}).get(key)
        if valid is not None and not valid[0] <= lo <= hi <= valid[1]:
            raise ValueError(f"{where}: {dim!r} leaves the option's valid range [{valid[0]}, {valid[1]}] "
                             f"({cls.__name__}.numbers)")
    return space


def in_space(value: Any, dim: tuple) -> bool:
    kind, lo, hi = dim
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind == "int" and not isinstance(value, int):
        return False
    return lo <= value <= hi


def read_config(config: str | Path | dict, method: str | None = None) -> tuple[str, dict[str, Any], float | None]:
    """``(method, options, keep_ratio)`` of a tuned configuration (a JSON path or its dict), validated: unknown
    keys, a method other than ``method`` (when given), options the method does not have, and values outside its
    declared search space are errors naming the fix. The method's own validation runs at ``apply``."""
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"config {str(config)!r} does not exist; write one with tokprune tune --out")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"config {str(config)!r} is not JSON: {e}") from None
        where = f"config {str(config)!r}"
    elif isinstance(config, dict):
        data, where = config, "config"
    else:
        raise TypeError(f"config must be a path to a tokprune tune JSON file or its dict, got {type(config).__name__}")
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object written by tokprune tune")
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; a tuned config has {', '.join(CONFIG_KEYS)}")
    if "method" not in data or "options" not in data:
        raise ValueError(f"{where}: needs 'method' and 'options' (written by tokprune tune --out)")
    name, options = data["method"], data["options"]
    if method is not None and name != method:
        raise ValueError(f"{where} was tuned for method {name!r}, not {method!r}; pass method={name!r} or a config "
                         f"tuned for {method!r}")
    if not isinstance(options, dict):
        raise ValueError(f"{where}: 'options' must be an object {{option: value}}, got {options!r}")
    space = search_space(name)
    from tokprune.registry import get_method

    names = {f.name for f in fields(get_method(name)) if f.init}
    bad = sorted(set(options) - names)
    if bad:
        raise ValueError(f"{where}: method {name!r} has no option {', '.join(bad)}; its options: "
                         f"{', '.join(sorted(names))}")
    for key, value in options.items():
        if key in space and not in_space(value, space[key]):
            kind, lo, hi = space[key]
            raise ValueError(f"{where}: {key}={value!r} is outside the search space of {name} ({kind} in "
                             f"[{lo}, {hi}]); re-run tokprune tune or edit it into that range")
    keep_ratio = data.get("keep_ratio")
    if keep_ratio is not None and (isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float))
                                   or not 0 < keep_ratio <= 1):
        raise ValueError(f"{where}: keep_ratio must be a kept fraction in (0, 1], got {keep_ratio!r}")
    return name, dict(options), keep_ratio
