"""Budgets: how many visual tokens to keep, with validation that names the fix."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


def as_scalar(value: Any) -> Any:
    """A numpy / torch scalar (``np.float32(0.5)``, ``torch.tensor(0.5)``, ``np.int64(64)``) as the Python number
    it holds, so budgets read from arrays or tensors are accepted; anything else is returned unchanged (and
    validated by its caller). Booleans stay booleans, so ``keep=True`` is still refused."""
    if type(value) in (bool, int, float) or value is None:  # exact: np.float64 subclasses float
        return value
    if hasattr(value, "numel") and hasattr(value, "item"):  # a torch tensor: only a one-element one is a scalar
        if value.numel() != 1 or value.dtype.is_complex:
            return value
        return value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


@dataclass(frozen=True)
class Budget:
    """Visual tokens kept per image: ``keep`` (a count) or ``keep_ratio`` (a kept fraction), never both."""

    keep: int | None = None
    keep_ratio: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", as_scalar(self.keep))
        object.__setattr__(self, "keep_ratio", as_scalar(self.keep_ratio))
        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError(
                "pass exactly one of keep (visual tokens kept per image, an int) and keep_ratio "
                f"(fraction kept, in (0, 1]); got keep={self.keep!r}, keep_ratio={self.keep_ratio!r}"
            )
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int):
                raise TypeError(f"keep must be an int count of visual tokens per image, got {self.keep!r}")
            if self.keep <= 0:
                raise ValueError(f"keep must be >= 1 visual token per image, got {self.keep}")
        else:
            r = self.keep_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0 < r <= 1) or math.isnan(r):
                raise ValueError(
                    f"keep_ratio is the fraction of visual tokens KEPT and must be in (0, 1], got {r!r}"
                )

    def count(self, n_visual: int, what: str = "image", rounding: str = "round") -> int:
        """Tokens to keep out of ``n_visual``; raises if a count budget exceeds what the image has. ``rounding``: how
        a ``keep_ratio`` becomes a count, ``"round"`` (nearest) or ``"floor"`` (the progressive references'
        ``int(N * r)``, with a 1e-9 guard against float noise such as ``90 * 0.7 = 62.99...``)."""
        if self.keep is not None:
            if self.keep > n_visual:
                raise ValueError(
                    f"keep={self.keep} is larger than the {n_visual} visual tokens of this {what}; "
                    f"pass keep <= {n_visual} or a keep_ratio"
                )
            return self.keep
        if rounding == "floor":
            return max(1, min(n_visual, math.floor(self.keep_ratio * n_visual + 1e-9)))
        if rounding != "round":
            raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")
        return max(1, min(n_visual, round(self.keep_ratio * n_visual)))

    def __str__(self) -> str:
        return f"keep={self.keep}" if self.keep is not None else f"keep_ratio={self.keep_ratio}"
