"""What a pruning model holds for one engine: the method, its budget, its encoder taps; shared by the families.

A family module (:mod:`tokprune_vllm.llava`, :mod:`tokprune_vllm.qwen2_vl`) builds a :class:`Pruning` in its
model's ``__init__`` from the HF config (None without settings: the model is then vLLM's own) and calls
:meth:`Pruning.prune` on the encoder's per-image outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tokprune.pruners.base import ModelInfo, Signal
from tokprune.selection import Placement
from tokprune_vllm import config as cfg
from tokprune_vllm.methods import DOWNSAMPLE, make_pruner
from tokprune_vllm.selection import EncoderTaps, check_request, select, vision_budget


def tensor_parallel_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):  # no parallel state (a unit test building the model alone)
        return 1


class Pruning:
    """The engine's pruning: ``settings`` from the HF config, ``info`` the model as tokprune describes it.

    ``layer_of(layer)``: (encoder layer, its attention module) of a 0-based layer (tapped for signals), or None
    when vLLM did not build that layer (LLaVA's CLIP stops at the feature layer).
    """

    def __init__(self, settings: cfg.Settings, info: ModelInfo,
                 layer_of: Callable[[int], tuple[nn.Module, nn.Module] | None]) -> None:
        if tensor_parallel_size() != 1:
            raise cfg.ConfigError("tokprune: tensor parallelism shards the encoder's heads across ranks, and the "
                                  "signals are head means; serve with tensor_parallel_size=1 (or data parallel)")
        self.settings, self.info = settings, info
        self.downsample = settings.method == DOWNSAMPLE
        self.pruner = None if self.downsample else make_pruner(settings.method, settings.options, info)
        if self.downsample and settings.options:
            raise cfg.ConfigError(f"downsample takes no options, got {sorted(settings.options)}")
        self.request = self.pruner.vision_request(info) if self.pruner is not None else None
        check_request(self.request, settings.method)
        self.positions = self.pruner.resolved_positions(info) if self.pruner is not None else "compact"
        attention: dict[int, nn.Module] = {}
        blocks: dict[int, nn.Module] = {}
        for sig in self.request.signals if self.request is not None else ():
            if sig.layer is None:
                continue
            mods = layer_of(sig.layer)
            if mods is None:
                raise cfg.ConfigError(
                    f"{settings.method} reads encoder layer {sig.layer}, which vLLM does not build for this model "
                    f"(it stops at the feature layer {info.feature_layer}); pass a layer <= {info.feature_layer}")
            if sig.kind == "hidden_out":
                blocks[sig.layer] = mods[0]
            else:
                attention[sig.layer] = mods[1]
        self.taps = EncoderTaps(attention, blocks) if attention or blocks else None

    # ---------------------------------------------------------------- counts (processor side)
    def kept_count(self, n_visual: int) -> int:
        """Tokens an image of ``n_visual`` tokens keeps (what the processor writes as placeholders)."""
        if self.pruner is None:
            raise RuntimeError("downsample counts are family-specific")
        return vision_budget(self.pruner, self.info, n_visual, self.settings.budget)

    # ---------------------------------------------------------------- encoder side
    def begin(self) -> None:
        """A new encoder call starts: forget the last one's taps."""
        if self.taps is not None:
            self.taps.clear()

    def prune(self, features: list[torch.Tensor], per_call: Callable[[list[torch.Tensor], str], list[torch.Tensor]],
              pixels: list[torch.Tensor] | None, grid: list[torch.Tensor]) -> list[Placement]:
        """Placements of each image of one encoder call. ``per_call(values, kind)`` maps one signal's values, one
        per attention call ((B, n_patches, ...) each, in call order) or per layer call (``hidden_out``: the
        layer's output), to per-token values per image (the family's layout: [CLS] column, merge units, window
        order); ``pixels``: per image, per token un-normalised pixels."""
        values: dict[Signal, list[torch.Tensor]] = {}
        for sig in self.request.signals:
            if sig.kind == "pixels":
                if pixels is None:
                    raise ValueError("the encoder input was precomputed embeddings: no pixels to read")
                values[sig] = pixels
                continue
            values[sig] = per_call(self.taps.values(sig), sig.kind)
        keeps = [vision_budget(self.pruner, self.info, int(f.shape[0]), self.settings.budget) for f in features]
        placements = select(self.pruner, self.info, self.request, features, values, grid, keeps, self.positions)
        record([p.slots.tolist() for p in placements])
        return placements


#: environment variable naming a file that receives one JSON line per encoder call: each image's kept slots (the
#: CI comparison reads it; off unless set)
RECORD_ENV = "TOKPRUNE_VLLM_RECORD"


def record(kept: list[list[int]]) -> None:
    """Append one encoder call's kept slots per image to the file named by :data:`RECORD_ENV`, if set."""
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(kept) + "\n")


def check_engine(vllm_config: Any) -> None:
    """Engine options the pruning cannot run under, refused at start with the fix."""
    if getattr(vllm_config.compilation_config, "compile_mm_encoder", False):
        raise cfg.ConfigError("tokprune: a compiled vision encoder (compile_mm_encoder) runs without the plugin's "
                              "taps on its layers; leave compile_mm_encoder off (the LLM can still be compiled)")


def from_config(hf_config: Any, info_of: Callable[[], ModelInfo],
                layer_of: Callable[[int], tuple[nn.Module, nn.Module] | None]) -> Pruning | None:
    """The engine's :class:`Pruning`, or None when the HF config asks for none."""
    settings = cfg.read(hf_config)
    if settings is None:
        return None
    return Pruning(settings, info_of(), layer_of)
