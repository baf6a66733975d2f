"""Model-family adapters, one per file; importing this package registers them."""

from tokprune.patches import llava  # noqa: F401
from tokprune.patches.base import Adapter

__all__ = ["Adapter"]
