"""Model-family adapters, one per file; importing this package registers them."""

from tokprune.patches import llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl, qwen3_vl  # noqa: F401
from tokprune.patches.base import Adapter

__all__ = ["Adapter"]
