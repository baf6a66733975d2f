"""The engine's pruning settings: read from the HF config (``hf_overrides={"tokprune": {...}}``), checked once.

    LLM(model, hf_overrides={"tokprune": {"method": "cls", "keep": 64}})
    vllm serve MODEL --hf-overrides '{"tokprune": {"method": "cls", "keep": 64}}'

Keys: ``method`` (a servable method, :mod:`tokprune_vllm.methods`), exactly one of ``keep`` (visual tokens kept per
image) and ``keep_ratio`` (fraction kept), and the method's own options (e.g. ``"dominant": 54`` for visionzip).
No ``tokprune`` key, or ``"method": null``, leaves the model exactly as vLLM's own.

The settings reach every place that needs them through the HF config: the processor (which sizes the prompt's
image placeholders before the encoder runs) and the model (which prunes the encoder's output to that size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokprune.config import Budget
from tokprune.pruners.base import ModelInfo, Pruner

KEY = "tokprune"
#: keys of the ``tokprune`` dict that are not method options
RESERVED = ("method", "keep", "keep_ratio")


class ConfigError(ValueError):
    """The ``tokprune`` settings cannot be served; the message names the fix."""


@dataclass(frozen=True)
class Settings:
    """What the user asked for: a method name, a budget and the method's options."""

    method: str
    budget: Budget
    options: dict[str, Any] = field(default_factory=dict)

    def count(self, n_visual: int) -> int:
        """Visual tokens an image of ``n_visual`` keeps (the error names the fix when ``keep`` exceeds it)."""
        return self.budget.count(n_visual)


def read(hf_config: Any) -> Settings | None:
    """The settings in ``hf_config`` (None: no pruning). Raises :class:`ConfigError` for malformed settings."""
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f'hf_overrides "{KEY}" must be a dict such as {{"method": "cls", "keep": 64}}, '
                          f"got {raw!r}")
    method = raw.get("method")
    if method is None:
        extra = sorted(set(raw) - {"method"})
        if extra:
            raise ConfigError(f'hf_overrides "{KEY}" sets {", ".join(extra)} but no method; add "method": NAME '
                              "(or remove the tokprune key to serve the model unpruned)")
        return None
    if not isinstance(method, str):
        raise ConfigError(f'"{KEY}": method must be a string, got {method!r}')
    try:
        budget = Budget(keep=raw.get("keep"), keep_ratio=raw.get("keep_ratio"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f'"{KEY}": {e}') from None
    options = {k: v for k, v in raw.items() if k not in RESERVED}
    return Settings(method, budget, options)


def build_pruner(settings: Settings, info: ModelInfo) -> Pruner:
    """The tokprune method for ``settings`` on the model described by ``info``, refused with a reason when it
    cannot be served (see :func:`tokprune_vllm.methods.check_servable`)."""
    from tokprune_vllm.methods import make_pruner

    return make_pruner(settings.method, settings.options, info)
