"""The transformers releases tokprune is tested on, readable without importing transformers or torch.

:mod:`tokprune.patches.compat` (which imports transformers) re-exports these and refuses other releases; the
``tokprune`` command reads them here, so that ``--version``, ``-h`` and argument errors stay fast and only an
untested release pays for the full check before a model loads.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

#: the release of each tested minor that CI installs (oldest first; CI runs the whole suite on each)
TESTED_RELEASES: dict[str, str] = {"5.23": "5.23.0", "5.24": "5.24.0", "5.25": "5.25.0"}
#: minor releases of transformers the full test suite passes on
TESTED: tuple[str, ...] = tuple(TESTED_RELEASES)
#: the environment variable that lets a user run on an untested release (with one warning)
OVERRIDE_ENV = "TOKPRUNE_ALLOW_UNTESTED_TRANSFORMERS"


def installed() -> str | None:
    """The transformers version in use: the imported module's when it is loaded, else the installed metadata's."""
    module = sys.modules.get("transformers")
    if module is not None:
        return str(module.__version__)
    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def is_tested(release: str | None) -> bool:
    """Whether ``release`` (e.g. "5.25.0") is in a tested minor."""
    if not release:
        return False
    major, _, rest = release.partition(".")
    minor = rest.split(".")[0]
    return f"{major}.{''.join(ch for ch in minor if ch.isdigit())}" in TESTED
