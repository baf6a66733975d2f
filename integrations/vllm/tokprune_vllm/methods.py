"""Which tokprune methods vLLM can serve, and why the others cannot.

vLLM fixes the number of image placeholders in the prompt *before* the encoder runs (the processor expands them),
caches processor and encoder outputs by image content, and keeps one paged KV cache whose length cannot change per
layer. So a method is servable only when

* it prunes before the LLM only (no in-LLM stage: an in-LLM cut would need a shorter KV cache in later layers);
* its kept count per image is fixed by the budget alone (no in-encoder cut whose survivors depend on the image,
  no budget pooled over a prompt's images);
* its choice depends on the image alone (no text-guided rule: the encoder never sees the prompt; no
  dependence on the image's place in the prompt, which the encoder cache does not know).

The first three are read off the method itself (:func:`reasons`); the last one is a property of its rule, so a
method is also on the list :data:`SERVABLE`, whose entries the CI job compares with tokprune's Hugging Face path.
A method added to tokprune later is enabled with :func:`register_servable` once that comparison passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tokprune.pruners  # noqa: F401  (registers the built-in methods)
from tokprune.pruners.base import ModelInfo, Pruner, UnsupportedError
from tokprune.registry import METHODS, get_method
from tokprune_vllm.config import ConfigError

#: the plugin's own baseline (not a tokprune method): LLaVA's projected grid average-pooled to the budget
DOWNSAMPLE = "downsample"

#: servable methods -> a function fixing / checking options for vLLM (None: options as given)
SERVABLE: dict[str, Callable[[dict[str, Any]], dict[str, Any]] | None] = {}

#: why a method outside SERVABLE is refused, when its rule (not its schedule) is the reason
RULE_REASONS = {
    "cdpruner": "its selection is conditioned on the prompt's text, and vLLM's encoder never sees the prompt",
    "catp": "its budget is pooled over a prompt's images and its stage 1 is guided by the paired text",
    "sparsevlm": "it prunes inside the LLM with text-guided raters (the paged KV cache cannot shrink per layer)",
}


def register_servable(name: str, fix_options: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Allow ``name`` (a registered tokprune method) to be served; ``fix_options`` may check or complete its
    options for vLLM (e.g. ``random`` is seeded from the image content). Call this from a plugin of your own, or
    add the name here, once the method's kept sets match tokprune's HF path in the CI comparison."""
    SERVABLE[name] = fix_options


def _random_options(options: dict[str, Any]) -> dict[str, Any]:
    seed_by = options.get("seed_by", "content")
    if seed_by != "content":
        raise ConfigError(
            'random: vLLM caches encoder outputs by image content and never tells the encoder where an image sits '
            'in its prompt, so random must be seeded from the image: use "seed_by": "content" (the default here)')
    return {**options, "seed_by": "content"}


def _visionzip_options(options: dict[str, Any]) -> dict[str, Any]:
    merge = options.get("merge", "llm")
    if merge != "llm":
        raise ConfigError(
            "visionzip: the vLLM plugin merges contextual tokens after the projector (merge='llm'); tokprune's "
            "encoder-space merge (merge='encoder', LLaVA's default on Hugging Face: the reference's) would need the "
            "feature layer's hidden states and a second projector call, which the plugin does not do yet")
    return {**options, "merge": "llm"}


for _name in ("cls", "vtc_cls", "hiprune", "divprune", "vispruner"):
    register_servable(_name)
register_servable("visionzip", _visionzip_options)
register_servable("random", _random_options)


def reasons(pruner: Pruner, info: ModelInfo) -> list[str]:
    """Why ``pruner`` cannot be served, read off its schedule and requests (empty: nothing in its shape forbids
    it)."""
    out = []
    if pruner.llm_layers(info):
        out.append("it drops tokens inside the LLM, and vLLM's paged KV cache cannot change length per layer")
    if pruner.encoder_cut(info) is not None:
        out.append("it drops tokens inside the vision encoder, so its kept count is not known before the encoder "
                   "runs (vLLM sizes the prompt's image placeholders first)")
    request = pruner.vision_request(info)
    if request is not None and request.paired_text:
        out.append("it is guided by the prompt's text, and vLLM's encoder never sees the prompt")
    if pruner.pooled_budget:
        out.append("its budget moves between a prompt's images, and vLLM sizes each image's placeholders alone")
    if request is None and not pruner.llm_layers(info):
        out.append("it has no vision stage")
    return out


def servable() -> list[str]:
    """Names that can be served now (the methods registered in tokprune and allowed here, plus downsample)."""
    return sorted([n for n in SERVABLE if n in METHODS] + [DOWNSAMPLE])


def make_pruner(name: str, options: dict[str, Any], info: ModelInfo) -> Pruner:
    """The tokprune method ``name`` with ``options``, checked for ``info``; a clear :class:`ConfigError` when it
    cannot be served."""
    if name not in METHODS:
        known = ", ".join(servable())
        raise ConfigError(f"tokprune has no method {name!r}; methods vLLM can serve: {known}")
    cls = get_method(name)
    if name in SERVABLE and SERVABLE[name] is not None:
        options = SERVABLE[name](options)
    try:
        pruner = cls(**options)
    except TypeError as e:
        raise ConfigError(f"{name}: {e} (options go next to method and keep in the tokprune dict)") from None
    try:
        pruner.check(info)
    except (UnsupportedError, ValueError) as e:
        raise ConfigError(f"{name} cannot run on this model: {e}") from None
    why = reasons(pruner, info)
    if name not in SERVABLE and not why and name in RULE_REASONS:
        why = [RULE_REASONS[name]]
    if why:
        raise ConfigError(f"{name} cannot be served by vLLM: {'; '.join(why)}. Methods vLLM can serve: "
                          f"{', '.join(servable())}")
    if name not in SERVABLE:
        raise ConfigError(
            f"{name} is not enabled for vLLM: its kept sets have not been compared with tokprune's Hugging Face "
            f"path (tokprune_vllm.methods.register_servable({name!r}) enables it once they are). Methods vLLM can "
            f"serve: {', '.join(servable())}")
    if getattr(pruner, "score_dtype", "float32") != "float32":
        raise ConfigError(f"{name}: score_dtype={pruner.score_dtype!r} is not supported by the vLLM plugin (it "
                          "computes attention scores in float32, tokprune's default)")
    if pruner.resolved_positions(info) == "original" and info.supports_compact:
        raise ConfigError(f"{name}: positions='original' keeps gaps in LLaVA's 1-D positions, which a vLLM prompt "
                          "cannot express (its placeholders are numbered contiguously); leave positions unset")
    return pruner
