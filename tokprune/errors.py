"""Exceptions that describe the user's environment, not a bug; importing this module loads nothing else, so the
``tokprune`` command can name them in its one-line error handling without importing torch or transformers."""

from __future__ import annotations


class UntestedTransformersError(RuntimeError):
    """The installed transformers is outside the tested window (``tokprune.patches.compat.TESTED``); the message
    names the window, the install line and the override."""
