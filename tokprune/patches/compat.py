"""Everything that differs between the transformers releases tokprune supports, in one place.

tokprune hooks transformers internals (forward kwargs, cache objects, output fields), so a release can change
what a hook sees without any error. Each helper below names the release that needs its branch; code elsewhere
calls these helpers and never compares versions itself. ``TESTED`` is the window CI runs the whole suite on;
:func:`check_transformers` refuses any other release unless ``TOKPRUNE_ALLOW_UNTESTED_TRANSFORMERS=1``.
See docs/compat.md for what each adapter depends on.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import transformers
from packaging.version import Version

from tokprune.errors import UntestedTransformersError

# the tested window lives in a module that imports nothing (the CLI reads it without transformers); names kept here
from tokprune.transformers_window import OVERRIDE_ENV, TESTED, TESTED_RELEASES  # noqa: E402,F401

VERSION = Version(transformers.__version__)
MINOR = f"{VERSION.major}.{VERSION.minor}"

# 5.24 renamed the cache kwarg and output field ``past_key_values`` -> ``cache`` (the old name warns until 5.40).
CACHE_KWARG = "cache" if VERSION >= Version("5.24.0.dev0") else "past_key_values"

_warned = False


def check_transformers(version: str | None = None) -> None:
    """Raise :class:`~tokprune.errors.UntestedTransformersError` (a RuntimeError) unless the installed transformers
    is a tested release, or the user overrode the refusal (then warn once)."""
    global _warned
    v = Version(version or transformers.__version__)
    minor = f"{v.major}.{v.minor}"
    if minor in TESTED:
        return
    window = ", ".join(TESTED)
    if os.environ.get(OVERRIDE_ENV, "") not in ("", "0"):
        if not _warned:
            warnings.warn(
                f"tokprune runs on transformers {v}, which it was not tested with (tested: {window}); "
                f"{OVERRIDE_ENV} is set, so pruning goes ahead: check it with `python -m tokprune.compat --check`",
                RuntimeWarning, stacklevel=3,
            )
            _warned = True
        return
    raise UntestedTransformersError(
        f"tokprune was tested with transformers {window} and transformers {v} is installed; a hook on a changed "
        f"forward can give wrong answers without an error. Install a tested release "
        f"(pip install 'transformers>={TESTED[0]},<{_next_minor(TESTED[-1])}'), or set {OVERRIDE_ENV}=1 to run "
        f"anyway and check it with `python -m tokprune.compat --check`"
    )


def _next_minor(minor: str) -> str:
    major, m = minor.split(".")
    return f"{major}.{int(m) + 1}"


def get_cache(kw: dict) -> Any:
    """The KV cache object in a forward call's kwargs, under either name (5.24 renamed it ``cache``)."""
    cache = kw.get("cache")
    return cache if cache is not None else kw.get("past_key_values")


def output_cache(out: Any) -> Any:
    """The KV cache a model output returns (``out.cache`` from 5.24 on, ``out.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass a cache to a forward call under the name this release expects."""
    return {CACHE_KWARG: cache}
