"""Families the plugin cannot prune yet: vLLM's own classes, refusing at engine start when tokprune settings are
given (without settings they are vLLM's own, unchanged)."""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

from tokprune_vllm import REFUSED
from tokprune_vllm import config as cfg


def _refuse_if_pruning(model: Any, vllm_config: Any) -> None:
    hf_config = vllm_config.model_config.hf_config
    settings = cfg.read(hf_config)
    if settings is not None:
        arch = type(model).__mro__[1].__name__
        raise cfg.ConfigError(
            f"tokprune cannot serve {arch} pruned: {REFUSED[arch]}. Served families: LLaVA-1.5, Qwen2-VL, "
            "Qwen2.5-VL; use tokprune on Hugging Face transformers for this model, or drop the tokprune settings")


class RefusingLlavaNext(LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        _refuse_if_pruning(self, vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)


class RefusingQwen3VL(Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        _refuse_if_pruning(self, vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)


class RefusingQwen3VLMoe(Qwen3VLMoeForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        _refuse_if_pruning(self, vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)


class RefusingLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        _refuse_if_pruning(self, vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
