"""Depth-reduced real-width proxies: the real config (widths, heads, FFN, vocabulary, vision tower) with fewer
layers, so a CPU can time prefills at real shapes in minutes.

Every layer of a stack has the same shapes, so the time of a layer and what pruning saves in it are the same in
the proxy as in the real model; what changes is the weight of the parts (vision encoder, LLM layers before and after
an in-LLM stage, lm_head) in the total. The analytic FLOPs of a proxy are therefore computed from the *reduced*
config (``tokprune.flops`` reads the layer counts), which is the bound a measured proxy speed-up is compared with;
:func:`full_depth_ratio` gives the bound of the real model for the same pruning.

Rules (:func:`reduce_depth`): the proxy keeps the *first* N decoder layers and the first M vision layers.
Per-layer lists are cut to the same length (``layer_types``); Qwen2.5-VL keeps the full-attention blocks among
its first M (``fullatt_block_indexes`` < M: M = 8 keeps block 7, one full-attention block per 8 as in the real
32-block ViT) and its last block is always a full-attention one, as the real ViT's last block (31) is: M = 4 gives
blocks 0-2 windowed and block 3 full, so methods that read a full-attention block (VFlowOpt) run on the proxy;
Qwen3-VL keeps its DeepStack taps among the first M blocks. LLaVA's
``vision_feature_layer`` counts from the end (-2), so it stays the second-to-last layer of the proxy; a
non-negative feature layer that the proxy would not have is an error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

#: vision-config attributes holding the number of layers, by family
_VISION_DEPTH_KEYS = ("num_hidden_layers", "depth")


@dataclass(frozen=True)
class Depth:
    """Layer counts of a proxy against the real model: ``(used, real)`` for the LLM and the vision encoder."""

    llm: tuple[int, int]
    vision: tuple[int, int] | None
    notes: tuple[str, ...] = ()

    @property
    def is_proxy(self) -> bool:
        return self.llm[0] != self.llm[1] or (self.vision is not None and self.vision[0] != self.vision[1])

    def label(self) -> str:
        """e.g. ``depth-reduced proxy: LLM 4 of 32 layers, vision 24 of 24 layers``."""
        parts = [f"LLM {self.llm[0]} of {self.llm[1]} layers"]
        if self.vision is not None:
            parts.append(f"vision {self.vision[0]} of {self.vision[1]} layers")
        head = "depth-reduced proxy" if self.is_proxy else "full depth"
        return f"{head}: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"llm_layers": list(self.llm), "vision_layers": list(self.vision) if self.vision else None,
                "proxy": self.is_proxy, "label": self.label(), "notes": list(self.notes)}


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _vision_depth_key(vc: Any) -> str:
    for key in _VISION_DEPTH_KEYS:
        if isinstance(getattr(vc, key, None), int):
            return key
    raise ValueError(f"cannot find the layer count of vision config {type(vc).__name__}")


def depth_of(config: Any) -> Depth:
    """The layer counts of a config as an unreduced :class:`Depth`."""
    n = _text_config(config).num_hidden_layers
    vc = getattr(config, "vision_config", None)
    m = getattr(vc, _vision_depth_key(vc)) if vc is not None else None
    return Depth((n, n), (m, m) if m is not None else None)


def _check(name: str, value: int | None, real: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= real:
        raise ValueError(f"{name} must be an integer in [1, {real}] (the real model has {real}), got {value!r}")


def reduce_depth(config: Any, llm_layers: int | None = None, vision_layers: int | None = None) -> tuple[Any, Depth]:
    """A copy of ``config`` with the first ``llm_layers`` decoder layers and the first ``vision_layers`` vision
    layers (None keeps a stack whole), and the :class:`Depth` saying what was kept. The input is not modified."""
    real = depth_of(config)
    _check("llm_layers", llm_layers, real.llm[1])
    if vision_layers is not None and real.vision is None:
        raise ValueError("vision_layers given, but the config has no vision encoder")
    if real.vision is not None:
        _check("vision_layers", vision_layers, real.vision[1])
    new = copy.deepcopy(config)
    notes: list[str] = []
    n = llm_layers if llm_layers is not None else real.llm[1]
    tc = _text_config(new)
    tc.num_hidden_layers = n
    if isinstance(getattr(tc, "layer_types", None), list):
        tc.layer_types = tc.layer_types[:n]
    vision = None
    if real.vision is not None:
        m = vision_layers if vision_layers is not None else real.vision[1]
        vc = new.vision_config
        setattr(vc, _vision_depth_key(vc), m)
        notes += _cut_vision_lists(new, vc, m, real.vision[1])
        vision = (m, real.vision[1])
    return new, Depth((n, real.llm[1]), vision, tuple(notes))


def _cut_vision_lists(config: Any, vc: Any, m: int, real_depth: int) -> list[str]:
    """Restrict the per-block index lists of a vision config to its first ``m`` blocks (of ``real_depth``); notes
    for the table."""
    notes = []
    full = getattr(vc, "fullatt_block_indexes", None)
    if isinstance(full, list):
        vc.fullatt_block_indexes = [i for i in full if i < m]
        if full and full[-1] == real_depth - 1 and m - 1 not in vc.fullatt_block_indexes:
            vc.fullatt_block_indexes.append(m - 1)  # the real ViT ends on a full-attention block: so does the proxy
        if vc.fullatt_block_indexes != full:
            notes.append(f"full-attention ViT blocks {vc.fullatt_block_indexes} (real: {full}; the last block attends "
                         "over the whole image, as the real ViT's last block does)")
    deep = getattr(vc, "deepstack_visual_indexes", None)
    if isinstance(deep, list):
        vc.deepstack_visual_indexes = [i for i in deep if i < m]
        if vc.deepstack_visual_indexes != deep:
            notes.append(f"DeepStack taps {vc.deepstack_visual_indexes or 'none'} (real: {deep})")
    feature = getattr(config, "vision_feature_layer", None)
    for f in feature if isinstance(feature, (list, tuple)) else [feature]:
        if isinstance(f, int) and f >= 0 and f > m:
            raise ValueError(f"vision_feature_layer {f} does not exist in a {m}-layer proxy; keep more vision layers")
    return notes


def full_depth_ratio(full_config: Any, record: Any, **geometry: Any) -> float:
    """Analytic whole-model prefill FLOPs (``logits_to_keep=1``) of the *real-depth* model pruned as the proxy's
    ``record`` says (stage layers and kept tokens carry over), as a fraction of the same prompt unpruned."""
    from tokprune import flops

    report = flops.record_report(full_config, record, logits_to_keep=1, **geometry)
    return report.total / report.baseline.total
